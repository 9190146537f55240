"""The main result object: Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

Content tree (``dsrdump`` shows it; docs/reporting.md has an example)::

    Imaging Measurement Report (TID 1500)
      Language, observation context: the algorithm as device observer (TID 1001/1004)
      Procedure reported: chest X-ray / CT of chest
      Image Library: one entry per source image (TID 1600)
      Imaging Measurements
        Measurement Group per finding (TID 1501)
          Tracking identifier/UID, Finding (the finding code)
          Algorithm identification (TID 4019: name, version, parameters incl. thresholds)
          Source images used (every source image)
          Qualitative Evaluations  TEXT "COVID-19: PRESENT (probability 0.870, threshold 0.420)"
          Probability of <finding>  NUM 0..1 {probability}   (99PACSAI code, 3 decimals)
          Threshold Value  NUM 0..1 {probability}
          <finding code> = Present | Absent   (qualitative evaluation)

    Demo models: a "Qualitative Evaluations" container with the TEXT "DEMO - NOT FOR CLINICAL
    USE ..." is the first content item, before everything else.
"""

from __future__ import annotations

from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from pacs_ai.reporting import _common, codes
from pacs_ai.reporting._document import report_document
from pacs_ai.reporting._library import image_library
from pacs_ai.reporting.inputs import Code as InputCode
from pacs_ai.reporting.inputs import FindingResult, ReportRequest
from pacs_ai.reporting.uids import derived_uid, report_uid

_IMAGING_MEASUREMENTS = Code("126010", "DCM", "Imaging Measurements")


def _code(code: InputCode) -> Code:
    return Code(code.value, code.scheme, code.meaning)


def _group(
    finding: FindingResult,
    algorithm: AlgorithmIdentification,
    source_images: list[SourceImageForMeasurementGroup],
    sop_uid: str,
) -> MeasurementsAndQualitativeEvaluations:
    finding_code = _code(finding.code)
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=derived_uid(sop_uid, "finding", finding.label),
            identifier=finding.label,
        ),
        finding_type=finding_code,
        algorithm_id=algorithm,
        source_images=source_images,
        measurements=[
            Measurement(
                codes.probability_of(finding_code),
                round(float(finding.probability), 3),
                codes.PROBABILITY_UNIT,
            ),
            Measurement(
                codes.THRESHOLD, round(float(finding.threshold), 3), codes.PROBABILITY_UNIT
            ),
        ],
        qualitative_evaluations=[
            QualitativeEvaluation(finding_code, codes.PRESENT if finding.present else codes.ABSENT)
        ],
    )
    # TID 1501 "Qualitative Evaluations" TEXT: the result as one sentence, first in the group,
    # so renderers that show values without concept names (dsr2html) still say what is what.
    container = group[0]
    container.ContentSequence.insert(
        _first_contains(container.ContentSequence),
        TextContentItem(
            name=codes.QUALITATIVE_EVALUATIONS,
            value=_common.finding_line(finding),
            relationship_type=RelationshipTypeValues.CONTAINS,
        ),
    )
    return group


def _first_contains(items: ContentSequence) -> int:
    return next(
        (i for i, item in enumerate(items) if item.RelationshipType == "CONTAINS"), len(items)
    )


def _demo_container() -> ContainerContentItem:
    # TID 1500 row "Qualitative Evaluations" (CONTAINER) > TEXT: visible in every SR viewer.
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=codes.COMMENT,
                value=_common.DEMO_STATEMENT,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return container


def build_sr(req: ReportRequest) -> Dataset:
    """The TID 1500 Comprehensive 3D SR for ``req`` (deterministic UIDs, UNVERIFIED)."""
    algo = req.algorithm
    sop_uid = report_uid(req, "sr")
    algorithm = AlgorithmIdentification(
        name=algo.name,
        version=algo.version,
        parameters=_common.algorithm_parameters(req),
        manufacturer=algo.manufacturer,
    )
    source_images = [
        SourceImageForMeasurementGroup(str(ds.SOPClassUID), str(ds.SOPInstanceUID))
        for ds in req.sources
    ]
    report = MeasurementReport(
        observation_context=_common.observation_context(req),
        procedure_reported=codes.procedure_for_modality(str(req.sources[0].get("Modality", ""))),
        imaging_measurements=[_group(f, algorithm, source_images, sop_uid) for f in req.findings],
    )
    items = report[0].ContentSequence
    # TID 1500 order: ... procedure reported, image library, imaging measurements, ...
    measurements = next(i for i, item in enumerate(items) if item.name == _IMAGING_MEASUREMENTS)
    items.insert(measurements, image_library(req.sources))
    if algo.demo:
        items.insert(0, _demo_container())  # the first thing every renderer shows
    doc = report_document(Comprehensive3DSR, report, req, "sr", "result SR")
    _common.declare_private_scheme(doc)
    return doc
