"""Pipeline behaviour around failures and re-runs: model errors retried then dead-lettered,
late instances re-run the study with a predecessor reference, admin re-queue of deliveries."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_ai.cli import main
from pacs_ai.db.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Report,
    Study,
    StudyState,
)
from pacs_ai.inference import resolve_model_dir
from pacs_ai.service import Service
from pacs_ai.training import dicomwriter as dw
from tests.conftest import wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.orthanc import Orthanc
from tests.integration.process import write_config
from tests.integration.test_e2e import chest_dx, storescu


def _state(svc: Service, uid: str) -> StudyState | None:
    with svc.engine.connect() as c:
        return c.scalar(select(Study.state).where(Study.study_uid == uid))


def test_model_error_is_retried_then_dead_lettered(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    # A model that does not load refuses the start (test_startup.py). One that breaks while
    # the service runs (its files replaced, the scoring worker restarted) fails each job.
    model = tmp_path / "cxr-model"
    shutil.copytree(resolve_model_dir("bundled:cxr"), model)
    svc = start_service(
        pipeline={"enabled": True, "poll_seconds": 0.2, "retry_seconds": [0.3, 0.3]},
        inference={"cxr_model": str(model)},
    )
    (model / "card.json").write_text("{not json")
    assert svc.pipeline is not None and svc.pipeline.scorer.pid is not None
    os.kill(svc.pipeline.scorer.pid, signal.SIGKILL)
    dx = chest_dx("normal", seed=11)
    storescu(svc, write_all([dx], tmp_path / "dx"))
    wait_for(lambda: _state(svc, dx.StudyInstanceUID) == StudyState.FAILED, timeout=30)
    with svc.engine.connect() as c:
        jobs = c.execute(select(Job.attempt, Job.state, Job.error).order_by(Job.id)).all()
        study = c.execute(select(Study.state_reason)).one()
        events = c.scalars(select(AuditEvent.action)).all()
    assert [(j.attempt, j.state) for j in jobs] == [
        (1, JobState.FAILED),
        (2, JobState.FAILED),
        (3, JobState.DEAD),
    ]
    assert all("ModelError" in (j.error or "") for j in jobs)
    assert "ModelError" in (study.state_reason or "")
    assert events.count("job_failed") == 2 and "job_dead" in events


def test_late_instance_reruns_with_predecessor(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(pipeline={"enabled": True, "poll_seconds": 0.2})
    first = chest_dx("covid", seed=1)
    storescu(svc, write_all([first], tmp_path / "a"))
    wait_for(lambda: _state(svc, first.StudyInstanceUID) == StudyState.REPORTED, timeout=30)

    # A second frontal image of the same study arrives later (another series).
    late = chest_dx("covid", seed=2)
    late.StudyInstanceUID = first.StudyInstanceUID
    storescu(svc, write_all([late], tmp_path / "b"))

    def rerun() -> bool:
        with svc.engine.connect() as c:
            return c.scalar(select(Report.id).where(Report.study_revision == 1)) is not None

    wait_for(rerun, timeout=30, what="a report for revision 1")
    with svc.engine.connect() as c:
        reports = c.execute(select(Report).where(Report.kind == "sr").order_by(Report.id)).all()
    assert [r.study_revision for r in reports] == [0, 1]
    old, new = (pydicom.dcmread(svc.settings.reports.path / r.path) for r in reports)
    assert new.SOPInstanceUID != old.SOPInstanceUID
    ref = new.PredecessorDocumentsSequence[0]
    assert ref.StudyInstanceUID == first.StudyInstanceUID
    prior = ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert prior.ReferencedSOPInstanceUID == old.SOPInstanceUID
    sources = {
        r.ReferencedSOPInstanceUID
        for s in new.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for r in s.ReferencedSOPSequence
    }
    assert sources == {first.SOPInstanceUID, late.SOPInstanceUID}


def test_dead_delivery_requeued_by_admin(
    start_service: ServiceFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {})  # does not know us yet: rejects
    pacs.start()
    try:
        svc = start_service(
            pipeline={"enabled": True, "poll_seconds": 0.2},
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": pacs.aet,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "timeout_seconds": 10,
                }
            ],
            delivery={"retry_ladder_seconds": [0.2], "poll_seconds": 0.2, "max_attempts": 1},
        )
        cfg = str(write_config(svc.settings, tmp_path / "config.toml"))
        dx = dw.xray_image(chest_dx("normal", seed=4).pixel_array)

        def delivery_state() -> DeliveryState | None:
            with svc.engine.connect() as c:
                return c.scalar(select(Delivery.state))

        storescu(svc, write_all([dx], tmp_path / "dx"))
        wait_for(lambda: delivery_state() == DeliveryState.DEAD, timeout=30)
        assert main(["deliveries", "list", "-c", cfg, "--state", "dead", "--format", "json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert len(listed) == 1 and "rejected" in listed[0]["last_error"]

        # The admin fixes the PACS (it now knows our AE title) and re-queues.
        pacs.stop()
        pacs.known_aes["pacsai"] = ("PACS_AI", 104)
        pacs.start()
        assert main(["deliveries", "retry", "-c", cfg, "--all-dead"]) == 0
        assert "re-queued 1" in capsys.readouterr().out
        wait_for(lambda: delivery_state() == DeliveryState.DELIVERED, timeout=30)
        assert _state(svc, dx.StudyInstanceUID) == StudyState.DELIVERED
        assert len(pacs.find_instances(dx.StudyInstanceUID)) == 1
    finally:
        pacs.stop()
