"""DICOM upper layer framing (PS3.8 §9): reading PDUs from a socket, writing the few we send.

Why not pynetdicom's own acceptor: its reactor polls queues with 1 ms sleeps across two
threads and reads sockets 4 KiB at a time; measured here it takes ~7 ms per 512 KiB
instance before any disk work, which alone misses our ingest target (DESIGN.md §8). This
module reads each PDU with two ``recv_into`` calls into a reused buffer, and the association
thread streams dataset fragments straight into the spool. pynetdicom still does the hard
parts (A-ASSOCIATE-RQ/AC codecs, presentation context negotiation); the two DIMSE commands we
answer (C-STORE, C-ECHO) are small fixed structures encoded here directly, since encoding them
through pydicom cost more than a millisecond per instance.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

from pacs_ai.errors import ProtocolError

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
_KNOWN_PDU_TYPES = frozenset(range(1, 8))

# A-ASSOCIATE-RQ carries presentation contexts and user identity; 1 MiB is far above any real
# request and bounds what a peer can make us buffer before it is even associated.
MAX_ASSOCIATE_RQ_LENGTH = 1024 * 1024
# Some implementations count the PDU header in their P-DATA size; tolerate that much.
_PDATA_SLACK = 16

ABORT_NOT_SPECIFIED = 0  # A-ABORT provider reason (PS3.8 Table 9-26); others on ProtocolError

COMMAND_C_STORE_RQ = 0x0001
COMMAND_C_ECHO_RQ = 0x0030
NO_DATASET = 0x0101


class Stopping(Exception):
    """The server is shutting down while the association was idle."""


class PeerClosed(ProtocolError):
    """The peer closed the connection."""


class PduTimeout(ProtocolError):
    """No data within the timeout."""


class PduStream:
    """Blocking PDU reader/writer over one (possibly TLS) socket."""

    def __init__(self, sock: socket.socket, max_pdata_length: int) -> None:
        self.sock = sock
        self._header = bytearray(6)
        self._max_pdata = max_pdata_length + _PDATA_SLACK
        self._buf = bytearray(max(self._max_pdata, 4096))
        self.bytes_read = 0

    def _recv_exact(self, view: memoryview, deadline: float) -> None:
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PduTimeout("peer stalled")
            self.sock.settimeout(remaining)
            try:
                n = self.sock.recv_into(view)
            except TimeoutError as exc:
                raise PduTimeout("peer stalled") from exc
            except (ssl.SSLError, OSError) as exc:
                raise PeerClosed(f"connection error: {exc.__class__.__name__}") from exc
            if n == 0:
                raise PeerClosed("connection closed by peer")
            self.bytes_read += n
            view = view[n:]

    def wait_readable(self, idle_timeout: float, stop: threading.Event) -> None:
        """Wait for the next PDU while idle, waking every 0.5 s to honour ``stop``."""
        deadline = time.monotonic() + idle_timeout
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
        while not pending:
            if stop.is_set():
                raise Stopping()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PduTimeout("association idle too long")
            r, _, _ = select.select([self.sock], [], [], min(0.5, remaining))
            pending = bool(r)

    def read_pdu(self, timeout: float) -> tuple[int, memoryview]:
        """Read one PDU within ``timeout`` seconds in total (header and body together: a
        peer trickling bytes gains nothing); returns (type, body) where body excludes the
        6-byte header. The body view is only valid until the next call.
        """
        deadline = time.monotonic() + timeout
        self._recv_exact(memoryview(self._header), deadline)
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        if pdu_type not in _KNOWN_PDU_TYPES:
            raise ProtocolError(
                f"unknown PDU type 0x{pdu_type:02X}", ProtocolError.UNRECOGNIZED_PDU
            )
        if pdu_type == P_DATA:
            limit = self._max_pdata
        elif pdu_type == A_ASSOCIATE_RQ:
            limit = MAX_ASSOCIATE_RQ_LENGTH
        else:
            limit = 1024
        if length > limit:
            raise ProtocolError(f"PDU length {length} exceeds the limit {limit}")
        if length > len(self._buf):
            self._buf = bytearray(length)
        body = memoryview(self._buf)[:length]
        self._recv_exact(body, deadline)
        return pdu_type, body

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ssl.SSLError, OSError) as exc:
            raise PeerClosed(f"send failed: {exc.__class__.__name__}") from exc


def abort_pdu(source: int = 2, reason: int = ABORT_NOT_SPECIFIED) -> bytes:
    return struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, source, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBLBBBB", A_ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


def release_rp_pdu() -> bytes:
    return struct.pack(">BBLL", A_RELEASE_RP, 0, 4, 0)


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """Yield (context_id, message control header, fragment) for each PDV of a P-DATA-TF."""
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            raise ProtocolError("truncated PDV item")
        (item_len,) = struct.unpack_from(">L", body, pos)
        if item_len < 2 or pos + 4 + item_len > end:
            raise ProtocolError("PDV item length out of range")
        context_id = body[pos + 4]
        control = body[pos + 5]
        yield context_id, control, body[pos + 6 : pos + 4 + item_len]
        pos += 4 + item_len


class Command:
    """A decoded DIMSE command set: the few elements C-STORE/C-ECHO need, read directly
    from its Implicit VR Little Endian encoding (PS3.7 §6.3.1)."""

    __slots__ = ("_elements",)

    def __init__(self, elements: dict[int, bytes]) -> None:
        self._elements = elements

    def us(self, tag: int, default: int = -1) -> int:
        raw = self._elements.get(tag)
        if raw is None or len(raw) != 2:
            return default
        return int(struct.unpack("<H", raw)[0])

    def uid(self, tag: int) -> str:
        raw = self._elements.get(tag, b"")
        return raw.decode("ascii", "replace").rstrip("\x00 ")

    @property
    def command_field(self) -> int:
        return self.us(0x00000100)

    @property
    def message_id(self) -> int:
        return self.us(0x00000110, 0)

    @property
    def has_dataset(self) -> bool:
        return self.us(0x00000800, NO_DATASET) != NO_DATASET

    @property
    def sop_class_uid(self) -> str:
        return self.uid(0x00000002)

    @property
    def sop_instance_uid(self) -> str:
        return self.uid(0x00001000)


def decode_command(data: bytes) -> Command:
    """Decode a DIMSE command set (always Implicit VR Little Endian, group 0000 only)."""
    elements: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise ProtocolError("truncated DIMSE command set")
        group, elem, length = struct.unpack_from("<HHL", data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ProtocolError("malformed DIMSE command set")
        elements[(group << 16) | elem] = data[pos : pos + length]
        pos += length
    return Command(elements)


def _element(tag: int, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def _command_pdu(elements: list[bytes], context_id: int, peer_max_pdu: int) -> bytes:
    body = b"".join(elements)
    command = _element(0x00000000, struct.pack("<L", len(body)), b"") + body
    # One PDV per PDU, each within the peer's maximum PDU length (6 bytes of PDV header).
    step = max(peer_max_pdu - 6, 1) if peer_max_pdu else len(command)
    out = bytearray()
    for start in range(0, len(command), step):
        chunk = command[start : start + step]
        control = 0x03 if start + step >= len(command) else 0x01
        pdv = struct.pack(">LBB", len(chunk) + 2, context_id, control) + chunk
        out += struct.pack(">BBL", P_DATA, 0, len(pdv)) + pdv
    return bytes(out)


def _us(tag: int, value: int) -> bytes:
    return _element(tag, struct.pack("<H", value), b"")


def _ui(tag: int, value: str) -> bytes:
    return _element(tag, value.encode("ascii"), b"\x00")


def store_response(
    context_id: int,
    peer_max_pdu: int,
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    status: int,
    comment: str | None = None,
) -> bytes:
    """Encode a C-STORE-RSP (PS3.7 §9.3.1.2)."""
    elements = []
    if sop_class_uid:
        elements.append(_ui(0x00000002, sop_class_uid))
    elements += [
        _us(0x00000100, 0x8001),
        _us(0x00000120, message_id),
        _us(0x00000800, NO_DATASET),
        _us(0x00000900, status),
    ]
    if comment and status != 0:
        text = comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x00000902, text, b" "))
    if sop_instance_uid:
        elements.append(_ui(0x00001000, sop_instance_uid))
    return _command_pdu(elements, context_id, peer_max_pdu)


def echo_response(context_id: int, peer_max_pdu: int, message_id: int) -> bytes:
    """Encode a C-ECHO-RSP with Success (PS3.7 §9.3.5.2)."""
    elements = [
        _ui(0x00000002, "1.2.840.10008.1.1"),
        _us(0x00000100, 0x8030),
        _us(0x00000120, message_id),
        _us(0x00000800, NO_DATASET),
        _us(0x00000900, 0x0000),
    ]
    return _command_pdu(elements, context_id, peer_max_pdu)
