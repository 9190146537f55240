"""The bounded dataset walk: codestream frame headers, the capped inflater, element
structure, PDV → message assembly, and log redaction."""

from __future__ import annotations

import io
import logging
import struct
import tracemalloc
import zlib
from pathlib import Path

import jpeg_ls
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_ai.errors import IncompleteDataset, InflateLimitExceeded, InvalidDataset, ProtocolError
from pacs_ai.imaging.codestream import FrameSize, j2k_frames, jpeg_frames
from pacs_ai.ingest import protocol as p
from pacs_ai.ingest import validation
from pacs_ai.ingest.inflate import FileSource, InflatingSource
from pacs_ai.ingest.messages import COMMAND, DATA, MessageAssembler
from pacs_ai.ingest.spool import part10_header
from pacs_ai.ingest.structure import CodestreamKind, walk
from pacs_ai.ingest.validation import Limits
from pacs_ai.logs import RedactingFilter, safe_traceback, uid_ref
from tests import dicomfaults as f
from tests.conftest import dx_dataset
from tests.integration.rawpeer import encode_dataset, pdata, store_command

SMALL = FrameSize(64, 64, 1, 8)
HUGE = FrameSize(40000, 40000, 1, 8)


def _frames_jpeg(data: bytes, ls: bool = False) -> list[FrameSize]:
    return jpeg_frames(io.BytesIO(data), len(data), ls)


def _frames_j2k(data: bytes) -> list[FrameSize]:
    return j2k_frames(io.BytesIO(data), len(data))


def test_jpeg_frame_headers_found_wherever_they_sit() -> None:
    assert _frames_jpeg(f.jpeg_frame()) == [SMALL]
    assert _frames_jpeg(f.jpeg_huge_sof_after_padding()) == [HUGE, SMALL]
    assert _frames_jpeg(f.jpeg_second_image_after_eoi()) == [SMALL, HUGE]
    # A frame header hidden in the scan data (not byte-stuffed) is a marker, so it is found.
    frame = f.jpeg_frame()
    eoi = frame.rindex(b"\xff\xd9")
    assert _frames_jpeg(frame[:eoi] + f.sof0(40000, 40000) + frame[eoi:]) == [SMALL, HUGE]
    assert _frames_jpeg(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xd9") == []


def test_jpeg_ls_frame_headers_and_oversize_segment() -> None:
    pixels = (np.arange(512 * 512) % 4000).astype(np.uint16).reshape(512, 512)
    frame = bytes(jpeg_ls.encode(pixels))
    assert _frames_jpeg(frame, ls=True) == [FrameSize(512, 512, 1, 12)]
    # LSE id 4 (oversize image dimension) redefines the size: reported as a frame.
    sof = frame.index(b"\xff\xf7")
    lse = b"\xff\xf8" + struct.pack(">HBB", 2 + 1 + 1 + 8, 4, 4) + struct.pack(">LL", 9, 70000)
    assert _frames_jpeg(frame[: sof + 13] + lse + frame[sof + 13 :], ls=True)[-1] == (
        FrameSize(9, 70000, 1, 12)
    )


def test_j2k_siz_and_any_following_codestream() -> None:
    assert _frames_j2k(f.j2k_frame()) == [SMALL]
    assert _frames_j2k(f.j2k_huge_siz()) == [HUGE]
    assert _frames_j2k(f.j2k_second_codestream()) == [SMALL, HUGE]
    # Zero padding after EOC (fragments are even-length) is fine.
    assert _frames_j2k(f.j2k_frame() + b"\x00") == [SMALL]


def test_inflater_refuses_a_bomb_in_bounded_memory() -> None:
    bomb = f.deflate_bomb(b"header", 1 << 30)  # ~1 MB -> 1 GiB
    limit = InflatingSource.limit_for(len(bomb), 2 << 30, 100.0)
    assert limit == len(bomb) * 100 + 16 * 1024 * 1024
    src = InflatingSource(io.BytesIO(bomb), 0, len(bomb), limit)
    tracemalloc.start()
    with pytest.raises(InflateLimitExceeded):
        src.skip(1 << 31)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert src.inflated <= limit + 256 * 1024
    assert peak < 8 * 1024 * 1024


def test_inflater_reads_what_was_deflated() -> None:
    data = bytes(range(256)) * 4000
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(data) + c.flush()
    src = InflatingSource(io.BytesIO(deflated), 0, len(deflated), 10 << 20)
    assert src.read(10) == data[:10] and src.peek(5) == data[10:15]
    assert src.skip(len(data) - 20) and src.read(100) == data[-10:] and src.at_end()


def test_inflater_ends_at_the_end_of_the_deflate_stream() -> None:
    """Bytes after the deflate stream's last block (padding, as in pydicom's image_dfl.dcm)
    are ignored; the reader ends instead of spinning (it once did)."""
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = c.compress(b"abc" * 1000) + c.flush() + b"\x00\x00junk"
    src = InflatingSource(io.BytesIO(deflated), 0, len(deflated), 1 << 20)
    assert src.read(10_000) == b"abc" * 1000
    assert src.at_end() and not src.skip(1)


def _walk(data: bytes) -> object:
    return walk(FileSource(io.BytesIO(data), 0, len(data)), False, True, CodestreamKind.NONE)


def test_walk_refuses_elements_running_past_the_end() -> None:
    data = encode_dataset(f.dx_dataset(size=16))
    walked = _walk(data)
    name_at = data.index(b"\x10\x00\x10\x00PN")
    with pytest.raises(IncompleteDataset):
        _walk(data[: name_at + 3])  # inside an element header
    with pytest.raises(IncompleteDataset):
        _walk(data[: name_at + 10])  # inside a value
    assert walked.pixel is not None and walked.pixel.length == 16 * 16 * 2  # type: ignore[attr-defined]
    assert 0x00100010 in walked.raw  # type: ignore[attr-defined]
    # An undefined-length sequence that is never delimited.
    open_sq = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    with pytest.raises(IncompleteDataset):
        _walk(open_sq + item)
    with pytest.raises(InvalidDataset):
        unknown_vr = b"\x10\x00\x20\x00ZZ\x02\x00ab"
        _walk(struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 2) + b"ab" + unknown_vr)


