"""``/metrics``: values derived from the database, so they are right whichever process did the
work (``serve``, ``pacs-ai worker``s, pipeline children), plus the listener's in-process C-STORE
timing (:mod:`pacs_ai.telemetry`).

Counters over append-only tables (associations, jobs, findings) are tallied incrementally by
primary key: rows up to a high-water mark whose values can no longer change ("settled": an
ended association, a finished job) are summed once and kept; only newer rows are read on each
scrape. Gauges (studies and deliveries by state, ages, free space) are indexed aggregates.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Connection, Engine, Select, case, func, literal, select

from pacs_ai.config import Settings
from pacs_ai.db.models import (
    Association,
    AuditEvent,
    Delivery,
    DeliveryState,
    Finding,
    Job,
    JobState,
    ModelAlert,
    Study,
    StudyState,
    utcnow,
)
from pacs_ai.storage.uploader import upload_metrics
from pacs_ai.telemetry import CSTORE_SECONDS

JOB_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_UNDELIVERED = (
    DeliveryState.PENDING,
    DeliveryState.SENDING,
    DeliveryState.FAILED,
    DeliveryState.DEAD,
)

Key = tuple[Any, ...]


class _Tally:
    """Per-group sums over a table, read incrementally by primary key (see module doc)."""

    def __init__(
        self,
        id_col: Any,
        group_cols: Sequence[Any],
        value_cols: Sequence[Any],
        settled: ColumnElement[bool] | None = None,
    ) -> None:
        self._id = id_col
        self._groups = list(group_cols)
        self._values = list(value_cols)
        self._settled = settled
        self._hwm = 0
        self._base: dict[Key, list[float]] = {}

    def _sum(self, conn: Connection, where: ColumnElement[bool]) -> dict[Key, list[float]]:
        stmt: Select[Any] = (
            select(*self._groups, *(func.coalesce(func.sum(v), 0) for v in self._values))
            .where(where)
            .group_by(*self._groups)
        )
        n = len(self._groups)
        return {tuple(r[:n]): [float(x) for x in r[n:]] for r in conn.execute(stmt)}

    def read(self, conn: Connection) -> dict[Key, list[float]]:
        if self._settled is None:
            new_hwm = conn.scalar(select(func.max(self._id))) or 0
        else:
            first_open = conn.scalar(
                select(func.min(self._id)).where(self._id > self._hwm, ~self._settled)
            )
            new_hwm = (
                first_open - 1
                if first_open is not None
                else conn.scalar(select(func.max(self._id))) or 0
            )
        if new_hwm > self._hwm:
            delta = self._sum(conn, (self._id > self._hwm) & (self._id <= new_hwm))
            _add(self._base, delta)
            self._hwm = new_hwm
        out = {k: list(v) for k, v in self._base.items()}
        if self._settled is not None:
            _add(out, self._sum(conn, self._id > self._hwm))
        return out


def _add(into: dict[Key, list[float]], other: dict[Key, list[float]]) -> None:
    for k, vals in other.items():
        cur = into.setdefault(k, [0.0] * len(vals))
        for i, v in enumerate(vals):
            cur[i] += v


# Retention's audit actions and the detail key holding each one's count.
_PURGE_ACTIONS = {"objects_purged": "instances", "reports_purged": "reports"}


class _Purges:
    """What retention purged, from its audit events (count and bytes in each event's detail),
    read incrementally by primary key like :class:`_Tally`."""

    def __init__(self) -> None:
        self._hwm = 0
        self.items: dict[str, float] = dict.fromkeys(_PURGE_ACTIONS, 0.0)
        self.bytes: dict[str, float] = dict.fromkeys(_PURGE_ACTIONS, 0.0)

    def read(self, conn: Connection) -> None:
        rows = conn.execute(
            select(AuditEvent.id, AuditEvent.action, AuditEvent.detail)
            .where(AuditEvent.id > self._hwm, AuditEvent.action.in_(list(_PURGE_ACTIONS)))
            .order_by(AuditEvent.id)
        ).all()
        for row in rows:
            detail = json.loads(row.detail or "{}")
            self.items[row.action] += float(detail.get(_PURGE_ACTIONS[row.action], 0) or 0)
            self.bytes[row.action] += float(detail.get("bytes", 0) or 0)
            self._hwm = row.id


class DatabaseCollector(Collector):
    """Collects on every scrape; one short read transaction."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._associations = _Tally(
            Association.id,
            [Association.accepted, Association.end_reason],
            [
                literal(1),
                Association.instances_stored,
                Association.instances_failed,
                Association.bytes_received,
            ],
            settled=Association.ended_at.is_not(None),
        )
        self._findings = _Tally(
            Finding.id,
            [Finding.model_name, Finding.label, Finding.present],
            [literal(1)],
        )
        # Job durations as a histogram: cumulative bucket counts summed in SQL.
        timed = Job.duration_ms.is_not(None)
        self._jobs = _Tally(
            Job.id,
            [Job.models, Job.state],
            [
                case((timed, 1), else_=0),
                Job.duration_ms / 1000.0,
                *(case((Job.duration_ms <= b * 1000.0, 1), else_=0) for b in JOB_BUCKETS),
            ],
            settled=Job.finished_at.is_not(None),
        )

        self._purges = _Purges()

    def describe(self) -> Iterable[Metric]:
        return []  # collected on demand only (no query at registration)

    def collect(self) -> Iterator[Metric]:
        with self._lock, self._engine.connect() as conn:
            yield from self._collect(conn)
        yield from self._spool()

    def _collect(self, conn: Connection) -> Iterator[Metric]:
        now = self._clock()
        assoc = self._associations.read(conn)
        received = CounterMetricFamily(
            "pacs_ai_instances_received",
            "C-STORE requests handled, by outcome (stored: Success answered).",
            labels=["outcome"],
        )
        received.add_metric(["stored"], sum(v[1] for v in assoc.values()))
        received.add_metric(["failed"], sum(v[2] for v in assoc.values()))
        yield received
        yield CounterMetricFamily(
            "pacs_ai_received_bytes",
            "Dataset bytes received in stored instances.",
            value=sum(v[3] for v in assoc.values()),
        )
        associations = CounterMetricFamily(
            "pacs_ai_associations",
            "Ended DICOM associations by result and reason (how they ended).",
            labels=["result", "reason"],
        )
        for (accepted, reason), vals in sorted(assoc.items(), key=lambda kv: str(kv[0])):
            if reason is not None:  # still open: counted when it ends
                associations.add_metric(["accepted" if accepted else "rejected", reason], vals[0])
        yield associations
        yield GaugeMetricFamily(
            "pacs_ai_associations_open",
            "DICOM associations open now.",
            value=sum(v[0] for (_, reason), v in assoc.items() if reason is None),
        )

        studies = GaugeMetricFamily("pacs_ai_studies", "Studies by state.", labels=["state"])
        by_state = {
            r[0]: r[1]
            for r in conn.execute(select(Study.state, func.count()).group_by(Study.state))
        }
        for state in StudyState:
            studies.add_metric([state.value], by_state.get(state, 0))
        yield studies
        yield GaugeMetricFamily(
            "pacs_ai_pipeline_queue_depth",
            "Studies ready and waiting for a pipeline worker.",
            value=by_state.get(StudyState.READY, 0),
        )
        oldest_ready = conn.scalar(
            select(func.min(Study.ready_at)).where(Study.state == StudyState.READY)
        )
        yield GaugeMetricFamily(
            "pacs_ai_pipeline_oldest_ready_age_seconds",
            "Age of the oldest study waiting for the pipeline (0 when none waits).",
            value=_age(now, oldest_ready),
        )

        jobs = HistogramMetricFamily(
            "pacs_ai_job_duration_seconds",
            "Pipeline job durations (decode, preprocess, inference, report) per model set "
            "and outcome.",
            labels=["model", "state"],
        )
        for (models, state), vals in sorted(
            self._jobs.read(conn).items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))
        ):
            if not vals[0]:
                continue  # running jobs: no duration yet
            bounds = [_le(b) for b in JOB_BUCKETS] + ["+Inf"]
            counts = [*vals[2:], vals[0]]
            label = models or "none"
            jobs.add_metric(
                [label, state.value if hasattr(state, "value") else str(state)],
                list(zip(bounds, counts, strict=True)),
                vals[1],
            )
        yield jobs
        running = conn.scalar(
            select(func.count()).select_from(Job).where(Job.state == JobState.RUNNING)
        )
        yield GaugeMetricFamily(
            "pacs_ai_jobs_running", "Pipeline jobs running now.", value=running or 0
        )

        findings = CounterMetricFamily(
            "pacs_ai_findings",
            "Scored findings by model, finding and decision.",
            labels=["model", "finding", "decision"],
        )
        for (model, label, present), vals in sorted(self._findings.read(conn).items()):
            findings.add_metric([model, label, "present" if present else "absent"], vals[0])
        yield findings

        deliveries = GaugeMetricFamily(
            "pacs_ai_deliveries", "Report deliveries by state.", labels=["state"]
        )
        d_state = {
            r[0]: r[1]
            for r in conn.execute(select(Delivery.state, func.count()).group_by(Delivery.state))
        }
        for d in DeliveryState:
            deliveries.add_metric([d.value], d_state.get(d, 0))
        yield deliveries
        # one index lookup per state (state, created_at), not a scan
        oldest = [
            conn.scalar(select(func.min(Delivery.created_at)).where(Delivery.state == st))
            for st in _UNDELIVERED
        ]
        oldest_undelivered = min((o for o in oldest if o is not None), default=None)
        yield GaugeMetricFamily(
            "pacs_ai_delivery_oldest_undelivered_age_seconds",
            "Age of the oldest delivery not yet delivered, dead ones included (0 when none).",
            value=_age(now, oldest_undelivered),
        )
        self._purges.read(conn)
        purged = CounterMetricFamily(
            "pacs_ai_retention_purged",
            "What retention purged: received instances and report objects (files; rows are kept).",
            labels=["what"],
        )
        purged_bytes = CounterMetricFamily(
            "pacs_ai_retention_purged_bytes",
            "Bytes of files retention purged.",
            labels=["what"],
        )
        for action, what in _PURGE_ACTIONS.items():
            purged.add_metric([what], self._purges.items[action])
            purged_bytes.add_metric([what], self._purges.bytes[action])
        yield purged
        yield purged_bytes
        alerts = GaugeMetricFamily(
            "pacs_ai_model_alerts_open",
            "Open model-monitoring alerts (collapse, positive rate, score shift, OOD refusals).",
            labels=["model", "label", "kind"],
        )
        for name, label, kind, n in conn.execute(
            select(ModelAlert.model_name, ModelAlert.label, ModelAlert.kind, func.count())
            .where(ModelAlert.cleared_at.is_(None))
            .group_by(ModelAlert.model_name, ModelAlert.label, ModelAlert.kind)
        ):
            alerts.add_metric([name, label, kind], n)
        yield alerts
        if self._settings.storage.backend == "s3":
            yield from upload_metrics(self._settings, conn, now)

    def _spool(self) -> Iterator[Metric]:
        path = self._settings.storage.path
        while not path.exists() and path.parent != path:  # not created yet: its file system
            path = path.parent
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            free = 0
        yield GaugeMetricFamily(
            "pacs_ai_spool_free_bytes", "Free bytes on the spool's file system.", value=free
        )
        yield GaugeMetricFamily(
            "pacs_ai_spool_min_free_bytes",
            "The watermark below which the listener refuses (storage.min_free_mb).",
            value=self._settings.storage.min_free_mb * 1024 * 1024,
        )


def _age(now: dt.datetime, since: dt.datetime | None) -> float:
    if since is None:
        return 0.0
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    return max(0.0, (now - since).total_seconds())


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def make_registry(settings: Settings, engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, engine))
    registry.register(CSTORE_SECONDS)
    return registry
