"""The job ledger: claim a ready study, heartbeat, and finish, fail or recover its job.

An attempt is recorded (a ``jobs`` row, state ``running``, with its attempt number) in the
same transaction that claims the study, before any work starts, so an attempt that kills the
worker, or the whole service, still counts: :meth:`JobLedger.recover_stale` fails the
interrupted job like any other failure, and once ``pipeline.retry_seconds`` is used up the
study is ``failed`` (dead) instead of being claimed again forever.

Liveness: a running attempt refreshes ``jobs.heartbeat_at`` every
``pipeline.heartbeat_seconds`` (:meth:`JobLedger.heartbeat`); one whose heartbeat is older
than ``pipeline.stalled_seconds`` belongs to a worker that died and is taken back by the
periodic sweep of any worker.

Exactly-once results on at-least-once execution (fencing): :func:`finish_job` only moves a
job that is still ``running``, and reports whether it did. The result commit
(:func:`pacs_ai.results.record_results`) finishes the job first, in its own transaction, and
rolls everything back when that matched no row (:class:`StaleAttempt`): an attempt that was
declared dead and came back late commits nothing. Behind that, partial unique indexes allow
one running and one succeeded attempt per study revision, and report UIDs are deterministic
(one SR per study revision and model).

Claims: PostgreSQL ``FOR UPDATE SKIP LOCKED``, so several workers on one database never take
the same study; SQLite: an atomic conditional update.
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
from pacs_ai.errors import PacsAiError

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


@dataclass(frozen=True)
class Unclaimed:
    """Why :meth:`JobLedger.claim_study` took nothing: ``gone`` (another revision, finished
    or deleted: nothing to do), ``dead`` (dead-lettered), ``processing`` (a running attempt
    holds it), ``waiting`` (its retry is due at ``retry_at``)."""

    why: str
    retry_at: dt.datetime | None = None


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


class RetryLater(PacsAiError):
    """The attempt failed or could not start; try again at ``retry_at`` (the queue's retry
    strategy schedules it)."""

    def __init__(self, message: str, retry_at: dt.datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class DeadLettered(PacsAiError):
    """The study revision's last attempt failed (study ``failed``): no more retries."""


class StaleAttempt(PacsAiError):
    """The attempt is no longer the running one (declared dead, finished elsewhere): its
    result must not be committed."""


