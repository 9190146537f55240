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
from pacs_ai.imaging.codestream import FrameSize, codestream_frame_size
from pacs_ai.imaging.decode import (
    DecodeLimits,
    read_dataset,
    read_header,
    stored_values,
)
from pacs_ai.imaging.gating import assess_series
from pacs_ai.imaging.prepare import xray_input
from pacs_ai.imaging.spec import InputSpec
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
        ("RG1_J2KR.dcm", FrameSize(1955, 1841, 1, 15)),
        ("JPEG-LL.dcm", FrameSize(1024, 256, 1, 16)),
        ("JPGExtended.dcm", FrameSize(1024, 256, 1, 12)),
        ("MR_small_jpeg_ls_lossless.dcm", FrameSize(64, 64, 1, 16)),
        ("SC_rgb_jpeg_dcmtk.dcm", FrameSize(100, 100, 3, 8)),
    ],
)
def test_codestream_frame_size_is_read_without_decoding(name: str, size: FrameSize) -> None:
    ds = read_dataset(_data(name))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    assert codestream_frame_size(get_frame(ds.PixelData, 0, number_of_frames=frames)) == size


def test_codestream_larger_than_header_is_refused() -> None:
    ds = read_dataset(_data("RG1_J2KR.dcm"))
    ds.Rows, ds.Columns = 100, 100  # the codestream still says 1955 x 1841
    with pytest.raises(DecodeLimitExceeded, match="codestream declares 1955x1841"):
        stored_values(ds)


def _jpeg_with_late_huge_frame(small: bytes) -> bytes:
    """A real JPEG whose SOF follows 200 KiB of APP segments, plus a second SOF declaring
    60000 x 60000 after the first scan: the header-only prefix check missed both."""
    sof = small.index(b"\xff\xc3")  # JPEG-LL.dcm is lossless (SOF3)
    pad = b"".join(b"\xff\xe1" + (65535).to_bytes(2, "big") + bytes(65533) for _ in range(3))
    huge = b"\xff\xc3\x00\x0b\x10" + (60000).to_bytes(2, "big") * 2 + b"\x01\x01\x11\x00"
    body = small[2:sof] + small[sof:-2]
    return b"\xff\xd8" + pad + body + huge + b"\xff\xd9"


def test_frame_header_anywhere_in_the_frame_is_found() -> None:
    ds = read_dataset(_data("JPEG-LL.dcm"))
    frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    found = codestream_frame_size(_jpeg_with_late_huge_frame(frame))
    assert found == FrameSize(60000, 60000, 1, 16)


def test_j2k_siz_declaring_more_than_the_header_is_refused(tmp_path: Path) -> None:
    ds = read_dataset(_data("RG1_J2KR.dcm"))
    frame = bytearray(get_frame(ds.PixelData, 0, number_of_frames=1))
    at = frame.index(b"\xff\x51")
    frame[at + 6 : at + 14] = (40000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    assert codestream_frame_size(frame) == FrameSize(40000, 40000, 1, 15)
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    with pytest.raises(DecodeLimitExceeded, match="codestream declares 40000x40000"):
        stored_values(ds)


def test_compressed_frame_without_frame_header_is_refused() -> None:
    ds = read_dataset(_data("JPEG-LL.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    with pytest.raises(DecodeLimitExceeded, match="no frame header"):
        stored_values(ds)


def test_deflated_header_read_inflates_only_up_to_pixel_data(tmp_path: Path) -> None:
    ds = dw.xray_image(np.zeros((8, 8)), modality="CR")
    ds.Rows = ds.Columns = 16384  # a 512 MiB deflate bomb in Pixel Data
    ds.PixelData = bytes(16384 * 16384 * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    del ds
    assert path.stat().st_size < 1_000_000
    import tracemalloc

    tracemalloc.start()
    header = read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert header.Rows == 16384 and "PixelData" not in header
    assert peak < 16 * 1024**2
    with pytest.raises(DecodeLimitExceeded):
        read_dataset(path, DecodeLimits(max_decoded_bytes=64 * 1024**2))


def test_deflated_pixel_data_longer_than_declared_is_refused(tmp_path: Path) -> None:
    ds = dw.xray_image(np.zeros((64, 64)), modality="CR")
    ds.PixelData = bytes(200 * 1024**2)  # header says 64x64: 8 KiB
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeLimitExceeded, match="inflates beyond"):
        read_dataset(path)
