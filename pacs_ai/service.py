"""``pacs-ai serve`` / ``pacs-ai worker``: wires listener, assembly, pipeline, outbox and
scheduler together and runs them until SIGTERM/SIGINT.

Roles (``serve --role``, ``service.role``) split the work over processes and machines that
share one PostgreSQL database, the only source of truth:

- ``gateway``: DICOM listener, assembly timers, retention, the console and, with
  ``storage.backend = "s3"``, the uploader of received instances;
- ``worker``: claims and scores studies, one slot per visible GPU (``CUDA_VISIBLE_DEVICES``)
  or ``pipeline.workers`` on CPU; a slot claims only when it is idle, so a worker never takes
  more than it can run; it also sweeps stalled attempts of dead workers;
  with ``s3`` it also puts its report files in the bucket;
- ``sender``: the delivery outbox only;
- ``all`` (default): everything, today's single-process behaviour.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pacs_ai import startup
from pacs_ai.assembly import Assembler
from pacs_ai.config import Role, Settings
from pacs_ai.db.session import current_revision, head_revision, make_engine
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import StartupError
from pacs_ai.ingest.recovery import recover
from pacs_ai.ingest.server import DicomServer
from pacs_ai.ingest.spool import Spool
from pacs_ai.pipeline import Pipeline
from pacs_ai.scheduler import Scheduler
from pacs_ai.scoring_worker import ScoringWorker
from pacs_ai.storage.objects import S3Store
from pacs_ai.storage.reports import ReportUploader
from pacs_ai.storage.retention import Retention
from pacs_ai.storage.uploader import Uploader

if TYPE_CHECKING:
    from pacs_ai.taskqueue import Deferrer, QueueWorker
    from pacs_ai.web import HttpServer

log = logging.getLogger(__name__)

ASSEMBLY_JOB = "assembly-sweep"
DELIVERY_JOB = "delivery"
STALE_JOB = "stale-jobs"
RETENTION_JOB = "retention"
ROLES_APART = ("gateway", "worker", "sender")


@dataclass(frozen=True)
class Components:
    """What one process runs."""

    role: str
    listener: bool  # DICOM listener, assembly, retention (the gateway)
    pipeline: bool  # claim and score (the worker)
    sender: bool  # delivery outbox
    http: bool  # console, /metrics, /healthz, /readyz

    def describe(self) -> str:
        parts = [
            name
            for name, on in (
                ("DICOM listener + assembly + retention", self.listener),
                ("pipeline worker", self.pipeline),
                ("delivery outbox", self.sender),
                ("HTTP console", self.http),
            )
            if on
        ]
        return f"role {self.role}: runs " + (", ".join(parts) or "nothing")


def components(settings: Settings, role: Role | None = None, listener: bool = True) -> Components:
    """``role`` None: ``service.role``; ``listener=False`` is ``pacs-ai worker`` (pipeline and
    outbox, no listener)."""
    http = settings.http.enabled
    sender = bool(settings.destinations)
    if not listener:
        return Components("worker (pacs-ai worker)", False, True, sender, http)
    role = role or settings.service.role
    if role == "gateway":
        return Components(role, True, False, False, http)
    if role == "worker":
        return Components(role, False, True, False, False)
    if role == "sender":
        return Components(role, False, False, sender, False)
    return Components(role, True, settings.pipeline.enabled, sender, http)


def pipeline_slots(settings: Settings) -> list[dict[str, str]]:
    """One environment per pipeline slot: one per visible GPU when ``CUDA_VISIBLE_DEVICES``
    names some (and the device is not forced to CPU), else ``pipeline.workers`` on CPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    gpus = [d.strip() for d in visible.split(",") if d.strip()]
    if settings.inference.device != "cpu" and gpus and gpus != ["-1"]:
        return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus]
    return [{} for _ in range(settings.pipeline.workers)]


