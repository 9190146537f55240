"""Modality LUT, VOI LUT / window and presentation maths (PS3.3 C.11), on numpy arrays.

The one VOI policy, identical in training and inference (:func:`voi_policy`):

1. Modality LUT: the Modality LUT Sequence if present, else Rescale Slope/Intercept
   (default 1/0).
2. VOI: the first item of the VOI LUT Sequence if present; else the first Window
   Center/Width pair with its VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID); else a
   linear ramp over the full range that Bits Stored allows, passed through the Modality LUT
   ("BitsStored-aware scaling"). The result is in [0, 1].
3. Presentation: the output is in MONOCHROME2 sense (high = bright = attenuating). It is
   inverted once when Photometric Interpretation is MONOCHROME1 or Presentation LUT Shape is
   INVERSE. For DX these two say the same thing (PS3.3 C.8.11.6.1.2), so an image is never
   inverted twice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from pacs_ai.errors import ImagingError


def rescale(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Linear Modality LUT: ``stored * slope + intercept`` in float32."""
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def lut_lookup(values: np.ndarray, descriptor: Sequence[int], data: Sequence[int]) -> np.ndarray:
    """Apply a LUT (Modality or VOI) given its LUT Descriptor and LUT Data.

    Descriptor = (entries, first mapped value, bits per entry); entries 0 means 65536. Inputs
    below the first mapped value get the first entry, inputs past the end the last (PS3.3
    C.11.1.1.1). Output is float32 in the LUT's own units.
    """
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    table = np.asarray(data, dtype=np.float32)
    if table.size < entries:
        raise ImagingError(f"LUT has {table.size} entries, descriptor says {entries}")
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, entries - 1)
    return np.asarray(table[index], dtype=np.float32)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Window to [0, 1] per PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID).

    LINEAR: y = ((x - (c - 0.5)) / (w - 1) + 0.5), 0 at or below c - 0.5 - (w-1)/2,
    1 above c - 0.5 + (w-1)/2; needs w >= 1. LINEAR_EXACT: y = (x - c) / w + 0.5 clipped;
    needs w > 0. SIGMOID: y = 1 / (1 + exp(-4 (x - c) / w)).
    """
    x = values.astype(np.float32)
    fn = (function or "LINEAR").upper()
    if fn == "LINEAR":
        if width < 1:
            raise ImagingError(f"window width {width} < 1 for LINEAR")
        if width == 1:  # a threshold
            return (x > center - 0.5).astype(np.float32)
        y = (x - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)
    elif fn == "LINEAR_EXACT":
        if width <= 0:
            raise ImagingError(f"window width {width} <= 0")
        y = (x - np.float32(center)) / np.float32(width) + np.float32(0.5)
    elif fn == "SIGMOID":
        if width <= 0:
            raise ImagingError(f"window width {width} <= 0")
        return np.asarray(1.0 / (1.0 + np.exp(-4.0 * (x - center) / width)), dtype=np.float32)
    else:
        raise ImagingError(f"unknown VOI LUT Function {function!r}")
    return np.asarray(np.clip(y, 0.0, 1.0), dtype=np.float32)


def _first(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def modality_lut(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Step 1 of the policy: stored values to modality values (float32)."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        item = seq[0]
        return lut_lookup(stored, item.LUTDescriptor, _lut_data(item))
    slope = ds.get("RescaleSlope", 1.0)
    intercept = ds.get("RescaleIntercept", 0.0)
    return rescale(stored, float(slope if slope not in (None, "") else 1.0), float(intercept or 0))


def _lut_data(item: Dataset) -> list[int]:
    data = item.LUTData
    if isinstance(data, bytes):  # OW read as bytes
        bits = int(item.LUTDescriptor[2])
        entries = int(item.LUTDescriptor[0] or 65536)
        dtype = np.uint8 if bits <= 8 and len(data) == entries else "<u2"
        return [int(v) for v in np.frombuffer(data, dtype=dtype)]
    if isinstance(data, int):
        return [data]
    return [int(v) for v in data]


def _bits_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    return 0.0, float(2**bits - 1)


def voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Step 2 of the policy: modality values to [0, 1] (before presentation inversion)."""
    seq = ds.get("VOILUTSequence")
    if seq:
        item = seq[0]
        desc = item.LUTDescriptor
        out = lut_lookup(values, desc, _lut_data(item))
        top = float(2 ** int(desc[2]) - 1) if int(desc[2]) > 0 else float(out.max() or 1)
        return np.clip(out / np.float32(max(top, 1.0)), 0.0, 1.0).astype(np.float32)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center not in (None, "") and width not in (None, ""):
        w = _first(width)
        if math.isfinite(w) and w > 0:
            fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR")
            if fn.upper() == "LINEAR" and w < 1:
                fn = "LINEAR_EXACT"
            return window(values, _first(center), w, fn)
    lo, hi = _bits_range(ds)
    ends = modality_lut(np.array([lo, hi], dtype=np.float64), ds)
    lo_m, hi_m = float(ends.min()), float(ends.max())
    if hi_m <= lo_m:
        return np.zeros_like(values, dtype=np.float32)
    return np.clip((values - lo_m) / (hi_m - lo_m), 0.0, 1.0).astype(np.float32)


def needs_inversion(ds: Dataset) -> bool:
    """Step 3: True when the displayed image must be inverted to MONOCHROME2 sense."""
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return pi == "MONOCHROME1" or shape == "INVERSE"


def _policy(values: np.ndarray, ds: Dataset) -> np.ndarray:
    out = voi(modality_lut(values, ds), ds)
    if needs_inversion(ds):
        out = np.float32(1.0) - out
    return out.astype(np.float32, copy=False)


_MAX_TABLE = 1 << 17


def display_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """The whole policy: stored values to a float32 [0, 1] image, high = bright.

    Integer images are mapped through a table of the policy over their value range (the
    same maths, evaluated once per distinct value instead of once per pixel).
    """
    if stored.dtype.kind in "iu" and stored.size > 4 * _MAX_TABLE:
        unsigned = stored.dtype in (np.uint8, np.uint16)
        lo = 0 if unsigned else int(stored.min())  # unsigned: index with the values as they are
        hi = int(stored.max())
        if hi - lo < _MAX_TABLE:
            table = _policy(np.arange(lo, hi + 1, dtype=np.int64), ds)
            index = stored if lo == 0 else stored.astype(np.int32) - lo
            return np.asarray(np.take(table, index), dtype=np.float32)
    return _policy(stored, ds)
