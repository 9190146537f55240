"""Read DICOM files and decode their pixel data, refusing absurd or hostile input first.

Every transfer syntax of DESIGN.md §4 decodes here: implicit/explicit little endian, explicit
big endian and deflate (pydicom), JPEG baseline/extended/lossless, JPEG-LS (pylibjpeg-libjpeg),
JPEG 2000 (pylibjpeg-openjpeg) and RLE (pylibjpeg-rle or pydicom). Before any pixel is decoded
the declared geometry is checked against :class:`DecodeLimits`, so the memory a file can make
us allocate is bounded by the limits, not by what its compressed stream expands to. A deflated
dataset is inflated in a bounded stream before pydicom sees it (a deflate bomb would otherwise
be inflated whole by the parser).
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset as _parse_dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.utils import pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from pacs_ai.errors import DecodeLimitExceeded, ImagingError


@dataclass(frozen=True)
class DecodeLimits:
    """Upper bounds checked before decoding. Defaults fit any real CR/DX/CT/Enhanced CT."""

    max_rows: int = 16384
    max_columns: int = 16384
    max_frames: int = 4096
    # Decoded size of all frames (Rows x Columns x Frames x Samples x BitsAllocated/8).
    max_decoded_bytes: int = 2 * 1024**3
    # A deflated dataset may inflate to at most this many bytes.
    max_inflated_bytes: int = 2 * 1024**3


DEFAULT_LIMITS = DecodeLimits()


def read_header(path: Path) -> Dataset:
    """The dataset without pixel data (for gating and ordering); raises :class:`ImagingError`."""
    return _read(path, stop_before_pixels=True, limits=DEFAULT_LIMITS)


def read_dataset(path: Path, limits: DecodeLimits = DEFAULT_LIMITS) -> Dataset:
    """The whole dataset, checked against ``limits`` (pixel data still encoded)."""
    ds = _read(path, stop_before_pixels=False, limits=limits)
    check_limits(ds, limits)
    return ds


def check_limits(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Refuse absurd geometry before decoding (:class:`DecodeLimitExceeded`)."""
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImagingError(f"image geometry missing or invalid: {exc}") from exc
    if not (0 < rows <= limits.max_rows and 0 < cols <= limits.max_columns):
        raise DecodeLimitExceeded(f"image of {rows}x{cols} pixels is outside the limits")
    if not 0 < frames <= limits.max_frames:
        raise DecodeLimitExceeded(f"{frames} frames is outside the limit of {limits.max_frames}")
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise ImagingError(f"unsupported SamplesPerPixel={samples} BitsAllocated={bits}")
    decoded = rows * cols * frames * samples * max(bits, 8) // 8
    if decoded > limits.max_decoded_bytes:
        raise DecodeLimitExceeded(
            f"decoded size {decoded} bytes exceeds the limit of {limits.max_decoded_bytes}"
        )


def stored_values(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Decode one frame (or the only frame) to stored values, honouring Bits Stored.

    Returns a 2-D integer array (one sample per pixel) or (rows, cols, 3) for colour. Unused
    high bits are masked and signed values sign-extended from Bits Stored, whatever the
    decoder did. Raises :class:`ImagingError` when the stream cannot be decoded.
    """
    check_limits(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frame is not None and not 0 <= frame < frames:
        raise ImagingError(f"frame {frame} outside 0..{frames - 1}")
    _check_codestream(ds, frame or 0, frames)
    try:
        if frames == 1:
            arr = np.asarray(pixel_array(ds))
        else:
            arr = np.asarray(pixel_array(ds, index=frame or 0))
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise ImagingError(f"pixel data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return _honour_bits_stored(arr, ds)


# JPEG start-of-frame markers (all processes, and JPEG-LS SOF55) carry height and width.
_SOF = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF, 0xF7}
)


def codestream_size(data: bytes) -> tuple[int, int] | None:
    """(rows, columns) declared by a JPEG, JPEG-LS or JPEG 2000 codestream, read from its
    SOF or SIZ marker without decoding; None when not found."""
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 <= len(data) and data[i] == 0xFF:
            code = data[i + 1]
            if code in _SOF:
                return int.from_bytes(data[i + 5 : i + 7]), int.from_bytes(data[i + 7 : i + 9])
            if code == 0xFF:  # fill byte
                i += 1
                continue
            i += 2 + int.from_bytes(data[i + 2 : i + 4])
        return None
    at = data.find(b"\xff\x4f\xff\x51", 0, 4096)  # SOC then SIZ (raw or inside a JP2 box)
    if at < 0 or at + 24 > len(data):
        return None
    x, y, x0, y0 = (int.from_bytes(data[at + 8 + 4 * k : at + 12 + 4 * k]) for k in range(4))
    return y - y0, x - x0


def _check_codestream(ds: Dataset, frame: int, frames: int) -> None:
    """Refuse a compressed frame whose codestream is larger than the header says: decoders
    allocate what the codestream declares, so this is the bomb check for JPEG/J2K."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return
    try:
        data = get_frame(ds.PixelData, frame, number_of_frames=frames)
    except Exception as exc:  # malformed encapsulation
        raise ImagingError(f"encapsulated pixel data is malformed: {exc}") from exc
    size = codestream_size(bytes(data[:65536]))
    if size is not None and (size[0] > int(ds.Rows) or size[1] > int(ds.Columns)):
        raise DecodeLimitExceeded(
            f"codestream declares {size[0]}x{size[1]} pixels, the header {ds.Rows}x{ds.Columns}"
        )


def _honour_bits_stored(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    if arr.dtype.kind not in "iu" or bits_stored >= arr.dtype.itemsize * 8 or bits_stored < 1:
        return arr
    mask = (1 << bits_stored) - 1
    if int(ds.get("PixelRepresentation", 0) or 0) == 0:
        out = arr if arr.flags.writeable else arr.copy()
        np.bitwise_and(out, np.asarray(mask, dtype=out.dtype), out=out)
        return out
    sign = 1 << (bits_stored - 1)
    wide = arr.astype(np.int32)
    np.bitwise_and(wide, mask, out=wide)
    np.bitwise_xor(wide, sign, out=wide)
    wide -= sign
    return wide.astype(arr.dtype) if arr.dtype.itemsize <= 2 else wide


def _read(path: Path, *, stop_before_pixels: bool, limits: DecodeLimits) -> Dataset:
    try:
        try:
            meta = read_file_meta_info(path)
        except InvalidDicomError:
            meta = None  # no preamble: let dcmread decide
        if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            return _read_deflated(path, meta, limits)
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, zlib.error) as exc:
        raise ImagingError(f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc


def _read_deflated(path: Path, meta: FileMetaDataset, limits: DecodeLimits) -> Dataset:
    """Inflate the dataset in a bounded stream, then parse it as explicit VR little endian."""
    raw = Path(path).read_bytes()
    # preamble (128) + "DICM" (4) + the group length element (12) + the rest of group 0002
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts: list[bytes] = []
    produced = 0
    pending = raw[start:]
    while pending:
        piece = inflater.decompress(pending, 1 << 22)
        produced += len(piece)
        if produced > limits.max_inflated_bytes:
            raise DecodeLimitExceeded(
                f"deflated dataset inflates beyond {limits.max_inflated_bytes} bytes"
            )
        parts.append(piece)
        pending = inflater.unconsumed_tail
    parts.append(inflater.flush())
    ds = _parse_dataset(io.BytesIO(b"".join(parts)), is_implicit_VR=False, is_little_endian=True)
    plain = FileMetaDataset(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian  # the body is inflated now
    ds.file_meta = plain
    ds.set_original_encoding(False, True)
    return ds
