"""The structure of a received dataset, walked once from its first byte to its last.

What pydicom tolerates (an element whose value runs past the end, a sequence never
delimited) we refuse: every element must end inside the dataset. The walk keeps only the raw
bytes of the few top-level elements ingest records (:data:`WANTED`, small values), skips
everything else by its length, and reads the first fragment of encapsulated Pixel Data
through :mod:`pacs_ai.imaging.codestream`. Memory is one read chunk, whatever lengths the
peer declares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR

from pacs_ai.errors import IncompleteDataset, InvalidDataset, PixelDataError
from pacs_ai.imaging.codestream import CodestreamError, FrameSize, j2k_frames, jpeg_frames
from pacs_ai.ingest.inflate import ByteSource

PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        *(b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS"),
        *(b"LO", b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"),
    }
)
_MAX_DEPTH = 32
_MAX_WANTED_VALUE = 1024

# Top-level elements whose values ingest reads (identifiers, Image Pixel module, charset).
WANTED = frozenset(
    {
        0x00080005,  # SpecificCharacterSet
        0x00080016,  # SOPClassUID
        0x00080018,  # SOPInstanceUID
        0x00080020,  # StudyDate
        0x00080050,  # AccessionNumber
        0x00080060,  # Modality
        0x00081030,  # StudyDescription
        0x0008103E,  # SeriesDescription
        0x00100010,  # PatientName
        0x00100020,  # PatientID
        0x00180015,  # BodyPartExamined
        0x0020000D,  # StudyInstanceUID
        0x0020000E,  # SeriesInstanceUID
        0x00200011,  # SeriesNumber
        0x00200013,  # InstanceNumber
        0x00280002,  # SamplesPerPixel
        0x00280004,  # PhotometricInterpretation
        0x00280008,  # NumberOfFrames
        0x00280010,  # Rows
        0x00280011,  # Columns
        0x00280100,  # BitsAllocated
        0x00280101,  # BitsStored
        0x00280102,  # HighBit
        0x00280103,  # PixelRepresentation
    }
)


class CodestreamKind:
    NONE = 0
    JPEG = 1
    JPEG_LS = 2
    J2K = 3


@dataclass
class PixelInfo:
    length: int  # UNDEFINED for encapsulated
    frames: list[FrameSize] | None = None  # frame headers of the first fragment, if walked
    fragments: int = 0


@dataclass
class Walked:
    """What the walk found: the raw top-level wanted elements, re-encodable as a dataset in
    the walk's encoding, and the Pixel Data element (if any)."""

    implicit: bool
    little_endian: bool
    raw: dict[int, bytes] = field(default_factory=dict)
    pixel: PixelInfo | None = None


