"""Periodic work on apscheduler: completion sweeps now; retries and retention as they land.

Every job runs with ``max_instances=1`` and ``coalesce=True`` (a slow run is never doubled
up in this process) and is written as an idempotent conditional update on the database (two
processes running the same job cannot double-fire a state change).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self) -> None:
        self._sched = BackgroundScheduler(timezone=dt.UTC)

    def every(self, job_id: str, seconds: float, func: Callable[[], object]) -> None:
        self._sched.add_job(
            _guarded(job_id, func),
            "interval",
            seconds=seconds,
            id=job_id,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    def once(self, job_id: str, delay: float, func: Callable[[], object]) -> None:
        """Run ``func`` once, ``delay`` seconds from now (e.g. a sweep exactly when an X-ray's
        grace period ends, rather than at the next periodic tick)."""
        self._sched.add_job(
            _guarded(job_id, func),
            "date",
            run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=delay),
            misfire_grace_time=None,
        )

    def start(self) -> None:
        self._sched.start()

    def shutdown(self) -> None:
        if self._sched.running:
            self._sched.shutdown(wait=True)


def _guarded(job_id: str, func: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except Exception:
            log.exception("scheduled job %s failed; it runs again at its next time", job_id)

    return run
