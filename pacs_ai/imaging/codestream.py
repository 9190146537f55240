"""Frame sizes declared inside JPEG, JPEG-LS and JPEG 2000 (incl. HTJ2K) codestreams.

Decoders allocate what the codestream declares, not what the DICOM header says, so ingest
(streaming from the spool file) and the pipeline's decoder (:func:`codestream_frame_size`, in
memory) read every frame header in a compressed fragment and compare it with Rows/Columns/
samples/bits. The walk follows marker segments by their lengths and, inside entropy-coded data,
searches for the next marker, through the *whole* fragment: a second frame header placed
late in the stream (after padding or scan data) is found wherever it sits (DESIGN.md §6.11).

Pure functions over a forward-only byte reader; nothing is decoded and memory stays at one
read chunk whatever the fragment's size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Protocol

_CHUNK = 256 * 1024

# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15, SOF55 (JPEG-LS) and DHP (hierarchical).
_JPEG_FRAME = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF, 0xF7, 0xDE}
)
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
_SOI, _EOI, _SOS, _LSE = 0xD8, 0xD9, 0xDA, 0xF8
_J2K_SOC, _J2K_SIZ, _J2K_SOT, _J2K_EOC = 0x4F, 0x51, 0x90, 0xD9
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


class CodestreamError(Exception):
    """The codestream cannot be walked (not the expected format, or malformed)."""


@dataclass(frozen=True)
class FrameSize:
    rows: int
    columns: int
    components: int
    bits: int  # sample precision (JPEG P, JPEG 2000 Ssiz + 1; the largest component)


class ByteReader(Protocol):
    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end."""
        ...


class _Cursor:
    """Buffered forward reader over at most ``limit`` bytes of ``src``."""

    def __init__(self, src: ByteReader, limit: int) -> None:
        self._src = src
        self._left = limit  # not yet pulled from src
        self._buf = b""
        self._pos = 0

    def _fill(self, need: int) -> bool:
        """Make at least ``need`` unread bytes available; False at the end."""
        while len(self._buf) - self._pos < need:
            if self._left <= 0:
                return False
            data = self._src.read(min(_CHUNK, self._left))
            if not data:
                self._left = 0
                return False
            self._left -= len(data)
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        return True

    def at_end(self) -> bool:
        return not self._fill(1)

    def available(self) -> int:
        self._fill(2)
        return len(self._buf) - self._pos

    def unread(self, data: bytes) -> None:
        self._buf = data + self._buf[self._pos :]
        self._pos = 0

    def read(self, n: int) -> bytes:
        if not self._fill(n):
            raise CodestreamError("codestream ends inside a marker segment")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def skip(self, n: int) -> bool:
        """Skip ``n`` bytes; False when fewer were left (the cursor is then at the end)."""
        while n > 0:
            available = len(self._buf) - self._pos
            if available >= n:
                self._pos += n
                return True
            n -= available
            self._buf, self._pos = b"", 0
            if not self._fill(1):
                return False
        return True

    def next_jpeg_marker(self, jpeg_ls: bool) -> int | None:
        """Scan entropy-coded data (or junk) for the next marker code; None at the end.

        JPEG stuffs 0xFF as FF00 and has RSTn; JPEG-LS bit-stuffs, so a marker is 0xFF
        followed by a byte with its high bit set.
        """
        while True:
            if not self._fill(2):
                self.skip(len(self._buf) - self._pos)
                return None
            at = self._buf.find(b"\xff", self._pos)
            if at < 0 or at == len(self._buf) - 1:
                keep = 1 if at == len(self._buf) - 1 else 0
                self._pos = len(self._buf) - keep
                if not self._fill(keep + 1):
                    self._pos = len(self._buf)
                    return None
                continue
            code = self._buf[at + 1]
            self._pos = at + 1
            if code == 0xFF:  # fill byte: the next FF may start the marker
                continue
            is_marker = code >= 0x80 if jpeg_ls else code != 0x00
            if is_marker and code not in _JPEG_STANDALONE:
                self._pos = at + 2
                return code


def _u16(b: bytes, at: int = 0) -> int:
    return int.from_bytes(b[at : at + 2], "big")


def _u32(b: bytes, at: int = 0) -> int:
    return int.from_bytes(b[at : at + 4], "big")


def jpeg_frames(src: ByteReader, length: int, jpeg_ls: bool = False) -> list[FrameSize]:
    """Every frame header (SOFn, SOF55, DHP, JPEG-LS LSE oversize) in a JPEG/JPEG-LS
    fragment of ``length`` bytes."""
    cur = _Cursor(src, length)
    if cur.read(2) != b"\xff\xd8":
        raise CodestreamError("JPEG fragment does not start with SOI")
    frames: list[FrameSize] = []
    code: int | None = _SOI
    while True:
        if code is None:
            return frames
        if code in (_SOI, _EOI) or code in _JPEG_STANDALONE:
            code = _next_marker_after_standalone(cur, jpeg_ls)
            continue
        if cur.at_end():
            return frames
        seg_len = _u16(cur.read(2))
        if seg_len < 2:
            raise CodestreamError("JPEG marker segment length below 2")
        if code in _JPEG_FRAME:
            seg = cur.read(seg_len - 2)
            if len(seg) < 6:
                raise CodestreamError("JPEG frame header too short")
            frames.append(FrameSize(_u16(seg, 1), _u16(seg, 3), seg[5], seg[0]))
        elif code == _LSE:
            seg = cur.read(seg_len - 2)
            frames.extend(_lse_oversize(seg, frames))
        elif not cur.skip(seg_len - 2):
            return frames
        if code in (_SOS, _LSE):
            code = cur.next_jpeg_marker(jpeg_ls)
        else:
            code = _next_marker_after_standalone(cur, jpeg_ls)


