"""Read-only queries for admins (``pacs-ai audit ...``). Rows come back as plain dicts with
ISO-8601 UTC timestamps, ready for table, JSON or CSV output."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, Executable, func, select

from pacs_ai.db.models import Association, AuditEvent, Instance, Series, Study


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
        s.patient_id,
        s.accession_number,
        s.study_date,
    ]
    if show_phi:
        cols.append(s.patient_name)
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
    return _rows(engine, stmt.limit(limit))


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
