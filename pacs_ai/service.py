"""``pacs-ai serve``: wires the listener, assembly and scheduler together and runs them until
SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from pacs_ai.assembly import Assembler
from pacs_ai.config import Settings
from pacs_ai.db.session import current_revision, head_revision, make_engine, make_session_factory
from pacs_ai.errors import ConfigError
from pacs_ai.ingest.recovery import recover
from pacs_ai.ingest.server import DicomServer
from pacs_ai.ingest.spool import Spool
from pacs_ai.scheduler import Scheduler

log = logging.getLogger(__name__)

ASSEMBLY_JOB = "assembly-sweep"


class Service:
    def __init__(
        self, settings: Settings, on_ready: Callable[[list[int]], None] | None = None
    ) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database)
        self.sessions = make_session_factory(self.engine)
        self.spool = Spool(settings.storage.path, settings.storage.min_free_mb)
        self.scheduler = Scheduler()
        self.assembler = Assembler(self.engine, settings.assembly, on_ready=on_ready)
        self.server = DicomServer(
            settings, self.engine, self.spool, on_association_end=self._association_ended
        )
        self._stopped = threading.Event()

    def _association_ended(self, _assoc_id: int) -> None:
        # Slightly after the grace period ends, so the sweep finds the series due.
        delay = self.settings.assembly.xray_grace_seconds + 0.02
        self.scheduler.once(ASSEMBLY_JOB, delay, self.assembler.sweep)

    def check_schema(self) -> None:
        cur, head = current_revision(self.engine), head_revision()
        if cur != head:
            raise ConfigError(
                f"database schema is at {cur or 'nothing'}, this version needs {head}: "
                "run `pacs-ai db upgrade` first"
            )

    def start(self) -> None:
        self.check_schema()
        recover(self.spool, self.engine)
        self.scheduler.every(
            ASSEMBLY_JOB, self.settings.assembly.sweep_interval_seconds, self.assembler.sweep
        )
        self.scheduler.start()
        self.server.start()

    def stop(self) -> None:
        log.info("shutting down")
        self.server.stop()
        self.scheduler.shutdown()
        self.engine.dispose()
        self._stopped.set()

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