class Service:
    """The gateway in one process, or one role of it (see the module doc)."""

    def __init__(self, settings: Settings, listener: bool = True, role: Role | None = None) -> None:
        self.settings = settings
        self.parts = components(settings, role, listener)
        self.engine = make_engine(settings.database)
        self.spool = Spool(settings.storage.path, settings.storage.min_free_mb)
        self.scheduler = Scheduler()
        self.outbox = Outbox(self.engine, settings)
        self.pipelines: list[Pipeline] = []
        if self.parts.pipeline:
            slots = pipeline_slots(settings)
            for i, env in enumerate(slots):
                suffix = "" if len(slots) == 1 else f"/{i}"
                self.pipelines.append(
                    Pipeline(
                        self.engine,
                        settings,
                        self.outbox,
                        ScoringWorker(settings, env),
                        on_reported=self._deliver_now,
                        worker_id=None if not suffix else _worker_id(suffix),
                        name=f"pipeline{suffix}",
                    )
                )
        self.pipeline: Pipeline | None = self.pipelines[0] if self.pipelines else None
        # PostgreSQL: procrastinate drives the pipelines (pacs_ai.taskqueue), every role;
        # SQLite: the pipeline threads poll the ledger.
        self.queue_worker: QueueWorker | None = None
        self.deferrer: Deferrer | None = None
        if self.engine.dialect.name == "postgresql":
            from pacs_ai.taskqueue import Deferrer, QueueWorker

            if self.pipelines:
                self.queue_worker = QueueWorker(self.engine, settings, self.pipelines)
            if self.parts.listener:
                self.deferrer = Deferrer(self.engine)
        self.assembler: Assembler | None = None
        self.server: DicomServer | None = None
        if self.parts.listener:
            on_ready: Callable[[list[int]], None] | None = (
                self._wake_pipelines if self.pipelines else None
            )
            if self.deferrer is not None:
                on_ready = self._queue_ready
            self.assembler = Assembler(self.engine, settings.assembly, on_ready=on_ready)
            self.server = DicomServer(
                settings, self.engine, self.spool, on_association_end=self._association_ended
            )

        # storage.backend = "s3": the spool is the write-ahead buffer; uploads run here.
        self.uploader: Uploader | None = None
        self.report_uploader: ReportUploader | None = None
        if settings.storage.backend == "s3":
            store = S3Store(settings.storage)
            if self.parts.listener:
                self.uploader = Uploader(self.engine, settings, store)
                self.spool.buffer_guard = self.uploader.check_buffer
            if self.pipelines:  # report files are made here: put them there too
                self.report_uploader = ReportUploader(self.engine, settings, store)
        self.http = self._make_http() if self.parts.http else None

    def _queue_ready(self, study_ids: list[int]) -> None:
        assert self.deferrer is not None
        self.deferrer.defer_studies(study_ids)

    def _wake_pipelines(self, study_ids: object = None) -> None:
        for p in self.pipelines:
            p.wake(study_ids)

    def _models_loaded(self) -> bool:
        return all(p.scorer.ready for p in self.pipelines)

    # --- HTTP face: console, /metrics, /healthz, /readyz (issue 9) ---------------------------

    def _make_http(self) -> HttpServer:
        from pacs_ai.web import HttpServer, WebContext, build_app

        server = self.server
        ctx = WebContext(
            settings=self.settings,
            engine=self.engine,
            listener_accepting=(lambda: server.accepting) if server else None,
            models_loaded=self._models_loaded if self.pipelines else None,
            wake_outbox=self._deliver_now,
            wake_pipeline=self._wake_pipelines if self.pipelines else None,
        )
        return HttpServer(self.settings.http, build_app(ctx))

    def _association_ended(self, _assoc_id: int) -> None:
        # Slightly after the grace period ends, so the sweep finds the series due.
        assert self.assembler is not None
        delay = self.settings.assembly.xray_grace_seconds + 0.02
        self.scheduler.once(ASSEMBLY_JOB, delay, self.assembler.sweep)

    def _deliver_now(self) -> None:
        # Only where this process sends; elsewhere the sender's poll picks the rows up.
        if self.parts.sender:
            self.scheduler.once(DELIVERY_JOB, 0.0, self.outbox.run_due)

    def check_schema(self) -> str | None:
        cur = current_revision(self.engine)
        problem = startup.schema_problem(self.settings, cur, head_revision())
        if problem:
            raise StartupError(problem)
        return cur

    def start(self) -> None:
        """Check, then start. Raises :class:`StartupError` (schema out of date, port taken,
        a model that does not load) before anything runs; logs the summary when running."""
        revision = self.check_schema()
        try:
            if self.http is not None:  # a port in use fails the start before anything runs
                self.http.start()
            if self.server is not None:
                try:
                    self.server.bind()
                except OSError as exc:
                    raise StartupError(startup.listen_problem(self.settings.dicom, exc)) from exc
            # Every model the routing rules use, loaded now in the scoring worker: one that
            # cannot load refuses the start instead of failing every study later.
            models = []
            for p in self.pipelines:
                models = p.scorer.wait_ready()  # every slot loads the same models
        except StartupError:
            if self.server is not None:
                self.server.close()
            if self.http is not None:
                self.http.stop()
            raise
        if self.server is not None:
            recover(self.spool, self.engine, self.settings.service.node_name)
        if self.uploader is not None:
            self.uploader.refresh()  # the buffer guard counts from the first association
            self.uploader.start()
        if self.report_uploader is not None:
            self.report_uploader.start()
        if self.assembler is not None:
            self.scheduler.every(
                ASSEMBLY_JOB, self.settings.assembly.sweep_interval_seconds, self.assembler.sweep
            )
        if self.pipelines:
            # Attempts whose worker died (no heartbeat for pipeline.stalled_seconds) count as
            # failed attempts and are retried (a crash loop ends "failed"). With SQLite one
            # process runs the pipeline (`all` or `pacs-ai worker`), so at start anything
            # still running was ours; `--role worker` processes may be several, so they wait.
            stalled = self.settings.pipeline.stalled_seconds
            ledger = self.pipelines[0].ledger
            single = self.engine.dialect.name == "sqlite" and self.parts.role != "worker"
            ledger.recover_stale(dt.timedelta(seconds=0 if single else stalled))
            if self.queue_worker is not None:
                # PostgreSQL: the same sweep also retries procrastinate jobs of dead workers
                # and re-defers ready studies that have no job (pacs_ai.taskqueue).
                self.queue_worker.start()
                self.scheduler.every(
                    STALE_JOB, self.settings.pipeline.heartbeat_seconds, self.queue_worker.sweep
                )
            else:
                self.scheduler.every(
                    STALE_JOB,
                    self.settings.pipeline.heartbeat_seconds,
                    lambda: ledger.recover_stale(dt.timedelta(seconds=stalled)),
                )
                for p in self.pipelines:
                    p.start()
        if self.parts.sender:
            self.scheduler.every(
                DELIVERY_JOB, self.settings.delivery.poll_seconds, self.outbox.run_due
            )
        if self.server is not None and self.settings.retention.enabled:
            retention = Retention(self.engine, self.settings)
            self.scheduler.every(
                RETENTION_JOB, self.settings.retention.interval_seconds, retention.run
            )
        self.scheduler.start()
        if self.server is not None:
            self.server.start()
        for line in startup.summary_lines(
            self.settings,
            models,
            self.engine,
            self.server is not None,
            revision,
            role=f"{self.parts.describe()}; pipeline slots: {len(self.pipelines)}",
        ):
            log.info("%s", line)
        if self.http is not None:
            self._announce_console()
        if self.engine.dialect.name == "sqlite" and self.parts.role in ROLES_APART:
            log.warning("role %s on SQLite: every role must run on this machine", self.parts.role)
        startup.notify_systemd("READY=1")

    def _announce_console(self) -> None:
        from pacs_ai.web.users import count_users

        assert self.http is not None
        log.info("console: %s (also /metrics, /healthz, /readyz)", self.http.url)
        if count_users(self.engine) == 0:
            log.warning("no console users yet: `pacs-ai user add NAME --role admin`")

    def stop(self) -> None:
        log.info("shutting down")
        if self.http is not None:
            self.http.stop()
        if self.server is not None:
            self.server.stop()
        if self.uploader is not None:
            self.uploader.stop()
        if self.queue_worker is not None:
            self.queue_worker.stop()
        else:
            for p in self.pipelines:
                p.stop()
        if self.report_uploader is not None:
            self.report_uploader.stop()
        self.scheduler.shutdown()
        if self.deferrer is not None:
            self.deferrer.close()
        self.engine.dispose()

    def run_forever(self) -> None:
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d received", signum)
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        stop_requested.wait()
        self.stop()


def _worker_id(suffix: str) -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}{suffix}"[:64]
