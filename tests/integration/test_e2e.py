"""End to end with a real PACS (Orthanc): modality -> pacs-ai -> SR in the PACS, same study.

The modality is dcmtk's storescu; pacs-ai runs with the bundled demo models; Orthanc is the
destination. Every object pacs-ai produces is checked by dciodvfy, and the SR is read back
from Orthanc and parsed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from pacs_ai.db.models import (
    Delivery,
    DeliveryState,
    Finding,
    Report,
    Series,
    Study,
    StudyState,
)
from pacs_ai.service import Service
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import ct_phantom, cxr_phantom
from tests.conftest import PATIENT, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.orthanc import Orthanc
from tests.tools import dciodvfy_errors, require_tool

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR


def chest_dx(kind: str = "covid", seed: int = 0, size: int = 512) -> pydicom.Dataset:
    img = cxr_phantom(kind, np.random.default_rng(seed), size)  # type: ignore[arg-type]
    return dw.xray_image(200 + img * 3500, modality="DX", patient=PATIENT)


def chest_ct(kind: str = "covid", seed: int = 0, slices: int = 24) -> list[pydicom.Dataset]:
    vol = ct_phantom(kind, np.random.default_rng(seed), (slices, 128, 128))  # type: ignore[arg-type]
    return dw.ct_series(vol, patient=PATIENT, slice_thickness_mm=300 / slices)


def storescu(svc: Service, files: list[Path]) -> None:
    result = subprocess.run(
        [
            require_tool("storescu"),
            "-aec",
            "PACS_AI",
            "127.0.0.1",
            str(svc.server.port),  # type: ignore[union-attr]
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path / "orthanc", {"pacsai": ("PACS_AI", 1)})
    pacs.start()
    yield pacs
    pacs.stop()


def gateway(
    start_service: ServiceFactory,
    pacs: Orthanc,
    db_url: str | None = None,
    objects: tuple[str, ...] = ("sr", "summary", "text_sr"),
    max_attempts: int = 50,
    **extra: dict,
) -> Service:  # type: ignore[type-arg]
    return start_service(
        db_url,
        pipeline={"enabled": True, "poll_seconds": 0.5},
        destinations=[
            {
                "name": "orthanc",
                "ae_title": pacs.aet,
                "host": "127.0.0.1",
                "port": pacs.dicom_port,
                "objects": list(objects),
                "timeout_seconds": 10,
            }
        ],
        delivery={"retry_ladder_seconds": [0.5], "poll_seconds": 0.3, "max_attempts": max_attempts},
        **extra,
    )


def _study(svc: Service, uid: str):  # type: ignore[no-untyped-def]
    with svc.engine.connect() as c:
        return c.execute(select(Study).where(Study.study_uid == uid)).first()


def _delivered(svc: Service, uid: str) -> bool:
    row = _study(svc, uid)
    return row is not None and row.state == StudyState.DELIVERED


def _check_objects(svc: Service, study_uid: str) -> list[pydicom.Dataset]:
    """dciodvfy every object made for the study; return them parsed."""
    with svc.engine.connect() as c:
        paths = c.scalars(
            select(Report.path)
            .join(Study, Study.id == Report.study_id)
            .where(Study.study_uid == study_uid)
        ).all()
    out = []
    for rel in paths:
        path = svc.settings.reports.path / rel
        assert dciodvfy_errors(path) == [], path
        out.append(pydicom.dcmread(path))
    return out


def _sr_from_orthanc(pacs: Orthanc, study_uid: str) -> pydicom.Dataset:
    found = [
        i
        for i in pacs.find_instances(study_uid)
        if i["MainDicomTags"].get("SOPInstanceUID") and _is_sr(pacs, i["ID"])
    ]
    assert len(found) == 1
    return pydicom.dcmread(BytesIO(pacs.instance_file(found[0]["ID"])))


def _is_sr(pacs: Orthanc, orthanc_id: str) -> bool:
    tags = pacs.get(f"/instances/{orthanc_id}/tags?short")
    return bool(tags.get("0008,0016") == SR_CLASS)


def _findings(sr: pydicom.Dataset) -> dict[str, dict[str, object]]:
    """finding meaning -> {probability, present} from the TID 1500 content tree."""
    out: dict[str, dict[str, object]] = {}

    def walk(items: pydicom.Sequence, finding: str | None = None) -> None:
        for item in items:
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if item.ValueType == "CODE" and name == "Finding":
                finding = item.ConceptCodeSequence[0].CodeMeaning
                out.setdefault(finding, {})
            if finding and item.ValueType == "NUM" and name == f"Probability of {finding}":
                out[finding]["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            if finding and item.ValueType == "CODE" and name == finding:
                out[finding]["present"] = item.ConceptCodeSequence[0].CodeMeaning == "Present"
            if "ContentSequence" in item:
                walk(item.ContentSequence, finding)

    walk(sr.ContentSequence)
    return out


def test_dx_end_to_end(start_service: ServiceFactory, orthanc: Orthanc, tmp_path: Path) -> None:
    svc = gateway(start_service, orthanc)
    dx = chest_dx("covid")
    storescu(svc, write_all([dx], tmp_path / "dx"))
    wait_for(lambda: _delivered(svc, dx.StudyInstanceUID), timeout=60, what="delivered")

    objects = _check_objects(svc, dx.StudyInstanceUID)
    assert {o.SOPClassUID.name for o in objects} == {
        "Comprehensive 3D SR Storage",
        "Secondary Capture Image Storage",
        "Basic Text SR Storage",
    }
    sr = _sr_from_orthanc(orthanc, dx.StudyInstanceUID)
    assert sr.StudyInstanceUID == dx.StudyInstanceUID and sr.PatientID == dx.PatientID
    assert sr.SeriesInstanceUID != dx.SeriesInstanceUID and sr.VerificationFlag == "UNVERIFIED"
    referenced = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {dx.SOPInstanceUID}
    equipment = sr.ContributingEquipmentSequence
    # the card's demo flag (not the model's name) puts the warning in the objects
    ai = [e for e in equipment if e.get("ManufacturerModelName") == "pacs-ai-cxr-demo"]
    assert [e.ContributionDescription for e in ai] == [
        "AI inference result (DEMO - not for clinical use)"
    ]
    assert (
        sr.ContentSequence[0].ContentSequence[0].TextValue.startswith("DEMO - NOT FOR CLINICAL USE")
    )
    findings = _findings(sr)
    assert set(findings) == {"COVID-19", "Pneumonia"}
    with svc.engine.connect() as c:
        db_findings = {r.label: r for r in c.execute(select(Finding))}
    assert abs(findings["COVID-19"]["probability"] - db_findings["covid"].probability) < 1e-6  # type: ignore[operator]
    assert findings["COVID-19"]["present"] == db_findings["covid"].present
    # The orthanc copy is the very object pacs-ai wrote (deterministic UID, sent once).
    assert sr.SOPInstanceUID in {o.SOPInstanceUID for o in objects}
    assert len(orthanc.find_instances(dx.StudyInstanceUID)) == 3  # our 3 objects, not the image


def test_ct_end_to_end(start_service: ServiceFactory, orthanc: Orthanc, tmp_path: Path) -> None:
    svc = gateway(start_service, orthanc, objects=("sr",), assembly={"ct_quiet_seconds": 1.0})
    ct = chest_ct("covid")
    storescu(svc, write_all(ct, tmp_path / "ct"))
    wait_for(lambda: _delivered(svc, ct[0].StudyInstanceUID), timeout=90, what="delivered")
    _check_objects(svc, ct[0].StudyInstanceUID)
    sr = _sr_from_orthanc(orthanc, ct[0].StudyInstanceUID)
    assert "COVID-19" in _findings(sr)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(evidence.ReferencedSOPSequence) == len(ct)


def test_non_chest_input_is_not_applicable(
    start_service: ServiceFactory, orthanc: Orthanc, tmp_path: Path
) -> None:
    svc = gateway(start_service, orthanc, assembly={"ct_quiet_seconds": 0.5})
    from pydicom.data import get_testdata_file

    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))  # type: ignore[arg-type]
    localizer = dw.ct_series(np.full((3, 64, 64), -500.0), localizer=True)
    lateral = dw.xray_image(np.full((256, 256), 2000.0), modality="DX", view="LATERAL")
    files = write_all([mr, *localizer, lateral], tmp_path / "other")
    storescu(svc, files)
    uids = [mr.StudyInstanceUID, localizer[0].StudyInstanceUID, lateral.StudyInstanceUID]

    def settled() -> bool:
        rows = [_study(svc, u) for u in uids]
        return all(r is not None and r.state == StudyState.NOT_APPLICABLE for r in rows)

    wait_for(settled, timeout=60, what="all not applicable")
    with svc.engine.connect() as c:
        reasons = c.scalars(select(Series.not_applicable_reason)).all()
        assert c.scalar(select(Report.id)) is None
    assert all(reasons) and any("lateral" in r.lower() for r in reasons if r)
    assert all(orthanc.find_instances(u) == [] for u in uids)


def test_pacs_down_then_restart_delivers_exactly_once(
    start_service: ServiceFactory, orthanc: Orthanc, tmp_path: Path, sqlite_url: str
) -> None:
    orthanc.stop()
    svc = gateway(start_service, orthanc, db_url=sqlite_url, objects=("sr",))
    dx = chest_dx("pneumonia", seed=3)
    storescu(svc, write_all([dx], tmp_path / "dx"))

    def attempts() -> int:
        with svc.engine.connect() as c:
            return int(c.scalar(select(Delivery.attempts)) or 0)

    wait_for(lambda: attempts() >= 2, timeout=60, what="failed attempts while the PACS is down")
    with svc.engine.connect() as c:
        d = c.execute(select(Delivery)).one()
    assert d.state == DeliveryState.FAILED and d.last_status is None and d.last_error
    svc.stop()  # pacs-ai restarts while the delivery is pending

    orthanc.start()
    again = gateway(start_service, orthanc, db_url=sqlite_url, objects=("sr",))
    wait_for(lambda: _delivered(again, dx.StudyInstanceUID), timeout=60, what="delivered")
    srs = [i for i in orthanc.find_instances(dx.StudyInstanceUID) if _is_sr(orthanc, i["ID"])]
    assert len(srs) == 1
    with again.engine.connect() as c:
        d = c.execute(select(Delivery)).one()
    assert d.state == DeliveryState.DELIVERED and d.last_status == 0 and d.attempts >= 3


def test_pacs_rejecting_is_never_delivered(start_service: ServiceFactory, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "strict", {})  # does not know our AE title
    pacs.start()
    try:
        # One attempt allowed: the outcome is the same whether the reject counts as
        # permanent or transient.
        svc = gateway(start_service, pacs, objects=("sr",), max_attempts=1)
        dx = chest_dx("normal", seed=5)
        storescu(svc, write_all([dx], tmp_path / "dx"))

        def dead() -> bool:
            with svc.engine.connect() as c:
                return c.scalar(select(Delivery.state)) == DeliveryState.DEAD

        wait_for(dead, timeout=60, what="the delivery dead-lettered")
        with svc.engine.connect() as c:
            d = c.execute(select(Delivery)).one()
            study = c.execute(select(Study)).one()
        # A permanent reject (1,1,3) is not retried: dead at the first attempt.
        assert (d.state, d.attempts, d.last_status) == (DeliveryState.DEAD, 1, None)
        assert d.delivered_at is None
        assert (d.last_error or "").startswith("association rejected (1,1,3), permanent")
        assert study.state == StudyState.REPORTED
        assert pacs.find_instances(dx.StudyInstanceUID) == []
    finally:
        pacs.stop()
