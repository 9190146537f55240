"""A deliberately low-level DICOM peer for tests: it speaks the upper layer byte by byte, so
tests can send what real libraries refuse to (mismatched UIDs, hostile UIDs, malformed or
oversized PDUs, stalls) and see exactly what the server answers."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@dataclass
class Accepted:
    contexts: dict[int, tuple[str, str]]  # context id -> (abstract syntax, transfer syntax)
    max_pdu: int


@dataclass
class Rejected:
    result: int
    source: int
    reason: int


def encode_dataset(ds: Dataset, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    implicit = transfer_syntax == "1.2.840.10008.1.2"
    out = encode(ds, implicit, True)
    assert out is not None
    return out


def _element(tag: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    body = b"".join(
        [
            _element(0x00000002, sop_class.encode("latin-1")),
            _element(0x00000100, struct.pack("<H", 0x0001)),
            _element(0x00000110, struct.pack("<H", message_id)),
            _element(0x00000700, struct.pack("<H", 0)),
            _element(0x00000800, struct.pack("<H", 0x0000)),
            _element(0x00001000, sop_instance.encode("latin-1")),
        ]
    )
    return _element(0x00000000, struct.pack("<L", len(body))) + body


def pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


class RawPeer:
    def __init__(self, host: str, port: int, timeout: float = 5.0, bind: str | None = None):
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(bind, 0) if bind else None
        )
        self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by server")
            buf += chunk
        return buf

    def recv_pdu(self) -> tuple[int, bytes]:
        header = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, header + self._recv_exact(length)

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (reading an A-ABORT first is fine);
        False if it sends anything else or keeps the connection open past the timeout."""
        try:
            while True:
                pdu_type, _ = self.recv_pdu()
                if pdu_type != 0x07:
                    return False
        except TimeoutError:
            return False
        except (ConnectionError, OSError):
            return True

    def associate(
        self,
        calling: str,
        called: str = "PACS_AI",
        contexts: list[tuple[str, list[str]]] | None = None,
        max_pdu: int = 16384,
    ) -> Accepted | Rejected:
        rq = A_ASSOCIATE()
        rq.application_context_name = "1.2.840.10008.3.1.1.1"
        rq.calling_ae_title = calling
        rq.called_ae_title = called
        cxs = []
        for i, (abstract, syntaxes) in enumerate(contexts or [], start=0):
            cx = PresentationContext()
            cx.context_id = 2 * i + 1
            cx.abstract_syntax = abstract
            cx.transfer_syntax = syntaxes
            cxs.append(cx)
        rq.presentation_context_definition_list = cxs
        ml = MaximumLengthNotification()
        ml.maximum_length_received = max_pdu
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = "1.2.3.4.5"
        rq.user_information = [ml, impl]
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(rq)
        self.send_raw(pdu.encode())
        pdu_type, data = self.recv_pdu()
        if pdu_type == 0x03:
            return Rejected(data[7], data[8], data[9])
        assert pdu_type == 0x02, f"unexpected PDU 0x{pdu_type:02X}"
        ac = A_ASSOCIATE_AC()
        ac.decode(data)
        prim = ac.to_primitive()
        accepted = {
            int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in prim.presentation_context_definition_results_list
            if cx.result == 0
        }
        return Accepted(accepted, int(prim.maximum_length_received or 0))

    def c_store(
        self,
        context_id: int,
        sop_class: str,
        sop_instance: str,
        dataset: bytes,
        fragment: int = 16000,
        message_id: int = 1,
    ) -> int:
        """Send a C-STORE-RQ with these exact values; returns the response status."""
        self.send_raw(pdata(context_id, 0x03, store_command(sop_class, sop_instance, message_id)))
        for start in range(0, len(dataset), fragment):
            last = start + fragment >= len(dataset)
            self.send_raw(
                pdata(context_id, 0x02 if last else 0x00, dataset[start : start + fragment])
            )
        return self.read_status()

    def read_status(self) -> int:
        pdu_type, data = self.recv_pdu()
        assert pdu_type == 0x04, f"expected P-DATA, got 0x{pdu_type:02X}"
        command = data[12:]  # PDU header 6 + PDV length 4 + context id + control header
        pos = 0
        while pos < len(command):
            group, elem, length = struct.unpack_from("<HHL", command, pos)
            value = command[pos + 8 : pos + 8 + length]
            if (group, elem) == (0x0000, 0x0900):
                return int(struct.unpack("<H", value)[0])
            pos += 8 + length
        raise AssertionError("no Status in the response")

    def release(self) -> bool:
        self.send_raw(struct.pack(">BBLL", 0x05, 0, 4, 0))
        pdu_type, _ = self.recv_pdu()
        return pdu_type == 0x06
