"""PostgreSQL: procrastinate drives the scoring; the job ledger records and fences attempts.

- A study that becomes ``ready`` (assembly, a re-run) is deferred as the task
  ``pacs_ai.score_study(study_id, revision)`` with ``queueing_lock = "study:<id>:<revision>"``:
  procrastinate keeps at most one queued job per lock, so deferring twice (the assembler and
  the periodic re-defer, two gateways) yields one job. A defer that fails (the database away)
  is caught up by the re-defer in :meth:`QueueWorker.sweep`.
- A worker process runs one procrastinate worker (:class:`QueueWorker`) with ``concurrency``
  = its pipeline slots; each task takes a free slot and calls
  :meth:`pacs_ai.pipeline.Pipeline.run_study`, which claims that study through the ledger
  (records the attempt; the ledger stays the commit fence).
- Retries and dead-letter: :class:`LadderRetry`, procrastinate's retry strategy with the
  delays of ``pipeline.retry_seconds`` (the ledger counts attempts, interrupted ones too); the
  last failure ends the procrastinate job ``failed`` (the dead-letter: ``SELECT * FROM
  procrastinate_jobs WHERE status = 'failed'``) and the study ``failed`` as on SQLite.
- Stalled: procrastinate's worker heartbeat (``pipeline.heartbeat_seconds``); every worker's
  sweep fails the ledger's stale attempts, then retries the jobs of workers silent for
  ``pipeline.stalled_seconds`` (``JobManager.get_stalled_jobs`` + ``retry_job``).

SQLite has none of this: the ledger alone, polled by the pipeline threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from procrastinate import (
    App,
    BaseRetryStrategy,
    PsycopgConnector,
    RetryDecision,
    SyncPsycopgConnector,
)
from procrastinate import exceptions as pq_exc
from procrastinate import jobs as pq_jobs
from sqlalchemy import Engine, Text, and_, cast, column, exists, func, select, table

from pacs_ai.db.models import Study, StudyState, utcnow
from pacs_ai.errors import safe_reason
from pacs_ai.jobs import DeadLettered, RetryLater

if TYPE_CHECKING:
    from pacs_ai.config import Settings
    from pacs_ai.pipeline import Pipeline

log = logging.getLogger(__name__)

TASK = "pacs_ai.score_study"
QUEUE = "scoring"
# Retries of one procrastinate job for reasons other than failed attempts (not due yet,
# another attempt running, an error before the claim): a bound, far above any real need.
MAX_JOB_RUNS = 200
REDEFER_BATCH = 500


def queueing_lock(study_id: int, revision: int) -> str:
    return f"study:{study_id}:{revision}"


def conninfo(engine: Engine) -> str:
    """The SQLAlchemy URL as a libpq URL for psycopg (``postgresql+psycopg://`` → ``postgresql://``)."""
    return engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


class LadderRetry(BaseRetryStrategy):
    """procrastinate's retry strategy for ``score_study``: the delay after failed attempt n
    is ``pipeline.retry_seconds[n-1]`` (the ledger decides n, so interrupted attempts count);
    after the last the job fails (dead-letter). Errors before a claim (the database away)
    back off exponentially on the same ladder by the job's own run count."""

    def __init__(self, ladder: Sequence[float]) -> None:
        self._ladder = tuple(ladder) or (10.0,)

    def get_retry_decision(
        self, *, exception: BaseException, job: pq_jobs.Job
    ) -> RetryDecision | None:
        if isinstance(exception, DeadLettered) or job.attempts >= MAX_JOB_RUNS:
            return None
        if isinstance(exception, RetryLater):
            return RetryDecision(retry_at=exception.retry_at)
        step = min(job.attempts, len(self._ladder) - 1)
        return RetryDecision(
            retry_in={"seconds": self._ladder[step] * 2 ** max(0, job.attempts - step)}
        )


def _app(connector: Any, retry_seconds: Sequence[float] = (), run: Any = None) -> App:
    app = App(connector=connector)

    def score_study(study_id: int, revision: int) -> None:
        if run is None:
            raise RuntimeError("score_study runs in a worker process only")
        run(study_id, revision)

    app.task(name=TASK, queue=QUEUE, retry=LadderRetry(retry_seconds))(score_study)
    return app


def _defer_all(app: App, studies: Iterable[tuple[int, int]]) -> int:
    """Defer each (study id, revision); returns how many were new (the lock absorbs the rest)."""
    new = 0
    for study_id, revision in studies:
        try:
            app.configure_task(TASK, queueing_lock=queueing_lock(study_id, revision)).defer(
                study_id=study_id, revision=revision
            )
            new += 1
        except pq_exc.AlreadyEnqueued:
            pass
    return new


def _ready_revisions(engine: Engine, ids: Iterable[int]) -> list[tuple[int, int]]:
    ids = list(ids)
    if not ids:
        return []
    with engine.connect() as conn:
        rows = conn.execute(
            select(Study.id, Study.revision).where(
                Study.id.in_(ids), Study.state == StudyState.READY
            )
        ).all()
    return [(r.id, r.revision) for r in rows]


def unqueued_ready(engine: Engine, limit: int = REDEFER_BATCH) -> list[tuple[int, int]]:
    """Ready study revisions with no queued or running procrastinate job (made ready while
    no queue was reachable, or a defer lost to a crash)."""
    pj = table("procrastinate_jobs", column("queueing_lock"), column("status"), column("task_name"))
    key = func.concat("study:", Study.id, ":", Study.revision)
    queued = exists().where(
        and_(
            pj.c.task_name == TASK,
            pj.c.queueing_lock == key,
            cast(pj.c.status, Text).in_(("todo", "doing")),
        )
    )
    with engine.connect() as conn:
        rows = conn.execute(
            select(Study.id, Study.revision)
            .where(Study.state == StudyState.READY, ~queued)
            .order_by(Study.ready_at, Study.id)
            .limit(limit)
        ).all()
    return [(r.id, r.revision) for r in rows]


class Deferrer:
    """Defers ``score_study`` from any process (gateway, console, CLI): a small synchronous
    connection pool, opened on first use."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._app = _app(SyncPsycopgConnector(conninfo=conninfo(engine), min_size=1, max_size=2))
        self._opened = False
        self._lock = threading.Lock()

    def defer_studies(self, study_ids: Iterable[int]) -> int:
        """Defer these studies' current revisions if ready; failures are logged (the
        workers' periodic re-defer catches up)."""
        try:
            with self._lock:
                if not self._opened:
                    self._app.open()
                    self._opened = True
                return _defer_all(self._app, _ready_revisions(self._engine, study_ids))
        except Exception as exc:
            log.warning(
                "queue: deferring ready studies failed (%s); re-deferred later", safe_reason(exc)
            )
            return 0

    def close(self) -> None:
        with self._lock:
            if self._opened:
                self._app.close()
                self._opened = False


def defer_once(engine: Engine, study_ids: Iterable[int]) -> int:
    """One-shot defer (a re-run from the console or the CLI): its own short connection."""
    deferrer = Deferrer(engine)
    try:
        return deferrer.defer_studies(study_ids)
    finally:
        deferrer.close()


class QueueWorker:
    """One procrastinate worker (asyncio, on its own thread) with ``concurrency`` = the
    pipelines (slots); a task runs in a thread and holds one slot while it scores."""

    def __init__(self, engine: Engine, settings: Settings, pipelines: Sequence[Pipeline]) -> None:
        self._engine = engine
        self._settings = settings
        self._pipelines = list(pipelines)
        self._free: queue.SimpleQueue[Pipeline] = queue.SimpleQueue()
        for p in self._pipelines:
            self._free.put(p)
        connector = PsycopgConnector(
            conninfo=conninfo(engine), min_size=1, max_size=len(self._pipelines) + 3
        )
        self.app = _app(connector, settings.pipeline.retry_seconds, self._run)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping = threading.Event()
        self.stalled_retried = 0

    def _run(self, study_id: int, revision: int) -> None:
        pipeline = self._free.get(timeout=60)  # concurrency == slots: one is free
        try:
            pipeline.run_study(study_id, revision)
        finally:
            self._free.put(pipeline)

    def start(self) -> None:
        for p in self._pipelines:
            p.scorer.start()
        self._thread = threading.Thread(target=self._main, name="queue-worker", daemon=True)
        self._thread.start()
        self._started.wait(timeout=30)

    def _main(self) -> None:
        """Run the worker until :meth:`stop`; when it stops on an error (PostgreSQL away,
        its connection lost), start it again after a backoff (1 s doubling to 60 s)."""
        backoff = 1.0
        while not self._stopping.is_set():
            began = time.monotonic()
            try:
                asyncio.run(self._amain())
            except Exception as exc:
                log.error("queue worker stopped (%s)", safe_reason(exc))
            finally:
                self._started.set()
            if self._stopping.is_set():
                break
            if time.monotonic() - began > 60:
                backoff = 1.0
            log.warning("queue worker: restarting in %.0f s", backoff)
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 60.0)

    async def _amain(self) -> None:
        pipeline = self._settings.pipeline
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            async with self.app.open_async():
                self._started.set()
                await self.app.run_worker_async(
                    queues=[QUEUE],
                    name=self._pipelines[0].worker_id,
                    concurrency=len(self._pipelines),
                    wait=True,
                    install_signal_handlers=False,
                    listen_notify=True,
                    fetch_job_polling_interval=pipeline.poll_seconds,
                    update_heartbeat_interval=pipeline.heartbeat_seconds,
                    stalled_worker_timeout=pipeline.stalled_seconds,
                    shutdown_graceful_timeout=60.0,
                    delete_jobs="successful",
                )
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise RuntimeError("queue worker cancelled") from None
        finally:
            self._loop = None

    def sweep(self) -> None:
        """Periodic (every ``pipeline.heartbeat_seconds``, each worker): fail the ledger's
        stale attempts, retry procrastinate jobs of dead workers, re-defer ready studies that
        have no job."""
        self._pipelines[0].ledger.recover_stale(
            dt.timedelta(seconds=self._settings.pipeline.stalled_seconds)
        )
        loop = self._loop
        if loop is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(self._sweep_async(), loop)
        fut.result(timeout=max(30.0, self._settings.pipeline.heartbeat_seconds * 4))

    async def _sweep_async(self) -> None:
        manager = self.app.job_manager
        stalled = await manager.get_stalled_jobs(
            queue=QUEUE,
            task_name=TASK,
            seconds_since_heartbeat=self._settings.pipeline.stalled_seconds,
        )
        for job in stalled:
            try:
                await manager.retry_job(job, retry_at=utcnow())
                self.stalled_retried += 1
                log.warning("queue: job %s of a stalled worker retried", job.id)
            except pq_exc.ConnectorException as exc:
                # e.g. a queued job for the same study revision already exists: this one ends
                log.warning("queue: stalled job %s not retried (%s)", job.id, safe_reason(exc))
                await manager.finish_job(job, status=pq_jobs.Status.FAILED, delete_job=False)
        for study_id, revision in unqueued_ready(self._engine):
            with contextlib.suppress(pq_exc.AlreadyEnqueued):
                await self.app.configure_task(
                    TASK, queueing_lock=queueing_lock(study_id, revision)
                ).defer_async(study_id=study_id, revision=revision)

    def stop(self, timeout: float = 90.0) -> None:
        self._stopping.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None and loop.is_running():
            loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        for p in self._pipelines:
            p.scorer.stop()
