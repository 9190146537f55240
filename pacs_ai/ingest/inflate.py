"""Forward-only byte sources for walking a received dataset: a spooled file as it is, or the
inflated stream of a Deflated Explicit VR Little Endian dataset.

The inflater is streaming and capped: it never holds more than one chunk of inflated data,
and refuses (:class:`~pacs_ai.errors.InflateLimitExceeded`) as soon as the inflated size
passes ``dicom.max_instance_bytes`` or ``dicom.max_inflate_ratio`` times the deflated size,
so a few megabytes on the wire cannot become gigabytes in memory (DESIGN.md §6.11).
"""

from __future__ import annotations

import zlib
from typing import BinaryIO, Protocol

from pacs_ai.errors import InflateLimitExceeded, InvalidDataset

_IN_CHUNK = 64 * 1024
_OUT_CHUNK = 256 * 1024
# Small datasets may legitimately inflate far beyond the ratio (a blank image); they are
# allowed this much regardless.
INFLATE_SLACK_BYTES = 16 * 1024 * 1024


class ByteSource(Protocol):
    position: int

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the dataset."""
        ...

    def skip(self, n: int) -> bool:
        """Skip ``n`` bytes; False when the dataset ended first."""
        ...

    def at_end(self) -> bool: ...

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end) without consuming them."""
        ...


class FileSource:
    """The dataset part of a spooled file (from ``start`` to the end of the file)."""

    def __init__(self, f: BinaryIO, start: int, size: int) -> None:
        self._f = f
        self._size = size
        self.position = 0
        self._end = size - start
        f.seek(start)

    def read(self, n: int) -> bytes:
        data = self._f.read(min(n, self._end - self.position))
        self.position += len(data)
        return data

    def skip(self, n: int) -> bool:
        if self.position + n > self._end:
            self._f.seek(0, 2)
            self.position = self._end
            return False
        self._f.seek(n, 1)
        self.position += n
        return True

    def at_end(self) -> bool:
        return self.position >= self._end

    def peek(self, n: int) -> bytes:
        data = self._f.read(min(n, self._end - self.position))
        self._f.seek(-len(data), 1)
        return data


class InflatingSource:
    """Raw-deflate stream (PS3.5 A.5) read from ``f`` from ``start``, inflated on demand."""

    def __init__(self, f: BinaryIO, start: int, size: int, limit: int) -> None:
        self._f = f
        f.seek(start)
        self._limit = limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = b""
        self._pos = 0
        self._input_done = False
        self.inflated = 0
        self.position = 0

    @staticmethod
    def limit_for(deflated_bytes: int, max_instance_bytes: int, max_ratio: float) -> int:
        return min(max_instance_bytes, int(deflated_bytes * max_ratio) + INFLATE_SLACK_BYTES)

    def _more(self) -> bool:
        """Inflate the next chunk into the buffer; False at the end of the stream."""
        while not self._inflater.eof:
            pending = self._inflater.unconsumed_tail
            if not pending:
                if self._input_done:
                    return False
                pending = self._f.read(_IN_CHUNK)
                if not pending:
                    self._input_done = True
                    try:
                        out = self._inflater.flush()
                    except zlib.error as exc:
                        raise InvalidDataset("deflated dataset is corrupt") from exc
                    return self._append(out)
            try:
                out = self._inflater.decompress(pending, _OUT_CHUNK)
            except zlib.error as exc:
                raise InvalidDataset("deflated dataset is corrupt") from exc
            if out:
                return self._append(out)
        return False  # bytes after the end of the deflate stream are ignored (as pydicom does)

    def _append(self, out: bytes) -> bool:
        if not out:
            return False
        self.inflated += len(out)
        if self.inflated > self._limit:
            raise InflateLimitExceeded("inflated dataset exceeds the inflate limits")
        self._buf = self._buf[self._pos :] + out
        self._pos = 0
        return True

    def read(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and self._more():
            pass
        data = self._buf[self._pos : self._pos + n]
        self._pos += len(data)
        self.position += len(data)
        return data

    def skip(self, n: int) -> bool:
        while n > 0:
            available = len(self._buf) - self._pos
            if available >= n:
                self._pos += n
                self.position += n
                return True
            n -= available
            self.position += available
            self._buf, self._pos = b"", 0
            if not self._more():
                return False
        return True

    def at_end(self) -> bool:
        return self._pos >= len(self._buf) and not self._more()

    def peek(self, n: int) -> bytes:
        while len(self._buf) - self._pos < n and self._more():
            pass
        return self._buf[self._pos : self._pos + n]
