"""Checks on a received dataset before it may be acknowledged.

Tolerant where real devices differ harmlessly (leading zeros in UID components, odd pixel
padding, implicit VR sent as explicit), strict where our safety depends on it: every element
ends inside the dataset (:mod:`pacs_ai.ingest.structure`), UIDs are digits and dots only
(they are audited and later used to build SR references, never paths), Type 1 identifiers
are present, image SOP classes carry Pixel Data and the Image Pixel module, the declared
image size is sane, native Pixel Data is long enough, and compressed frame headers agree with
the image header.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Protocol

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRBigEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pacs_ai.errors import (
    CodestreamMismatch,
    DatasetMismatch,
    ImageTooLarge,
    InvalidDataset,
    InvalidUid,
    MissingAttribute,
    PixelDataError,
)
from pacs_ai.imaging.codestream import FrameSize
from pacs_ai.ingest.inflate import ByteSource, FileSource, InflatingSource
from pacs_ai.ingest.structure import UNDEFINED, CodestreamKind, PixelInfo, Walked, walk

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, name: str) -> str:
    uid = str(value or "").rstrip("\x00 ")
    if not uid:
        raise MissingAttribute(f"{name} is missing or empty")
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise InvalidUid(f"{name} is not a valid UID")
    return uid


class _Values(Protocol):
    """Element values by keyword: a pydicom :class:`Dataset` or the fast decoder's dict."""

    def get(self, key: str, /) -> object: ...


def _get(ds: _Values, keyword: str) -> object:
    """An element's value; a value pydicom cannot convert (impossible length for its VR,
    undecodable text) is an unparseable dataset, not an internal error."""
    try:
        return ds.get(keyword)
    except Exception as exc:
        raise InvalidDataset(f"{keyword} cannot be read: {exc.__class__.__name__}") from exc


def _text(ds: _Values, keyword: str, limit: int) -> str | None:
    value = _get(ds, keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: _Values, keyword: str) -> int | None:
    value = _get(ds, keyword)
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class InstanceHeader:
    """What ingest records about an instance (PHI stays in the database, never in logs)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None


@dataclass(frozen=True)
class Limits:
    max_pixel_bytes: int
    max_instance_bytes: int
    max_inflate_ratio: float


_JPEG_LS = frozenset({JPEGLSLossless, JPEGLSNearLossless})
_J2K = frozenset({JPEG2000, JPEG2000Lossless, HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL})
_IMAGE_PIXEL_MODULE = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
)


@lru_cache(maxsize=64)
def _uid(value: str) -> UID:
    """A transfer syntax as pydicom's UID (its constructor validates: cached per value)."""
    return UID(value)


@lru_cache(maxsize=512)
def is_image_storage(sop_class_uid: str) -> bool:
    """Storage SOP classes of image IODs (they carry the Image Pixel module)."""
    return "Image Storage" in UID(sop_class_uid).name


def _codestream_kind(ts: UID) -> int:
    if ts in _J2K:
        return CodestreamKind.J2K
    if ts in _JPEG_LS:
        return CodestreamKind.JPEG_LS
    if ts.is_compressed and ts != RLELossless:
        return CodestreamKind.JPEG
    return CodestreamKind.NONE


