"""The job ledger with a controlled clock: retries, dead-lettering, and attempts interrupted by
a crash counted at restart; and the scrubbing of error text."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import Engine, insert, select

from pacs_ai.config import DatabaseSettings
from pacs_ai.db.models import AuditEvent, Job, JobState, Study, StudyState
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.errors import ImagingError, WorkerFailed, safe_reason
from pacs_ai.jobs import JobLedger


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _engine(tmp_path: Path) -> Engine:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    upgrade(engine)
    return engine


def _ready_study(engine: Engine, clock: Clock) -> int:
    with engine.begin() as c:
        return int(
            c.execute(
                insert(Study)
                .values(study_uid="1.2.3", state=StudyState.READY, ready_at=clock.now)
                .returning(Study.id)
            ).scalar_one()
        )


def _state(engine: Engine, study_id: int) -> tuple[StudyState, str | None]:
    with engine.connect() as c:
        row = c.execute(select(Study.state, Study.state_reason).where(Study.id == study_id)).one()
    return row.state, row.state_reason


def test_failed_attempts_wait_for_their_retry_then_dead(tmp_path: Path) -> None:
    engine, clock = _engine(tmp_path), Clock()
    ledger = JobLedger(engine, (10.0, 60.0), "w1", clock)
    study = _ready_study(engine, clock)
    for attempt, delay in ((1, 10.0), (2, 60.0)):
        claim = ledger.claim()
        assert claim is not None and claim.attempt == attempt
        assert ledger.fail(claim, "ImagingError: pixel data cannot be decoded") is False
        assert _state(engine, study) == (
            StudyState.READY,
            "ImagingError: pixel data cannot be decoded",
        )
        clock.advance(delay - 1)
        assert ledger.claim() is None  # not due yet
        clock.advance(1)
    claim = ledger.claim()
    assert claim is not None and claim.attempt == 3
    assert ledger.fail(claim, "ImagingError: x") is True
    assert _state(engine, study) == (StudyState.FAILED, "ImagingError: x")
    clock.advance(3600)
    assert ledger.claim() is None
    with engine.connect() as c:
        states = c.execute(select(Job.attempt, Job.state).order_by(Job.id)).all()
        actions = c.scalars(select(AuditEvent.action).order_by(AuditEvent.id)).all()
    assert [tuple(s) for s in states] == [
        (1, JobState.FAILED),
        (2, JobState.FAILED),
        (3, JobState.DEAD),
    ]
    assert actions == ["job_failed", "job_failed", "job_dead"]


def test_attempts_interrupted_by_crashes_count_and_end_dead(tmp_path: Path) -> None:
    """Each claim is followed by a 'crash' (nothing recorded) and a restart's recovery."""
    engine, clock = _engine(tmp_path), Clock()
    study = _ready_study(engine, clock)
    for attempt in (1, 2):
        ledger = JobLedger(engine, (5.0,), f"run{attempt}", clock)  # a fresh process
        assert ledger.recover_stale(dt.timedelta(0)) == (0 if attempt == 1 else 1)
        clock.advance(5)
        claim = ledger.claim()
        assert claim is not None and claim.attempt == attempt
        assert _state(engine, study)[0] == StudyState.PROCESSING
    ledger = JobLedger(engine, (5.0,), "run3", clock)
    assert ledger.recover_stale(dt.timedelta(0)) == 1
    reason = "interrupted: the worker stopped during the job"
    assert _state(engine, study) == (StudyState.FAILED, reason)
    clock.advance(60)
    assert ledger.claim() is None  # never claimed again
    with engine.connect() as c:
        jobs = c.execute(select(Job.attempt, Job.state, Job.error).order_by(Job.id)).all()
    assert [tuple(j) for j in jobs] == [
        (1, JobState.FAILED, reason),
        (2, JobState.DEAD, reason),
    ]


def test_lease_keeps_young_running_jobs(tmp_path: Path) -> None:
    engine, clock = _engine(tmp_path), Clock()
    _ready_study(engine, clock)
    ledger = JobLedger(engine, (5.0,), "w", clock)
    assert ledger.claim() is not None
    clock.advance(599)
    assert ledger.recover_stale(dt.timedelta(seconds=600)) == 0
    clock.advance(1)
    assert ledger.recover_stale(dt.timedelta(seconds=600)) == 1


def test_safe_reason_drops_dicom_values() -> None:
    exc = ValueError(
        "bad value 'Doe^Jane' in (0010,0010) for 1.2.826.0.1.3680043.8.498.1 "
        "id \"PHI-123456\" 19800101 b'\\x00\\x01' Smith^John"
    )
    text = safe_reason(exc)
    assert text == "ValueError: bad value … in (0010,0010) for … id … … … …"
    assert safe_reason(MemoryError()) == "MemoryError"
    assert safe_reason(WorkerFailed("ModelError", "cannot read weights")) == (
        "ModelError: cannot read weights"
    )
    assert safe_reason(ImagingError("x" * 500)) == ("ImagingError: " + "x" * 500)[:200]
