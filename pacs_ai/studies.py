"""Admin actions on one study: re-run it as a new revision, re-deliver its reports.

A re-run puts a finished study back to ``ready`` with its revision bumped, exactly as a late
instance does once its series complete: the pipeline scores it again (on PostgreSQL it is
deferred to the queue at once) and the new report names the previous one in its Predecessor
Documents Sequence (report UIDs include the revision).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from sqlalchemy import Engine, update

from pacs_ai.db.events import write_audit
from pacs_ai.db.lookup import StudyRef, find_study
from pacs_ai.db.models import Study, StudyState, utcnow
from pacs_ai.errors import PacsAiError

# A study still receiving, waiting or being scored gets its (next) run anyway.
RERUNNABLE = frozenset(
    {StudyState.REPORTED, StudyState.DELIVERED, StudyState.NOT_APPLICABLE, StudyState.FAILED}
)


class NotRerunnable(PacsAiError):
    """The study is not finished (receiving, ready or processing)."""


def rerun_study(
    engine: Engine, ref: str, actor: str, clock: Callable[[], dt.datetime] = utcnow
) -> StudyRef:
    """Queue study ``ref`` (id, UID or unique UID prefix) for a new revision; returns it
    as it was before. Raises StudyNotFound, AmbiguousStudy or NotRerunnable."""
    now = clock()
    with engine.begin() as conn:
        study = find_study(conn, ref)
        if study.state not in RERUNNABLE:
            raise NotRerunnable(
                f"study {study.id} is {study.state.value}: it will be processed anyway; "
                "re-run it once it is reported, delivered, not applicable or failed"
            )
        taken = conn.execute(
            update(Study)
            .where(
                Study.id == study.id,
                Study.revision == study.revision,
                Study.state == study.state,
            )
            .values(
                state=StudyState.READY,
                revision=study.revision + 1,
                ready_at=now,
                state_changed_at=now,
                state_reason="re-run requested",
            )
            .returning(Study.id)
        ).first()
        if taken is None:
            raise NotRerunnable(f"study {study.id} changed meanwhile; try again")
        write_audit(
            conn,
            actor,
            "study_rerun",
            "ok",
            "study",
            study.id,
            {
                "previous_state": study.state.value,
                "previous_revision": study.revision,
                "revision": study.revision + 1,
            },
        )
    if engine.dialect.name == "postgresql":
        # PostgreSQL: queue it now (procrastinate); the workers' periodic re-defer of ready
        # studies catches it up if this fails.
        from pacs_ai.taskqueue import defer_once

        defer_once(engine, [study.id])
    return study
