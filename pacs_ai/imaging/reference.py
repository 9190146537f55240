"""The numpy reference implementation of the model input (the path before
:mod:`pacs_ai.imaging.tensorprep`): decode to stored values, the VOI policy of
:mod:`pacs_ai.imaging.lut` (CT: Hounsfield units and windows of :mod:`pacs_ai.imaging.ct`)
on every pixel, then :func:`~pacs_ai.imaging.geometry.fit_square`.

Not used in production: ``tests/unit/test_tensorprep.py`` checks that the tensor path gives
the same numbers on real images, so a change to either shows up there.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

from pacs_ai.errors import ImagingError
from pacs_ai.imaging.ct import hu_window, to_hu
from pacs_ai.imaging.decode import stored_values
from pacs_ai.imaging.geometry import fit_square, pixel_spacing
from pacs_ai.imaging.lut import display_values


def xray_input_reference(ds: Dataset, size: int) -> np.ndarray:
    """A CR/DX dataset to the (1, size, size) [0, 1] model input, pixel by pixel in numpy."""
    display = display_values(_grey(stored_values(ds)), ds)
    out, _ = fit_square(display, size, pixel_spacing(ds), pad=0.0)
    return out[None]


def ct_input_reference(
    ds: Dataset, size: int, windows: tuple[tuple[float, float], ...], frame: int | None = None
) -> np.ndarray:
    """One CT slice (or frame) to the (windows, size, size) [0, 1] input, in numpy."""
    hu = to_hu(_grey(stored_values(ds, frame)), ds, frame)
    planes = np.stack([hu_window(hu, c, w) for c, w in windows])
    out, _ = fit_square(planes, size, pixel_spacing(ds), pad=0.0)
    return out


def _grey(stored: np.ndarray) -> np.ndarray:
    if stored.ndim != 2:
        raise ImagingError("expected a single-sample (greyscale) image")
    return stored
