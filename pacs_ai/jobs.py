"""The job ledger: claim a ready study, and finish, fail or recover its job.

An attempt is recorded (a ``jobs`` row, state ``running``) in the same transaction that
claims the study, before any work starts, so an attempt that kills the worker, or the whole
service, still counts: after a restart :meth:`JobLedger.recover_stale` fails the interrupted
job like any other failure, and once ``pipeline.retry_seconds`` is used up the study is
``failed`` (dead) instead of being claimed again forever.

Claims: PostgreSQL ``FOR UPDATE SKIP LOCKED``, so several workers on one database never take
the same study; SQLite: an atomic conditional update (one worker).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, and_, exists, func, insert, select, update

from pacs_ai.db.events import write_audit
from pacs_ai.db.models import Job, JobState, Study, StudyState, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """One claimed study revision and the job (attempt) recorded for it."""

    study_id: int
    study_uid: str
    revision: int
    job_id: int
    attempt: int
    started: dt.datetime


def finish_job(
    conn: Connection, job_id: int, state: JobState, now: dt.datetime, **values: Any
) -> None:
    """The one place a job leaves ``running``."""
    conn.execute(update(Job).where(Job.id == job_id).values(state=state, finished_at=now, **values))


class JobLedger:
    def __init__(
        self,
        engine: Engine,
        retry_seconds: Sequence[float],
        worker_id: str,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._retries = tuple(retry_seconds)
        self._worker_id = worker_id
        self._clock = clock

    def claim(self) -> Claim | None:
        """Take the oldest ready study whose retry is due, and record its attempt."""
        now = self._clock()
        with self._engine.begin() as conn:
            waiting = exists().where(
                and_(
                    Job.study_id == Study.id,
                    Job.study_revision == Study.revision,
                    Job.state == JobState.FAILED,
                    Job.next_attempt_at > now,
                )
            )
            q = (
                select(Study.id, Study.study_uid, Study.revision)
                .where(Study.state == StudyState.READY, ~waiting)
                .order_by(Study.ready_at, Study.id)
                .limit(1)
            )
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True, of=Study)
            row = conn.execute(q).first()
            if row is None:
                return None
            taken = conn.execute(
                update(Study)
                .where(
                    Study.id == row.id,
                    Study.state == StudyState.READY,
                    Study.revision == row.revision,
                )
                .values(state=StudyState.PROCESSING, state_changed_at=now)
                .returning(Study.id)
            ).first()
            if taken is None:
                return None  # another worker or a late instance got there first
            attempt = 1 + int(
                conn.scalar(
                    select(func.count()).where(
                        Job.study_id == row.id, Job.study_revision == row.revision
                    )
                )
                or 0
            )
            job_id = conn.execute(
                insert(Job)
                .values(
                    study_id=row.id,
                    study_revision=row.revision,
                    attempt=attempt,
                    state=JobState.RUNNING,
                    claimed_by=self._worker_id,
                    started_at=now,
                )
                .returning(Job.id)
            ).scalar_one()
        return Claim(row.id, row.study_uid, row.revision, job_id, attempt, now)

    def fail(self, claim: Claim, reason: str) -> bool:
        """Record a failed attempt; True when it was the last (job dead, study failed)."""
        now = self._clock()
        with self._engine.begin() as conn:
            return self._fail(conn, claim, reason, now)

    def recover_stale(self, older_than: dt.timedelta) -> int:
        """Jobs left ``running`` by a worker that died count as failed attempts: the study is
        retried after its delay, or ``failed`` when the retries are used up.

        With SQLite (one worker) the service calls this at start with no age limit; with
        PostgreSQL only jobs running longer than ``pipeline.lease_seconds`` are taken back.
        """
        now = self._clock()
        with self._engine.begin() as conn:
            stale = conn.execute(
                select(Job.id, Job.study_id, Job.study_revision, Job.attempt, Job.started_at)
                .join(Study, Study.id == Job.study_id)
                .where(Job.state == JobState.RUNNING, Job.started_at <= now - older_than)
                .add_columns(Study.study_uid)
            ).all()
            for job_id, study_id, revision, attempt, started, study_uid in stale:
                claim = Claim(study_id, study_uid, revision, job_id, attempt, started)
                self._fail(conn, claim, "interrupted: the worker stopped during the job", now)
        return len(stale)

    def _fail(self, conn: Connection, claim: Claim, reason: str, now: dt.datetime) -> bool:
        dead = claim.attempt > len(self._retries)
        retry_at = None if dead else now + dt.timedelta(seconds=self._retries[claim.attempt - 1])
        log.error(
            "study %d: attempt %d failed (%s)%s",
            claim.study_id,
            claim.attempt,
            reason.partition(":")[0],
            "; dead-lettered" if dead else "; will retry",
        )
        finish_job(
            conn,
            claim.job_id,
            JobState.DEAD if dead else JobState.FAILED,
            now,
            duration_ms=(now - claim.started).total_seconds() * 1000,
            error=reason,
            next_attempt_at=retry_at,
        )
        conn.execute(
            update(Study)
            .where(
                Study.id == claim.study_id,
                Study.revision == claim.revision,
                Study.state == StudyState.PROCESSING,
            )
            .values(
                state=StudyState.FAILED if dead else StudyState.READY,
                state_reason=reason[:200],
                state_changed_at=now,
            )
        )
        write_audit(
            conn,
            "system",
            "job_dead" if dead else "job_failed",
            "error",
            "study",
            claim.study_id,
            {"attempt": claim.attempt, "error": reason[:500]},
        )
        return dead
