"""CT: Hounsfield units, padding, slice ordering along the slice normal, windows.

Ordering policy (:func:`plan_volume`), headers only:

- every axial image frame becomes a slice: classic CT one per instance, Enhanced CT one per
  frame with its per-frame (or shared) functional groups; localizers are dropped;
- the position of a slice is its Image Position (Patient) projected on the slice normal
  (row direction x column direction), never Instance Number;
- slices whose orientation differs from the most common one are dropped (a stray reformat);
- acquisitions (Acquisition Number) whose position ranges overlap are alternatives of the same
  anatomy (e.g. a repeat scan): the one with most slices is kept (ties: the lowest number).
  Acquisitions that do not overlap are parts of one volume and are kept together;
- duplicate positions (closer than 0.01 mm) keep the slice with the lowest Instance Number.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from pacs_ai.errors import ImagingError

LUNG_WINDOW = (-600.0, 1500.0)
MEDIASTINAL_WINDOW = (40.0, 400.0)
AIR_HU = -1024.0
_DUPLICATE_MM = 0.01


@dataclass(frozen=True)
class SliceRef:
    """One slice of a planned volume: ``index`` into the headers given, ``frame`` (None for a
    single-frame instance), its position along the normal (mm) and identifiers."""

    index: int
    frame: int | None
    position: float
    sop_uid: str
    acquisition: int
    instance_number: int
    orientation: tuple[float, ...]


def _group_item(ds: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """The functional group ``sequence`` item for ``frame``: per-frame first, then shared."""
    if frame is not None:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame and frame < len(per_frame):
            seq = per_frame[frame].get(sequence)
            if seq:
                return seq[0]  # type: ignore[no-any-return]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(sequence)
        if seq:
            return seq[0]  # type: ignore[no-any-return]
    return None


def _attr(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> object:
    item = _group_item(ds, frame, sequence)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def rescale_of(ds: Dataset, frame: int | None = None) -> tuple[float, float]:
    """(slope, intercept): top level, or the Enhanced CT Pixel Value Transformation group."""
    slope = _attr(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _attr(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    return (
        float(slope) if slope not in (None, "") else 1.0,  # type: ignore[arg-type]
        float(intercept) if intercept not in (None, "") else 0.0,  # type: ignore[arg-type]
    )


def is_localizer(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    frame_type = ds.get("FrameType") or []
    return "LOCALIZER" in image_type or "LOCALIZER" in [str(v).upper() for v in frame_type]


def _geometry(ds: Dataset, frame: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    iop = _attr(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    ipp = _attr(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
    try:
        o = np.array([float(v) for v in iop], dtype=np.float64)  # type: ignore[attr-defined]
        p = np.array([float(v) for v in ipp], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if o.shape != (6,) or p.shape != (3,):
        return None
    normal = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return None
    return o, normal / norm


def slice_refs(headers: Sequence[Dataset]) -> list[SliceRef]:
    """All usable slices (frames) of the given headers, unordered; localizers and images
    without geometry are left out."""
    refs: list[SliceRef] = []
    for index, ds in enumerate(headers):
        if is_localizer(ds) or "Rows" not in ds:
            continue
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        enhanced = any(
            k in ds for k in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence")
        )
        frames: list[int | None] = list(range(n_frames)) if enhanced or n_frames > 1 else [None]
        for frame in frames:
            geo = _geometry(ds, frame)
            if geo is None:
                continue
            orientation, normal = geo
            ipp = _attr(ds, frame, "PlanePositionSequence", "ImagePositionPatient")
            position = float(np.dot([float(v) for v in ipp], normal))  # type: ignore[attr-defined]
            acq = ds.get("AcquisitionNumber")
            refs.append(
                SliceRef(
                    index=index,
                    frame=frame,
                    position=position,
                    sop_uid=str(ds.get("SOPInstanceUID", "")),
                    acquisition=int(acq) if acq not in (None, "") else 0,
                    instance_number=int(ds.get("InstanceNumber", 0) or 0),
                    orientation=tuple(round(float(v), 2) for v in orientation),
                )
            )
    return refs


def plan_volume(headers: Sequence[Dataset]) -> list[SliceRef]:
    """The slices of one volume, ordered inferior to superior along the normal (module doc)."""
    refs = slice_refs(headers)
    if not refs:
        return []
    main_orientation = Counter(r.orientation for r in refs).most_common(1)[0][0]
    refs = [r for r in refs if r.orientation == main_orientation]
    refs = _one_acquisition(refs)
    refs.sort(key=lambda r: (r.position, r.instance_number, r.frame or 0))
    out: list[SliceRef] = []
    for ref in refs:
        if out and abs(ref.position - out[-1].position) < _DUPLICATE_MM:
            continue  # duplicate position: the first (lowest Instance Number) stays
        out.append(ref)
    return out


def _one_acquisition(refs: list[SliceRef]) -> list[SliceRef]:
    groups: dict[int, list[SliceRef]] = defaultdict(list)
    for r in refs:
        groups[r.acquisition].append(r)
    if len(groups) == 1:
        return refs
    ranked = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    kept: list[tuple[float, float]] = []
    out: list[SliceRef] = []
    for _, members in ranked:
        lo = min(r.position for r in members)
        hi = max(r.position for r in members)
        if any(lo <= k_hi + _DUPLICATE_MM and hi >= k_lo - _DUPLICATE_MM for k_lo, k_hi in kept):
            continue  # overlaps a larger acquisition: an alternative of the same anatomy
        kept.append((lo, hi))
        out.extend(members)
    return out


def select_evenly(slices: Sequence[SliceRef], count: int) -> list[SliceRef]:
    """Up to ``count`` slices nearest to ``count`` positions evenly spread over the volume
    (by position, so uneven spacing does not bias the choice)."""
    if len(slices) <= count:
        return list(slices)
    positions = np.array([s.position for s in slices])
    targets = np.linspace(positions[0], positions[-1], count)
    chosen = sorted({int(np.abs(positions - t).argmin()) for t in targets})
    return [slices[i] for i in chosen]


def to_hu(stored: np.ndarray, ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Stored values to Hounsfield units (float32); padding pixels become air (-1024 HU).

    Pixel Padding Value (with Pixel Padding Range Limit when present) is compared with the
    stored values, before rescaling, as PS3.3 C.7.5.1.1.2 defines it.
    """
    if stored.ndim != 2:
        raise ImagingError("CT slice is not a single-sample 2-D image")
    slope, intercept = rescale_of(ds, frame)
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    pad = ds.get("PixelPaddingValue")
    if pad is not None:
        limit = ds.get("PixelPaddingRangeLimit")
        lo, hi = (int(pad), int(pad)) if limit is None else sorted((int(pad), int(limit)))
        hu[(stored >= lo) & (stored <= hi)] = AIR_HU
    return hu


def hu_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear window of HU to [0, 1]: (hu - (center - width/2)) / width, clipped."""
    if width <= 0:
        raise ImagingError(f"window width {width} <= 0")
    lo = np.float32(center - width / 2.0)
    return np.asarray(np.clip((hu - lo) / np.float32(width), 0.0, 1.0), dtype=np.float32)
