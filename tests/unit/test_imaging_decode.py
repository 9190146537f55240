"""Decoding every transfer syntax, limits before decoding, and the real MONOCHROME1 CR."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import get_frame
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacs_ai.errors import DecodeLimitExceeded, ImagingError
from pacs_ai.imaging.decode import (
    DecodeLimits,
    codestream_size,
    read_dataset,
    read_header,
    stored_values,
)
from pacs_ai.imaging.gating import assess_series
from pacs_ai.imaging.prepare import InputSpec, xray_input
from pacs_ai.training import dicomwriter as dw


def _data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_values(name: str) -> None:
    reference = stored_values(read_dataset(_data("MR_small.dcm")))
    assert np.array_equal(stored_values(read_dataset(_data(name))), reference)


@pytest.mark.parametrize(
    "name", ["emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"]
)
def test_multiframe_lossless_frames_match(name: str) -> None:
    ref = read_dataset(_data("emri_small.dcm"))
    ds = read_dataset(_data(name))
    for frame in (0, 9):
        assert np.array_equal(stored_values(ds, frame), stored_values(ref, frame))


def test_jpeg_lossless_and_lossy_jpeg2000_agree() -> None:
    a = stored_values(read_dataset(_data("JPEG-LL.dcm"))).astype(np.float64)
    b = stored_values(read_dataset(_data("JPEG2000.dcm"))).astype(np.float64)
    assert a.shape == b.shape == (1024, 256)
    assert np.abs(a - b).mean() < 0.03 * (a.max() - a.min())


def test_jpeg_baseline_extended_and_8bit_lossless_decode() -> None:
    extended = stored_values(read_dataset(_data("JPGExtended.dcm")))
    assert extended.ndim == 2 and extended.max() > extended.min()
    baseline = stored_values(read_dataset(_data("SC_rgb_jpeg_dcmtk.dcm")))
    assert baseline.ndim == 3 and baseline.shape[-1] == 3
    ll8 = stored_values(read_dataset(_data("JPGLosslessP14SV1_1s_1f_8b.dcm")))
    assert ll8.shape == (768, 1024)


def test_deflated_dataset_is_read(tmp_path: Path) -> None:
    ds = read_dataset(_data("image_dfl.dcm"))
    assert stored_values(ds).shape == (512, 512)
    assert read_header(_data("image_dfl.dcm")).Rows == 512


def _deflated_file(tmp_path: Path, side: int) -> Path:
    ds = dw.xray_image(np.zeros((side, side)), modality="CR")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "dfl.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_deflate_bomb_is_refused_before_parsing(tmp_path: Path) -> None:
    path = _deflated_file(tmp_path, 512)  # 512 KiB of zeros inflates from ~1 KiB
    assert path.stat().st_size < 10_000
    assert read_dataset(path).Rows == 512
    with pytest.raises(DecodeLimitExceeded):
        read_dataset(path, DecodeLimits(max_inflated_bytes=100_000))


def test_absurd_dimensions_refused_before_decoding(tmp_path: Path) -> None:
    ds = dw.xray_image(np.zeros((8, 8)), modality="CR")
    ds.Rows = 60000  # pixel data still 8x8: must be refused on the header alone
    path = tmp_path / "absurd.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeLimitExceeded):
        read_dataset(path)
    ds.Rows, ds.NumberOfFrames = 8, 100000
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeLimitExceeded):
        read_dataset(path)


def test_garbage_and_truncated_files_raise_imaging_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(ImagingError):
        read_dataset(junk)
    good = _data("RG1_J2KR.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImagingError):
        stored_values(read_dataset(cut))


def test_bits_stored_high_bits_are_masked(tmp_path: Path) -> None:
    ds = dw.xray_image(np.full((4, 4), 100), modality="CR", bits_stored=12)
    raw = np.frombuffer(ds.PixelData, dtype="<u2").copy()
    raw |= 0xF000  # garbage in the unused high bits
    ds.PixelData = raw.tobytes()
    assert stored_values(ds).max() == 100


def test_real_monochrome1_cr_and_its_jpeg2000_variants_preprocess_alike() -> None:
    spec = InputSpec.default("cxr", 224)
    images = {
        n: xray_input(read_dataset(_data(n)), spec)[0]
        for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
    }
    assert np.array_equal(images["RG1_UNCR.dcm"], images["RG1_J2KR.dcm"])
    assert np.abs(images["RG1_UNCR.dcm"] - images["RG1_J2KI.dcm"]).mean() < 0.01
    img = images["RG1_UNCR.dcm"]
    # MONOCHROME1 inverted: lungs (mid-height, a quarter in from each side) darker than the
    # mediastinum/spine in the middle column, as on a MONOCHROME2 display
    content = img[10:214, 16:208]
    lungs = (content[60:120, 35:65].mean() + content[60:120, 125:155].mean()) / 2
    middle = content[60:120, 88:104].mean()
    assert lungs < middle - 0.05
    header = read_header(_data("RG1_UNCR.dcm"))
    assert assess_series([header]).applicable


def test_pixel_spacing_zero_is_ignored_and_aspect_is_kept() -> None:
    ds = read_dataset(_data("RG1_UNCR.dcm"))  # Pixel Spacing 0.000\0.000, 1955 x 1841
    img = xray_input(ds, InputSpec.default("cxr", 224))[0]
    cols = np.nonzero(img.max(axis=0) > 0)[0]
    assert img.shape == (224, 224)
    assert cols.min() >= 5 and cols.max() <= 218  # letterboxed left and right


def test_deflate_stream_is_genuinely_deflated(tmp_path: Path) -> None:
    path = _deflated_file(tmp_path, 64)
    raw = path.read_bytes()
    meta = pydicom.filereader.read_file_meta_info(path)
    body = raw[132 + 12 + int(meta.FileMetaInformationGroupLength) :]
    assert len(zlib.decompress(body, -zlib.MAX_WBITS)) > len(body)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("RG1_J2KR.dcm", (1955, 1841)),
        ("JPEG-LL.dcm", (1024, 256)),
        ("JPGExtended.dcm", None),
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64)),
    ],
)
def test_codestream_size_is_read_without_decoding(name: str, size: tuple[int, int] | None) -> None:
    ds = read_dataset(_data(name))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    found = codestream_size(bytes(get_frame(ds.PixelData, 0, number_of_frames=frames)[:65536]))
    assert found == (size or (int(ds.Rows), int(ds.Columns)))


def test_codestream_larger_than_header_is_refused() -> None:
    ds = read_dataset(_data("RG1_J2KR.dcm"))
    ds.Rows, ds.Columns = 100, 100  # the codestream still says 1955 x 1841
    with pytest.raises(DecodeLimitExceeded, match="codestream declares 1955x1841"):
        stored_values(ds)
