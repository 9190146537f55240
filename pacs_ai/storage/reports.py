"""Report files with ``storage.backend = "s3"``: written where the pipeline ran, put in the
bucket under ``s3_prefix + "reports/" + <path>``, read by a delivery or the console on any
host (local file first, else the bucket through a bounded cache).

The report rows are the queue (``reports.uploaded_at`` null): every process that runs a
pipeline runs a :class:`ReportUploader`, which puts the files it has (a row whose file is on
another host is left to that host). Retention deletes a report's object with its file, and
only once it is uploaded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, select, update

from pacs_ai.config import Settings
from pacs_ai.db.models import Report, utcnow
from pacs_ai.storage.cache import ObjectCache
from pacs_ai.storage.objects import ObjectStoreError, ObjectStoreUnavailable, S3Store

log = logging.getLogger(__name__)

REPORTS = "reports/"


def report_key(relpath: str) -> str:
    return REPORTS + relpath


class ReportUploader:
    """Puts this host's report files in the bucket; :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        store: S3Store,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._cfg = settings.storage
        self._root = settings.reports.path.resolve()
        self._store = store
        self._clock = clock
        self.uploaded = 0
        self._elsewhere: set[int] = set()  # rows whose file is not on this host
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Upload the files of up to ``upload_batch`` rows; returns how many were marked."""
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(Report.id, Report.path)
                .where(Report.uploaded_at.is_(None), Report.purged_at.is_(None))
                .order_by(Report.id)
                .limit(self._cfg.upload_batch + len(self._elsewhere))
            ).all()
        # Forget rows no longer waiting (uploaded by their host, purged): the set stays small.
        self._elsewhere &= {rid for rid, _rel in rows}
        done: list[int] = []
        for rid, rel in rows:
            if rid in self._elsewhere:
                continue
            path = (self._root / rel).resolve()
            if not path.is_relative_to(self._root) or not path.is_file():
                self._elsewhere.add(rid)
                continue
            try:
                self._store.put_named(report_key(rel), path)
            except ObjectStoreUnavailable:
                raise
            except (ObjectStoreError, ValueError, OSError) as exc:
                self._elsewhere.add(rid)
                log.error("upload of report %d failed: %s", rid, exc.__class__.__name__)
                continue
            done.append(rid)
            if len(done) >= self._cfg.upload_batch:
                break
        if done:
            with self._engine.begin() as conn:
                conn.execute(
                    update(Report)
                    .where(Report.id.in_(done), Report.uploaded_at.is_(None))
                    .values(uploaded_at=self._clock())
                )
            self.uploaded += len(done)
        return len(done)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="s3-reports", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            delay = self._cfg.upload_poll_seconds
            started = time.monotonic()
            try:
                self.run_once()
                backoff = 0.0
            except ObjectStoreUnavailable as exc:
                backoff = min(self._cfg.upload_max_backoff_seconds, max(2 * backoff, 0.5))
                delay = backoff
                log.warning("object store unavailable for reports (%s)", exc.__class__.__name__)
            except Exception as exc:  # the database, most likely: keep the thread alive
                log.error("report upload round failed: %s", exc.__class__.__name__)
            self._stop.wait(max(0.0, delay - (time.monotonic() - started)))


def report_reader(settings: Settings) -> Callable[[str], Path]:
    """``read(relpath) -> Path``: the report file on this host, else (``s3``) the object
    downloaded into the bounded cache. Never raises for a missing object: the local path is
    returned and the caller's handling of a missing file applies (a delivery retries)."""
    root = settings.reports.path.resolve()
    storage = settings.storage
    opened: list[tuple[S3Store, ObjectCache]] = []  # on first use (reads the credentials)
    lock = threading.Lock()

    def read(relpath: str) -> Path:
        local = (root / relpath).resolve()
        if not local.is_relative_to(root):
            raise ValueError("path escapes reports.path")
        if storage.backend != "s3" or local.is_file():
            return local
        with lock:
            if not opened:
                store = S3Store(storage)
                limit = storage.s3_cache_mb * 1024 * 1024
                opened.append((store, ObjectCache(storage.s3_cache_path / "reports", limit, store)))
        store, cache = opened[0]
        name = report_key(relpath)
        try:
            return cache.get(
                hashlib.sha256(name.encode()).hexdigest(),
                fetch=lambda dest: store.fetch_named(name, dest),
            )
        except (ObjectStoreError, ValueError) as exc:
            log.warning("report file not here and not in the bucket: %s", exc.__class__.__name__)
            return local

    return read
