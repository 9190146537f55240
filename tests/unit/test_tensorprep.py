"""The tensor preprocessing path (production) against the numpy reference, on real images.

On the CPU both evaluate the same float32 maths per stored value and the same resize kernel,
so the expected difference is zero; the assertions allow 1e-6 (a different SIMD width in
numpy's exp for SIGMOID may move the last bit) and state the exact bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pacs_ai.errors import ImagingError
from pacs_ai.imaging.ct import LUNG_WINDOW, MEDIASTINAL_WINDOW
from pacs_ai.imaging.decode import read_dataset, stored_values
from pacs_ai.imaging.prepare import ct_input, xray_input
from pacs_ai.imaging.reference import ct_input_reference, xray_input_reference
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.imaging.tensorprep import (
    _read_native,
    decode_dataset,
    decode_file,
    finish,
    stored_patterns,
)
from pacs_ai.training import dicomwriter as dw

SAMPLES = Path(__file__).resolve().parents[2] / "dicom_samples"
WINDOWS = (LUNG_WINDOW, MEDIASTINAL_WINDOW)
TOLERANCE = 1e-6


def _data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def _xray_fast(path: Path, size: int = 224) -> np.ndarray:
    return finish([decode_file(path, "cxr")], size)[0].numpy()


@pytest.mark.parametrize(
    "name",
    [
        "RG1_UNCR.dcm",  # chest CR, MONOCHROME1, 15 of 16 bits, window 15000 (native read)
        "RG1_J2KR.dcm",  # the same, JPEG 2000 lossless (decoder path)
        "RG3_UNCR.dcm",  # CR, MONOCHROME1, 10 bits stored
        "vlut_04.dcm",  # VOI LUT Sequence, 8-bit
        "mlut_18.dcm",  # Modality LUT Sequence, signed 12 of 16 bits
        "MR_small.dcm",  # signed 16-bit with a window
        "MR-SIEMENS-DICOM-WithOverlays.dcm",  # 12 of 16 bits, two windows
    ],
)
def test_xray_tensor_path_matches_the_numpy_reference(name: str) -> None:
    path = _data(name)
    ref = xray_input_reference(read_dataset(path), 224)
    fast = _xray_fast(path)
    assert fast.shape == ref.shape == (1, 224, 224)
    assert fast.dtype == np.float32
    assert float(np.abs(fast - ref).max()) <= TOLERANCE
    assert float(ref.max()) > 0.5  # a real image, not an all-black comparison


def test_sample_studies_match_the_reference() -> None:
    for folder in ("cr_chest_pa", "dx_chest_pa"):
        path = SAMPLES / folder / "IM0001.dcm"
        ref = xray_input_reference(read_dataset(path), 224)
        assert float(np.abs(_xray_fast(path) - ref).max()) <= TOLERANCE
    for path in sorted((SAMPLES / "ct_chest").glob("*.dcm"))[:4]:
        ref = ct_input_reference(read_dataset(path), 128, WINDOWS)
        fast = finish([decode_file(path, "ct", WINDOWS)], 128)[0].numpy()
        assert fast.shape == ref.shape == (2, 128, 128)
        assert float(np.abs(fast - ref).max()) <= TOLERANCE
        assert float(ref[0].max()) > 0.5


def test_real_ct_signed_with_rescale_matches() -> None:
    path = _data("CT_small.dcm")  # signed 16-bit, rescale slope 1 intercept -1024
    ref = ct_input_reference(read_dataset(path), 64, WINDOWS)
    fast = finish([decode_file(path, "ct", WINDOWS)], 64)[0].numpy()
    assert float(np.abs(fast - ref).max()) <= TOLERANCE
    assert 0.0 < float(ref.mean()) < 1.0


def _write(ds: Dataset, path: Path) -> Path:
    dw.write(ds, path)
    return path


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"PhotometricInterpretation": "MONOCHROME1"},
        {"PresentationLUTShape": "INVERSE"},
        {"RescaleSlope": "0.5", "RescaleIntercept": "-100"},
        {"WindowCenter": "1800", "WindowWidth": "900", "VOILUTFunction": "SIGMOID"},
        {"WindowCenter": "1800", "WindowWidth": "0.5", "VOILUTFunction": "LINEAR"},
    ],
)
def test_synthetic_policies_match(tmp_path: Path, extra: dict[str, str]) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, size=(300, 200))
    ds = dw.xray_image(pixels, modality="DX", bits_stored=12, pixel_spacing_mm=0.2)
    for key, value in extra.items():
        setattr(ds, key, value)
    raw = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    raw[::7] |= 0xF000  # garbage in the unused high bits: masked by both paths
    ds.PixelData = raw.tobytes()
    path = _write(ds, tmp_path / "x.dcm")
    ref = xray_input_reference(read_dataset(path), 96)
    assert float(np.abs(_xray_fast(path, 96) - ref).max()) <= TOLERANCE


def test_native_read_gives_the_decoder_bits() -> None:
    for name in ("RG1_UNCR.dcm", "MR_small.dcm", "vlut_04.dcm"):
        path = _data(name)
        native = _read_native(path, None, read_dataset.__defaults__[0])  # type: ignore[index]
        assert native is not None, name
        ds, bits = native
        stored = stored_values(read_dataset(path))
        patterns = stored_patterns(ds)
        assert np.array_equal(patterns[bits], stored.astype(np.int64)), name


def test_compressed_and_multiframe_use_the_decoder(tmp_path: Path) -> None:
    assert _read_native(_data("RG1_J2KR.dcm"), None, read_dataset.__defaults__[0]) is None  # type: ignore[index]
    path = _data("emri_small.dcm")  # 10 frames, native: frame 7 read from its own offset
    ds = read_dataset(path)
    for frame in (0, 7):
        dec = decode_file(path, "cxr", frame=frame)
        assert dec.bits is not None
        ref = stored_values(ds, frame)
        assert np.array_equal(stored_patterns(ds)[dec.bits], ref.astype(np.int64))


def test_truncated_pixel_data_is_an_imaging_error(tmp_path: Path) -> None:
    path = _data("RG1_UNCR.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ImagingError):
        decode_file(cut, "cxr")
    small = _data("MR_small.dcm")  # 8 KB of pixels: read with the header, not deferred
    cut.write_bytes(small.read_bytes()[:-500])
    with pytest.raises(ImagingError):
        decode_file(cut, "cxr")


def test_prepare_functions_are_the_tensor_path_and_batches_agree() -> None:
    spec = InputSpec.default("cxr", 224)
    paths = [_data("RG1_UNCR.dcm"), _data("RG1_J2KR.dcm"), _data("MR_small.dcm")]
    single = [xray_input(read_dataset(p), spec) for p in paths]
    batch = finish([decode_file(p, "cxr") for p in paths], 224).numpy()
    for i in range(3):
        assert float(np.abs(batch[i] - single[i]).max()) <= TOLERANCE
    ct_spec = InputSpec.default("ct", 64)
    ds = pydicom.dcmread(_data("CT_small.dcm"))
    assert np.array_equal(
        ct_input(ds, ct_spec), finish([decode_dataset(ds, "ct", ct_spec.windows)], 64)[0].numpy()
    )