def test_message_assembler_order_rules() -> None:
    cmd = store_command("1.2.3", "1.2.3.4")
    asm = MessageAssembler({1})

    def body(pdu: bytes) -> memoryview:
        return memoryview(pdu)[6:]

    events = list(asm.feed(body(pdata(1, 0x03, cmd))))
    assert [e[0] for e in events] == [COMMAND] and asm.in_message
    events = list(asm.feed(body(pdata(1, 0x00, b"ab"))))
    events += list(asm.feed(body(pdata(1, 0x02, b"cd"))))
    fragments = [(e[0], bytes(e[2]), e[3]) for e in events]
    assert fragments == [(DATA, b"ab", False), (DATA, b"cd", True)]
    assert not asm.in_message
    with pytest.raises(ProtocolError):
        list(asm.feed(body(pdata(1, 0x02, b"x"))))  # dataset before a command
    with pytest.raises(ProtocolError):
        list(MessageAssembler({1}).feed(body(pdata(3, 0x03, cmd))))  # context not accepted
    assert p.decode_command(cmd).sop_instance_uid == "1.2.3.4"


def test_redacting_filter_and_tracebacks() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    record = logging.LogRecord(
        "pydicom", logging.ERROR, __file__, 1, "Invalid value %s for %r", (uid, "Doe^Jane"), None
    )
    assert RedactingFilter().filter(record)
    assert record.getMessage() == f"Invalid value {uid_ref(uid)} for '…'"
    own = logging.LogRecord(
        "pacs_ai.x", logging.INFO, __file__, 1, "from 127.0.0.1 %s", (uid,), None
    )
    RedactingFilter().filter(own)
    assert own.getMessage() == f"from 127.0.0.1 {uid_ref(uid)}"
    try:
        raise ValueError("Doe^Jane")
    except ValueError as exc:
        text = safe_traceback((ValueError, exc, exc.__traceback__))
    assert "ValueError" in text and "test_ingest_walk.py" in text and "Doe" not in text


