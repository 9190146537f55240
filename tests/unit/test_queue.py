"""Issue 12: heartbeats and the stalled-attempt sweep, fencing of a dead attempt, and one
running / one succeeded attempt per study revision, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from pacs_ai.config import DatabaseSettings, PipelineSettings, Settings
from pacs_ai.db.models import Job, JobState, Study, StudyState
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.jobs import Claim, JobLedger, finish_job
from pacs_ai.service import components, pipeline_slots
from tests.conftest import make_settings
from tests.unit.test_jobs import Clock, _ready_study, _state

INTERRUPTED = "interrupted: the worker stopped during the job"


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(DatabaseSettings(url=db_url))
    upgrade(engine)
    yield engine
    engine.dispose()


def _jobs(engine: Engine) -> list[tuple[int, JobState, str | None, str | None]]:
    with engine.connect() as c:
        rows = c.execute(
            select(Job.attempt, Job.state, Job.claimed_by, Job.error).order_by(Job.id)
        ).all()
    return [(r.attempt, r.state, r.claimed_by, r.error) for r in rows]


def test_heartbeat_keeps_an_attempt_alive_until_it_stops(engine: Engine) -> None:
    clock = Clock()
    a = JobLedger(engine, (5.0,), "a", clock)
    b = JobLedger(engine, (5.0,), "b", clock)
    study = _ready_study(engine, clock)
    claim = a.claim()
    assert claim is not None and claim.attempt == 1
    stalled = dt.timedelta(seconds=30)
    for _ in range(4):  # 80 s of work, a heartbeat every 20 s: never stalled
        clock.advance(20)
        assert a.heartbeat(claim) is True
        assert b.recover_stale(stalled) == 0
    clock.advance(29)  # the worker dies: no heartbeat since
    assert b.recover_stale(stalled) == 0
    clock.advance(2)
    assert b.recover_stale(stalled) == 1
    assert b.recover_stale(stalled) == 0  # once
    assert _jobs(engine) == [(1, JobState.FAILED, "a", INTERRUPTED)]
    assert _state(engine, study) == (StudyState.READY, INTERRUPTED)
    # The dead attempt learns it lost the job; its failure report changes nothing.
    assert a.heartbeat(claim) is False
    assert a.fail(claim, "WorkerFailed: late") is False
    assert _jobs(engine) == [(1, JobState.FAILED, "a", INTERRUPTED)]
    clock.advance(5)  # the retry delay
    again = b.claim()
    assert again is not None and again.attempt == 2
    assert _jobs(engine)[1][:3] == (2, JobState.RUNNING, "b")


def test_finish_job_is_fenced(engine: Engine) -> None:
    clock = Clock()
    ledger = JobLedger(engine, (1.0,), "a", clock)
    _ready_study(engine, clock)
    claim = ledger.claim()
    assert claim is not None
    assert ledger.recover_stale(dt.timedelta(0)) == 1
    with engine.begin() as c:
        assert finish_job(c, claim.job_id, JobState.SUCCEEDED, clock.now) is False
    assert _jobs(engine) == [(1, JobState.FAILED, "a", INTERRUPTED)]


def test_racing_claims_of_one_study_yield_one_job(engine: Engine) -> None:
    clock = Clock()
    _ready_study(engine, clock)
    ledgers = [JobLedger(engine, (1.0,), f"w{i}", clock) for i in range(4)]
    barrier = threading.Barrier(len(ledgers))
    claims: list[Claim | None] = []
    errors: list[BaseException] = []

    def claim(ledger: JobLedger) -> None:
        barrier.wait()
        try:
            claims.append(ledger.claim())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(x,)) for x in ledgers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    got = [c for c in claims if c is not None]
    # SQLite may answer "database is locked" to a loser; never a second claim.
    assert len(got) == 1 and len(claims) + len(errors) == 4
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Job)) == 1


def _job_row(study: int, attempt: int, state: JobState) -> dict[str, object]:
    return {"study_id": study, "study_revision": 0, "attempt": attempt, "state": state}


def test_one_running_and_one_succeeded_attempt_per_revision(engine: Engine) -> None:
    clock = Clock()
    study = _ready_study(engine, clock)
    with engine.begin() as c:
        c.execute(insert(Job).values(_job_row(study, 1, JobState.RUNNING)))
    with pytest.raises(IntegrityError), engine.begin() as c:  # a duplicate enqueue/claim
        c.execute(insert(Job).values(_job_row(study, 2, JobState.RUNNING)))
    with engine.begin() as c:
        c.execute(insert(Job).values(_job_row(study, 2, JobState.FAILED)))
        c.execute(insert(Job).values(_job_row(study, 3, JobState.SUCCEEDED)))
    with pytest.raises(IntegrityError), engine.begin() as c:  # a second result
        c.execute(insert(Job).values(_job_row(study, 4, JobState.SUCCEEDED)))
    with engine.begin() as c:  # a new revision (late instance, re-run) is a new study run
        c.execute(
            insert(Job).values({**_job_row(study, 1, JobState.SUCCEEDED), "study_revision": 1})
        )
    with engine.connect() as c:
        assert c.scalar(select(func.count()).select_from(Job)) == 4
        assert c.scalar(select(Study.state)) == StudyState.READY


def _settings(tmp_path: Path, **sections: Any) -> Settings:
    return make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **sections)


def test_roles_choose_what_runs(tmp_path: Path) -> None:
    dest = [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]
    s = _settings(tmp_path, pipeline={"enabled": True}, http={"enabled": True}, destinations=dest)
    got = {
        role: (c.listener, c.pipeline, c.sender, c.http)
        for role in ("all", "gateway", "worker", "sender")
        for c in [components(s, role)]
    }
    assert got == {
        "all": (True, True, True, True),
        "gateway": (True, False, False, True),
        "worker": (False, True, False, False),
        "sender": (False, False, True, False),
    }
    assert components(s, None) == components(s, "all")  # service.role defaults to all
    legacy = components(s, None, listener=False)  # `pacs-ai worker`: pipeline and outbox
    assert (legacy.listener, legacy.pipeline, legacy.sender) == (False, True, True)
    quiet = _settings(tmp_path, service={"role": "worker"})
    assert components(quiet, None).role == "worker"
    assert components(quiet, "gateway").role == "gateway"  # --role wins
    assert components(s, "worker").describe() == "role worker: runs pipeline worker"


def test_pipeline_slots_one_per_visible_gpu_else_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = _settings(tmp_path, pipeline={"workers": 3})
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert pipeline_slots(s) == [{}, {}, {}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 2")
    assert pipeline_slots(s) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "2"}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # no GPU visible
    assert pipeline_slots(s) == [{}, {}, {}]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    cpu = _settings(tmp_path, pipeline={"workers": 2}, inference={"device": "cpu"})
    assert pipeline_slots(cpu) == [{}, {}]


def test_stalled_must_outlast_two_heartbeats(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="twice heartbeat_seconds"):
        PipelineSettings(heartbeat_seconds=10, stalled_seconds=15)


def test_upgrade_stops_on_two_results_for_one_revision(db_url: str) -> None:
    engine = make_engine(DatabaseSettings(url=db_url))
    try:
        upgrade(engine, "honesty")
        clock = Clock()
        study = _ready_study(engine, clock)
        with engine.begin() as c:
            for attempt in (1, 2):  # possible before fencing, after a lease expired
                c.execute(insert(Job).values(_job_row(study, attempt, JobState.SUCCEEDED)))
        with pytest.raises(RuntimeError, match="1 study revision\\(s\\) have more than one"):
            upgrade(engine)
        with engine.begin() as c:  # what the message says to do
            c.execute(update(Job).where(Job.attempt == 2).values(state=JobState.FAILED))
        upgrade(engine)
        with engine.connect() as c:
            assert c.scalar(select(func.count()).select_from(Job)) == 2
    finally:
        engine.dispose()
