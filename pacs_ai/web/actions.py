"""What console users may change, each in one transaction with its audit event (actor =
the user). The service picks the work up at its next poll (or when woken).

These are small stand-ins for the pipeline's and outbox's own entry points; the re-run follows
what a late instance does (``ingest.recorder``): back to ``ready`` with revision + 1, so the
pipeline scores it again and the new report names the previous one as its predecessor.
"""

from __future__ import annotations

from sqlalchemy import Engine, select, update

from pacs_ai.config import Settings
from pacs_ai.db.models import Delivery, DeliveryState, Report, Study, StudyState, utcnow
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import PacsAiError
from pacs_ai.ingest.recorder import write_audit

# States a re-run may start from: not while the study is still arriving or being scored.
RERUNNABLE = frozenset(
    {StudyState.REPORTED, StudyState.DELIVERED, StudyState.NOT_APPLICABLE, StudyState.FAILED}
)


class ActionRefused(PacsAiError):
    """A console action that does not apply to the object in its current state."""


def rerun_study(engine: Engine, study_id: int, actor: str) -> int:
    """Score the study again as a new revision; returns that revision."""
    now = utcnow()
    with engine.begin() as conn:
        row = conn.execute(
            update(Study)
            .where(Study.id == study_id, Study.state.in_(RERUNNABLE))
            .values(
                state=StudyState.READY,
                revision=Study.revision + 1,
                ready_at=now,
                state_changed_at=now,
                state_reason=f"re-run requested by {actor}"[:200],
            )
            .returning(Study.revision)
        ).first()
        if row is None:
            write_audit(conn, actor, "study_rerun", "refused", "study", study_id)
            raise ActionRefused("the study is receiving or being processed; try again later")
        write_audit(conn, actor, "study_rerun", "ok", "study", study_id, {"revision": row[0]})
    return int(row[0])


def redeliver_study(engine: Engine, settings: Settings, study_id: int, actor: str) -> int:
    """Queue the study's latest report objects again to every configured destination that
    has not got them yet; existing delivery rows are re-queued. Returns rows queued."""
    outbox = Outbox(engine, settings)
    with engine.begin() as conn:
        latest = conn.scalar(
            select(Report.study_revision)
            .where(Report.study_id == study_id)
            .order_by(Report.study_revision.desc())
            .limit(1)
        )
        if latest is None:
            write_audit(conn, actor, "study_redeliver", "refused", "study", study_id)
            raise ActionRefused("the study has no report objects")
        reports = [
            (int(r.id), str(r.kind))
            for r in conn.execute(
                select(Report.id, Report.kind).where(
                    Report.study_id == study_id, Report.study_revision == latest
                )
            )
        ]
        created = outbox.enqueue(conn, study_id, list(reports))
        write_audit(conn, actor, "study_redeliver", "ok", "study", study_id, {"created": created})
    with engine.connect() as conn:
        existing = list(
            conn.scalars(
                select(Delivery.id).where(
                    Delivery.study_id == study_id,
                    Delivery.report_id.in_([r[0] for r in reports]),
                )
            )
        )
    requeued = _requeue_any(engine, existing, actor)
    return created + requeued


def _requeue_any(engine: Engine, ids: list[int], actor: str) -> int:
    """Every given delivery back to pending (delivered ones too: a re-delivery)."""
    if not ids:
        return 0
    with engine.begin() as conn:
        done = list(
            conn.scalars(
                update(Delivery)
                .where(Delivery.id.in_(ids), Delivery.state != DeliveryState.SENDING)
                .values(
                    state=DeliveryState.PENDING,
                    next_attempt_at=None,
                    attempts=0,
                    claimed_at=None,
                    delivered_at=None,
                )
                .returning(Delivery.id)
            )
        )
        for i in done:
            write_audit(conn, actor, "delivery_requeued", "ok", "delivery", i)
    return len(done)


def retry_deliveries(
    engine: Engine, settings: Settings, delivery_ids: list[int] | None, actor: str
) -> int:
    """Dead or failed deliveries back to pending now (None: every dead one)."""
    return Outbox(engine, settings).requeue(delivery_ids, actor=actor)
