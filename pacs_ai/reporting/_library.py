"""TID 1600 Image Library with shared descriptors, built from highdicom content items.

highdicom's ``ImageLibrary`` writes a full TID 1602 descriptor set under every image (about a
dozen content items per CT slice, ~30 ms each to build here). TID 1600 lets descriptors that
all entries share live once on the Image Library Group, so we write one group per series
(modality, frame of reference, matrix size) and one IMAGE item per source: a 300-slice CT
costs 300 small items instead of thousands.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from highdicom.sr import (
    CodeContentItem,
    ContainerContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    RelationshipTypeValues,
    UIDRefContentItem,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

_SOURCE = Code("260753009", "SCT", "Source")  # the concept name highdicom uses for entries
_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_ACQ = RelationshipTypeValues.HAS_ACQ_CONTEXT


@functools.cache
def _modality_codes() -> dict[str, Code]:
    """CID 29 Acquisition Modality, by code value (which is the Modality attribute value)."""
    out: dict[str, Code] = {}
    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        out.setdefault(code.value, code)
    return out


def _group_key(ds: Dataset) -> tuple[str, str, str]:
    return (
        str(ds.SeriesInstanceUID),
        str(ds.get("Modality", "")),
        str(ds.get("FrameOfReferenceUID", "")),
    )


def _shared_descriptors(
    images: Sequence[Dataset],
) -> list[CodeContentItem | UIDRefContentItem | NumContentItem]:
    first = images[0]
    items: list[CodeContentItem | UIDRefContentItem | NumContentItem] = []
    modality = _modality_codes().get(str(first.get("Modality", "")))
    if modality is not None:
        items.append(CodeContentItem(codes.DCM.Modality, modality, relationship_type=_ACQ))
    if first.get("FrameOfReferenceUID"):
        items.append(
            UIDRefContentItem(
                codes.DCM.FrameOfReferenceUID, first.FrameOfReferenceUID, relationship_type=_ACQ
            )
        )
    for keyword, concept in (
        ("Rows", codes.DCM.PixelDataRows),
        ("Columns", codes.DCM.PixelDataColumns),
    ):
        values = {ds.get(keyword) for ds in images}
        if len(values) == 1 and None not in values:
            items.append(
                NumContentItem(concept, int(first[keyword].value), _PIXELS, relationship_type=_ACQ)
            )
    return items


def _entries(images: Sequence[Dataset], which_slice: bool = False) -> list[ImageContentItem]:
    out = []
    for ds in images:
        item = ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
        if which_slice:
            descriptors = _slice_descriptors(ds)
            if descriptors:
                item.ContentSequence = ContentSequence(descriptors)
        out.append(item)
    return out


def _slice_descriptors(ds: Dataset) -> list[NumContentItem]:
    """TID 1602 per-image descriptors that say which slice an entry is: its Instance Number
    and table position (Image Position (Patient) Z, mm)."""
    items = []
    number = ds.get("InstanceNumber")
    if number is not None and str(number).strip():
        items.append(
            NumContentItem(
                Code("113609", "DCM", "Instance Number"),
                int(number),
                Code("1", "UCUM", "no units"),
                relationship_type=_ACQ,
            )
        )
    position = ds.get("ImagePositionPatient")
    if position is not None and len(position) == 3:
        items.append(
            NumContentItem(
                codes.DCM.ImagePositionPatientZ,
                round(float(position[2]), 2),
                Code("mm", "UCUM", "millimeter"),
                relationship_type=_ACQ,
            )
        )
    return items


def image_library(sources: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600: one group per series with shared descriptors, one entry per source image."""
    groups: dict[tuple[str, str, str], list[Dataset]] = {}
    for ds in sources:
        groups.setdefault(_group_key(ds), []).append(ds)
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence()
    for images in groups.values():
        group = ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=RelationshipTypeValues.CONTAINS
        )
        group.ContentSequence = ContentSequence(_shared_descriptors(images))
        multi_slice = len(images) > 1 or str(images[0].get("Modality", "")) == "CT"
        group.ContentSequence.extend(_entries(images, which_slice=multi_slice))
        library.ContentSequence.append(group)
    return library


def flat_image_library(sources: Sequence[Dataset]) -> ContainerContentItem:
    """TID 2000's Image Library row: IMAGE entries only (fits Basic Text SR, which has no NUM)."""
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = ContentSequence(_entries(sources))
    return library
