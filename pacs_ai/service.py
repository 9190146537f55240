"""``pacs-ai serve`` / ``pacs-ai worker``: wires listener, assembly, pipeline, outbox and
scheduler together and runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from typing import TYPE_CHECKING

from pacs_ai import startup
from pacs_ai.assembly import Assembler
from pacs_ai.config import Settings
from pacs_ai.db.session import current_revision, head_revision, make_engine
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import StartupError
from pacs_ai.ingest.recovery import recover
from pacs_ai.ingest.server import DicomServer
from pacs_ai.ingest.spool import Spool
from pacs_ai.pipeline import Pipeline
from pacs_ai.scheduler import Scheduler
from pacs_ai.storage.objects import S3Store
from pacs_ai.storage.reports import ReportUploader
from pacs_ai.storage.retention import Retention
from pacs_ai.storage.uploader import Uploader

if TYPE_CHECKING:
    from pacs_ai.web import HttpServer

log = logging.getLogger(__name__)

ASSEMBLY_JOB = "assembly-sweep"
DELIVERY_JOB = "delivery"
STALE_JOB = "stale-jobs"
RETENTION_JOB = "retention"


class Service:
    """The gateway in one process: listener + assembly, and (unless ``pipeline.enabled`` is
    false, or ``listener=False`` for ``pacs-ai worker``) the pipeline worker and outbox."""

    def __init__(self, settings: Settings, listener: bool = True) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database)
        self.spool = Spool(settings.storage.path, settings.storage.min_free_mb)
        self.scheduler = Scheduler()
        self.outbox = Outbox(self.engine, settings)
        self.pipeline: Pipeline | None = None
        if settings.pipeline.enabled or not listener:
            self.pipeline = Pipeline(
                self.engine, settings, self.outbox, on_reported=self._deliver_now
            )
        self.assembler: Assembler | None = None
        self.server: DicomServer | None = None
        if listener:
            self.assembler = Assembler(
                self.engine,
                settings.assembly,
                on_ready=self.pipeline.wake if self.pipeline else None,
            )
            self.server = DicomServer(
                settings, self.engine, self.spool, on_association_end=self._association_ended
            )

        # storage.backend = "s3": the spool is the write-ahead buffer; uploads run here.
        self.uploader: Uploader | None = None
        self.report_uploader: ReportUploader | None = None
        if settings.storage.backend == "s3":
            store = S3Store(settings.storage)
            if listener:
                self.uploader = Uploader(self.engine, settings, store)
                self.spool.buffer_guard = self.uploader.check_buffer
            if self.pipeline is not None:  # report files are made here: put them there too
                self.report_uploader = ReportUploader(self.engine, settings, store)
        self.http = self._make_http() if settings.http.enabled else None

    # --- HTTP face: console, /metrics, /healthz, /readyz (issue 9) ---------------------------

    def _make_http(self) -> HttpServer:
        from pacs_ai.web import HttpServer, WebContext, build_app

        server, pipeline = self.server, self.pipeline
        ctx = WebContext(
            settings=self.settings,
            engine=self.engine,
            listener_accepting=(lambda: server.accepting) if server else None,
            models_loaded=(lambda: pipeline.scorer.ready) if pipeline else None,
            wake_outbox=self._deliver_now,
            wake_pipeline=pipeline.wake if pipeline else None,
        )
        return HttpServer(self.settings.http, build_app(ctx))

    def _association_ended(self, _assoc_id: int) -> None:
        # Slightly after the grace period ends, so the sweep finds the series due.
        assert self.assembler is not None
        delay = self.settings.assembly.xray_grace_seconds + 0.02
        self.scheduler.once(ASSEMBLY_JOB, delay, self.assembler.sweep)

    def _deliver_now(self) -> None:
        if self.settings.destinations:
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
            models = self.pipeline.scorer.wait_ready() if self.pipeline is not None else []
        except StartupError:
            if self.server is not None:
                self.server.close()
            if self.http is not None:
                self.http.stop()
            raise
        if self.server is not None:
            recover(self.spool, self.engine)
        if self.uploader is not None:
            self.uploader.refresh()  # the buffer guard counts from the first association
            self.uploader.start()
        if self.report_uploader is not None:
            self.report_uploader.start()
        if self.assembler is not None:
            self.scheduler.every(
                ASSEMBLY_JOB, self.settings.assembly.sweep_interval_seconds, self.assembler.sweep
            )
        if self.pipeline is not None:
            # SQLite has one worker, so anything left "processing" was ours; with PostgreSQL
            # only jobs older than the lease (their worker is presumed dead). Either way the
            # interrupted job counts as an attempt (a crash loop ends "failed").
            single = self.engine.dialect.name == "sqlite"
            lease = dt.timedelta(seconds=0 if single else self.settings.pipeline.lease_seconds)
            ledger = self.pipeline.ledger
            ledger.recover_stale(lease)
            if not single:
                self.scheduler.every(
                    STALE_JOB,
                    self.settings.pipeline.lease_seconds / 4,
                    lambda: ledger.recover_stale(
                        dt.timedelta(seconds=self.settings.pipeline.lease_seconds)
                    ),
                )
            self.pipeline.start()
        if self.settings.destinations:
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
            self.settings, models, self.engine, self.server is not None, revision
        ):
            log.info("%s", line)
        if self.http is not None:
            self._announce_console()
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
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.report_uploader is not None:
            self.report_uploader.stop()
        self.scheduler.shutdown()
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
