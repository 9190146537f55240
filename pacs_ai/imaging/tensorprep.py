"""The production preprocessing path: decode to stored values, then table lookup and
letterbox as (batched) tensor operations, on the GPU when there is one.

Split in two so the halves can run in different places:

1. :func:`decode_file` / :func:`decode_dataset` (CPU; in decode processes,
   :mod:`pacs_ai.inference.decodepool`): the stored values of one image and a per-value
   *table* of the whole display policy. Every pixel transform before the resize is a function
   of the stored value alone — Bits Stored masking and sign extension, the Modality LUT
   (rescale or LUT), VOI LUT / window, MONOCHROME1 / INVERSE inversion for X-ray; rescale,
   Pixel Padding -> air, and each HU window for CT — so it is evaluated once per possible
   stored bit pattern (2^BitsAllocated entries, 8 or 16 bits) by the reference functions of
   :mod:`pacs_ai.imaging.lut` and :mod:`pacs_ai.imaging.ct`, and the image keeps its raw
   stored bits. An uncompressed little-endian frame is read straight from the file region of
   Pixel Data (no pydicom pixel conversion, no masking pass); every limit of
   :mod:`pacs_ai.imaging.decode` is checked first. Other syntaxes decode through
   :func:`pacs_ai.imaging.decode.stored_values`. Images a table cannot serve (32-bit, float)
   carry their planes computed by the reference functions.
2. :func:`finish` (on the model's device): the table lookup (``index_select``) and the
   square-pixel letterbox (:func:`pacs_ai.imaging.geometry.letterbox`, antialiased bilinear),
   batched over images that share a geometry. On CUDA the stored bits travel as 8/16-bit
   integers through pinned memory with non-blocking copies (a quarter of the float32 bytes).

The numpy functions in :mod:`pacs_ai.imaging.reference` are the reference implementation;
``tests/unit/test_tensorprep.py`` compares both on real images. On the CPU the numbers are
the same to the bit (the same float32 maths per stored value, the same resize kernel).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pacs_ai.errors import ImagingError
from pacs_ai.imaging.ct import hu_window, to_hu
from pacs_ai.imaging.decode import (
    DEFAULT_LIMITS,
    DecodeLimits,
    check_limits,
    read_dataset,
    stored_values,
)
from pacs_ai.imaging.geometry import letterbox, pixel_spacing
from pacs_ai.imaging.lut import _policy, display_values

_PIXEL_DATA = 0x7FE00010
_NATIVE = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
# Values larger than this are left in the file while the header is parsed (Pixel Data).
_DEFER_BYTES = 1 << 20
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Decoded:
    """One image ready for :func:`finish`.

    Either ``bits`` (H, W) uint8/uint16 raw stored bit patterns with ``table`` (C, 2^n)
    float32 giving each channel's [0, 1] value per bit pattern, or ``planes`` (C, H, W)
    float32 already mapped. ``spacing``: (row, column) mm or None.
    """

    spacing: tuple[float, float] | None
    bits: np.ndarray | None = None
    table: np.ndarray | None = None
    planes: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        src = self.bits if self.bits is not None else self.planes
        assert src is not None
        return int(src.shape[-2]), int(src.shape[-1])


# --- part 1: decode (CPU) ----------------------------------------------------------------------


def decode_file(
    path: Path,
    kind: str,
    windows: tuple[tuple[float, float], ...] = (),
    frame: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Decoded:
    """Read and decode one image (``kind`` "cxr" or "ct"; CT ``windows`` one per channel)."""
    native = _read_native(path, frame, limits)
    if native is not None:
        ds, bits = native
        return Decoded(pixel_spacing(ds), bits=bits, table=_table(ds, kind, windows, frame))
    return decode_dataset(_cached_dataset(path, limits), kind, windows, frame)


def decode_dataset(
    ds: Dataset, kind: str, windows: tuple[tuple[float, float], ...] = (), frame: int | None = None
) -> Decoded:
    """Decode a dataset already read (:func:`~pacs_ai.imaging.decode.read_dataset`)."""
    stored = stored_values(ds, frame)
    if stored.ndim != 2:
        raise ImagingError("expected a single-sample (greyscale) image")
    spacing = pixel_spacing(ds)
    width = _table_bits(ds)
    if width is not None and stored.dtype.kind in "iu" and stored.dtype.itemsize * 8 == width:
        unsigned = np.uint8 if width == 8 else np.uint16
        return Decoded(spacing, bits=stored.view(unsigned), table=_table(ds, kind, windows, frame))
    if kind == "cxr":
        planes = display_values(stored, ds)[None]
    else:
        hu = to_hu(stored, ds, frame)
        planes = np.stack([hu_window(hu, c, w) for c, w in windows])
    return Decoded(spacing, planes=np.ascontiguousarray(planes, dtype=np.float32))


def _table_bits(ds: Dataset) -> int | None:
    bits = int(ds.BitsAllocated)
    return bits if bits in (8, 16) else None


def stored_patterns(ds: Dataset) -> np.ndarray:
    """The stored value (int64) of each possible raw bit pattern 0 .. 2^BitsAllocated - 1:
    unused high bits masked, signed values sign-extended from Bits Stored, as
    :func:`~pacs_ai.imaging.decode.stored_values` makes them."""
    alloc = int(ds.BitsAllocated)
    stored = int(ds.get("BitsStored", alloc) or alloc)
    if not 1 <= stored <= alloc:
        stored = alloc
    values = np.arange(1 << alloc, dtype=np.int64) & ((1 << stored) - 1)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        sign = 1 << (stored - 1)
        values = (values ^ sign) - sign
    return values


def _table(
    ds: Dataset, kind: str, windows: tuple[tuple[float, float], ...], frame: int | None
) -> np.ndarray:
    """(C, 2^BitsAllocated) float32: the reference policy evaluated per bit pattern."""
    values = stored_patterns(ds)
    if kind == "cxr":
        return np.ascontiguousarray(_policy(values, ds)[None], dtype=np.float32)
    hu = to_hu(values[None], ds, frame)[0]
    return np.ascontiguousarray(np.stack([hu_window(hu, c, w) for c, w in windows]))


def _read_native(
    path: Path, frame: int | None, limits: DecodeLimits
) -> tuple[Dataset, np.ndarray] | None:
    """(header, raw bits) of an uncompressed little-endian greyscale 8/16-bit frame read
    straight from its file region, or None when the file is anything else."""
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError:
        return None
    except (OSError, ValueError, EOFError) as exc:
        raise ImagingError(f"not a readable DICOM file ({type(exc).__name__})") from exc
    if meta.get("TransferSyntaxUID") not in _NATIVE:
        return None
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise ImagingError(f"not a readable DICOM file ({type(exc).__name__})") from exc
    check_limits(ds, limits)
    width = _table_bits(ds)
    if width is None or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if not isinstance(elem, RawDataElement) or elem.length == _UNDEFINED:
        return None  # no (integer) Pixel Data, or encapsulated: the decoder path says why
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frame or 0
    if not 0 <= index < frames:
        raise ImagingError(f"frame {index} outside 0..{frames - 1}")
    dtype = np.dtype("<u2") if width == 16 else np.dtype(np.uint8)
    count = rows * cols
    per_frame = count * dtype.itemsize
    if elem.length < per_frame * frames:
        raise ImagingError("Pixel Data is shorter than the image geometry declares")
    if elem.value is not None:
        if len(elem.value) < per_frame * frames:
            raise ImagingError("Pixel Data runs past the end of the file")
        bits = np.frombuffer(elem.value, dtype=dtype, count=count, offset=index * per_frame)
    else:
        try:
            bits = np.fromfile(
                path, dtype=dtype, count=count, offset=elem.value_tell + index * per_frame
            )
        except OSError as exc:
            raise ImagingError(f"pixel data cannot be read ({type(exc).__name__})") from exc
        if bits.size != count:
            raise ImagingError("Pixel Data runs past the end of the file")
    return ds, bits.reshape(rows, cols).astype(np.uint16 if width == 16 else np.uint8, copy=False)


_local = threading.local()


def _cached_dataset(path: Path, limits: DecodeLimits) -> Dataset:
    """The last dataset read by this thread (the frames of one compressed Enhanced CT file
    are not read once per frame)."""
    last: tuple[Path, Dataset] | None = getattr(_local, "last", None)
    if last is None or last[0] != path:
        _local.last = None  # drop the previous one before reading the next
        last = (path, read_dataset(path, limits))
        _local.last = last
    return last[1]


# --- part 2: table lookup and letterbox (the model's device) -----------------------------------


def finish(items: list[Decoded], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model inputs (N, C, size, size) float32 in [0, 1] on ``device``: each image's
    table lookup, then the letterbox, batched over images of one geometry."""
    dev = torch.device(device)
    if not items:
        raise ImagingError("no image to prepare")
    planes = [_planes(item, dev) for item in items]
    channels = planes[0].shape[0]
    if any(p.shape[0] != channels for p in planes):
        raise ImagingError("images of one batch differ in channels")
    out = torch.empty((len(items), channels, size, size), dtype=torch.float32, device=dev)
    groups: dict[tuple[int, int, tuple[float, float] | None], list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[(*item.shape, item.spacing)].append(i)
    for (_, _, spacing), members in groups.items():
        src = (
            planes[members[0]][None]
            if len(members) == 1
            else torch.stack([planes[i] for i in members])
        )
        fitted, _ = letterbox(src, size, spacing, pad=0.0)
        if len(members) == 1:
            out[members[0]] = fitted[0]
        else:
            out[torch.tensor(members, device=dev)] = fitted
    return out


def _to_device(arr: np.ndarray, dev: torch.device) -> torch.Tensor:
    t = torch.from_numpy(arr)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t


def _planes(item: Decoded, dev: torch.device) -> torch.Tensor:
    """(C, H, W) float32 on ``dev``."""
    if item.planes is not None:
        return _to_device(np.ascontiguousarray(item.planes, dtype=np.float32), dev)
    assert item.bits is not None and item.table is not None
    h, w = item.shape
    table = _to_device(item.table, dev)
    if dev.type == "cuda":
        # the raw bits cross as 8/16-bit integers; widened to an index on the GPU
        raw = item.bits.view(np.int16) if item.bits.dtype == np.uint16 else item.bits
        index = _to_device(np.ascontiguousarray(raw), dev).to(torch.int32)
        if item.bits.dtype == np.uint16:
            index = index & 0xFFFF
    else:
        index = torch.from_numpy(item.bits.astype(np.int32))
    return table.index_select(1, index.reshape(-1)).reshape(table.shape[0], h, w)


@dataclass(frozen=True)
class PrepTask:
    """One image to prepare, as sent to a decode process: the file, its frame, "cxr"/"ct",
    the CT windows, the model's input size, and whether to finish it there (CPU models)."""

    path: Path
    frame: int | None
    kind: str
    windows: tuple[tuple[float, float], ...]
    size: int
    finish_here: bool


def prepare_task(task: PrepTask) -> np.ndarray | Decoded:
    """Run in a decode process (or thread): the finished (C, size, size) float32 input when
    ``task.finish_here`` (the model is on the CPU), else the :class:`Decoded` image for
    :func:`finish` on the model's device."""
    decoded = decode_file(task.path, task.kind, task.windows, task.frame)
    if not task.finish_here:
        return decoded
    return finish([decoded], task.size)[0].numpy()
