"""Retention end to end: a real association, the pipeline, `pacs-ai retention run`, the audit
trail afterwards, and the same study sent again after its files were purged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update

from pacs_ai.cli import main
from pacs_ai.db.models import AuditEvent, Instance, Report, Study, StudyState
from pacs_ai.service import Service
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import cxr_phantom
from tests.conftest import PATIENT, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.process import write_config
from tests.integration.test_e2e import storescu

ACCESSION = "ACCPHI777"
PHI = (PATIENT.name, PATIENT.patient_id, PATIENT.birth_date, ACCESSION)


def _chest(seed: int) -> pydicom.Dataset:
    img = cxr_phantom("covid", np.random.default_rng(seed), 512)
    study = dw.StudyInfo(accession_number=ACCESSION)
    return dw.xray_image(200 + img * 3500, modality="DX", patient=PATIENT, study=study)


def _study(svc: Service, uid: str) -> tuple[StudyState, int] | None:
    with svc.engine.connect() as c:
        row = c.execute(select(Study.state, Study.revision).where(Study.study_uid == uid)).first()
    return None if row is None else (row.state, row.revision)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_purge_after_delivery_keeps_history_and_a_resend_is_stored_again(
    start_service: ServiceFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = start_service(
        pipeline={"enabled": True, "poll_seconds": 0.2},
        reports={"path": str(tmp_path / "reports"), "objects": ["sr"]},  # one report file
        retention={
            "objects_days": 0,
            "failed_objects_days": 0,
            "reports_days": 0,
            "min_free_mb": 0,
            "interval_seconds": 3600,
        },
    )
    cfg = str(write_config(svc.settings, tmp_path / "config.toml"))
    dx = _chest(seed=1)
    files = write_all([dx], tmp_path / "dx")
    uid = dx.StudyInstanceUID
    storescu(svc, files)
    wait_for(lambda: _study(svc, uid) == (StudyState.REPORTED, 0), timeout=60, what="reported")
    spool = svc.settings.storage.path
    with svc.engine.connect() as c:
        inst = c.execute(select(Instance.path, Instance.size_bytes)).one()
        reports = c.execute(select(Report.path)).scalars().all()
    obj = spool / inst.path
    report_files = [svc.settings.reports.path / p for p in reports]
    obj_bytes = obj.stat().st_size
    report_bytes = sum(p.stat().st_size for p in report_files)
    assert obj.exists() and len(report_files) == 1 and report_files[0].exists()

    dry = json.loads(_cli(capsys, "retention", "run", "-c", cfg, "--dry-run", "--format", "json"))
    assert (dry["objects_finished"]["files"], dry["objects_finished"]["bytes"]) == (1, obj_bytes)
    assert (dry["reports"]["files"], dry["bytes"]) == (1, obj_bytes + report_bytes)
    assert obj.exists()

    out = _cli(capsys, "retention", "run", "-c", cfg)
    assert f"freed {obj_bytes + report_bytes} bytes" in out
    assert not obj.exists() and not report_files[0].exists()
    assert list((spool / "objects").rglob("*.dcm")) == []
    with svc.engine.connect() as c:
        assert c.scalar(select(Instance.purged_at)) is not None
        assert c.scalar(select(Study.purged_at)) is not None
        assert c.scalar(select(Report.purged_at)) is not None
        details = c.execute(
            select(AuditEvent.action, AuditEvent.detail).where(
                AuditEvent.action.in_(("objects_purged", "reports_purged"))
            )
        ).all()
    assert sorted((a, json.loads(d)) for a, d in details) == [
        ("objects_purged", {"bytes": obj_bytes, "instances": 1, "reason": "finished"}),
        ("reports_purged", {"bytes": report_bytes, "reports": 1}),
    ]

    # The history still answers, found by a UID prefix; no PHI without --show-phi.
    timeline = _cli(capsys, "audit", "study", "-c", cfg, uid[:-3])
    for event in ("first instance received", "succeeded", "written", "objects_purged"):
        assert event in timeline
    assert "reports_purged" in timeline and "objects purged" in timeline.splitlines()[0]
    assert not [v for v in PHI if v in timeline]
    shown = _cli(capsys, "audit", "study", "-c", cfg, uid, "--show-phi")
    assert PATIENT.name in shown and PATIENT.patient_id in shown and ACCESSION in shown

    # The same study again: stored again (not "duplicate" with no file) and re-run.
    storescu(svc, files)
    wait_for(lambda: obj.exists(), timeout=10, what="object stored again")
    wait_for(lambda: _study(svc, uid) == (StudyState.REPORTED, 1), timeout=60, what="re-run")
    with svc.engine.connect() as c:
        row = c.execute(select(Instance.purged_at, Instance.times_received)).one()
    assert (row.purged_at, row.times_received) == (None, 2)
    assert pydicom.dcmread(obj).SOPInstanceUID == dx.SOPInstanceUID


def test_audit_output_hides_phi_unless_asked(
    start_service: ServiceFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = start_service()
    cfg = str(write_config(svc.settings, tmp_path / "config.toml"))
    dx = _chest(seed=2)
    storescu(svc, write_all([dx], tmp_path / "dx"))
    wait_for(lambda: _study(svc, dx.StudyInstanceUID) is not None, timeout=10)
    with svc.engine.connect() as c:
        study_id = c.scalar(select(Study.id))
    outputs = {}
    for what in ("studies", "instances", "events", "associations"):
        for fmt in ("table", "json", "csv"):
            outputs[f"{what} {fmt}"] = _cli(capsys, "audit", what, "-c", cfg, "--format", fmt)
        outputs[f"{what} wide"] = _cli(capsys, "audit", what, "-c", cfg, "--wide")
    outputs["study"] = _cli(capsys, "audit", "study", "-c", cfg, str(study_id))
    outputs["study json"] = _cli(
        capsys, "audit", "study", "-c", cfg, dx.StudyInstanceUID, "--format", "json"
    )
    leaks = {name: [v for v in PHI if v in out] for name, out in outputs.items()}
    assert leaks == {name: [] for name in outputs}

    for fmt in ("table", "json", "csv"):
        out = _cli(capsys, "audit", "studies", "-c", cfg, "--show-phi", "--format", fmt)
        assert [v for v in PHI if v in out] == [PATIENT.name, PATIENT.patient_id, ACCESSION]
    # Birth date is not stored in the database, so even --show-phi has none to show.

    table = outputs["studies table"]
    assert max(len(line) for line in table.splitlines()) <= 120
    assert dx.StudyInstanceUID not in table  # cut to fit ...
    assert dx.StudyInstanceUID in outputs["studies wide"]  # ... whole with --wide
    assert dx.StudyInstanceUID in outputs["studies csv"]


def test_serve_runs_retention_on_its_schedule(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(retention={"objects_days": 0, "min_free_mb": 0, "interval_seconds": 1})
    studies = [_chest(seed=3), _chest(seed=4)]
    storescu(svc, write_all(studies, tmp_path / "dx"))
    uids = [ds.StudyInstanceUID for ds in studies]
    for uid in uids:
        wait_for(lambda u=uid: _study(svc, u) == (StudyState.READY, 0), timeout=10, what="ready")
    objects = {}
    with svc.engine.connect() as c:
        for uid in uids:
            rel = c.scalar(select(Instance.path).join(Study).where(Study.study_uid == uid))
            objects[uid] = svc.settings.storage.path / str(rel)

    def finish(uid: str) -> None:  # as if the pipeline had found nothing to score
        with svc.engine.begin() as c:
            c.execute(
                update(Study).where(Study.study_uid == uid).values(state=StudyState.NOT_APPLICABLE)
            )

    finish(uids[0])
    wait_for(lambda: not objects[uids[0]].exists(), timeout=10, what="purged by the job")
    assert objects[uids[1]].exists()  # still "ready": never purged, whatever its age
    finish(uids[1])
    wait_for(lambda: not objects[uids[1]].exists(), timeout=10, what="purged by the job")

    def purges() -> int:  # the files go just before the purge's transaction commits
        with svc.engine.connect() as c:
            return c.scalars(select(AuditEvent.action)).all().count("objects_purged")

    wait_for(lambda: purges() == 2, timeout=10, what="two purges audited")
    assert purges() == 2
