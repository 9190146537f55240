"""Issue 12 item 1 on a real PostgreSQL: procrastinate drives the ledger.

Deferring a study revision twice queues one procrastinate job and records one attempt; a study
that fails every attempt is retried after the ladder's delays and ends dead-lettered (its
procrastinate job ``failed``, the study ``failed``). The kill -9 fail-over is in
``test_queue.py``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, select, text

from pacs_ai.db.models import Job, JobState, Study, StudyState
from pacs_ai.taskqueue import TASK, Deferrer, LadderRetry, queueing_lock
from tests.conftest import wait_for
from tests.integration.conftest import ServiceFactory
from tests.integration.test_e2e import chest_dx
from tests.integration.test_worker_faults import (
    _file_bytes,
    _study,
    place_ready_study,
    undecodable_rle_dx,
)


def _pq_jobs(engine: Engine, lock: str | None = None) -> list[tuple[str, int, str | None]]:
    """(status, attempts, queueing_lock) of score_study jobs, oldest first."""
    q = "SELECT status::text, attempts, queueing_lock FROM procrastinate_jobs WHERE task_name = :t"
    args: dict[str, Any] = {"t": TASK}
    if lock is not None:
        q += " AND queueing_lock = :l"
        args["l"] = lock
    with engine.connect() as c:
        rows = c.execute(text(q + " ORDER BY id"), args).all()
    return [(r[0], int(r[1]), r[2]) for r in rows]


def _attempts(engine: Engine, study_id: int) -> list[Any]:
    with engine.connect() as c:
        return list(
            c.execute(
                select(Job.attempt, Job.state, Job.started_at, Job.finished_at, Job.next_attempt_at)
                .where(Job.study_id == study_id)
                .order_by(Job.attempt)
            ).all()
        )


def _study_id(engine: Engine, uid: str) -> int:
    with engine.connect() as c:
        sid = c.scalar(select(Study.id).where(Study.study_uid == uid))
    assert sid is not None
    return int(sid)


def test_deferring_twice_queues_one_job_and_one_attempt(
    start_service: ServiceFactory, postgres_url: str
) -> None:
    # The service is the gateway role first (no worker): what is deferred stays queued.
    gw = start_service(postgres_url, service={"role": "gateway"})
    assert gw.queue_worker is None and gw.deferrer is not None
    dx = chest_dx("covid", seed=61)
    uid = place_ready_study(gw.engine, gw.settings.storage.path, [(dx, _file_bytes(dx))])
    sid = _study_id(gw.engine, uid)
    lock = queueing_lock(sid, 0)
    deferrer = Deferrer(gw.engine)
    try:
        assert deferrer.defer_studies([sid]) == 1
        assert deferrer.defer_studies([sid]) == 0  # the queueing lock: already queued
        gw._queue_ready([sid])  # the assembler's hook: absorbed as well
    finally:
        deferrer.close()
    assert _pq_jobs(gw.engine) == [("todo", 0, lock)]
    # A worker scores it once; the periodic re-defer (every heartbeat) adds nothing.
    worker = start_service(
        postgres_url,
        service={"role": "worker"},
        pipeline={"enabled": True, "poll_seconds": 0.2, "heartbeat_seconds": 0.2},
    )
    assert worker.queue_worker is not None
    wait_for(lambda: _study(worker.engine, uid) == (StudyState.REPORTED, None), timeout=120)
    attempts = _attempts(worker.engine, sid)
    assert [(a.attempt, a.state) for a in attempts] == [(1, JobState.SUCCEEDED)]
    wait_for(lambda: _pq_jobs(worker.engine) == [], timeout=30, what="the job deleted")
    worker.queue_worker.sweep()  # nothing ready: nothing deferred
    assert _pq_jobs(worker.engine) == []


def test_failing_study_is_retried_with_backoff_then_dead_lettered(
    start_service: ServiceFactory, postgres_url: str
) -> None:
    ladder = [0.5, 1.0]
    svc = start_service(
        postgres_url,
        pipeline={
            "enabled": True,
            "poll_seconds": 0.2,
            "heartbeat_seconds": 0.2,
            "retry_seconds": ladder,
        },
    )
    assert svc.queue_worker is not None
    uid = place_ready_study(svc.engine, svc.settings.storage.path, [undecodable_rle_dx()])
    sid = _study_id(svc.engine, uid)
    # Placed behind the gateway's back: the workers' periodic re-defer queues it.
    wait_for(
        lambda: _study(svc.engine, uid)[0] == StudyState.FAILED,  # type: ignore[index]
        timeout=120,
        what="the study dead-lettered",
    )
    wait_for(lambda: _pq_jobs(svc.engine) != [] and _pq_jobs(svc.engine)[0][0] == "failed")
    # One procrastinate job, failed (the dead-letter) at its third run (two retries).
    assert _pq_jobs(svc.engine) == [("failed", 3, queueing_lock(sid, 0))]
    attempts = _attempts(svc.engine, sid)
    assert [(a.attempt, a.state) for a in attempts] == [
        (1, JobState.FAILED),
        (2, JobState.FAILED),
        (3, JobState.DEAD),
    ]
    for before, after, delay in zip(attempts[:-1], attempts[1:], ladder, strict=True):
        assert before.next_attempt_at == before.finished_at + dt.timedelta(seconds=delay)
        assert after.started_at >= before.next_attempt_at  # the backoff was respected
    state, reason = _study(svc.engine, uid)  # type: ignore[misc]
    assert state == StudyState.FAILED
    assert str(reason).startswith("ImagingError: pixel data cannot be decoded")
    # Dead stays dead: the sweep does not queue a failed study again.
    svc.queue_worker.sweep()
    assert _pq_jobs(svc.engine) == [("failed", 3, queueing_lock(sid, 0))]


class _Job:
    def __init__(self, attempts: int) -> None:
        self.attempts = attempts


def test_ladder_retry_decisions() -> None:
    from pacs_ai.jobs import DeadLettered, RetryLater

    strategy = LadderRetry([10.0, 60.0])
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    decision = strategy.get_retry_decision(exception=RetryLater("x", at), job=_Job(0))  # type: ignore[arg-type]
    assert decision is not None and decision.retry_at == at
    assert strategy.get_retry_decision(exception=DeadLettered("x"), job=_Job(0)) is None  # type: ignore[arg-type]
    # Errors before a claim: the ladder, then doubling past its end, within the run bound.
    before = dt.datetime.now(dt.UTC)
    steps = []
    for runs in (0, 1, 2):
        d = strategy.get_retry_decision(exception=OSError(), job=_Job(runs))  # type: ignore[arg-type]
        assert d is not None and d.retry_at is not None
        steps.append(round((d.retry_at - before).total_seconds()))
    assert steps == [10, 60, 120]
    assert strategy.get_retry_decision(exception=OSError(), job=_Job(200)) is None  # type: ignore[arg-type]


def test_rerun_defers_the_new_revision(start_service: ServiceFactory, postgres_url: str) -> None:
    from sqlalchemy import update

    from pacs_ai.studies import rerun_study

    gw = start_service(postgres_url, service={"role": "gateway"})
    dx = chest_dx("normal", seed=62)
    uid = place_ready_study(gw.engine, gw.settings.storage.path, [(dx, _file_bytes(dx))])
    sid = _study_id(gw.engine, uid)
    with gw.engine.begin() as c:
        c.execute(update(Study).where(Study.id == sid).values(state=StudyState.REPORTED))
    rerun_study(gw.engine, str(sid), "admin:test")
    assert _pq_jobs(gw.engine) == [("todo", 0, queueing_lock(sid, 1))]
