"""The TID 1500 Comprehensive 3D SR: real sources, real validators, parsed back and checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from pacs_ai.reporting import (
    AlgorithmInfo,
    FindingResult,
    PriorReport,
    ReportRequest,
    build_sr,
    report_uid,
    write_object,
)
from pacs_ai.reporting import codes as rcodes
from pacs_ai.training import dicomwriter
from tests.tools import dciodvfy_errors, dsrdump

DEMO = AlgorithmInfo(
    name="pacs-ai chest demo",
    version="1.2.0",
    manufacturer="pacs-ai project",
    demo=True,
    parameters={"input": "224x224 lung window"},
)
REAL = AlgorithmInfo(name="site model", version="7", manufacturer="Site", demo=False)
FINDINGS = (
    FindingResult("covid19", rcodes.COVID19, probability=0.87, threshold=0.42, present=True),
    FindingResult("pneumonia", rcodes.PNEUMONIA, probability=0.1, threshold=0.5, present=False),
)
PATIENT = dicomwriter.Patient(name="Doe^Jane", patient_id="PID-4711", birth_date="19800202")


def _xray(modality: str) -> list[Dataset]:
    pixels = np.full((64, 64), 1000.0)
    return [dicomwriter.xray_image(pixels, modality=modality, patient=PATIENT)]  # type: ignore[arg-type]


def _ct(slices: int = 20) -> list[Dataset]:
    return dicomwriter.ct_series(np.zeros((slices, 32, 32)), patient=PATIENT)


@pytest.fixture(scope="module", params=["CR", "DX", "CT"])
def sources(request: pytest.FixtureRequest) -> list[Dataset]:
    return _ct() if request.param == "CT" else _xray(request.param)


def _items(node: Dataset) -> Iterator[Dataset]:
    """Every content item below ``node``, depth first."""
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def _texts(ds: Dataset, scheme: str, value: str) -> list[str]:
    return [
        str(i.TextValue)
        for i in _items(ds)
        if i.ValueType == "TEXT" and _concept(i) == (scheme, value)
    ]


def _code_meanings(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.keyword == "CodeMeaning":
            yield str(elem.value)
        elif elem.VR == "SQ":
            for item in elem.value:
                yield from _code_meanings(item)


def _roundtrip(ds: Dataset, tmp_path: Path) -> tuple[Path, Dataset]:
    path = write_object(ds, tmp_path)
    return path, pydicom.dcmread(path)


def test_sr_is_valid_and_parses(sources: list[Dataset], tmp_path: Path) -> None:
    path, _ = _roundtrip(build_sr(ReportRequest(sources, FINDINGS, DEMO)), tmp_path)
    assert dciodvfy_errors(path) == []
    run = dsrdump(path, "+Pl", "+Pc")
    assert run.returncode == 0, run.output
    assert run.stderr == "", run.stderr  # dcmtk warns on stderr about any SR structure problem
    assert "Imaging Measurement Report" in run.stdout
    assert '(840539006,SCT,"COVID-19")=(52101004,SCT,"Present")' in run.stdout
    assert '(233604007,SCT,"Pneumonia")=(272519000,SCT,"Absent")' in run.stdout
    assert "DEMO - NOT FOR CLINICAL USE" in run.stdout


def test_sr_content_read_back(sources: list[Dataset], tmp_path: Path) -> None:
    _, ds = _roundtrip(build_sr(ReportRequest(sources, FINDINGS, DEMO)), tmp_path)
    src = sources[0]
    assert ds.SOPClassUID == Comprehensive3DSRStorage
    assert ds.Modality == "SR"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyID"):
        assert ds[keyword].value == src[keyword].value, keyword
    assert ds.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}
    assert (ds.VerificationFlag, ds.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(FINDINGS)
    sop_uids = {str(s.SOPInstanceUID) for s in sources}
    for group, finding in zip(groups, FINDINGS, strict=True):
        assert group.finding_type is not None
        assert group.finding_type.value == finding.code.value
        assert group.tracking_identifier == finding.label
        values = {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}
        probability = f"Probability of {finding.code.meaning}"
        assert values.keys() == {probability, "Threshold Value"}
        assert values[probability][0] == pytest.approx(finding.probability)
        assert values["Threshold Value"][0] == pytest.approx(finding.threshold)
        assert {unit for _, unit in values.values()} == {"{probability}"}
        [evaluation] = group.get_qualitative_evaluations()
        assert evaluation.name.value == finding.code.value
        assert isinstance(evaluation.value, hd.sr.CodedConcept)
        expected = rcodes.PRESENT if finding.present else rcodes.ABSENT
        assert (evaluation.value.value, evaluation.value.scheme_designator) == (
            expected.value,
            expected.scheme_designator,
        )
        referenced = {
            str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in group.source_images
        }
        assert referenced == sop_uids

    # TID 4019 algorithm identification, in every group, thresholds among the parameters.
    assert _texts(ds, "DCM", "111001") == [DEMO.name] * len(FINDINGS)
    assert _texts(ds, "DCM", "111003") == [DEMO.version] * len(FINDINGS)
    params = set(_texts(ds, "DCM", "111002"))
    assert {
        "input=224x224 lung window",
        "threshold covid19=0.420",
        "threshold pneumonia=0.500",
    } <= params

    # Device observer: the algorithm.
    [observer] = report.get_observer_contexts()
    attrs = observer.observer_identifying_attributes
    assert isinstance(attrs, hd.sr.DeviceObserverIdentifyingAttributes)
    assert (attrs.name, attrs.manufacturer_name, attrs.model_name) == (
        DEMO.name,
        DEMO.manufacturer,
        DEMO.name,
    )
    assert attrs.uid.startswith("2.25.")

    # Contributing Equipment (IHE AI Results): the AI software as Processing Equipment.
    ai = [
        e for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == DEMO.name
    ]
    assert len(ai) == 1
    assert ai[0].Manufacturer == DEMO.manufacturer
    assert ai[0].SoftwareVersions == DEMO.version
    purpose = ai[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")

    # Every source is referenced: image library entries and the evidence sequence.
    library = [
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in _items(ds)
        if i.ValueType == "IMAGE" and _concept(i) == ("SCT", "260753009")
    ]
    assert sorted(library) == sorted(sop_uids)
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == sop_uids
    # ... and nothing in the tree points outside the evidence (highdicom's check we skip).
    image_refs = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in _items(ds)
        if i.ValueType == "IMAGE"
    }
    assert image_refs <= evidence

    meanings = list(_code_meanings(ds))
    assert meanings and max(len(m) for m in meanings) <= 64


def test_demo_statement_only_for_demo_models(tmp_path: Path) -> None:
    sources = _xray("DX")
    demo = build_sr(ReportRequest(sources, FINDINGS, DEMO))
    real = build_sr(ReportRequest(sources, FINDINGS, REAL))
    assert any("NOT FOR CLINICAL USE" in t for t in _texts(demo, "DCM", "121106"))
    assert "NOT FOR CLINICAL USE" in demo.SeriesDescription
    assert _texts(real, "DCM", "121106") == []
    assert "DEMO" not in real.SeriesDescription
    assert all(
        "DEMO" not in e.get("ContributionDescription", "")
        for e in real.ContributingEquipmentSequence
    )
    assert dciodvfy_errors(write_object(real, tmp_path)) == []


def test_predecessor_documents_sequence(tmp_path: Path) -> None:
    sources = _ct(4)
    first = build_sr(ReportRequest(sources[:3], FINDINGS, DEMO))
    assert "PredecessorDocumentsSequence" not in first
    prior = PriorReport(
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
        sop_class_uid=first.SOPClassUID,
        sop_instance_uid=first.SOPInstanceUID,
    )
    # A late slice arrived: all four sources, next revision, the first report as predecessor.
    second = build_sr(ReportRequest(sources, FINDINGS, DEMO, study_revision=1, predecessor=prior))
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.SeriesInstanceUID == first.SeriesInstanceUID  # same model version: same series
    assert second.InstanceNumber == 2
    [study] = second.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == prior.study_uid
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == prior.series_uid
    [sop] = series.ReferencedSOPSequence
    assert (sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID) == (
        prior.sop_class_uid,
        prior.sop_instance_uid,
    )
    assert dciodvfy_errors(write_object(second, tmp_path)) == []


def test_uids_are_deterministic() -> None:
    sources = _xray("DX")
    req = ReportRequest(sources, FINDINGS, DEMO)
    a, b = build_sr(req), build_sr(ReportRequest(list(sources), FINDINGS, DEMO))
    assert a.SOPInstanceUID == b.SOPInstanceUID == report_uid(req, "sr")
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    tracking = [i.UID for i in _items(a) if i.ValueType == "UIDREF"]
    assert tracking == [i.UID for i in _items(b) if i.ValueType == "UIDREF"]


def test_non_ascii_algorithm_text_switches_to_utf8(tmp_path: Path) -> None:
    algo = AlgorithmInfo(name="Modèle thorax", version="1", manufacturer="Hôpital", demo=False)
    path = write_object(build_sr(ReportRequest(_xray("DX"), FINDINGS, algo)), tmp_path)
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert _texts(ds, "DCM", "111001") == ["Modèle thorax"] * len(FINDINGS)
    assert ds.PatientName == PATIENT.name
    assert dciodvfy_errors(path) == []


def test_source_without_optional_type2_header_still_builds(tmp_path: Path) -> None:
    [src] = _xray("DX")
    for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName"):
        delattr(src, keyword)
    ds = build_sr(ReportRequest([src], FINDINGS, DEMO))
    assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
    assert dciodvfy_errors(write_object(ds, tmp_path)) == []
