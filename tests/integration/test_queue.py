"""Issue 12 on a real PostgreSQL: roles in separate processes, a worker killed mid-study
(another finishes it after ``pipeline.stalled_seconds``, one SR), and the fence that refuses
the late commit of an attempt declared dead."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select

from pacs_ai.db.models import Delivery, Finding, Job, JobState, Report, Study, StudyState
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.jobs import StaleAttempt
from pacs_ai.pipeline import Pipeline
from pacs_ai.scoring_worker import FAULT_ENV, ScoringWorker
from tests.conftest import free_port, make_settings, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.process import ServerProcess, write_config
from tests.integration.test_e2e import chest_dx
from tests.integration.test_worker_faults import _file_bytes, place_ready_study
from tests.tools import require_tool

INTERRUPTED = "interrupted: the worker stopped during the job"


def _closed_destination() -> list[dict[str, Any]]:
    # Nobody listens there: deliveries stay in the outbox, which is what is counted.
    port = free_port()
    return [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}]


def _counts(engine: Engine, study_uid: str) -> tuple[int, int, int]:
    """(SR reports, deliveries, findings) of one study."""
    with engine.connect() as c:
        sid = c.scalar(select(Study.id).where(Study.study_uid == study_uid))
        srs = c.scalar(select(func.count()).where(Report.study_id == sid, Report.kind == "sr"))
        outbox = c.scalar(select(func.count()).where(Delivery.study_id == sid))
        findings = c.scalar(
            select(func.count()).select_from(Finding).join(Job).where(Job.study_id == sid)
        )
    return int(srs or 0), int(outbox or 0), int(findings or 0)


def _jobs(engine: Engine, study_uid: str) -> list[tuple[int, JobState, str | None, str | None]]:
    with engine.connect() as c:
        rows = c.execute(
            select(Job.attempt, Job.state, Job.error, Job.claimed_by)
            .join(Study)
            .where(Study.study_uid == study_uid)
            .order_by(Job.id)
        ).all()
    return [(r.attempt, r.state, r.error, r.claimed_by) for r in rows]


def _state(engine: Engine, study_uid: str) -> StudyState | None:
    with engine.connect() as c:
        return c.scalar(select(Study.state).where(Study.study_uid == study_uid))


def test_late_commit_of_a_fenced_attempt_is_refused(
    start_service: ServiceFactory, postgres_url: str
) -> None:
    svc = start_service(
        postgres_url,
        pipeline={"retry_seconds": [0.1, 0.1]},
        destinations=_closed_destination(),
        delivery={"poll_seconds": 3600},  # the outbox rows stay as written
    )
    dx = chest_dx("covid", seed=41)
    uid = place_ready_study(svc.engine, svc.settings.storage.path, [(dx, _file_bytes(dx))])
    scorer = ScoringWorker(svc.settings)
    scorer.start()
    try:
        outbox = Outbox(svc.engine, svc.settings)
        late = Pipeline(svc.engine, svc.settings, outbox, scorer, worker_id="late")
        alive = Pipeline(svc.engine, svc.settings, outbox, scorer, worker_id="alive")
        first = late.ledger.claim()
        assert first is not None and first.attempt == 1
        # The "late" worker is declared dead (no heartbeat) while it still works.
        assert alive.ledger.recover_stale(dt.timedelta(0)) == 1
        dead_row = _jobs(svc.engine, uid)
        assert dead_row == [(1, JobState.FAILED, INTERRUPTED, "late")]
        # Its commit is refused before the retry is even claimed ...
        with pytest.raises(StaleAttempt):
            late._process(first)
        assert _counts(svc.engine, uid) == (0, 0, 0)
        assert _jobs(svc.engine, uid) == dead_row
        assert _state(svc.engine, uid) == StudyState.READY
        second = None
        deadline = time.monotonic() + 10  # the retry delay is 0.1 s
        while second is None and time.monotonic() < deadline:
            second = alive.ledger.claim()
            if second is None:
                time.sleep(0.05)
        assert second is not None and second.attempt == 2
        alive._process(second)
        assert _state(svc.engine, uid) == StudyState.REPORTED
        done = _counts(svc.engine, uid)
        assert done[:2] == (1, 1) and done[2] > 0
        jobs = _jobs(svc.engine, uid)
        assert jobs == [dead_row[0], (2, JobState.SUCCEEDED, None, "alive")]
        # The late attempt comes back after the result is in: still refused, nothing added.
        with pytest.raises(StaleAttempt):
            late._process(first)
        assert _counts(svc.engine, uid) == done
        assert _jobs(svc.engine, uid) == jobs
        assert _state(svc.engine, uid) == StudyState.REPORTED
    finally:
        scorer.stop()


class RoleProcess(ServerProcess):
    """``pacs-ai serve --role ROLE`` as a child process; started when its summary is logged."""

    def start_role(
        self, role: str, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> int:
        """``prefix``: run it behind that (``ip netns exec NAME``: on another host)."""
        log = self.log_path.open("ab")
        args = ["serve", "--role", role, "--config", str(self.config)]
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pacs_ai", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        proc = self.proc

        def started() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{role} exited early:\n{self.log_path.read_text()}")
            return f"role {role}: runs" in self.log_path.read_text()

        wait_for(started, timeout=240, what=f"the {role} started")
        return proc.pid


def _storescu(port: int, files: list[Path]) -> None:
    done = subprocess.run(
        [require_tool("storescu"), "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def roles(
    tmp_path: Path, postgres_url: str
) -> Iterator[tuple[Path, int, Engine, list[RoleProcess]]]:
    settings = make_settings(
        tmp_path,
        postgres_url,
        pipeline={
            "enabled": True,
            "poll_seconds": 0.2,
            "retry_seconds": [0.5, 0.5],
            "heartbeat_seconds": 0.5,
            "stalled_seconds": 3.0,
        },
        destinations=_closed_destination(),
        reports={"objects": ["sr"]},
        logging={"level": "INFO"},
    )
    cfg = write_config(settings, tmp_path / "config.toml")
    done = ServerProcess(cfg, tmp_path / "db.log").cli("db", "upgrade", "--config", str(cfg))
    assert done.returncode == 0, done.stderr
    procs: list[RoleProcess] = []
    engine = create_engine(postgres_url)
    yield cfg, settings.dicom.port, engine, procs
    for p in procs:
        p.stop()
    engine.dispose()


def test_roles_on_postgres_worker_killed_mid_study_scored_once(
    roles: tuple[Path, int, Engine, list[RoleProcess]], tmp_path: Path
) -> None:
    cfg, port, engine, procs = roles

    def start(name: str, role: str, env: dict[str, str] | None = None) -> tuple[RoleProcess, int]:
        proc = RoleProcess(cfg, tmp_path / f"{name}.log")
        procs.append(proc)
        return proc, proc.start_role(role, env)

    gateway, _ = start("gateway", "gateway")
    assert "role gateway: runs DICOM listener" in gateway.log_path.read_text()
    # Worker 1 hangs in every study (test hook), so it is mid-study for as long as needed.
    w1, w1_pid = start("w1", "worker", {FAULT_ENV: "hang"})
    dx = chest_dx("covid", seed=42)
    _storescu(port, write_all([dx], tmp_path / "s1"))
    uid = dx.StudyInstanceUID
    wait_for(
        lambda: [(a, s) for a, s, _, _ in _jobs(engine, uid)] == [(1, JobState.RUNNING)],
        timeout=60,
        what="worker 1 mid-study",
    )
    assert str(_jobs(engine, uid)[0][3]).endswith(f":{w1_pid}")
    _w2, w2_pid = start("w2", "worker")
    assert [(a, s) for a, s, _, _ in _jobs(engine, uid)] == [(1, JobState.RUNNING)]  # heartbeats
    w1.kill9()
    # Within stalled_seconds (3 s) + the retry delay (0.5 s) + one scoring, worker 2 has it.
    wait_for(lambda: _state(engine, uid) == StudyState.REPORTED, timeout=60, what="recovered")
    jobs = _jobs(engine, uid)
    assert [(a, s, e) for a, s, e, _ in jobs] == [
        (1, JobState.FAILED, INTERRUPTED),
        (2, JobState.SUCCEEDED, None),
    ]
    assert str(jobs[1][3]).endswith(f":{w2_pid}")
    srs, outbox, findings = _counts(engine, uid)
    assert (srs, outbox) == (1, 1) and findings > 0
    # Two live workers, two more studies: each scored exactly once.
    _w3, w3_pid = start("w3", "worker")
    more = [chest_dx("normal", seed=43), chest_dx("covid", seed=44)]
    _storescu(port, write_all(more, tmp_path / "s2"))
    uids = [str(d.StudyInstanceUID) for d in more]
    wait_for(
        lambda: all(_state(engine, u) == StudyState.REPORTED for u in uids),
        timeout=120,
        what="both reported",
    )
    for u in uids:
        [(attempt, state, error, by)] = _jobs(engine, u)
        assert (attempt, state, error) == (1, JobState.SUCCEEDED, None)
        assert by is not None and by.rsplit(":", 1)[1] in {str(w2_pid), str(w3_pid)}
        assert _counts(engine, u)[:2] == (1, 1)
    # The gateway scored nothing itself and the workers took no DICOM port.
    assert "pipeline slots: 0" in gateway.log_path.read_text()
