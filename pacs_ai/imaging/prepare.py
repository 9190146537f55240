"""From a file to the model's input: the one preprocessing path shared by training and
inference (:mod:`pacs_ai.imaging.tensorprep` does the pixel work; the numpy reference it is
tested against is :mod:`pacs_ai.imaging.reference`).

The model input is a float32 array (channels, size, size) in [0, 1]; the model normalises it
itself (see :mod:`pacs_ai.inference.architectures`), so what the model sees is also what a
person can be shown.

- X-ray (1 channel): decode, the VOI policy of :mod:`pacs_ai.imaging.lut` (Modality LUT,
  VOI LUT or window, MONOCHROME1/Presentation LUT inversion), then square pixels from Pixel
  Spacing and a letterbox into ``size`` x ``size`` padded with 0 (black).
- CT (one channel per window): Hounsfield units (padding -> air), each window of the input
  spec (lung WL -600/WW 1500 first, e.g. mediastinal WL 40/WW 400 second), the same letterbox
  padded with 0.
- PNG/JPEG (training folders like the seed notebook): read as 8/16-bit grey, scaled to [0, 1]
  by the bit depth, then the X-ray letterbox.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from pacs_ai.errors import DecodeLimitExceeded, ImagingError
from pacs_ai.imaging.ct import plan_volume, select_evenly
from pacs_ai.imaging.decode import DEFAULT_LIMITS
from pacs_ai.imaging.gating import CT_SOP_CLASSES
from pacs_ai.imaging.geometry import fit_square
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.imaging.tensorprep import decode_dataset, finish

PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_MAX_PICTURE_PIXELS = DEFAULT_LIMITS.max_rows * DEFAULT_LIMITS.max_columns


def xray_input(ds: Dataset, spec: InputSpec) -> np.ndarray:
    """A decoded-on-demand CR/DX dataset to the (1, size, size) [0, 1] model input (the
    tensor path of :mod:`pacs_ai.imaging.tensorprep`, on the CPU)."""
    return finish([decode_dataset(ds, "cxr")], spec.size)[0].numpy()


def ct_input(ds: Dataset, spec: InputSpec, frame: int | None = None) -> np.ndarray:
    """One CT slice (or Enhanced CT frame) to the (windows, size, size) [0, 1] input."""
    return finish([decode_dataset(ds, "ct", spec.windows, frame)], spec.size)[0].numpy()


def picture_input(path: Path, spec: InputSpec) -> np.ndarray:
    """A PNG/JPEG picture (grey or colour, converted to grey) to the X-ray input."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > _MAX_PICTURE_PIXELS:
                raise DecodeLimitExceeded(f"picture of {img.width}x{img.height} is too large")
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32)
                top = 65535.0 if arr.max() > 255 else 255.0
            else:
                arr = np.asarray(img.convert("L"), dtype=np.float32)
                top = 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImagingError(f"picture cannot be read: {type(exc).__name__}: {exc}") from exc
    out, _ = fit_square(np.clip(arr / top, 0.0, 1.0), spec.size, None, pad=0.0)
    return out[None]


@dataclass(frozen=True)
class ScoredSlice:
    """A CT slice chosen for scoring: its file, frame (None: single-frame) and SOP UID."""

    path: Path
    frame: int | None
    sop_uid: str


def ct_scored_slices(
    paths: Sequence[Path], headers: Sequence[Dataset], spec: InputSpec
) -> list[ScoredSlice]:
    """The slices a CT series is scored on, for training and inference alike: CT images
    only, ordered by :func:`~pacs_ai.imaging.ct.plan_volume`, ``spec.ct_slices`` of them
    spread evenly along the normal."""
    keep = [i for i, h in enumerate(headers) if str(h.get("SOPClassUID", "")) in CT_SOP_CLASSES]
    slices = select_evenly(plan_volume([headers[i] for i in keep]), spec.ct_slices)
    return [ScoredSlice(paths[keep[s.index]], s.frame, s.sop_uid) for s in slices]


def stack_inputs(items: Sequence[np.ndarray]) -> np.ndarray:
    """Stack model inputs into one (N, C, S, S) float32 batch."""
    return np.ascontiguousarray(np.stack(items), dtype=np.float32)
