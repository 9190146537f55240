"""Our hand-encoded DIMSE responses and File Meta header, checked by independent decoders
(pydicom, pynetdicom)."""

from __future__ import annotations

import struct
from io import BytesIO

import pydicom
import pytest
from pynetdicom.dsutils import decode

from pacs_ai.errors import ProtocolError
from pacs_ai.ingest import protocol as p
from pacs_ai.ingest.spool import part10_header

CT = "1.2.840.10008.5.1.4.1.1.2"


def _command_bytes(pdu: bytes) -> bytes:
    assert pdu[0] == 0x04
    pdvs = list(p.iter_pdvs(memoryview(pdu[6:])))
    assert pdvs[-1][1] == 0x03  # command, last fragment
    return b"".join(bytes(f) for _, _, f in pdvs)


def _command_of(pdu: bytes) -> pydicom.Dataset:
    return decode(BytesIO(_command_bytes(pdu)), True, True)


def test_store_response_decodes_with_pydicom() -> None:
    pdu = p.store_response(5, 16384, 77, CT, "1.2.3.4", 0xA900, "mismatch")
    cmd = _command_of(pdu)
    assert cmd.CommandField == 0x8001 and cmd.MessageIDBeingRespondedTo == 77
    assert cmd.Status == 0xA900 and cmd.ErrorComment == "mismatch"
    assert cmd.AffectedSOPClassUID == CT and cmd.AffectedSOPInstanceUID == "1.2.3.4"
    assert cmd.CommandDataSetType == 0x0101
    # Group length counts every byte after its own 12-byte element.
    assert cmd.CommandGroupLength == len(_command_bytes(pdu)) - 12


def test_response_fragments_within_small_peer_pdu() -> None:
    data = p.store_response(1, 40, 1, CT, "1.2.3.4.5.6.7.8.9", 0)
    pos, fragments = 0, []
    while pos < len(data):
        length = struct.unpack_from(">L", data, pos + 2)[0]
        assert length <= 40
        fragments += list(p.iter_pdvs(memoryview(data[pos + 6 : pos + 6 + length])))
        pos += 6 + length
    assert len(fragments) > 1 and fragments[-1][1] == 0x03
    assert all(c == 0x01 for _, c, _ in fragments[:-1])


def test_echo_response_and_command_parsing() -> None:
    cmd = _command_of(p.echo_response(1, 0, 9))
    assert cmd.CommandField == 0x8030 and cmd.Status == 0
    body = b"".join(
        struct.pack("<HHL", 0, e, len(v)) + v
        for e, v in [
            (0x0100, struct.pack("<H", 1)),
            (0x0110, struct.pack("<H", 3)),
            (0x0800, struct.pack("<H", 0)),
            (0x1000, b"1.2.3\x00"),
        ]
    )
    parsed = p.decode_command(body)
    assert parsed.command_field == 1 and parsed.message_id == 3 and parsed.has_dataset
    assert parsed.sop_instance_uid == "1.2.3" and parsed.sop_class_uid == ""


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00",
        struct.pack("<HHL", 0, 0x100, 100) + b"\x00\x00",
        struct.pack("<HHL", 8, 0x18, 2) + b"\x00\x00",
    ],
    ids=["short", "length-overrun", "not-group-0"],
)
def test_malformed_commands(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode_command(data)


def test_malformed_pdv_items() -> None:
    with pytest.raises(ProtocolError):
        list(p.iter_pdvs(memoryview(struct.pack(">LBB", 100, 1, 3) + b"xx")))
    with pytest.raises(ProtocolError):
        list(p.iter_pdvs(memoryview(b"\x00\x00")))


def test_part10_header_reads_back() -> None:
    header = part10_header(CT, "1.2.3.4", "1.2.840.10008.1.2.1", "MODALITY1")
    ds = pydicom.dcmread(BytesIO(header + b""), force=True)
    meta = ds.file_meta
    assert meta.MediaStorageSOPClassUID == CT and meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert meta.FileMetaInformationGroupLength == len(header) - 144