def finish_job(
    conn: Connection, job_id: int, state: JobState, now: dt.datetime, **values: Any
) -> bool:
    """The one place a job leaves ``running``; False (nothing changed) when it was not
    running any more: the caller's attempt is fenced out."""
    done = conn.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(state=state, finished_at=now, **values)
    )
    return done.rowcount == 1


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
        """Take the oldest ready study whose retry is due, and record its attempt (SQLite;
        on PostgreSQL procrastinate picks the study and calls :meth:`claim_study`)."""
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
            return self._take(conn, row.id, row.study_uid, row.revision, now)

    def claim_study(self, study_id: int, revision: int) -> Claim | Unclaimed:
        """Claim this study revision (a procrastinate task names it), recording its attempt;
        or say why not: moved on (another revision, finished, deleted), dead-lettered, being
        processed by a live attempt, or its retry not due yet."""
        now = self._clock()
        with self._engine.begin() as conn:
            q = select(Study.id, Study.study_uid, Study.revision, Study.state).where(
                Study.id == study_id
            )
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(of=Study)
            row = conn.execute(q).first()
            if row is None or row.revision != revision:
                return Unclaimed("gone")
            if row.state == StudyState.FAILED:
                return Unclaimed("dead")
            if row.state == StudyState.PROCESSING:
                return Unclaimed("processing")
            if row.state != StudyState.READY:
                return Unclaimed("gone")
            due = conn.scalar(
                select(func.max(Job.next_attempt_at)).where(
                    Job.study_id == study_id,
                    Job.study_revision == revision,
                    Job.state == JobState.FAILED,
                )
            )
            if due is not None and _aware(due) > now:
                return Unclaimed("waiting", _aware(due))
            claim = self._take(conn, row.id, row.study_uid, row.revision, now)
        return claim if claim is not None else Unclaimed("processing")

    def _take(
        self, conn: Connection, study_id: int, study_uid: str, revision: int, now: dt.datetime
    ) -> Claim | None:
        taken = conn.execute(
            update(Study)
            .where(
                Study.id == study_id,
                Study.state == StudyState.READY,
                Study.revision == revision,
            )
            .values(state=StudyState.PROCESSING, state_changed_at=now)
            .returning(Study.id)
        ).first()
        if taken is None:
            return None  # another worker or a late instance got there first
        attempt = 1 + int(
            conn.scalar(
                select(func.count()).where(Job.study_id == study_id, Job.study_revision == revision)
            )
            or 0
        )
        job_id = conn.execute(
            insert(Job)
            .values(
                study_id=study_id,
                study_revision=revision,
                attempt=attempt,
                state=JobState.RUNNING,
                claimed_by=self._worker_id,
                started_at=now,
                heartbeat_at=now,
            )
            .returning(Job.id)
        ).scalar_one()
        return Claim(study_id, study_uid, revision, job_id, attempt, now)

    def retry_delay(self, attempt: int) -> float | None:
        """Seconds before the next attempt after failed attempt ``attempt`` (1-based); None
        when it was the last (``pipeline.retry_seconds`` has one delay per retry)."""
        return None if attempt > len(self._retries) else self._retries[attempt - 1]

    def fail(self, claim: Claim, reason: str) -> bool:
        """Record a failed attempt; True when it was the last (job dead, study failed).
        An attempt already fenced out (taken back as stalled) changes nothing."""
        now = self._clock()
        with self._engine.begin() as conn:
            return bool(self._fail_attempt(conn, claim, reason, now))

    def heartbeat(self, claim: Claim) -> bool:
        """Refresh the attempt's heartbeat; False when it is not running any more (it was
        declared dead: its result will be refused)."""
        with self._engine.begin() as conn:
            done = conn.execute(
                update(Job)
                .where(Job.id == claim.job_id, Job.state == JobState.RUNNING)
                .values(heartbeat_at=self._clock())
            )
        return done.rowcount == 1

    def recover_stale(self, older_than: dt.timedelta) -> int:
        """Jobs left ``running`` by a worker that died count as failed attempts: the study is
        retried after its delay, or ``failed`` when the retries are used up.

        An attempt is stale when its heartbeat (or its start, before the first heartbeat) is
        older than ``older_than``: ``pipeline.stalled_seconds`` for the periodic sweep; with
        SQLite and one process the service also calls this at start with no age limit.
        """
        now = self._clock()
        with self._engine.begin() as conn:
            seen = func.coalesce(Job.heartbeat_at, Job.started_at)
            stale = conn.execute(
                select(Job.id, Job.study_id, Job.study_revision, Job.attempt, Job.started_at)
                .join(Study, Study.id == Job.study_id)
                .where(Job.state == JobState.RUNNING, seen <= now - older_than)
                .add_columns(Study.study_uid)
            ).all()
            taken = 0
            for job_id, study_id, revision, attempt, started, study_uid in stale:
                claim = Claim(study_id, study_uid, revision, job_id, attempt, started)
                reason = "interrupted: the worker stopped during the job"
                if self._fail_attempt(conn, claim, reason, now) is not None:
                    taken += 1
        return taken

    def _fail_attempt(
        self, conn: Connection, claim: Claim, reason: str, now: dt.datetime
    ) -> bool | None:
        """True: dead-lettered; False: will retry; None: not running any more (fenced)."""
        dead = claim.attempt > len(self._retries)
        retry_at = None if dead else now + dt.timedelta(seconds=self._retries[claim.attempt - 1])
        if not finish_job(
            conn,
            claim.job_id,
            JobState.DEAD if dead else JobState.FAILED,
            now,
            duration_ms=(now - claim.started).total_seconds() * 1000,
            error=reason,
            next_attempt_at=retry_at,
        ):
            log.warning(
                "study %d: attempt %d is no longer running (stale attempt); nothing recorded",
                claim.study_id,
                claim.attempt,
            )
            return None
        log.error(
            "study %d: attempt %d failed (%s)%s",
            claim.study_id,
            claim.attempt,
            reason.partition(":")[0],
            "; dead-lettered" if dead else "; will retry",
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
