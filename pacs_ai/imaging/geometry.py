"""Pixel spacing and the resize/letterbox to the model's square input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Box:
    """Where the image content lies inside the letterboxed square (pixels)."""

    top: int
    left: int
    height: int
    width: int


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: Pixel Spacing, else Imager Pixel Spacing; None when
    absent or not positive (e.g. the 0.000 some CR plates write)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None:
            continue
        try:
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError, IndexError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return row, col
    return None


def fit_square(
    image: np.ndarray,
    size: int,
    spacing: tuple[float, float] | None = None,
    pad: float = 0.0,
) -> tuple[np.ndarray, Box]:
    """Resample ``image`` (H, W) or (C, H, W) into a ``size`` x ``size`` square.

    Pixels are made square using ``spacing`` (row, column mm), the longer physical side fills
    the square, the other is centred and padded with ``pad``. Downsampling is antialiased
    (bilinear). Returns float32 and the content :class:`Box`. The numpy face of
    :func:`letterbox` (the same arithmetic).
    """
    planes = image[None] if image.ndim == 2 else image
    src = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32))[None]
    out, box = letterbox(src, size, spacing, pad)
    arr = out[0].numpy()
    return (arr[0] if image.ndim == 2 else arr), box


def letterbox_box(
    height: int, width: int, size: int, spacing: tuple[float, float] | None = None
) -> Box:
    """Where an (height, width) image with ``spacing`` lands in the ``size`` square."""
    sr, sc = spacing if spacing else (1.0, 1.0)
    extent_h, extent_w = height * sr, width * sc
    scale = size / max(extent_h, extent_w)
    new_h = max(1, min(size, round(extent_h * scale)))
    new_w = max(1, min(size, round(extent_w * scale)))
    return Box((size - new_h) // 2, (size - new_w) // 2, new_h, new_w)


def letterbox(
    planes: torch.Tensor,
    size: int,
    spacing: tuple[float, float] | None = None,
    pad: float = 0.0,
) -> tuple[torch.Tensor, Box]:
    """:func:`fit_square` on a float32 tensor (N, C, H, W) of images sharing one geometry,
    on whatever device the tensor is: (N, C, size, size) and the content :class:`Box`."""
    box = letterbox_box(planes.shape[-2], planes.shape[-1], size, spacing)
    resized = F.interpolate(
        planes, size=(box.height, box.width), mode="bilinear", align_corners=False, antialias=True
    )
    out = torch.full(
        (planes.shape[0], planes.shape[1], size, size),
        pad,
        dtype=torch.float32,
        device=planes.device,
    )
    out[:, :, box.top : box.top + box.height, box.left : box.left + box.width] = resized
    return out, box
