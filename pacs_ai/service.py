"""``pacs-ai serve`` / ``pacs-ai worker``: wires listener, assembly, pipeline, outbox and
scheduler together and runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
from typing import TYPE_CHECKING

from pacs_ai.assembly import Assembler
from pacs_ai.config import Settings
from pacs_ai.db.session import current_revision, head_revision, make_engine
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import ConfigError
from pacs_ai.ingest.recovery import recover
from pacs_ai.ingest.server import DicomServer
from pacs_ai.ingest.spool import Spool
from pacs_ai.pipeline import ModelProvider, Pipeline
from pacs_ai.scheduler import Scheduler

if TYPE_CHECKING:
    from pacs_ai.web import HttpServer

log = logging.getLogger(__name__)

ASSEMBLY_JOB = "assembly-sweep"
DELIVERY_JOB = "delivery"
STALE_JOB = "stale-jobs"


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
        self.models: ModelProvider | None = None
        if settings.pipeline.enabled or not listener:
            self.models = ModelProvider(settings)
            self.pipeline = Pipeline(
                self.engine,
                settings,
                self.outbox,
                self.models,
                on_reported=self._deliver_now,
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

        self.http = self._make_http() if settings.http.enabled else None

    # --- HTTP face: console, /metrics, /healthz, /readyz (issue 9) ---------------------------

    def _make_http(self) -> HttpServer:
        from pacs_ai.web import HttpServer, WebContext, build_app

        server, models, pipeline = self.server, self.models, self.pipeline
        ctx = WebContext(
            settings=self.settings,
            engine=self.engine,
            listener_accepting=(lambda: server.accepting) if server else None,
            models_loaded=models.loaded if models else None,
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

    def check_schema(self) -> None:
        cur, head = current_revision(self.engine), head_revision()
        if cur != head:
            raise ConfigError(
                f"database schema is at {cur or 'nothing'}, this version needs {head}: "
                "run `pacs-ai db upgrade` first"
            )

    def start(self) -> None:
        self.check_schema()
        if self.http is not None:  # first: a port in use fails the start before anything runs
            self.http.start()
            self._announce_console()
        if self.server is not None:
            recover(self.spool, self.engine)
        if self.assembler is not None:
            self.scheduler.every(
                ASSEMBLY_JOB, self.settings.assembly.sweep_interval_seconds, self.assembler.sweep
            )
        if self.pipeline is not None:
            # SQLite has one worker, so anything left "processing" was ours; with PostgreSQL
            # only jobs older than the lease (their worker is presumed dead).
            single = self.engine.dialect.name == "sqlite"
            lease = dt.timedelta(seconds=0 if single else self.settings.pipeline.lease_seconds)
            self.pipeline.recover_stale(lease)
            if not single:
                pipeline = self.pipeline
                self.scheduler.every(
                    STALE_JOB,
                    self.settings.pipeline.lease_seconds / 4,
                    lambda: pipeline.recover_stale(
                        dt.timedelta(seconds=self.settings.pipeline.lease_seconds)
                    ),
                )
            self.pipeline.start()
        if self.settings.destinations:
            self.scheduler.every(
                DELIVERY_JOB, self.settings.delivery.poll_seconds, self.outbox.run_due
            )
        self.scheduler.start()
        if self.server is not None:
            self.server.start()

    def _announce_console(self) -> None:
        from pacs_ai.web.users import count_users

        assert self.http is not None
        print(f"pacs-ai console: {self.http.url}", flush=True)
        if count_users(self.engine) == 0:
            log.warning("no console users yet: `pacs-ai user add NAME --role admin`")

    def stop(self) -> None:
        log.info("shutting down")
        if self.http is not None:
            self.http.stop()
        if self.server is not None:
            self.server.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
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
