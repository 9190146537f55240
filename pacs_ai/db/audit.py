"""Read-only queries for admins (``pacs-ai audit ...``). Rows come back as plain dicts with
ISO-8601 UTC timestamps, ready for table, JSON or CSV output."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, Executable, Integer, func, select

from pacs_ai.db.models import (
    Association,
    AuditEvent,
    Delivery,
    Finding,
    Instance,
    Job,
    Report,
    Series,
    Study,
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    if hasattr(value, "value"):  # enums
        return value.value
    return value


def _rows(engine: Engine, stmt: Executable) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        result = conn.execute(stmt)
        keys = list(result.keys())
        return [{k: _jsonable(v) for k, v in zip(keys, row, strict=True)} for row in result]


def associations(
    engine: Engine, since: dt.datetime | None = None, ae: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    a = Association
    stmt = select(
        a.id,
        a.started_at,
        a.ended_at,
        a.calling_ae,
        a.called_ae,
        a.peer_host,
        a.tls,
        a.accepted,
        a.reject_reason,
        a.end_reason,
        a.instances_stored,
        a.instances_failed,
        a.bytes_received,
    ).order_by(a.id.desc())
    if since is not None:
        stmt = stmt.where(a.started_at >= since)
    if ae is not None:
        stmt = stmt.where(a.calling_ae == ae)
    return _rows(engine, stmt.limit(limit))


def instances(
    engine: Engine,
    since: dt.datetime | None = None,
    ae: str | None = None,
    study_uid: str | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    i = Instance
    stmt = (
        select(
            i.id,
            i.received_at,
            Association.calling_ae,
            Study.study_uid,
            Series.series_uid,
            Series.modality,
            i.sop_instance_uid,
            i.sop_class_uid,
            i.transfer_syntax_uid,
            i.size_bytes,
            i.sha256,
            i.times_received,
            i.conflicts_with_id,
            i.path,
            i.purged_at,
        )
        .join(Study, Study.id == i.study_id)
        .join(Series, Series.id == i.series_id)
        .outerjoin(Association, Association.id == i.association_id)
        .order_by(i.id.desc())
    )
    if since is not None:
        stmt = stmt.where(i.received_at >= since)
    if ae is not None:
        stmt = stmt.where(Association.calling_ae == ae)
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    return _rows(engine, stmt.limit(limit))


def studies(
    engine: Engine,
    since: dt.datetime | None = None,
    study_uid: str | None = None,
    ae: str | None = None,
    show_phi: bool = False,
    limit: int = 200,
) -> list[dict[str, Any]]:
    s = Study
    series_count = select(func.count(Series.id)).where(Series.study_id == s.id).scalar_subquery()
    modalities = select(func.min(Series.modality)).where(Series.study_id == s.id).scalar_subquery()
    cols: list[Any] = [
        s.id,
        s.study_uid,
        s.state,
        s.state_reason,
        s.revision,
        modalities.label("modality"),
        series_count.label("series"),
        s.instance_count.label("instances"),
        s.first_received_at,
        s.last_received_at,
        s.ready_at,
        s.purged_at,
        s.study_date,
    ]
    if show_phi:
        cols += [s.patient_name, s.patient_id, s.accession_number]
    stmt = select(*cols).order_by(s.id.desc())
    if since is not None:
        stmt = stmt.where(s.last_received_at >= since)
    if study_uid is not None:
        stmt = stmt.where(s.study_uid == study_uid)
    if ae is not None:
        sent_by = (
            select(Instance.study_id)
            .join(Association, Association.id == Instance.association_id)
            .where(Association.calling_ae == ae)
        )
        stmt = stmt.where(s.id.in_(sent_by))
    rows = _rows(engine, stmt.limit(limit))
    _add_results(engine, rows)
    return rows


def _add_results(engine: Engine, rows: list[dict[str, Any]]) -> None:
    """Per study: the findings of its latest successful job, and its deliveries' states."""
    ids = [r["id"] for r in rows]
    if not ids:
        return
    with engine.connect() as conn:
        latest_job = (
            select(Job.study_id, func.max(Job.id).label("job_id"))
            .where(Job.study_id.in_(ids), Job.state == "succeeded")
            .group_by(Job.study_id)
            .subquery()
        )
        found: dict[int, list[str]] = {}
        for study_id, label, prob, present in conn.execute(
            select(
                latest_job.c.study_id,
                Finding.label,
                func.max(Finding.probability),
                func.max(Finding.present.cast(Integer)),
            )
            .join(Finding, Finding.job_id == latest_job.c.job_id)
            .group_by(latest_job.c.study_id, Finding.label)
            .order_by(Finding.label)
        ):
            found.setdefault(study_id, []).append(
                f"{label} {prob:.3f}{' PRESENT' if present else ''}"
            )
        delivery: dict[int, dict[str, int]] = {}
        for study_id, state, n in conn.execute(
            select(Delivery.study_id, Delivery.state, func.count())
            .where(Delivery.study_id.in_(ids))
            .group_by(Delivery.study_id, Delivery.state)
        ):
            delivery.setdefault(study_id, {})[_jsonable(state)] = n
    for r in rows:
        r["findings"] = "; ".join(found.get(r["id"], [])) or None
        states = delivery.get(r["id"])
        r["deliveries"] = (
            ", ".join(f"{n} {st}" for st, n in sorted(states.items())) if states else None
        )


