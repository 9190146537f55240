"""Deterministic UIDs, request validation and the atomic writer."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from pacs_ai.codes import InvalidCode
from pacs_ai.logs import quiet_third_party
from pacs_ai.reporting import (
    AlgorithmInfo,
    Code,
    FindingResult,
    InvalidReportRequest,
    PriorReport,
    ReportRequest,
    build_sr,
    build_summary_image,
    build_text_sr,
    report_series_uid,
    report_uid,
    write_object,
)
from pacs_ai.reporting import codes as rcodes
from pacs_ai.reporting.uids import REPORT_KINDS
from pacs_ai.training import dicomwriter

ALGO = AlgorithmInfo("pacs-ai chest demo", "1.2.0", "pacs-ai project", True, {})
FINDING = FindingResult("covid19", rcodes.COVID19, probability=0.6, threshold=0.42, present=True)


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    return dicomwriter.ct_series(np.zeros((5, 8, 8)))


def _req(sources: list[Dataset], /, **changes: object) -> ReportRequest:
    fields: dict[str, object] = {"sources": sources, "findings": [FINDING], "algorithm": ALGO}
    return ReportRequest(**(fields | changes))  # type: ignore[arg-type]


# --- UIDs -----------------------------------------------------------------------------------


def test_uid_form(ct: list[Dataset]) -> None:
    for kind in REPORT_KINDS:
        for uid in (report_uid(_req(ct), kind), report_series_uid(_req(ct), kind)):
            assert uid.startswith("2.25.") and len(uid) <= 64
            assert UID(uid).is_valid
            assert not uid[5:].startswith("0")


def test_same_input_same_uid_in_any_source_order(ct: list[Dataset]) -> None:
    for kind in REPORT_KINDS:
        assert report_uid(_req(ct), kind) == report_uid(_req(list(reversed(ct))), kind)


def test_what_changes_the_uid(ct: list[Dataset]) -> None:
    base = _req(ct)
    variants = {
        "revision": _req(ct, study_revision=1),
        "version": _req(ct, algorithm=dataclasses.replace(ALGO, version="1.2.1")),
        "name": _req(ct, algorithm=dataclasses.replace(ALGO, name="other model")),
        "sources": _req(ct[:4]),
    }
    uids = {report_uid(base, "sr")} | {report_uid(v, "sr") for v in variants.values()}
    assert len(uids) == 1 + len(variants)
    assert len({report_uid(base, kind) for kind in REPORT_KINDS}) == len(REPORT_KINDS)
    # Findings are not identity: the same model on the same images is the same object.
    rescored = dataclasses.replace(FINDING, probability=0.9)
    assert report_uid(_req(ct, findings=[rescored]), "sr") == report_uid(base, "sr")


def test_series_uid_stable_across_revisions_not_versions(ct: list[Dataset]) -> None:
    base = report_series_uid(_req(ct), "sr")
    assert report_series_uid(_req(ct[:4], study_revision=3), "sr") == base
    assert (
        report_series_uid(_req(ct, algorithm=dataclasses.replace(ALGO, version="2")), "sr") != base
    )
    assert report_series_uid(_req(ct), "text_sr") != base


def test_unknown_kind_is_refused(ct: list[Dataset]) -> None:
    with pytest.raises(ValueError, match="report kind"):
        report_uid(_req(ct), "pdf")  # type: ignore[arg-type]


# --- request validation ---------------------------------------------------------------------


def test_code_meaning_limit() -> None:
    Code("1", "SCT", "x" * 64)
    with pytest.raises(InvalidCode, match="64"):
        Code("1", "SCT", "x" * 65)
    with pytest.raises(InvalidCode):
        Code("12345678901234567", "SCT", "too long a code value")
    assert all(len(c.meaning) <= 64 for c in (rcodes.COVID19, rcodes.PNEUMONIA))


@pytest.mark.parametrize(
    ("probability", "threshold", "present"),
    [
        (1.2, 0.5, True),
        (-0.1, 0.5, False),
        (float("nan"), 0.5, False),
        (0.3, 0.5, True),
        (0.5, 0.5, False),
    ],
)
def test_bad_findings_are_refused(probability: float, threshold: float, present: bool) -> None:
    with pytest.raises(InvalidReportRequest):
        FindingResult("covid19", rcodes.COVID19, probability, threshold, present)


def test_numpy_scores_are_accepted() -> None:
    score = np.float32(0.7)  # what a model's softmax hands over
    finding = FindingResult("covid19", rcodes.COVID19, score, np.float64(0.42), True)  # type: ignore[arg-type]
    assert finding.present


def test_bad_requests_are_refused(ct: list[Dataset]) -> None:
    other_study = dicomwriter.ct_series(np.zeros((1, 8, 8)))
    image = np.zeros((4, 4), np.float32)
    bad: dict[str, dict[str, object]] = {
        "no sources": {"sources": []},
        "no findings": {"findings": []},
        "two studies": {"sources": [*ct, *other_study]},
        "duplicate source": {"sources": [ct[0], ct[0]]},
        "duplicate label": {"findings": [FINDING, FINDING]},
        "negative revision": {"study_revision": -1},
        "threshold contradicts parameters": {
            "algorithm": dataclasses.replace(ALGO, parameters={"threshold covid19": "0.5"})
        },
        "heatmap without image": {"heatmap": image},
        "heatmap shape": {"display_image": image, "heatmap": np.zeros((4, 5), np.float32)},
        "nan image": {"display_image": np.full((4, 4), np.nan, np.float32)},
        "prior of another study": {
            "predecessor": PriorReport(
                str(other_study[0].StudyInstanceUID),
                "1.2.3",
                "1.2.840.10008.5.1.4.1.1.88.34",
                "1.2.4",
            )
        },
    }
    for why, change in bad.items():
        with pytest.raises(InvalidReportRequest):
            _req(ct, **change)
            pytest.fail(f"accepted: {why}")


def test_path_hostile_uids_are_refused(ct: list[Dataset]) -> None:
    with pytest.raises(InvalidReportRequest):
        PriorReport("1.2.3", "../../etc", "1.2", "1.3")
    src = copy.deepcopy(ct[0])
    with pytest.warns(UserWarning, match="VR UI"):  # pydicom warns, and stores it anyway
        src.SOPInstanceUID = "1.2/../3"
    with pytest.raises(InvalidReportRequest):
        _req([src])


# --- writer ---------------------------------------------------------------------------------


def test_write_object_atomic_and_named_by_hash(ct: list[Dataset], tmp_path: Path) -> None:
    ds = build_sr(_req(ct))
    path = write_object(ds, tmp_path / "out")
    digest = hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()
    assert path.name == f"{digest[:32]}.dcm"
    assert str(ds.SOPInstanceUID) not in str(path)
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    # Rebuilding and rewriting the same report replaces the file: still exactly one object.
    assert write_object(build_sr(_req(ct)), tmp_path / "out") == path
    assert [p.name for p in (tmp_path / "out").iterdir()] == [path.name]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    ds = Dataset()  # no SOP Class UID: pydicom cannot build the file meta, save_as raises
    ds.SOPInstanceUID = "1.2.3.4"
    with pytest.raises((AttributeError, ValueError)):
        write_object(ds, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_no_phi_or_raw_uids_in_logs(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    patient = dicomwriter.Patient(name="Secret^Person", patient_id="PHI-12345")
    sources = dicomwriter.ct_series(np.zeros((2, 8, 8)), patient=patient)
    image = np.zeros((16, 16), np.float32)
    req = ReportRequest(sources, [FINDING], ALGO, display_image=image, heatmap=image)
    # Production logging (pacs_ai.logs) keeps highdicom at WARNING: it logs source UIDs at INFO.
    third_party = logging.getLogger("highdicom")
    saved = third_party.level
    quiet_third_party()
    try:
        caplog.set_level(logging.DEBUG)
        built = [build_sr(req), build_text_sr(req), build_summary_image(req)]
        for ds in built:
            write_object(ds, tmp_path)
    finally:
        third_party.setLevel(saved)
    assert "wrote report object" in caplog.text  # the check below looks at real log output
    secrets = {patient.name, patient.patient_id, str(sources[0].StudyInstanceUID)}
    secrets |= {str(ds.SOPInstanceUID) for ds in [*sources, *built]}
    assert not [s for s in secrets if s in caplog.text]
