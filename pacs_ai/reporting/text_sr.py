"""Fallback for viewers that cannot draw TID 1500: a Basic Text SR with the same content as text.

TID 2000 (Basic Diagnostic Imaging Report)::

    Diagnostic Imaging Report
      Language, observation context: the algorithm as device observer
      Findings (section)
        Comment   "DEMO - NOT FOR CLINICAL USE ..."           (demo models only)
        Finding   "COVID-19: PRESENT (probability 0.870, threshold 0.420)"   one per finding
        Algorithm Name / Version / Parameters   TEXT
      Image Library
        IMAGE     one per source image
"""

from __future__ import annotations

from typing import Any

from highdicom.sr import (
    ContainerContentItem,
    ContentSequence,
    LanguageOfContentItemAndDescendants,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.coding import CodedConcept
from highdicom.sr.sop import _SR
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage

from pacs_ai.reporting import _common, codes
from pacs_ai.reporting._document import report_document
from pacs_ai.reporting._library import flat_image_library
from pacs_ai.reporting.inputs import ReportRequest

_CONTAINS = RelationshipTypeValues.CONTAINS
_ENGLISH = CodedConcept("en-US", "RFC5646", "English (United States)")


class _BasicTextSR(_SR):
    """Basic Text SR: highdicom has the generic SR machinery but no class for this SOP class."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(sop_class_uid=BasicTextSRStorage, **kwargs)


def _text(name: Any, value: str) -> TextContentItem:
    return TextContentItem(name=name, value=value, relationship_type=_CONTAINS)


def _findings_section(req: ReportRequest) -> ContainerContentItem:
    algo = req.algorithm
    items: list[TextContentItem] = []
    if algo.demo:
        items.append(_text(codes.COMMENT, _common.DEMO_STATEMENT))
    items.extend(_text(codes.FINDING, _common.finding_line(f)) for f in req.findings)
    items.append(_text(codes.ALGORITHM_NAME, algo.name))
    items.append(_text(codes.ALGORITHM_VERSION, algo.version))
    items.extend(_text(codes.ALGORITHM_PARAMETERS, p) for p in _common.algorithm_parameters(req))
    section = ContainerContentItem(
        name=codes.FINDINGS_SECTION, is_content_continuous=False, relationship_type=_CONTAINS
    )
    section.ContentSequence = ContentSequence(items)
    return section


def build_text_sr(req: ReportRequest) -> Dataset:
    """The Basic Text SR for ``req`` (deterministic UIDs, UNVERIFIED)."""
    root = ContainerContentItem(
        name=codes.DIAGNOSTIC_IMAGING_REPORT, is_content_continuous=False, template_id="2000"
    )
    root.ContentSequence = ContentSequence()
    root.ContentSequence.extend(LanguageOfContentItemAndDescendants(_ENGLISH))
    root.ContentSequence.extend(_common.observation_context(req))
    root.ContentSequence.append(_findings_section(req))
    root.ContentSequence.append(flat_image_library(req.sources))
    return report_document(
        _BasicTextSR, ContentSequence([root], is_root=True), req, "text_sr", "text SR"
    )