def walk_file(path: Path, transfer_syntax: UID, limits: Limits) -> Walked:
    """Walk the dataset of a spooled Part 10 file (after our File Meta group)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(144)
        if len(head) < 144 or head[128:132] != b"DICM":
            raise InvalidDataset("spool file without File Meta")
        start = 144 + int.from_bytes(head[140:144], "little")
        implicit = transfer_syntax == ImplicitVRLittleEndian
        little = transfer_syntax != ExplicitVRBigEndian
        src: ByteSource
        if transfer_syntax.is_deflated:
            limit = InflatingSource.limit_for(
                size - start, limits.max_instance_bytes, limits.max_inflate_ratio
            )
            src = InflatingSource(f, start, size, limit)
        else:
            src = FileSource(f, start, size)
        return walk(src, implicit, little, _codestream_kind(transfer_syntax))


# The wanted top-level elements (structure.WANTED): keyword and dictionary VR. All are short
# VRs, so an explicit VR element header is 8 bytes, like an implicit one.
_FAST_ELEMENTS: dict[int, tuple[str, bytes]] = {
    0x00080005: ("SpecificCharacterSet", b"CS"),
    0x00080016: ("SOPClassUID", b"UI"),
    0x00080018: ("SOPInstanceUID", b"UI"),
    0x00080020: ("StudyDate", b"DA"),
    0x00080050: ("AccessionNumber", b"SH"),
    0x00080060: ("Modality", b"CS"),
    0x00081030: ("StudyDescription", b"LO"),
    0x0008103E: ("SeriesDescription", b"LO"),
    0x00100010: ("PatientName", b"PN"),
    0x00100020: ("PatientID", b"LO"),
    0x00180015: ("BodyPartExamined", b"CS"),
    0x0020000D: ("StudyInstanceUID", b"UI"),
    0x0020000E: ("SeriesInstanceUID", b"UI"),
    0x00200011: ("SeriesNumber", b"IS"),
    0x00200013: ("InstanceNumber", b"IS"),
    0x00280002: ("SamplesPerPixel", b"US"),
    0x00280004: ("PhotometricInterpretation", b"CS"),
    0x00280008: ("NumberOfFrames", b"IS"),
    0x00280010: ("Rows", b"US"),
    0x00280011: ("Columns", b"US"),
    0x00280100: ("BitsAllocated", b"US"),
    0x00280101: ("BitsStored", b"US"),
    0x00280102: ("HighBit", b"US"),
    0x00280103: ("PixelRepresentation", b"US"),
}
# Character sets the fast decoder handles (pydicom's codecs for them); any other falls back.
_FAST_CHARSETS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO_IR 100": "latin_1"}
_FAST_CHARSETS["ISO_IR 192"] = "utf_8"
_PERSON_OR_TEXT = frozenset({b"PN", b"LO", b"SH"})
_INTEGER_STRING = re.compile(r"^ *[+-]?[0-9]{1,12} *$")
_US_LE, _US_BE = struct.Struct("<H"), struct.Struct(">H")


def _fast_values(walked: Walked) -> dict[str, object] | None:
    """Decode the wanted elements without pydicom's reader (about a millisecond per instance
    on the C-STORE hot path), or None where the header needs pydicom's tolerance: a VR other
    than the dictionary's, a multi-valued or non-integer value, an odd length, a character
    set or byte sequence beyond the simple ones. The values equal what pydicom gives for the
    same bytes (``tests/unit/test_ingest_walk.py`` compares both)."""
    charset_raw = walked.raw.get(0x00080005)
    charset = "" if charset_raw is None else charset_raw[8:].decode("latin_1").strip(" \x00")
    codec = _FAST_CHARSETS.get(charset)
    if codec is None:
        return None
    us = _US_LE if walked.little_endian else _US_BE
    out: dict[str, object] = {}
    for tag, blob in walked.raw.items():
        keyword, vr = _FAST_ELEMENTS[tag]
        if not walked.implicit and blob[4:6] != vr:
            return None
        value = blob[8:]
        if vr == b"US":
            if len(value) == 0:
                out[keyword] = None
                continue
            if len(value) != 2:
                return None
            out[keyword] = us.unpack(value)[0]
            continue
        try:
            text = value.decode(codec if vr in _PERSON_OR_TEXT else "latin_1")
        except UnicodeDecodeError:
            return None
        text = text.rstrip(" \x00")
        if "\\" in text or (vr == b"PN" and "=" in text):  # multi-valued; PN groups
            return None
        if vr == b"IS":
            if not text:
                out[keyword] = None
                continue
            if not _INTEGER_STRING.match(text):
                return None
            out[keyword] = int(text)
            continue
        out[keyword] = text
    return out


def _header_values(walked: Walked) -> _Values:
    fast = _fast_values(walked)
    return fast if fast is not None else _header_dataset(walked)


def _header_dataset(walked: Walked) -> Dataset:
    raw = b"".join(walked.raw[tag] for tag in sorted(walked.raw))
    try:
        return read_dataset(BytesIO(raw), walked.implicit, walked.little_endian)
    except Exception as exc:  # pydicom raises many types on corrupt values
        raise InvalidDataset(f"dataset cannot be parsed: {exc.__class__.__name__}") from exc


def read_and_validate(
    path: Path,
    transfer_syntax: str,
    command_sop_class: str,
    command_sop_instance: str,
    limits: Limits,
) -> InstanceHeader:
    """Walk the spooled dataset (bounded memory, nothing decoded) and check it.

    Raises a :class:`~pacs_ai.errors.StoreError` subclass naming the problem.
    """
    ts = _uid(transfer_syntax)
    walked = walk_file(path, ts, limits)
    ds = _header_values(walked)

    sop_class = check_uid(_get(ds, "SOPClassUID"), "SOPClassUID")
    sop_instance = check_uid(_get(ds, "SOPInstanceUID"), "SOPInstanceUID")
    if sop_class != command_sop_class or sop_instance != command_sop_instance:
        raise DatasetMismatch("dataset SOP Class/Instance UID differ from the C-STORE command")
    study_uid = check_uid(_get(ds, "StudyInstanceUID"), "StudyInstanceUID")
    series_uid = check_uid(_get(ds, "SeriesInstanceUID"), "SeriesInstanceUID")
    modality = _text(ds, "Modality", 16)
    if not modality:
        raise MissingAttribute("Modality is missing or empty")

    if is_image_storage(sop_class):
        if walked.pixel is None:
            raise MissingAttribute("image SOP class without Pixel Data")
        for keyword in _IMAGE_PIXEL_MODULE:
            if _text(ds, keyword, 16) is None:
                raise MissingAttribute(f"{keyword} is missing for an image")
    if walked.pixel is not None:
        _check_pixels(ds, ts, limits.max_pixel_bytes, walked.pixel)

    return InstanceHeader(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        modality=modality.strip().upper(),
        body_part=_text(ds, "BodyPartExamined", 64),
        series_number=_int(ds, "SeriesNumber"),
        series_description=_text(ds, "SeriesDescription", 64),
        instance_number=_int(ds, "InstanceNumber"),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
    )


def declared_pixel_bytes(ds: _Values) -> int:
    """Decoded size the header claims (what a decoder would allocate)."""
    for kw in ("Rows", "Columns", "BitsAllocated"):
        if _int(ds, kw) is None:
            raise MissingAttribute(f"{kw} is missing for an image with Pixel Data")
    rows, cols, bits = _int(ds, "Rows"), _int(ds, "Columns"), _int(ds, "BitsAllocated")
    samples = _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    assert rows is not None and cols is not None and bits is not None
    if min(rows, cols, bits, samples, frames) <= 0:
        raise PixelDataError("non-positive image dimension")
    return (rows * cols * samples * frames * bits + 7) // 8


def _check_pixels(ds: _Values, ts: UID, max_pixel_bytes: int, pixel: PixelInfo) -> None:
    expected = declared_pixel_bytes(ds)
    if expected > max_pixel_bytes:
        raise ImageTooLarge(
            f"declared image size {expected} bytes exceeds the {max_pixel_bytes} byte limit"
        )
    if ts.is_compressed:
        if pixel.length != UNDEFINED:
            raise PixelDataError("compressed transfer syntax without encapsulated Pixel Data")
        if pixel.frames is not None:
            _check_frames(ds, pixel.frames)
        elif _codestream_kind(ts) != CodestreamKind.NONE:
            raise CodestreamMismatch("no compressed fragment in the Pixel Data")
        return
    if pixel.length == UNDEFINED:
        raise PixelDataError("encapsulated Pixel Data in a native transfer syntax")
    if pixel.length < expected:
        raise PixelDataError(f"Pixel Data has {pixel.length} bytes, the header needs {expected}")


def _check_frames(ds: _Values, frames: list[FrameSize]) -> None:
    """Every frame header in the first fragment must describe the image the header declares
    (decoders allocate what the codestream says)."""
    if not frames:
        raise CodestreamMismatch("no frame size found in the first compressed fragment")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    samples = _int(ds, "SamplesPerPixel") or 1
    bits = _int(ds, "BitsAllocated") or 0
    for frame in frames:
        if (frame.rows, frame.columns) != (rows, cols) or frame.components != samples:
            raise CodestreamMismatch("a compressed frame header disagrees with the image header")
        if frame.bits > max(bits, 8):
            raise CodestreamMismatch("a compressed frame's precision exceeds BitsAllocated")
