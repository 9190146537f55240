"""Read DICOM files and decode their pixel data, refusing absurd or hostile input first.

Every transfer syntax of DESIGN.md §4 decodes here: implicit/explicit little endian, explicit
big endian and deflate (pydicom), JPEG baseline/extended/lossless, JPEG-LS (pylibjpeg-libjpeg),
JPEG 2000 (pylibjpeg-openjpeg) and RLE (pylibjpeg-rle or pydicom). Before any pixel is decoded
the declared geometry is checked against :class:`DecodeLimits`, so the memory a file can make
us allocate is bounded by the limits, not by what its compressed stream expands to; a JPEG/J2K
frame is checked against what its codestream declares (:mod:`pacs_ai.imaging.codestream`). A
deflated dataset is inflated in a bounded stream before pydicom sees it (pydicom would inflate
it whole): a header read inflates only up to Pixel Data, a full read at most what the header
declares.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset as _parse_dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from pacs_ai.errors import DecodeLimitExceeded, ImagingError
from pacs_ai.imaging.codestream import codestream_frame_size


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
        raise ImagingError(f"image geometry missing or invalid ({type(exc).__name__})") from exc
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
        raise ImagingError(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    return _honour_bits_stored(arr, ds)


_FRAME_HEADER_SYNTAXES = frozenset(
    {*JPEGTransferSyntaxes, *JPEGLSTransferSyntaxes, *JPEG2000TransferSyntaxes}
)


def _check_codestream(ds: Dataset, frame: int, frames: int) -> None:
    """Refuse a compressed frame whose codestream declares more than the header (rows,
    columns, samples, precision) or declares nothing: decoders allocate what the codestream
    says, so this is the bomb check for JPEG/JPEG-LS/J2K. The whole frame is walked."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return
    try:
        data = get_frame(ds.PixelData, frame, number_of_frames=frames)
    except Exception as exc:  # malformed encapsulation
        raise ImagingError(f"encapsulated pixel data is malformed ({type(exc).__name__})") from exc
    size = codestream_frame_size(bytes(data), jpeg_ls=syntax in JPEGLSTransferSyntaxes)
    if size is None:
        if syntax in _FRAME_HEADER_SYNTAXES:
            raise DecodeLimitExceeded("no frame header found in the compressed frame")
        return  # RLE and others: the decoder uses the DICOM header's geometry
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if size.rows > rows or size.columns > cols or size.components > samples or size.bits > bits:
        raise DecodeLimitExceeded(
            f"codestream declares {size.rows}x{size.columns}x{size.components} "
            f"({size.bits} bits), the header {rows}x{cols}x{samples} ({bits} bits)"
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


# A header (everything before Pixel Data) larger than this is refused; header reads of plain
# files defer values over _LARGE_VALUE bytes and drop them (gating and reports never need them).
_HEADER_BYTES = 64 * 1024**2
_LARGE_VALUE = 1 << 20
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_PARSE_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, zlib.error)


def _read(path: Path, *, stop_before_pixels: bool, limits: DecodeLimits) -> Dataset:
    try:
        try:
            meta = read_file_meta_info(path)
        except InvalidDicomError:
            meta = None  # no preamble: let dcmread decide
        if meta is not None and meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            header = _deflated_header(path, meta)
            return header if stop_before_pixels else _read_deflated(path, meta, header, limits)
        if not stop_before_pixels:
            return pydicom.dcmread(path)
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=_LARGE_VALUE)
        for elem in list(ds.elements()):
            if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
                del ds[elem.tag]
        return ds
    except _PARSE_ERRORS as exc:
        raise ImagingError(f"not a readable DICOM file ({type(exc).__name__})") from exc


class _Inflater:
    """Inflates the deflated body of a file on demand, never more than asked for."""

    def __init__(self, path: Path, meta: FileMetaDataset) -> None:
        self._path = path
        # preamble (128) + "DICM" (4) + the group length element (12) + the rest of group 0002
        self._offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)

    def read(self, upto: int) -> tuple[bytearray, bool]:
        """The first ``upto`` inflated bytes (fewer at the end), and whether that is all."""
        out = bytearray()
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        with open(self._path, "rb") as fh:
            fh.seek(self._offset)
            pending = b""
            while len(out) < upto:
                if not pending:
                    pending = fh.read(1 << 16)
                    if not pending:
                        out += inflater.flush()
                        return out, True
                out += inflater.decompress(pending, upto - len(out))
                pending = inflater.unconsumed_tail
                if inflater.eof:
                    return out, True
            return out, inflater.eof or (not pending and not fh.read(1))


def _parse(data: bytes, stop_at_pixels: bool) -> tuple[Dataset, bool]:
    seen = [False]

    def at_pixels(tag: object, _vr: object, _length: int) -> bool:
        if int(tag) in _PIXEL_TAGS:  # type: ignore[call-overload]
            seen[0] = True
        return stop_at_pixels and seen[0]

    ds = _parse_dataset(
        io.BytesIO(data), is_implicit_VR=False, is_little_endian=True, stop_when=at_pixels
    )
    return ds, seen[0]


def _with_meta(ds: Dataset, meta: FileMetaDataset) -> Dataset:
    plain = FileMetaDataset(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian  # the body is inflated now
    ds.file_meta = plain
    ds.set_original_encoding(False, True)
    return ds


def _deflated_header(path: Path, meta: FileMetaDataset) -> Dataset:
    """Inflate only up to Pixel Data (1 MiB, then 4x more up to the header cap); the
    inflated prefix is dropped once parsed."""
    inflater = _Inflater(path, meta)
    want = 1 << 20
    while True:
        data, complete = inflater.read(want)
        try:
            ds, at_pixels = _parse(bytes(data), stop_at_pixels=True)
        except (EOFError, ValueError):
            if complete:
                raise
            at_pixels = False
        if at_pixels or complete:
            return _with_meta(ds, meta)
        if want >= _HEADER_BYTES:
            raise DecodeLimitExceeded(f"header of a deflated dataset exceeds {_HEADER_BYTES} bytes")
        want *= 4


def _read_deflated(
    path: Path, meta: FileMetaDataset, header: Dataset, limits: DecodeLimits
) -> Dataset:
    """Inflate the whole dataset, at most what its header declares (a deflate bomb in Pixel
    Data is refused at that size, not at the global cap), then parse it."""
    cap = limits.max_inflated_bytes
    if "Rows" in header:
        check_limits(header, limits)
        declared = (
            int(header.Rows)
            * int(header.Columns)
            * int(header.get("NumberOfFrames", 1) or 1)
            * int(header.get("SamplesPerPixel", 1) or 1)
            * max(int(header.BitsAllocated), 8)
            // 8
        )
        cap = min(cap, declared + _HEADER_BYTES)
    data, complete = _Inflater(path, meta).read(cap + 1)
    if len(data) > cap or not complete:
        raise DecodeLimitExceeded(f"deflated dataset inflates beyond {cap} bytes")
    body = bytes(data)
    del data
    ds, _ = _parse(body, stop_at_pixels=False)
    return _with_meta(ds, meta)