def _next_marker_after_standalone(cur: _Cursor, jpeg_ls: bool) -> int | None:
    """Between marker segments the next byte should be 0xFF; tolerate junk like libjpeg
    ("extraneous bytes before marker") by scanning on."""
    return cur.next_jpeg_marker(jpeg_ls)


def _lse_oversize(seg: bytes, frames: list[FrameSize]) -> list[FrameSize]:
    """JPEG-LS LSE id 4 redefines the image size (PS3.5 A.4.3 / ITU T.870 C.2.4.1.4)."""
    if not seg or seg[0] != 4 or len(seg) < 2:
        return []
    width = seg[1]
    if len(seg) < 2 + 2 * width or width == 0:
        raise CodestreamError("JPEG-LS oversize segment too short")
    rows = int.from_bytes(seg[2 : 2 + width], "big")
    cols = int.from_bytes(seg[2 + width : 2 + 2 * width], "big")
    base = frames[-1] if frames else FrameSize(0, 0, 0, 0)
    return [FrameSize(rows, cols, base.components, base.bits)]


def j2k_frames(src: ByteReader, length: int) -> list[FrameSize]:
    """Every SIZ in a JPEG 2000 / HTJ2K fragment of ``length`` bytes (raw codestream, or one
    wrapped in JP2 boxes); tile-parts are skipped by their Psot lengths, and the bytes after
    an EOC are searched for a further codestream (SOC SIZ)."""
    cur = _Cursor(src, length)
    head = cur.read(12)
    if head == _JP2_SIGNATURE:
        _skip_to_jp2c(cur)
        head = cur.read(2)
    if head[:2] != b"\xff\x4f":
        raise CodestreamError("JPEG 2000 fragment does not start with SOC")
    cur.unread(head[2:])
    frames: list[FrameSize] = []
    while True:
        if not _walk_j2k_codestream(cur, frames) or not _find_next_soc(cur):
            return frames


def _skip_to_jp2c(cur: _Cursor) -> None:
    while True:
        box = cur.read(8)
        size, kind = _u32(box), box[4:8]
        header = 8
        if size == 1:
            size = int.from_bytes(cur.read(8), "big")
            header = 16
        if kind == b"jp2c":
            return
        if size == 0 or size < header or not cur.skip(size - header):
            raise CodestreamError("JP2 file without a contiguous codestream box")


def _walk_j2k_codestream(cur: _Cursor, frames: list[FrameSize]) -> bool:
    """From just after SOC to EOC; False when the fragment ended first."""
    while True:
        if cur.at_end():
            return False
        marker = cur.read(2)
        if marker[0] != 0xFF:
            raise CodestreamError("JPEG 2000 marker expected")
        code = marker[1]
        if code == _J2K_EOC:
            return True
        seg_len = _u16(cur.read(2))
        if seg_len < 2:
            raise CodestreamError("JPEG 2000 marker segment length below 2")
        if code == _J2K_SIZ:
            frames.append(_siz(cur.read(seg_len - 2)))
        elif code == _J2K_SOT:
            seg = cur.read(seg_len - 2)
            if len(seg) < 8:
                raise CodestreamError("JPEG 2000 SOT too short")
            psot = _u32(seg, 2)
            if psot == 0:  # the last tile-part runs to the EOC that ends the codestream
                cur.skip(1 << 62)
                return False
            if psot < 2 + seg_len or not cur.skip(psot - 2 - seg_len):
                return False  # the tile-part continues in the next fragment
        elif not cur.skip(seg_len - 2):
            return False


def _siz(seg: bytes) -> FrameSize:
    if len(seg) < 36 + 3:
        raise CodestreamError("JPEG 2000 SIZ too short")
    xsiz, ysiz, x0, y0 = (_u32(seg, 2 + 4 * k) for k in range(4))
    components = _u16(seg, 34)
    if components == 0 or len(seg) < 36 + 3 * components:
        raise CodestreamError("JPEG 2000 SIZ component list too short")
    bits = max((seg[36 + 3 * c] & 0x7F) + 1 for c in range(components))
    return FrameSize(ysiz - y0, xsiz - x0, components, bits)


def _find_next_soc(cur: _Cursor) -> bool:
    """Search the rest of the fragment for SOC directly followed by SIZ; leave the cursor
    just after SOC."""
    while True:
        code = cur.next_jpeg_marker(jpeg_ls=False)
        if code is None:
            return False
        if code == _J2K_SOC and not cur.at_end():
            nxt = cur.read(min(2, cur.available()))
            cur.unread(nxt)
            if nxt == b"\xff\x51":
                return True


def codestream_frame_size(data: bytes, jpeg_ls: bool = False) -> FrameSize | None:
    """What an in-memory JPEG / JPEG-LS / JPEG 2000 (raw or JP2) frame declares: the largest
    of each field over all its frame headers. None when it is none of these, is malformed or
    declares no frame (callers refuse that for those transfer syntaxes)."""
    try:
        if data[:2] == b"\xff\xd8":
            frames = jpeg_frames(io.BytesIO(data), len(data), jpeg_ls)
        else:
            frames = j2k_frames(io.BytesIO(data), len(data))
    except CodestreamError:
        return None
    if not frames:
        return None
    return FrameSize(
        max(f.rows for f in frames),
        max(f.columns for f in frames),
        max(f.components for f in frames),
        max(f.bits for f in frames),
    )
