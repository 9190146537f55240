"""Checks on a received dataset before it may be acknowledged.

Tolerant where real devices differ harmlessly (leading zeros in UID components, odd pixel
padding), strict where our safety depends on it: UIDs are digits and dots only (they are
audited and later used to build SR references, never paths), Type 1 identifiers are present,
declared image size is sane and the native Pixel Data is long enough.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_ai.errors import (
    DatasetMismatch,
    ImageTooLarge,
    InvalidDataset,
    InvalidUid,
    MissingAttribute,
    PixelDataError,
)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


def check_uid(value: object, name: str) -> str:
    uid = str(value or "").rstrip("\x00 ")
    if not uid:
        raise MissingAttribute(f"{name} is missing or empty")
    if len(uid) > 64 or not _UID_RE.match(uid):
        raise InvalidUid(f"{name} is not a valid UID")
    return uid


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
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


def read_and_validate(
    path: Path,
    transfer_syntax: str,
    command_sop_class: str,
    command_sop_instance: str,
    max_pixel_bytes: int,
) -> InstanceHeader:
    """Parse the spooled file (pixel values are not read) and check it.

    Raises a :class:`~pacs_ai.errors.StoreError` subclass naming the problem.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise InvalidDataset(f"dataset cannot be parsed: {exc.__class__.__name__}") from exc

    sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID")
    sop_instance = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    if sop_class != command_sop_class or sop_instance != command_sop_instance:
        raise DatasetMismatch("dataset SOP Class/Instance UID differ from the C-STORE command")
    study_uid = check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    modality = _text(ds, "Modality", 16)
    if not modality:
        raise MissingAttribute("Modality is missing or empty")

    if _PIXEL_DATA in ds:
        _check_pixels(ds, UID(transfer_syntax), max_pixel_bytes, path.stat().st_size)

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


def declared_pixel_bytes(ds: Dataset) -> int:
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


def _check_pixels(ds: Dataset, transfer_syntax: UID, max_pixel_bytes: int, file_size: int) -> None:
    expected = declared_pixel_bytes(ds)
    if expected > max_pixel_bytes:
        raise ImageTooLarge(
            f"declared image size {expected} bytes exceeds the {max_pixel_bytes} byte limit"
        )
    element = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    length = getattr(element, "length", None)
    if transfer_syntax.is_deflated or length is None:
        # Deflated streams are inflated in memory by pydicom; offsets are not file offsets.
        value = ds.PixelData
        length = _UNDEFINED_LENGTH if ds["PixelData"].is_undefined_length else len(value)
    else:
        value_tell = getattr(element, "value_tell", None)
        truncated = value_tell is not None and value_tell + length > file_size
        if length != _UNDEFINED_LENGTH and truncated:
            raise PixelDataError("Pixel Data is truncated")
    if transfer_syntax.is_compressed:
        if length != _UNDEFINED_LENGTH:
            raise PixelDataError("compressed transfer syntax without encapsulated Pixel Data")
        return
    if length == _UNDEFINED_LENGTH:
        raise PixelDataError("encapsulated Pixel Data in a native transfer syntax")
    if length < expected:
        raise PixelDataError(f"Pixel Data has {length} bytes, the header needs {expected}")
