"""The audit-event writer shared by every layer (ingest, assembly, pipeline, delivery)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, insert

from pacs_ai.db.models import AuditEvent, utcnow


def write_audit(
    conn: Connection,
    actor: str,
    action: str,
    outcome: str,
    object_type: str | None = None,
    object_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One ``audit_events`` row in the caller's transaction (no DICOM values in ``detail``)."""
    conn.execute(
        insert(AuditEvent).values(
            at=utcnow(),
            actor=actor[:64],
            action=action,
            outcome=outcome,
            object_type=object_type,
            object_id=object_id,
            detail=json.dumps(detail, sort_keys=True) if detail else None,
        )
    )