class _Walker:
    def __init__(self, src: ByteSource, implicit: bool, little: bool, codestream: int) -> None:
        self.src = src
        self.implicit = implicit
        self.little = little
        self.codestream = codestream
        e = "<" if little else ">"
        self._tag_len = struct.Struct(e + "HHL")
        self._tag_vr_len16 = struct.Struct(e + "HH2sH")
        self._len32 = struct.Struct(e + "L")

    def _read(self, n: int, what: str) -> bytes:
        data = self.src.read(n)
        if len(data) != n:
            raise IncompleteDataset(f"dataset ends inside {what}")
        return data

    def _skip(self, n: int, what: str) -> None:
        if not self.src.skip(n):
            raise IncompleteDataset(f"dataset ends inside {what}")

    def header(self) -> tuple[int, bytes | None, int, bytes]:
        """(tag, VR or None, length, raw header bytes)."""
        head = self._read(8, "an element header")
        group, elem, length = self._tag_len.unpack(head)
        tag = (group << 16) | elem
        if self.implicit or tag in (_ITEM, _ITEM_END, _SEQ_END):
            return tag, None, length, head
        _, _, vr, short_len = self._tag_vr_len16.unpack(head)
        if vr in _LONG_VRS:
            more = self._read(4, "an element header")
            return tag, vr, self._len32.unpack(more)[0], head + more
        if vr not in _SHORT_VRS:
            raise InvalidDataset("unknown VR in an explicit VR dataset")
        return tag, vr, short_len, head

    def is_sequence(self, tag: int, vr: bytes | None) -> bool:
        if vr is not None:
            return vr == b"SQ"
        try:
            return bool(dictionary_VR(tag) == "SQ")
        except KeyError:
            return False

    def dataset(self, end: int | None, depth: int, out: Walked | None) -> None:
        """Elements until ``end`` (a position), an item delimiter (``end`` None, nested) or the
        end of the stream (top level)."""
        if depth > _MAX_DEPTH:
            raise InvalidDataset("sequences nested too deeply")
        top = out is not None
        while True:
            if end is not None and self.src.position >= end:
                if self.src.position > end:
                    raise InvalidDataset("an element runs past the end of its item")
                return
            if top and self.src.at_end():
                return
            tag, vr, length, head = self.header()
            if tag == _ITEM_END and not top and end is None:
                return
            if tag in (_ITEM, _ITEM_END, _SEQ_END):
                raise InvalidDataset("item or delimiter outside a sequence")
            if top and tag == PIXEL_DATA:
                assert out is not None
                out.pixel = self.pixel_data(length)
            elif length == UNDEFINED:
                if vr == b"UN":  # PS3.5 6.2.2: an unknown sequence, encoded implicit VR LE
                    _Walker(self.src, True, True, CodestreamKind.NONE).sequence(None, depth + 1)
                elif vr is None or vr == b"SQ":
                    self.sequence(None, depth + 1)
                else:
                    raise InvalidDataset("undefined length on an element that is no sequence")
            elif self.is_sequence(tag, vr):
                self.sequence(self.src.position + length, depth + 1)
            elif top and tag in WANTED and length <= _MAX_WANTED_VALUE:
                assert out is not None
                value = self._read(length, "an element value")
                out.raw.setdefault(tag, head + value)
            else:
                self._skip(length, "an element value")
            if end is not None and self.src.position > end:
                raise InvalidDataset("an element runs past the end of its item")

    def sequence(self, end: int | None, depth: int) -> None:
        while True:
            if end is not None and self.src.position >= end:
                if self.src.position > end:
                    raise InvalidDataset("an item runs past the end of its sequence")
                return
            tag, _, length, _ = self.header()
            if tag == _SEQ_END and end is None:
                return
            if tag != _ITEM:
                raise InvalidDataset("sequence item expected")
            if length == UNDEFINED:
                self.dataset(None, depth, None)
            else:
                self.dataset(self.src.position + length, depth, None)

    def pixel_data(self, length: int) -> PixelInfo:
        if length != UNDEFINED:
            if not self.src.skip(length):
                raise PixelDataError("Pixel Data is truncated")
            return PixelInfo(length)
        info = PixelInfo(UNDEFINED)
        while True:
            head = self.src.read(8)
            if len(head) != 8:
                raise PixelDataError("encapsulated Pixel Data is truncated")
            group, elem, item_len = self._tag_len.unpack(head)
            tag = (group << 16) | elem
            if tag == _SEQ_END:
                return info
            if tag != _ITEM or item_len == UNDEFINED:
                raise PixelDataError("malformed encapsulated Pixel Data")
            info.fragments += 1
            start = self.src.position
            if info.fragments == 2 and self.codestream != CodestreamKind.NONE:
                info.frames = self._frames(item_len)  # the first after the offset table
            if not self.src.skip(item_len - (self.src.position - start)):
                raise PixelDataError("encapsulated Pixel Data is truncated")

    def _frames(self, length: int) -> list[FrameSize]:
        try:
            if self.codestream == CodestreamKind.J2K:
                return j2k_frames(self.src, length)
            return jpeg_frames(self.src, length, self.codestream == CodestreamKind.JPEG_LS)
        except CodestreamError:
            return []


def walk(src: ByteSource, implicit: bool, little_endian: bool, codestream: int) -> Walked:
    """Walk a whole dataset; raises a :class:`~pacs_ai.errors.StoreError` on bad structure."""
    if not implicit:
        implicit = _looks_implicit(src, little_endian)
    walker = _Walker(src, implicit, little_endian, codestream)
    out = Walked(implicit, little_endian)
    walker.dataset(None, 0, out)
    return out


def _looks_implicit(src: ByteSource, little_endian: bool) -> bool:
    """pydicom's switch: an explicit VR dataset whose first element has no valid VR was
    written implicit VR (some devices do); read it as such rather than refuse it."""
    head = src.peek(6)
    return len(head) == 6 and head[4:6] not in _LONG_VRS | _SHORT_VRS
