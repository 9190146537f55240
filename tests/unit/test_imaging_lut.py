"""Modality LUT, VOI window/LUT and presentation maths against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_ai.errors import ImagingError
from pacs_ai.imaging.lut import display_values, lut_lookup, modality_lut, voi, window


def test_linear_window_matches_ps3_3_formula() -> None:
    # c=100, w=21: y = (x - 99.5)/20 + 0.5; 0 at or below 89.5, 1 above 109.5
    x = np.array([80, 89, 90, 99.5, 100, 109, 110, 200], dtype=np.float32)
    y = window(x, 100, 21)
    expected = [0.0, 0.0, 0.025, 0.5, 0.525, 0.975, 1.0, 1.0]
    assert y == pytest.approx(np.array(expected, dtype=np.float32), abs=1e-6)


def test_linear_exact_and_sigmoid() -> None:
    x = np.array([0.0, 50.0, 100.0, 150.0], dtype=np.float32)
    assert window(x, 100, 100, "LINEAR_EXACT") == pytest.approx([0.0, 0.0, 0.5, 1.0])
    sig = window(x, 100, 100, "SIGMOID")
    assert sig[2] == pytest.approx(0.5)
    assert sig[3] == pytest.approx(1 / (1 + np.exp(-2.0)))
    with pytest.raises(ImagingError):
        window(x, 0, 0.5)


def test_lut_lookup_clamps_below_first_and_past_end() -> None:
    # 4 entries, first mapped value 10
    out = lut_lookup(np.array([0, 10, 11, 13, 99]), [4, 10, 16], [100, 200, 300, 400])
    assert out.tolist() == [100, 100, 200, 400, 400]


def test_modality_lut_sequence_and_rescale() -> None:
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"
    assert modality_lut(np.array([0, 1000]), ds).tolist() == [-1024, 976]
    item = Dataset()
    item.LUTDescriptor = [3, 0, 16]
    item.LUTData = [5, 7, 9]
    ds2 = Dataset()
    ds2.ModalityLUTSequence = [item]
    assert modality_lut(np.array([0, 2, 5]), ds2).tolist() == [5, 9, 9]


def _xray(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def test_voi_policy_prefers_voi_lut_then_window_then_bits_stored() -> None:
    stored = np.array([0, 2048, 4095], dtype=np.float32)
    # no VOI at all: BitsStored 12 -> 0..4095 linear
    assert voi(stored, _xray()) == pytest.approx([0.0, 2048 / 4095, 1.0])
    # window wins over the bits range
    ds = _xray(WindowCenter="2048", WindowWidth="1025")
    assert voi(stored, ds) == pytest.approx([0.0, (2048 - 2047.5) / 1024 + 0.5, 1.0])
    # VOI LUT sequence wins over the window; output scaled by its bit depth (8 bits)
    item = Dataset()
    item.LUTDescriptor = [2, 0, 8]
    item.LUTData = [0, 255]
    ds.VOILUTSequence = [item]
    assert voi(np.array([0.0, 1.0, 5.0]), ds) == pytest.approx([0.0, 1.0, 1.0])


def test_monochrome1_is_inverted_once_even_with_inverse_presentation_lut() -> None:
    stored = np.array([0.0, 4095.0])
    plain = display_values(stored, _xray())
    mono1 = display_values(stored, _xray(PhotometricInterpretation="MONOCHROME1"))
    both = display_values(
        stored, _xray(PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE")
    )
    inverse_only = display_values(stored, _xray(PresentationLUTShape="INVERSE"))
    assert plain.tolist() == [0.0, 1.0]
    assert mono1.tolist() == [1.0, 0.0]
    assert both.tolist() == [1.0, 0.0]
    assert inverse_only.tolist() == [1.0, 0.0]


def test_signed_bits_stored_range() -> None:
    ds = _xray(PixelRepresentation=1, BitsStored=8)
    assert voi(np.array([-128.0, 127.0]), ds) == pytest.approx([0.0, 1.0])


def test_table_path_equals_direct_maths() -> None:
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, size=(800, 700)).astype(np.uint16)  # large: table path
    ds = _xray(WindowCenter="1500", WindowWidth="900", PhotometricInterpretation="MONOCHROME1")
    direct = 1.0 - window(stored.astype(np.float32), 1500, 900)
    assert np.array_equal(display_values(stored, ds), direct.astype(np.float32))