def events(
    engine: Engine,
    since: dt.datetime | None = None,
    action: str | None = None,
    ae: str | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    e = AuditEvent
    stmt = select(
        e.id, e.at, e.actor, e.action, e.object_type, e.object_id, e.outcome, e.detail
    ).order_by(e.id.desc())
    if since is not None:
        stmt = stmt.where(e.at >= since)
    if action is not None:
        stmt = stmt.where(e.action == action)
    if ae is not None:
        stmt = stmt.where(e.actor == ae)
    return _rows(engine, stmt.limit(limit))


def deliveries(
    engine: Engine,
    state: str | None = None,
    study_uid: str | None = None,
    limit: int = 200,
) -> list[dict[str, Any]]:
    d = Delivery
    stmt = (
        select(
            d.id,
            Study.study_uid,
            Report.kind,
            d.destination,
            d.ae_title,
            d.host,
            d.port,
            d.state,
            d.attempts,
            d.last_status,
            d.last_error,
            d.next_attempt_at,
            d.delivered_at,
            Report.sop_instance_uid,
        )
        .join(Report, Report.id == d.report_id)
        .join(Study, Study.id == d.study_id)
        .order_by(d.id.desc())
    )
    if state is not None:
        stmt = stmt.where(d.state == state)
    if study_uid is not None:
        stmt = stmt.where(Study.study_uid == study_uid)
    rows = _rows(engine, stmt.limit(limit))
    for r in rows:
        if r["last_status"] is not None:
            r["last_status"] = f"0x{r['last_status']:04X}"
    return rows


PHI_COLUMNS = ("patient_name", "patient_id", "accession_number", "patient_birth_date")


def study_timeline(engine: Engine, study_uid: str, show_phi: bool = False) -> dict[str, Any] | None:
    """Everything about one study, in time order: received, ready, scored, reported,
    delivered, purged, with durations. Patient name, ID, birth date and accession number only
    with ``show_phi``."""
    with engine.connect() as conn:
        study = conn.execute(select(Study).where(Study.study_uid == study_uid)).first()
        if study is None:
            return None
        sid = study.id
        series = conn.execute(
            select(
                Series.id,
                Series.series_uid,
                Series.modality,
                Series.body_part,
                Series.instance_count,
                Series.state,
                Series.completed_at,
                Series.not_applicable_reason,
            )
            .where(Series.study_id == sid)
            .order_by(Series.id)
        ).all()
        jobs = conn.execute(
            select(
                Job.id,
                Job.study_revision,
                Job.attempt,
                Job.state,
                Job.models,
                Job.device,
                Job.started_at,
                Job.finished_at,
                Job.duration_ms,
                Job.error,
            )
            .where(Job.study_id == sid)
            .order_by(Job.id)
        ).all()
        findings = conn.execute(
            select(
                Finding.job_id,
                Finding.series_id,
                Finding.model_name,
                Finding.label,
                Finding.probability,
                Finding.threshold,
                Finding.present,
            )
            .join(Job, Job.id == Finding.job_id)
            .where(Job.study_id == sid)
            .order_by(Finding.id)
        ).all()
        reports = conn.execute(
            select(
                Report.id,
                Report.study_revision,
                Report.kind,
                Report.sop_instance_uid,
                Report.path,
                Report.created_at,
            )
            .where(Report.study_id == sid)
            .order_by(Report.id)
        ).all()
        dels = conn.execute(
            select(
                Delivery.id,
                Delivery.report_id,
                Delivery.destination,
                Delivery.state,
                Delivery.attempts,
                Delivery.last_status,
                Delivery.last_error,
                Delivery.created_at,
                Delivery.delivered_at,
            )
            .where(Delivery.study_id == sid)
            .order_by(Delivery.id)
        ).all()
        instance_ids = select(Instance.id).where(Instance.study_id == sid)
        audit_rows = conn.execute(
            select(AuditEvent.at, AuditEvent.action, AuditEvent.outcome, AuditEvent.detail)
            .where(
                ((AuditEvent.object_type == "study") & (AuditEvent.object_id == sid))
                | ((AuditEvent.object_type == "instance") & AuditEvent.object_id.in_(instance_ids))
            )
            .order_by(AuditEvent.id)
        ).all()
        live = conn.scalar(
            select(func.count()).where(Instance.study_id == sid, Instance.purged_at.is_(None))
        )
    events: list[tuple[dt.datetime, str]] = [
        (study.first_received_at, "first instance received"),
        (study.last_received_at, f"last instance received ({study.instance_count} in all)"),
    ]
    if study.ready_at:
        events.append((study.ready_at, f"ready (revision {study.revision})"))
    for j in jobs:
        events.append((j.started_at, f"job {j.id} attempt {j.attempt} started"))
        if j.finished_at:
            events.append(
                (
                    j.finished_at,
                    f"job {j.id} {j.state.value}" + (f": {j.error[:120]}" if j.error else ""),
                )
            )
    for r in reports:
        events.append((r.created_at, f"report {r.id} ({r.kind}) written"))
    for d in dels:
        if d.delivered_at:
            events.append((d.delivered_at, f"delivery {d.id} to {d.destination} delivered"))
    for a in audit_rows:
        events.append((a.at, f"{a.action} ({a.outcome})" + (f": {a.detail}" if a.detail else "")))
    if study.purged_at:
        events.append((study.purged_at, f"received objects purged ({live} instances on disk now)"))
    events.sort(key=lambda e: e[0])
    t0 = events[0][0]
    return {
        "study": {
            k: _jsonable(v) for k, v in study._mapping.items() if show_phi or k not in PHI_COLUMNS
        },
        "timeline": [
            {
                "at": _jsonable(at),
                "after_ms": round((at - t0).total_seconds() * 1000),
                "event": what,
            }
            for at, what in events
        ],
        "series": [{k: _jsonable(v) for k, v in r._mapping.items()} for r in series],
        "jobs": [{k: _jsonable(v) for k, v in r._mapping.items()} for r in jobs],
        "findings": [{k: _jsonable(v) for k, v in r._mapping.items()} for r in findings],
        "reports": [{k: _jsonable(v) for k, v in r._mapping.items()} for r in reports],
        "deliveries": [{k: _jsonable(v) for k, v in r._mapping.items()} for r in dels],
    }
