"""What a JPEG / JPEG-LS / JPEG 2000 codestream declares, read without decoding.

Decoders allocate what the codestream's frame header says, not what the DICOM header says, so
this is the decompression-bomb check for compressed pixel data. The walk follows segment
lengths marker by marker through the whole buffer (no fixed prefix), so a frame header cannot
hide behind large application segments, and every frame header found counts (the largest
wins), so a small first one cannot cover a huge later one.
"""

from __future__ import annotations

from typing import NamedTuple


class FrameSize(NamedTuple):
    """The largest geometry a codestream declares: rows, columns, components (samples per
    pixel) and sample precision in bits."""

    rows: int
    columns: int
    samples: int
    precision: int


# JPEG start-of-frame markers (all processes), DHP (hierarchical) and JPEG-LS SOF55.
_SOF = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), 0xCD, 0xCE, 0xCF, 0xDE, 0xF7}
)
_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})  # TEM, RSTn, SOI, EOI: no length
_SOS = 0xDA
_J2K_SOC = b"\xff\x4f"
_J2K_SIZ = 0xFF51
_J2K_SOT = 0xFF90
_J2K_EOC = 0xFFD9
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"


def codestream_frame_size(data: bytes | bytearray | memoryview) -> FrameSize | None:
    """The frame size a JPEG/JPEG-LS (SOFn), JPEG 2000 (SIZ, raw or in a JP2 file) codestream
    declares; over several frame headers, the largest of each field. None when the buffer is
    not such a codestream or no frame header is found in it (callers refuse that)."""
    buf = data if isinstance(data, bytes) else bytes(data)
    if buf[:2] == b"\xff\xd8":
        return _jpeg(buf)
    if buf[:12] == _JP2_SIGNATURE:
        inner = _jp2_codestream(buf)
        return None if inner is None else _j2k(inner)
    if buf[:2] == _J2K_SOC:
        return _j2k(buf)
    return None


def _be(buf: bytes, at: int, n: int) -> int:
    return int.from_bytes(buf[at : at + n], "big")


def _largest(found: list[FrameSize]) -> FrameSize | None:
    if not found:
        return None
    return FrameSize(*(max(f[k] for f in found) for k in range(4)))


def _jpeg(buf: bytes) -> FrameSize | None:
    found: list[FrameSize] = []
    end = len(buf)
    i = 2
    while i + 1 < end:
        if buf[i] != 0xFF:
            return _largest(found)  # not at a marker: malformed, stop with what we have
        code = buf[i + 1]
        if code == 0xFF:  # fill byte
            i += 1
            continue
        if code in _STANDALONE:
            if code == 0xD9:  # EOI
                break
            i += 2
            continue
        if i + 4 > end:
            break
        length = _be(buf, i + 2, 2)
        if length < 2:
            break
        if code in _SOF and i + 10 <= end:
            # FF Cn, Lf(2), P(1), Y(2), X(2), Nf(1)
            found.append(FrameSize(_be(buf, i + 5, 2), _be(buf, i + 7, 2), buf[i + 9], buf[i + 4]))
        i += 2 + length
        if code == _SOS:
            i = _skip_entropy_coded(buf, i)
    return _largest(found)


def _skip_entropy_coded(buf: bytes, i: int) -> int:
    """The index of the next marker after entropy-coded data (FF followed by neither 00,
    a restart marker nor a fill byte)."""
    end = len(buf)
    while True:
        i = buf.find(b"\xff", i)
        if i < 0 or i + 1 >= end:
            return end
        nxt = buf[i + 1]
        if nxt == 0x00 or 0xD0 <= nxt <= 0xD7:
            i += 2
        elif nxt == 0xFF:
            i += 1
        else:
            return i


def _j2k(buf: bytes) -> FrameSize | None:
    """Walk the main header (SOC, then marker segments by length) up to the first tile."""
    found: list[FrameSize] = []
    end = len(buf)
    i = 2
    while i + 4 <= end:
        marker = _be(buf, i, 2)
        if marker in (_J2K_SOT, _J2K_EOC) or marker >> 8 != 0xFF:
            break
        length = _be(buf, i + 2, 2)
        if length < 2:
            break
        if marker == _J2K_SIZ and i + 41 <= end:
            # FF51 Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz {Ssiz XR YR}
            x, y, x0, y0 = (_be(buf, i + 6 + 4 * k, 4) for k in range(4))
            components = _be(buf, i + 38, 2)
            precision = max(
                (
                    (buf[i + 40 + 3 * c] & 0x7F) + 1
                    for c in range(components)
                    if i + 40 + 3 * c < end
                ),
                default=0,
            )
            found.append(FrameSize(max(y - y0, 0), max(x - x0, 0), components, precision))
        i += 2 + length
    return _largest(found)


def _jp2_codestream(buf: bytes) -> bytes | None:
    """The contiguous codestream box ('jp2c') of a JP2 file, walking boxes by length."""
    i, end = 0, len(buf)
    while i + 8 <= end:
        size, kind = _be(buf, i, 4), bytes(buf[i + 4 : i + 8])
        header = 8
        if size == 1 and i + 16 <= end:
            size, header = _be(buf, i + 8, 8), 16
        elif size == 0:
            size = end - i
        if size < header:
            return None
        if kind == b"jp2c":
            return buf[i + header : i + size]
        i += size
    return None
