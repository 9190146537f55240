"""Several pipeline workers on one PostgreSQL database never process a study twice."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from pacs_ai.db.models import Job, JobState, Report, Study, StudyState
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.pipeline import Pipeline
from pacs_ai.scoring_worker import ScoringWorker
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import cxr_phantom
from tests.conftest import wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.test_e2e import storescu


def test_workers_on_postgres_never_double_process(
    start_service: ServiceFactory, postgres_url: str, tmp_path: Path
) -> None:
    svc = start_service(postgres_url)  # listener only: studies pile up as "ready"
    studies = [
        dw.xray_image(200 + cxr_phantom("normal", np.random.default_rng(i), 256) * 3500)
        for i in range(8)
    ]
    storescu(svc, write_all(studies, tmp_path / "dx"))

    def ready() -> int:
        with svc.engine.connect() as c:
            stmt = select(func.count()).where(Study.state == StudyState.READY)
            return int(c.scalar(stmt) or 0)

    wait_for(lambda: ready() == 8, timeout=30, what="8 ready studies")
    scorer = ScoringWorker(svc.settings)  # one scoring child shared by the three claimers
    scorer.start()
    workers = [
        Pipeline(
            svc.engine,
            svc.settings,
            Outbox(svc.engine, svc.settings),
            scorer,
            worker_id=f"worker-{i}",
        )
        for i in range(3)
    ]
    barrier = threading.Barrier(len(workers))

    def drain(worker: Pipeline) -> None:
        barrier.wait()
        for _ in range(20):  # bounded
            if not worker.run_once():
                return

    threads = [threading.Thread(target=drain, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    scorer.stop()
    with svc.engine.connect() as c:
        jobs = c.execute(select(Job.study_id, Job.state, Job.claimed_by)).all()
        reports = c.execute(
            select(Report.study_id, func.count())
            .where(Report.kind == "sr")
            .group_by(Report.study_id)
        ).all()
        states = set(c.scalars(select(Study.state)))
    assert len(jobs) == 8 and {j.state for j in jobs} == {JobState.SUCCEEDED}
    assert len({j.study_id for j in jobs}) == 8  # one job per study, none twice
    assert sorted(n for _, n in reports) == [1] * 8  # one SR per study
    assert states == {StudyState.REPORTED}
    assert len({j.claimed_by for j in jobs}) >= 2  # the work really was shared
