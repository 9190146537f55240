"""Which series a model can take: "applicable" or "not applicable" with a short reason.

Headers only (files read with ``stop_before_pixels=True``). Rules, in order:

- no image in the series; modality other than CR, DX or CT ("MR not supported");
- SOP class other than CR, DX (for presentation or for processing), CT, Enhanced CT or
  Legacy Converted Enhanced CT;
- X-ray, per image: colour, multi-frame, localizer, non-chest body part when stated (Body Part
  Examined or Anatomic Region Sequence), lateral view (View Position, View Code Sequence or a
  row direction of A/P in Patient Orientation). A series is applicable when at least one image
  passes; the scorer then uses only those images (:func:`xray_image_problem`);
- CT: colour, non-chest body part when stated, only localizers, non-axial slices, fewer than
  ``min_ct_slices`` distinct slice positions after ordering (see :mod:`pacs_ai.imaging.ct`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from pacs_ai.imaging.ct import is_localizer, plan_volume, slice_refs

Kind = Literal["cxr", "ct"]

XRAY_SOP_CLASSES = frozenset(
    {
        ComputedRadiographyImageStorage,
        DigitalXRayImageStorageForPresentation,
        DigitalXRayImageStorageForProcessing,
    }
)
CT_SOP_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
_CHEST_WORDS = ("CHEST", "THORA", "LUNG", "TORSO", "WHOLEBODY", "WHOLE BODY")
# SNOMED CT anatomic codes that include the chest (CID 4031 and common alternatives).
_CHEST_CODES = frozenset(
    {"51185008", "43799004", "302551006", "39607008", "416550000", "416775004", "38266002"}
)
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"})
_LATERAL_CODES = frozenset({"399173006", "399198007", "260444003", "399260004"})


@dataclass(frozen=True)
class Applicability:
    """The gating decision for one series.

    ``applicable``: a model can score it. ``kind``: which model family ("cxr" or "ct"), also
    set when not applicable but the modality is known. ``reason``: short human text
    ("chest X-ray", "lateral view", "CT localizer", "MR not supported", ...).
    """

    applicable: bool
    kind: Kind | None
    reason: str


def assess_series(headers: Sequence[Dataset], *, min_ct_slices: int = 10) -> Applicability:
    """Decide whether a series can be scored; ``headers`` need no pixel data."""
    images = [ds for ds in headers if "Rows" in ds or "SOPClassUID" in ds]
    if not images:
        return Applicability(False, None, "no images in series")
    modality = Counter(str(ds.get("Modality", "")).upper() for ds in images).most_common(1)[0][0]
    if modality in ("CR", "DX"):
        return _assess_xray(images)
    if modality == "CT":
        return _assess_ct(images, min_ct_slices)
    return Applicability(False, None, f"{modality or 'unknown modality'} not supported")


def xray_image_problem(ds: Dataset) -> str | None:
    """Why this CR/DX image cannot be scored by the chest X-ray model, or None if it can."""
    if str(ds.get("SOPClassUID", "")) not in XRAY_SOP_CLASSES:
        return "SOP class not supported"
    colour = _colour_problem(ds)
    if colour:
        return colour
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame X-ray"
    if is_localizer(ds):
        return "localizer"
    if not _is_chest(ds):
        return "not a chest image"
    if _is_lateral(ds):
        return "lateral view"
    return None


def _assess_xray(images: Sequence[Dataset]) -> Applicability:
    problems = [xray_image_problem(ds) for ds in images]
    usable = problems.count(None)
    if usable:
        return Applicability(True, "cxr", "chest X-ray, frontal view")
    reason = Counter(p for p in problems if p).most_common(1)[0][0]
    return Applicability(False, "cxr", reason)


def _assess_ct(images: Sequence[Dataset], min_slices: int) -> Applicability:
    if not any(str(ds.get("SOPClassUID", "")) in CT_SOP_CLASSES for ds in images):
        return Applicability(False, "ct", "SOP class not supported")
    images = [ds for ds in images if str(ds.get("SOPClassUID", "")) in CT_SOP_CLASSES]
    for ds in images:
        colour = _colour_problem(ds)
        if colour:
            return Applicability(False, "ct", colour)
    if not any(_is_chest(ds) for ds in images):
        return Applicability(False, "ct", "not a chest CT")
    if all(is_localizer(ds) for ds in images):
        return Applicability(False, "ct", "CT localizer")
    refs = slice_refs(images)
    if refs:
        orientation = Counter(r.orientation for r in refs).most_common(1)[0][0]
        normal = np.cross(orientation[:3], orientation[3:])
        if abs(float(normal[2])) < 0.8 * float(np.linalg.norm(normal) or 1.0):
            return Applicability(False, "ct", "non-axial CT")
    n = len(plan_volume(images))
    if n < min_slices:
        return Applicability(False, "ct", f"too few CT slices ({n} < {min_slices})")
    return Applicability(True, "ct", f"chest CT, {n} slices")


def _colour_problem(ds: Dataset) -> str | None:
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if samples != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        return "colour image"
    return None


def _is_chest(ds: Dataset) -> bool:
    """True unless a body part is stated and it is not the chest."""
    part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if part:
        return any(word in part for word in _CHEST_WORDS)
    regions = ds.get("AnatomicRegionSequence") or []
    codes = {str(item.get("CodeValue", "")) for item in regions}
    codes.discard("")
    if codes:
        return bool(codes & _CHEST_CODES)
    return True


def _is_lateral(ds: Dataset) -> bool:
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if view:
        return view in _LATERAL_VIEWS
    for item in ds.get("ViewCodeSequence") or []:
        if str(item.get("CodeValue", "")) in _LATERAL_CODES:
            return True
        if "LATERAL" in str(item.get("CodeMeaning", "")).upper():
            return True
    orientation = ds.get("PatientOrientation") or []
    if len(orientation) >= 1:
        row = str(orientation[0]).upper()
        return row[:1] in ("A", "P")
    return False
