"""Series and study completion.

DICOM has no "study complete" signal, so completion is inferred:

- projection X-ray (CR, DX, ...) series: complete ``xray_grace_seconds`` after the association
  that brought their last instance ended (a single chest X-ray must not wait a minute), or
  after ``ct_quiet_seconds`` without a new instance if that association stays open;
- every other series (CT first of all): complete after ``ct_quiet_seconds`` without a new
  instance.

A study is ready when all of its series are complete. A late instance returns the study to
``receiving`` and bumps its revision (see ``ingest.recorder``); the next sweep makes it ready
again and the pipeline re-runs it. Sweeps are idempotent conditional updates, so two
processes sweeping the same database never double-complete anything.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine, and_, exists, select, update

from pacs_ai.config import AssemblySettings
from pacs_ai.db.events import write_audit
from pacs_ai.db.models import Association, Series, SeriesState, Study, StudyState, utcnow

log = logging.getLogger(__name__)

PROJECTION_MODALITIES = frozenset({"CR", "DX", "RG", "MG", "IO", "PX"})


class Assembler:
    def __init__(
        self,
        engine: Engine,
        settings: AssemblySettings,
        on_ready: Callable[[list[int]], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._on_ready = on_ready
        self._clock = clock
        self._lock = threading.Lock()

    def sweep(self) -> list[int]:
        """Complete what is due; returns the ids of studies that became ready."""
        with self._lock:  # periodic and on-demand sweeps never overlap in one process
            return self._sweep()

    def _sweep(self) -> list[int]:
        now = self._clock()
        grace = dt.timedelta(seconds=self._settings.xray_grace_seconds)
        quiet = dt.timedelta(seconds=self._settings.ct_quiet_seconds)
        with self._engine.begin() as s:
            rows = s.execute(
                select(Series.id, Series.modality, Series.last_received_at, Association.ended_at)
                .outerjoin(Association, Association.id == Series.last_association_id)
                .where(Series.state == SeriesState.RECEIVING)
            ).all()
            for series_id, modality, last_received, assoc_ended in rows:
                due = last_received + quiet <= now
                if not due and (modality or "").upper() in PROJECTION_MODALITIES:
                    due = assoc_ended is not None and assoc_ended + grace <= now
                if due:
                    # Guarded by last_received_at: an instance arriving meanwhile wins.
                    s.execute(
                        update(Series)
                        .where(
                            Series.id == series_id,
                            Series.state == SeriesState.RECEIVING,
                            Series.last_received_at == last_received,
                        )
                        .values(state=SeriesState.COMPLETE, completed_at=now)
                    )
            pending = exists().where(
                and_(Series.study_id == Study.id, Series.state == SeriesState.RECEIVING)
            )
            any_series = exists().where(Series.study_id == Study.id)
            ready = list(
                s.scalars(
                    update(Study)
                    .where(Study.state == StudyState.RECEIVING, ~pending, any_series)
                    .values(
                        state=StudyState.READY,
                        ready_at=now,
                        state_changed_at=now,
                        state_reason=None,
                    )
                    .returning(Study.id)
                )
            )
            for study_id in ready:
                write_audit(s, "system", "study_ready", "ok", "study", study_id)
        if ready:
            log.info("studies ready: %s", ",".join(str(i) for i in ready))
            if self._on_ready is not None:
                self._on_ready(ready)
        return ready