# --- the fast header decoder equals pydicom's reading ---------------------------------------


def _spooled(tmp_path: Path, ds: Dataset, ts: str) -> Path:
    fp = DicomBytesIO()
    fp.is_implicit_VR = ts == ImplicitVRLittleEndian
    fp.is_little_endian = ts != ExplicitVRBigEndian
    write_dataset(fp, ds)
    path = tmp_path / "x.dcm"
    path.write_bytes(part10_header(ds.SOPClassUID, ds.SOPInstanceUID, ts, "SCU") + fp.getvalue())
    return path


def _header_dataset_for_test(charset: str, name: str) -> Dataset:
    ds = dx_dataset(size=16)
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = " leading space kept "
    ds.SeriesDescription = "x" * 64
    ds.SeriesNumber = " 12"
    ds.InstanceNumber = "+7"
    ds.AccessionNumber = ""
    ds.Modality = "DX "
    ds.BodyPartExamined = "CHEST"
    return ds


@pytest.mark.parametrize(
    "ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
)
@pytest.mark.parametrize(
    ("charset", "name"),
    [("", "Doe^Jane  "), ("ISO_IR 100", "Müller^Zoë"), ("ISO_IR 192", "山田^太郎")],
)
def test_fast_header_values_equal_pydicoms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ts: str, charset: str, name: str
) -> None:
    ds = _header_dataset_for_test(charset, name)
    path = _spooled(tmp_path, ds, ts)
    limits = Limits(1 << 30, 1 << 31, 100.0)
    args = (path, ts, ds.SOPClassUID, ds.SOPInstanceUID, limits)
    walked = validation.walk_file(path, UID(ts), limits)
    assert validation._fast_values(walked) is not None  # the fast path is taken
    fast = validation.read_and_validate(*args)
    monkeypatch.setattr(validation, "_fast_values", lambda _walked: None)
    assert validation.read_and_validate(*args) == fast
    assert fast.patient_name == name.rstrip()
    assert (fast.series_number, fast.instance_number, fast.modality) == (12, 7, "DX")
    assert fast.study_description == " leading space kept"
    assert fast.accession_number is None


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("SpecificCharacterSet", "ISO 2022 IR 87"),  # a charset left to pydicom
        ("InstanceNumber", ["1", "2"]),  # multi-valued
        ("SeriesNumber", "12.0"),  # not a plain integer string
        ("PatientName", ["A^B", "C^D"]),
        ("PatientName", "Yamada^Tarou=Y^T"),  # component groups: pydicom's PersonName decides
    ],
)
def test_fast_header_falls_back_to_pydicom(tmp_path: Path, keyword: str, value: object) -> None:
    ds = _header_dataset_for_test("", "Doe^Jane")
    setattr(ds, keyword, value)
    path = _spooled(tmp_path, ds, ExplicitVRLittleEndian)
    walked = validation.walk_file(path, UID(ExplicitVRLittleEndian), Limits(1 << 30, 1 << 31, 1.0))
    assert validation._fast_values(walked) is None


def test_fast_header_falls_back_on_odd_us_and_vr_mismatch(tmp_path: Path) -> None:
    ds = _header_dataset_for_test("", "Doe^Jane")
    path = _spooled(tmp_path, ds, ExplicitVRLittleEndian)
    data = path.read_bytes()
    limits = Limits(1 << 30, 1 << 31, 1.0)
    rows = struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 2)
    assert rows in data
    for replacement in (
        struct.pack("<HH2sH", 0x0028, 0x0010, b"SS", 2),  # a VR other than the dictionary's
        struct.pack("<HH2sH", 0x0028, 0x0010, b"US", 4) + b"\x10\x00",  # two values
    ):
        path.write_bytes(data.replace(rows, replacement, 1))
        walked = validation.walk_file(path, UID(ExplicitVRLittleEndian), limits)
        assert validation._fast_values(walked) is None
