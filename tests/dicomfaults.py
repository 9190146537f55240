"""Hostile and broken DICOM payloads for ingest tests: compressed frames whose codestream
disagrees with the header, deflate bombs, datasets cut at chosen points."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import openjpeg
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from tests.conftest import dx_dataset

SMALL = 64


def small_pixels() -> np.ndarray:
    return (np.arange(SMALL * SMALL) % 200).astype(np.uint8).reshape(SMALL, SMALL)


def jpeg_frame() -> bytes:
    out = io.BytesIO()
    Image.fromarray(small_pixels()).save(out, format="JPEG")
    return out.getvalue()


def j2k_frame() -> bytes:
    return bytes(openjpeg.encode(small_pixels()))


def sof0(rows: int, cols: int) -> bytes:
    """A baseline JPEG frame header (one 8-bit component)."""
    return b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, rows, cols, 1) + b"\x01\x11\x00"


def jpeg_huge_sof_after_padding(rows: int = 40000, cols: int = 40000) -> bytes:
    """SOI, 8 KiB of APP segments (past any fixed look-ahead window), then a huge SOF."""
    frame = jpeg_frame()
    app = b"\xff\xe1" + struct.pack(">H", 4002) + bytes(4000)
    return frame[:2] + app + app + sof0(rows, cols) + frame[2:]


def jpeg_second_image_after_eoi(rows: int = 40000, cols: int = 40000) -> bytes:
    """A valid small JPEG, then a second image whose SOF declares a huge one."""
    return jpeg_frame() + b"\xff\xd8" + sof0(rows, cols) + b"\xff\xd9"


def j2k_second_codestream(rows: int = 40000, cols: int = 40000) -> bytes:
    """A valid small J2K codestream, then a second one whose SIZ declares a huge image."""
    frame = j2k_frame()
    start = frame.index(b"\xff\x51")
    siz_len = int.from_bytes(frame[start + 2 : start + 4], "big")
    siz = bytearray(frame[start : start + 2 + siz_len])
    siz[6:14] = struct.pack(">LL", cols, rows)
    siz[22:30] = struct.pack(">LL", cols, rows)  # one tile
    return frame + b"\xff\x4f" + bytes(siz) + b"\xff\xd9"


def j2k_huge_siz(rows: int = 40000, cols: int = 40000) -> bytes:
    frame = bytearray(j2k_frame())
    start = frame.index(b"\xff\x51")
    frame[start + 6 : start + 14] = struct.pack(">LL", cols, rows)
    frame[start + 22 : start + 30] = struct.pack(">LL", cols, rows)
    return bytes(frame)


def compressed_dataset(fragment: bytes, transfer_syntax: UID, seed: int = 0) -> Dataset:
    """A 64x64 8-bit DX image whose Pixel Data is ``fragment`` (one frame, encapsulated)."""
    ds = dx_dataset(size=SMALL, seed=seed)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def deflate_bomb(header: bytes, inflated_zeros: int) -> bytes:
    """``header`` followed by ``inflated_zeros`` zero bytes, raw-deflated: about 1 KiB on the
    wire per MiB inflated (identical blocks after full flushes, built in milliseconds)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    mib, rest = divmod(inflated_zeros, 1 << 20)
    out.append(block * mib)
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out.append(tail.compress(bytes(rest)) + tail.flush())
    return b"".join(out)
