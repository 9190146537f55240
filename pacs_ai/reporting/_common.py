"""Pieces shared by the three report objects: header sources, equipment, observer, text."""

from __future__ import annotations

import highdicom as hd
from highdicom.sr import (
    DeviceObserverIdentifyingAttributes,
    ObservationContext,
    ObserverContext,
)
from highdicom.sr.coding import CodedConcept
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from pacs_ai.reporting import codes
from pacs_ai.reporting.inputs import FindingResult, ReportRequest
from pacs_ai.reporting.uids import device_observer_uid

DEMO_STATEMENT = (
    "DEMO - NOT FOR CLINICAL USE. Produced by a demonstration model trained on synthetic "
    "images; it must not be used for diagnosis."
)
_DEMO_MARK = "DEMO NOT FOR CLINICAL USE"

# Series numbers of our objects: after the modality's series in a viewer's list.
SERIES_NUMBER = {"sr": 9001, "summary": 9002, "text_sr": 9003}

# Patient/Study attributes that highdicom reads from the first source (Type 2: may be empty).
_TYPE2_HEADER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_FIRST_PRIVATE_OR_PIXEL_GROUP = 0x6000  # overlays, pixel data and beyond are not header


def evidence(req: ReportRequest) -> list[Dataset]:
    """Header-only copies of the sources for highdicom.

    The first keeps its whole header (patient, study and equipment modules are copied from
    it; missing Type 2 attributes are added empty); the others carry only their identifying
    UIDs, which is all the evidence sequences need and keeps a 300-slice CT cheap.
    """
    first = Dataset()
    src = req.sources[0]
    for elem in src:
        if elem.tag.group < _FIRST_PRIVATE_OR_PIXEL_GROUP and not elem.tag.is_private:
            first.add(elem)
    for keyword in _TYPE2_HEADER:
        if keyword not in first:
            setattr(first, keyword, "")
    out = [first]
    for ds in req.sources[1:]:
        slim = Dataset()
        for keyword in _IDENTIFYING:
            slim.add(ds[Tag(keyword)])
        out.append(slim)
    return out


def character_set(req: ReportRequest) -> str | list[str] | None:
    """The source's Specific Character Set, or UTF-8 when our own text needs more than ASCII.

    Patient and study attributes come from the source (pydicom decoded them), so UTF-8 can
    always hold them too; ASCII text fits every character set.
    """
    algo = req.algorithm
    ours = [algo.name, algo.version, algo.manufacturer, *algo.parameters, *algo.parameters.values()]
    ours += [f.code.meaning for f in req.findings] + [f.label for f in req.findings]
    if all(text.isascii() for text in ours):
        value = req.sources[0].get("SpecificCharacterSet")
        return None if value is None else (list(value) if not isinstance(value, str) else value)
    return "ISO_IR 192"


def series_description(req: ReportRequest, what: str) -> str:
    """SeriesDescription (LO, 64): what the object is first (viewers cut the list at ~20
    characters, so "AI result SR", "AI text SR" and "AI summary image" stay apart), then the
    demo marker, then the model (which truncation may shorten; the marker stays)."""
    head = f"AI {what}"
    if req.algorithm.demo:
        head += f" - {_DEMO_MARK}"
    return f"{head} - {req.algorithm.name} {req.algorithm.version}"[:64].rstrip()


def declare_private_scheme(ds: Dataset) -> None:
    """Coding Scheme Identification for our 99PACSAI concepts (PS3.3 C.12.1.1.2)."""
    item = Dataset()
    item.CodingSchemeDesignator = codes.PRIVATE_SCHEME
    item.CodingSchemeName = codes.PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "pacs-ai project"
    ds.CodingSchemeIdentificationSequence = [item]


def series_date_time(ds: Dataset) -> None:
    """SeriesDate/SeriesTime of an AI series: when the object was made."""
    ds.SeriesDate = str(ds.get("ContentDate") or ds.get("InstanceCreationDate") or "")
    ds.SeriesTime = str(ds.get("ContentTime") or ds.get("InstanceCreationTime") or "")


def contributing_equipment(req: ReportRequest) -> list[hd.ContributingEquipment]:
    """IHE AI Results: the AI software as Processing Equipment in Contributing Equipment."""
    algo = req.algorithm
    description = "AI inference result"
    if algo.demo:
        description += " (DEMO - not for clinical use)"
    return [
        hd.ContributingEquipment(
            manufacturer=algo.manufacturer,
            purpose_of_reference=codes.PROCESSING_EQUIPMENT,
            manufacturer_model_name=algo.name,
            software_versions=algo.version,
            contribution_description=description,
        )
    ]


def observation_context(req: ReportRequest) -> ObservationContext:
    """TID 1001 with the algorithm as device observer (stable UID per model version)."""
    algo = req.algorithm
    device = DeviceObserverIdentifyingAttributes(
        uid=device_observer_uid(algo.name, algo.manufacturer, algo.version),
        name=algo.name,
        manufacturer_name=algo.manufacturer,
        model_name=algo.name,
    )
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=CodedConcept.from_code(codes.DEVICE),
            observer_identifying_attributes=device,
        )
    )


def algorithm_parameters(req: ReportRequest) -> list[str]:
    """TID 4019 parameters as ``key=value``; the operating thresholds are always among them."""
    params = dict(req.algorithm.parameters)
    for finding in req.findings:
        params.setdefault(f"threshold {finding.label}", _fmt(finding.threshold))
    return [f"{key}={value}" for key, value in params.items()]


def predecessors(req: ReportRequest) -> list[Dataset] | None:
    """The prior report as highdicom wants it for the Predecessor Documents Sequence."""
    prior = req.predecessor
    if prior is None:
        return None
    ds = Dataset()
    ds.StudyInstanceUID = prior.study_uid
    ds.SeriesInstanceUID = prior.series_uid
    ds.SOPClassUID = prior.sop_class_uid
    ds.SOPInstanceUID = prior.sop_instance_uid
    return [ds]


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def decision(finding: FindingResult) -> str:
    return "PRESENT" if finding.present else "ABSENT"


def finding_line(finding: FindingResult) -> str:
    """One human-readable line per finding, shared by the text SR and the summary image."""
    return (
        f"{finding.code.meaning}: {decision(finding)} "
        f"(probability {finding.probability:.3f}, threshold {finding.threshold:.3f})"
    )


def model_line(req: ReportRequest) -> str:
    algo = req.algorithm
    return f"Model: {algo.name} {algo.version} ({algo.manufacturer})"
