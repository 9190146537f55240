"""The scoring worker with decode processes (``inference.decode_processes = 1``): a study is
scored through them, and they stop with the worker."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy import select

from pacs_ai.db.models import Job, JobState, Study, StudyState
from tests.conftest import wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.test_e2e import chest_dx, storescu


def _children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(p) for p in text.split()}


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_study_scored_through_decode_processes(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(
        pipeline={"enabled": True, "poll_seconds": 0.2}, inference={"decode_processes": 1}
    )
    dx = chest_dx("covid", seed=5)
    storescu(svc, write_all([dx], tmp_path / "a"))

    def state() -> StudyState | None:
        with svc.engine.connect() as c:
            return c.scalar(select(Study.state).where(Study.study_uid == dx.StudyInstanceUID))

    wait_for(lambda: state() == StudyState.REPORTED, timeout=60)
    with svc.engine.connect() as c:
        assert c.scalars(select(Job.state)).all() == [JobState.SUCCEEDED]
    assert svc.pipeline is not None
    worker = svc.pipeline.scorer.pid
    assert worker is not None
    decoders = _children(worker)
    assert len(decoders) >= 1  # the decode process (spawn also starts a resource tracker)
    svc.pipeline.scorer.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(_gone(p) for p in decoders):
        time.sleep(0.05)
    assert all(_gone(p) for p in decoders)
