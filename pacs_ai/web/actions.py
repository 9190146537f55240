"""What console users may change: thin adapters over the same entry points the CLI uses
(:mod:`pacs_ai.studies`, :class:`~pacs_ai.delivery.outbox.Outbox`), each audited with the
user as actor. The service picks the work up at its next poll (or when woken)."""

from __future__ import annotations

from sqlalchemy import Engine

from pacs_ai.config import Settings
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import AmbiguousStudy, PacsAiError, StudyNotFound
from pacs_ai.studies import NotRerunnable
from pacs_ai.studies import rerun_study as _rerun


class ActionRefused(PacsAiError):
    """A console action that does not apply to the object in its current state."""


def rerun_study(engine: Engine, study_id: int, actor: str) -> int:
    """Score the study again as a new revision (the new report names the previous one as its
    predecessor); returns that revision."""
    try:
        before = _rerun(engine, str(study_id), actor)
    except (NotRerunnable, StudyNotFound, AmbiguousStudy) as exc:
        raise ActionRefused(str(exc)) from exc
    return before.revision + 1


def redeliver_study(engine: Engine, settings: Settings, study_id: int, actor: str) -> int:
    """Send the study's latest report objects again to every configured destination (those
    already delivered too: the admin asked for it). Returns the deliveries queued."""
    result = Outbox(engine, settings).redeliver(study_id, force=True, actor=actor)
    if result.reports == 0:
        raise ActionRefused("the study has no report objects")
    return result.queued + result.requeued


def retry_deliveries(
    engine: Engine, settings: Settings, delivery_ids: list[int] | None, actor: str
) -> int:
    """Dead or failed deliveries back to pending now (None: every dead one)."""
    return Outbox(engine, settings).requeue(delivery_ids, actor=actor)
