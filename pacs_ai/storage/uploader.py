"""The uploader: from the local write-ahead buffer (the spool) to the object store.

The instance rows are the queue: a row with ``uploaded_at`` null (and not purged) is waiting.
One background thread in the gateway takes the oldest ``upload_batch`` of them, puts each
file under its sha256 key with a conditional write (``If-None-Match: *``; an object already
there counts only when its dataset hashes to the key), and marks every row of that key
uploaded. Nothing is held in memory that a restart would lose: after a crash between a put
and its mark the next put answers 412, the content is checked, and the row is marked.

While the store is unreachable the thread backs off (doubling up to
``upload_max_backoff_seconds``) and ingest goes on into the local buffer; the backlog (count,
bytes, age of the oldest) is refreshed every round for the buffer guard, which answers
C-STORE with 0xA700 once the bytes waiting exceed ``local_buffer_high_watermark_mb``.

Several gateways may share one database, each with its own spool: each uploader takes, and
its guard counts, only the rows of its own ``service.node_name`` (``instances.gateway``), plus
rows recorded before that name was (null), which every gateway treats as its own. ``/metrics``
and the console's lag alert count the rows of all gateways.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import ColumnElement, Connection, Engine, func, or_, select, update

from pacs_ai.config import Settings
from pacs_ai.db.models import Instance, utcnow
from pacs_ai.errors import OutOfResources
from pacs_ai.storage.objects import (
    ObjectConflict,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    key_ref,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backlog:
    """Instances received but not yet in the object store."""

    count: int = 0
    bytes: int = 0
    oldest: dt.datetime | None = None

    def lag_seconds(self, now: dt.datetime) -> float:
        return 0.0 if self.oldest is None else max(0.0, (now - self.oldest).total_seconds())


def _waiting(gateway: str | None = None) -> list[ColumnElement[bool]]:
    """Rows waiting for upload: of ``gateway`` (and legacy rows without one), or of all
    gateways when None."""
    where: list[ColumnElement[bool]] = [
        Instance.uploaded_at.is_(None),
        Instance.purged_at.is_(None),
    ]
    if gateway is not None:
        where.append(or_(Instance.gateway == gateway, Instance.gateway.is_(None)))
    return where


def _backlog(conn: Connection, gateway: str | None = None) -> Backlog:
    row = conn.execute(
        select(
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.size_bytes), 0),
            func.min(Instance.received_at),
        ).where(*_waiting(gateway))
    ).one()
    oldest = row[2]
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return Backlog(int(row[0]), int(row[1]), oldest)


def upload_backlog(engine: Engine, gateway: str | None = None) -> Backlog:
    """Count, bytes and receive time of the oldest instance waiting for upload: in the spool
    of ``gateway`` (``service.node_name``), or of all gateways when None."""
    with engine.connect() as conn:
        return _backlog(conn, gateway)


def upload_lag_alert(settings: Settings, engine: Engine) -> str | None:
    """The console's alert line when the upload lag is above
    ``storage.upload_lag_alert_seconds`` (None when fine, or no object store)."""
    if settings.storage.backend != "s3":
        return None
    backlog = upload_backlog(engine)
    lag = backlog.lag_seconds(utcnow())
    if lag <= settings.storage.upload_lag_alert_seconds:
        return None
    return (
        f"object store upload lag {lag:.0f} s (above storage.upload_lag_alert_seconds = "
        f"{settings.storage.upload_lag_alert_seconds:g}): {backlog.count} instances, "
        f"{backlog.bytes // 2**20} MB only in the local buffer"
    )


def upload_metrics(settings: Settings, conn: Connection, now: dt.datetime) -> Iterator[Metric]:
    """``/metrics`` gauges of the upload backlog (``storage.backend = "s3"``), all gateways."""
    backlog = _backlog(conn)
    lag = backlog.lag_seconds(now)
    threshold = settings.storage.upload_lag_alert_seconds
    yield GaugeMetricFamily(
        "pacs_ai_upload_pending_instances",
        "Instances received but not yet in the object store (all gateways).",
        value=backlog.count,
    )
    yield GaugeMetricFamily(
        "pacs_ai_upload_pending_bytes",
        "Bytes only in the local buffers (not yet in the object store; all gateways).",
        value=backlog.bytes,
    )
    yield GaugeMetricFamily(
        "pacs_ai_upload_lag_seconds",
        "Age of the oldest instance not yet in the object store, all gateways (0: none).",
        value=lag,
    )
    yield GaugeMetricFamily(
        "pacs_ai_upload_lag_alert",
        "1 while the upload lag is above storage.upload_lag_alert_seconds.",
        value=1.0 if lag > threshold else 0.0,
    )
    yield GaugeMetricFamily(
        "pacs_ai_upload_lag_alert_seconds",
        "The alert threshold (storage.upload_lag_alert_seconds).",
        value=threshold,
    )
    yield GaugeMetricFamily(
        "pacs_ai_local_buffer_high_watermark_bytes",
        "Pending bytes of one gateway above which C-STORE answers 0xA700 (0: no limit).",
        value=settings.storage.local_buffer_high_watermark_mb * 1024 * 1024,
    )


@dataclass
class _Item:
    id: int
    sha256: str
    path: str


class Uploader:
    """Background uploads for ``storage.backend = "s3"``; :meth:`start` / :meth:`stop`."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        store: ObjectStore,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._cfg = settings.storage
        self.gateway = settings.service.node_name  # only this gateway's rows: its spool
        self._root = settings.storage.path.resolve()
        self._store = store
        self._clock = clock
        self._watermark = settings.storage.local_buffer_high_watermark_mb * 1024 * 1024
        self.backlog = Backlog()
        self.uploaded = 0  # objects confirmed in the store by this process
        self.failures = 0  # rounds that failed because the store was unavailable
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(
            max_workers=settings.storage.upload_concurrency, thread_name_prefix="s3-upload"
        )
        self._skip: dict[int, float] = {}  # row id -> monotonic time before which to skip it

    # --- ingest's buffer guard ---------------------------------------------------------------

    def check_buffer(self) -> None:
        """Raise :class:`OutOfResources` (C-STORE 0xA700) when the bytes waiting for upload,
        of this gateway as counted by the last round, exceed ``local_buffer_high_watermark_mb``."""
        if self._watermark and self.backlog.bytes > self._watermark:
            raise OutOfResources("local buffer above storage.local_buffer_high_watermark_mb")

    # --- one round ---------------------------------------------------------------------------

    def refresh(self) -> Backlog:
        self.backlog = upload_backlog(self._engine, self.gateway)
        return self.backlog

    def run_once(self) -> int:
        """Upload one batch; returns how many rows were marked. Raises
        :class:`ObjectStoreUnavailable` when the store cannot be reached."""
        self.refresh()
        now_m = time.monotonic()
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(Instance.id, Instance.sha256, Instance.path)
                .where(*_waiting(self.gateway))
                .order_by(Instance.id)
                .limit(self._cfg.upload_batch + len(self._skip))
            ).all()
        waiting = {r.id for r in rows}
        self._skip = {k: v for k, v in self._skip.items() if k in waiting}  # stays small
        due = [r for r in rows if self._skip.get(r.id, 0.0) <= now_m]
        items = [_Item(r.id, r.sha256, r.path) for r in due[: self._cfg.upload_batch]]
        if not items:
            return 0
        done: list[str] = []
        unavailable: ObjectStoreUnavailable | None = None
        for item, result in zip(items, self._pool.map(self._put, items), strict=True):
            if isinstance(result, ObjectStoreUnavailable):
                unavailable = result
            elif isinstance(result, Exception):
                # This row alone (file missing, content conflict, refused): retried later.
                self._skip[item.id] = now_m + self._cfg.upload_max_backoff_seconds
                log.error(
                    "upload of object %s failed: %s",
                    key_ref(item.sha256),
                    result.__class__.__name__,
                )
            else:
                self._skip.pop(item.id, None)
                done.append(item.sha256)
        marked = self._mark(done)
        if unavailable is not None:
            raise unavailable
        return marked

    def _put(self, item: _Item) -> Exception | None:
        path = (self._root / item.path).resolve()
        if not path.is_relative_to(self._root):
            return ValueError("path escapes the spool")
        try:
            self._store.put_if_absent(item.sha256, path)
        except (ObjectStoreError, OSError) as exc:
            if isinstance(exc, ObjectConflict):
                log.error(
                    "object %s exists with other content; not overwritten", key_ref(item.sha256)
                )
            return exc
        return None

    def _mark(self, shas: list[str]) -> int:
        if not shas:
            return 0
        now = self._clock()
        with self._engine.begin() as conn:
            n = conn.execute(
                update(Instance)
                .where(Instance.sha256.in_(shas), Instance.uploaded_at.is_(None))
                .values(uploaded_at=now)
            ).rowcount
        self.uploaded += len(shas)
        return int(n or 0)

    # --- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="s3-uploader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        cfg = self._cfg
        backoff = 0.0
        next_try = 0.0
        while not self._stop.is_set():
            delay = cfg.upload_poll_seconds
            try:
                if time.monotonic() >= next_try:
                    marked = self.run_once()
                    if backoff:
                        log.info("object store reachable again")
                    backoff = 0.0
                    if marked >= cfg.upload_batch:
                        delay = 0.0  # more waiting: go on at once
                else:
                    self.refresh()  # the backlog keeps counting while the store is away
            except ObjectStoreUnavailable as exc:
                self.failures += 1
                backoff = min(cfg.upload_max_backoff_seconds, max(2 * backoff, 0.5))
                next_try = time.monotonic() + backoff
                log.warning(
                    "object store unavailable (%s); %d instances waiting, retry in %.1f s",
                    exc.__class__.__name__,
                    self.backlog.count,
                    backoff,
                )
                delay = min(delay, backoff)
            except Exception as exc:  # the database, most likely: keep the thread alive
                log.error("upload round failed: %s", exc.__class__.__name__)
            if delay:
                self._wake.wait(delay)
                self._wake.clear()


def evict_uploaded(engine: Engine, spool_root: Path, older_than: dt.datetime) -> int:
    """Delete local copies of instances uploaded before ``older_than`` (their objects are in
    the store; the rows keep their paths and readers fall back to the store). Returns how many
    files were removed. Rows of every gateway are looked at: a path names its content (the
    sha256), so a duplicate another gateway recorded leaves its copy here to be removed too."""
    root = spool_root.resolve()
    removed = 0
    with engine.connect() as conn:
        rows = conn.execute(
            select(Instance.path).where(
                Instance.uploaded_at.is_not(None),
                Instance.uploaded_at <= older_than,
                Instance.purged_at.is_(None),
            )
        ).all()
    for (relpath,) in rows:
        p = (root / relpath).resolve()
        if p.is_relative_to(root):
            try:
                p.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    return removed
