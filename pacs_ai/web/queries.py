"""Read queries behind the console pages (the per-study timeline comes from
:mod:`pacs_ai.db.audit`). PHI columns are selected only when ``show_phi`` is true."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, exists, func, select

from pacs_ai.db import audit
from pacs_ai.db.models import (
    Association,
    Delivery,
    DeliveryState,
    Finding,
    Instance,
    Job,
    JobState,
    ModelAlert,
    Series,
    Study,
    StudyState,
    utcnow,
)

PAGE_SIZE = 50


@dataclass(frozen=True)
class StudyFilter:
    state: str | None = None
    modality: str | None = None
    date_from: dt.date | None = None  # received on or after (UTC)
    date_to: dt.date | None = None  # received on or before (UTC)
    calling_ae: str | None = None
    finding: str | None = None  # label decided present in the latest successful job
    uid: str | None = None
    accession: str | None = None  # admins only (the caller checks)
    before_id: int | None = None  # keyset pagination: studies with a smaller id


@dataclass
class StudyPage:
    rows: list[dict[str, Any]] = field(default_factory=list)
    next_before_id: int | None = None


def studies(engine: Engine, f: StudyFilter, show_phi: bool) -> StudyPage:
    """One page, newest first, by keyset on the primary key (an index walk whatever the size)."""
    s = Study
    modality = select(func.min(Series.modality)).where(Series.study_id == s.id).scalar_subquery()
    cols: list[Any] = [
        s.id,
        s.study_uid,
        s.state,
        s.state_reason,
        s.revision,
        modality.label("modality"),
        s.instance_count,
        s.first_received_at,
        s.study_date,
        s.study_description,
    ]
    if show_phi:
        cols += [s.patient_name, s.patient_id, s.accession_number]
    stmt = select(*cols).order_by(s.id.desc())
    if f.state:
        stmt = stmt.where(s.state == f.state)
    if f.modality:
        stmt = stmt.where(
            exists().where(and_(Series.study_id == s.id, Series.modality == f.modality.upper()))
        )
    if f.date_from:
        stmt = stmt.where(s.first_received_at >= _day_start(f.date_from))
    if f.date_to:
        stmt = stmt.where(s.first_received_at < _day_start(f.date_to + dt.timedelta(days=1)))
    if f.calling_ae:
        stmt = stmt.where(
            exists().where(
                and_(
                    Series.study_id == s.id,
                    Association.id == Series.last_association_id,
                    Association.calling_ae == f.calling_ae,
                )
            )
        )
    if f.finding:
        stmt = stmt.where(
            exists().where(
                and_(
                    Job.study_id == s.id,
                    Job.state == JobState.SUCCEEDED,
                    Job.study_revision == s.revision,
                    Finding.job_id == Job.id,
                    Finding.label == f.finding,
                    Finding.present.is_(True),
                )
            )
        )
    if f.uid:
        stmt = stmt.where(s.study_uid == f.uid.strip())
    if f.accession:
        stmt = stmt.where(s.accession_number == f.accession.strip())
    if f.before_id:
        stmt = stmt.where(s.id < f.before_id)
    rows = audit._rows(engine, stmt.limit(PAGE_SIZE + 1))
    page = StudyPage(rows[:PAGE_SIZE])
    if len(rows) > PAGE_SIZE:
        page.next_before_id = rows[PAGE_SIZE - 1]["id"]
    audit._add_results(engine, page.rows)
    return page


def _day_start(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def study_detail(engine: Engine, study_id: int, show_phi: bool) -> dict[str, Any] | None:
    with engine.connect() as conn:
        uid = conn.scalar(select(Study.study_uid).where(Study.id == study_id))
    if uid is None:
        return None
    data = audit.study_timeline(engine, uid, show_phi=show_phi)
    if data is None:
        return None
    data["study"]["id"] = study_id
    with engine.connect() as conn:
        sender = conn.execute(
            select(Association.calling_ae, Association.peer_host)
            .join(Instance, Instance.association_id == Association.id)
            .where(Instance.study_id == study_id)
            .order_by(Instance.id.desc())
            .limit(1)
        ).first()
    data["sender"] = f"{sender.calling_ae} ({sender.peer_host})" if sender else None
    return data


# --- overview ----------------------------------------------------------------------------


def overview(engine: Engine, now: dt.datetime | None = None) -> dict[str, Any]:
    now = now or utcnow()
    day_ago = now - dt.timedelta(hours=24)
    hour0 = now.replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=23)
    with engine.connect() as conn:
        by_state = {
            r[0]: r[1]
            for r in conn.execute(select(Study.state, func.count()).group_by(Study.state))
        }
        deliveries = {
            r[0]: r[1]
            for r in conn.execute(select(Delivery.state, func.count()).group_by(Delivery.state))
        }
        model_alerts = [
            {"model": r.model_name, "label": r.label or "series", "detail": r.detail}
            for r in conn.execute(
                select(ModelAlert.model_name, ModelAlert.label, ModelAlert.detail)
                .where(ModelAlert.cleared_at.is_(None))
                .order_by(ModelAlert.id)
            )
        ]
        assoc = conn.execute(
            select(
                func.count(),
                func.count().filter(Association.accepted.is_(False)),
                func.coalesce(func.sum(Association.instances_stored), 0),
                func.coalesce(func.sum(Association.instances_failed), 0),
                func.coalesce(func.sum(Association.bytes_received), 0),
            ).where(Association.started_at >= day_ago)
        ).one()
        per_hour_instances = conn.execute(
            select(Association.started_at, Association.instances_stored).where(
                Association.started_at >= hour0
            )
        ).all()
        studies_24h = conn.scalar(
            select(func.count()).select_from(Study).where(Study.first_received_at >= day_ago)
        )
        jobs_24h = conn.execute(
            select(Job.started_at, Job.duration_ms, Job.state).where(Job.started_at >= hour0)
        ).all()
        delivered_24h = conn.execute(
            select(Delivery.delivered_at, Study.last_received_at)
            .join(Study, Study.id == Delivery.study_id)
            .where(Delivery.delivered_at >= hour0)
        ).all()
        oldest_ready = conn.scalar(
            select(func.min(Study.ready_at)).where(Study.state == StudyState.READY)
        )
    hours = [hour0 + dt.timedelta(hours=i) for i in range(24)]
    received = [0] * 24
    for started, n in per_hour_instances:
        received[_hour_index(hour0, started)] += n or 0
    scored = [0] * 24
    job_ms: list[list[float]] = [[] for _ in range(24)]
    for started, ms, state in jobs_24h:
        i = _hour_index(hour0, started)
        if state == JobState.SUCCEEDED:
            scored[i] += 1
        if ms is not None:
            job_ms[i].append(ms / 1000)
    latency: list[list[float]] = [[] for _ in range(24)]
    for delivered_at, last_received in delivered_24h:
        if delivered_at is None:
            continue
        latency[_hour_index(hour0, delivered_at)].append(
            (delivered_at - last_received).total_seconds()
        )
    return {
        "model_alerts": model_alerts,
        "studies_by_state": {s.value: by_state.get(s, 0) for s in StudyState},
        "deliveries_by_state": {s.value: deliveries.get(s, 0) for s in DeliveryState},
        "last24": {
            "associations": assoc[0],
            "rejected": assoc[1],
            "instances": int(assoc[2]),
            "failed_instances": int(assoc[3]),
            "bytes": int(assoc[4]),
            "studies": studies_24h or 0,
            "jobs": len(jobs_24h),
            "delivered": len(delivered_24h),
        },
        "oldest_ready_s": (now - oldest_ready).total_seconds() if oldest_ready else None,
        "chart": {
            "hours": [int(h.timestamp()) for h in hours],
            "instances": received,
            "scored": scored,
            "job_p50": [_quantile(v, 0.5) for v in job_ms],
            "job_p95": [_quantile(v, 0.95) for v in job_ms],
            "latency_p50": [_quantile(v, 0.5) for v in latency],
            "latency_p95": [_quantile(v, 0.95) for v in latency],
        },
    }


def _hour_index(hour0: dt.datetime, at: dt.datetime) -> int:
    return min(23, max(0, int((at - hour0).total_seconds() // 3600)))


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def dead_delivery_ids(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(Delivery.id).where(Delivery.state == DeliveryState.DEAD).limit(1000)
            )
        )
