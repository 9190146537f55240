"""Wrap a finished highdicom content tree in an SR document without copying it twice.

highdicom's SR constructors deep-copy the content tree, parse the copy back into content
items and walk it again to check references: about 60 % of the build time of a one-image
report here, and growing with every referenced CT slice. The content we pass was just built
by highdicom's own templates and content items (already validated), and every image it
references is in ``evidence`` by construction (tests check both). So the document is built
by highdicom around a root-only stub, and the real root's attributes are then set on it
exactly as highdicom does (``for tag, value in content.items(): self[tag] = value``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from highdicom.sr import ContentSequence
from highdicom.sr.sop import _SR
from pydicom.dataset import Dataset

from pacs_ai.reporting import _common
from pacs_ai.reporting.inputs import ReportRequest
from pacs_ai.reporting.uids import ReportKind, report_series_uid, report_uid

_ROOT_HEADER = (
    "ValueType",
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
)


def sr_document(factory: Callable[..., _SR], content: ContentSequence, **kwargs: Any) -> _SR:
    """``factory(content=..., **kwargs)`` with ``content`` (a root ContentSequence) attached."""
    root = content[0]
    stub = Dataset()
    for keyword in _ROOT_HEADER:
        if keyword in root:
            stub[keyword] = root[keyword]
    stub.ContentSequence = []
    doc = factory(content=stub, **kwargs)
    for tag, value in root.items():
        doc[tag] = value
    doc._content = content  # what highdicom's from_dataset would rebuild, minus the copy
    return doc


def report_document(
    factory: Callable[..., _SR],
    content: ContentSequence,
    req: ReportRequest,
    kind: ReportKind,
    description: str,
) -> _SR:
    """An SR report of ``kind`` for ``req``: the header every pacs-ai SR shares (same study,
    own series, deterministic UIDs, UNVERIFIED, predecessors, contributing equipment)."""
    algo = req.algorithm
    doc = sr_document(
        factory,
        content,
        evidence=_common.evidence(req),
        series_instance_uid=report_series_uid(req, kind),
        series_number=_common.SERIES_NUMBER[kind],
        sop_instance_uid=report_uid(req, kind),
        instance_number=req.study_revision + 1,
        manufacturer=algo.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=_common.predecessors(req),
        contributing_equipment=_common.contributing_equipment(req),
        series_description=_common.series_description(req, description),
        manufacturer_model_name=algo.name,
        software_versions=algo.version,
        specific_character_set=_common.character_set(req),
    )
    _common.series_date_time(doc)
    return doc
