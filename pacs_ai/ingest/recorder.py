"""Database writes of the ingest path: associations, instances, study/series bookkeeping.

``record_instance`` is on the hot path (once per C-STORE, before Success): it runs Core
statements on a plain connection in one short transaction (the ORM's bulk-update path cost
several milliseconds per instance) and caches study/series ids per association.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.db.events import write_audit
from pacs_ai.db.models import (
    Association,
    Instance,
    Series,
    SeriesState,
    Study,
    StudyState,
    utcnow,
)
from pacs_ai.errors import DatabaseUnavailable, IdentityConflict, SpoolIOError
from pacs_ai.ingest.spool import StoredFile
from pacs_ai.ingest.validation import InstanceHeader


class RecordOutcome(enum.Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing new
    CONFLICT = "conflict"  # same SOP Instance UID, different bytes: kept both, flagged
    LATE = "late"  # new instance for a study that was already ready or further


@dataclass
class AssociationCache:
    """Rows this association already resolved: study UID -> (id, patient ID), series UID ->
    (id, study id)."""

    studies: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    series: dict[str, tuple[int, int]] = field(default_factory=dict)


def _insert_ignoring_conflict(
    conn: Connection, table: Table, key: str, values: dict[str, Any]
) -> None:
    """Insert unless another association inserted the same unique ``key`` concurrently."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(
        dialect.insert(table).values(**values).on_conflict_do_nothing(index_elements=[key])
    )


class IngestRecorder:
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], dt.datetime] = utcnow,
        spool_root: Path | None = None,
        gateway: str | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock
        # service.node_name, recorded on the association and instance rows of this gateway.
        self._gateway = gateway
        # Where stored paths are relative to (checks a restored purged instance's file).
        self._spool_root = spool_root

    # --- associations ------------------------------------------------------------------

    def open_association(
        self,
        peer_host: str,
        peer_port: int,
        tls: bool,
        calling: str = "",
        called: str = "",
        accepted: bool = False,
    ) -> int:
        """The row of an association whose A-ASSOCIATE-RQ was decoded (never written for a
        bare connection: idle sockets cost no database write)."""
        with self._engine.begin() as s:
            return self._insert_association(s, peer_host, peer_port, tls, calling, called, accepted)

    def _insert_association(
        self,
        s: Connection,
        peer_host: str,
        peer_port: int,
        tls: bool,
        calling: str,
        called: str,
        accepted: bool,
        **ended: Any,
    ) -> int:
        return int(
            s.execute(
                insert(Association)
                .values(
                    peer_host=peer_host[:64],
                    peer_port=peer_port,
                    tls=tls,
                    calling_ae=calling[:16] or None,
                    called_ae=called[:16] or None,
                    accepted=accepted,
                    started_at=ended.pop("started_at", None) or self._clock(),
                    instances_stored=0,
                    instances_failed=0,
                    bytes_received=0,
                    gateway=self._gateway,
                    **ended,
                )
                .returning(Association.id)
            ).scalar_one()
        )

    def record_refusal(
        self,
        peer_host: str,
        peer_port: int,
        tls: bool,
        calling: str,
        called: str,
        reason: str,
        action: str,
        started_at: dt.datetime | None = None,
    ) -> int:
        """An association rejected (A-ASSOCIATE-RJ) or ended before acceptance (malformed
        request, timeout, TLS failure): one ended row and one audit event."""
        with self._engine.begin() as s:
            assoc_id = self._insert_association(
                s,
                peer_host,
                peer_port,
                tls,
                calling,
                called,
                False,
                started_at=started_at,
                reject_reason=reason[:200],
                ended_at=self._clock(),
                end_reason=action,
            )
            write_audit(
                s,
                calling or "unknown",
                f"association_{action}",
                "refused",
                "association",
                assoc_id,
                {"reason": reason},
            )
        return assoc_id

    def close_association(
        self, assoc_id: int, end_reason: str, stored: int, failed: int, nbytes: int
    ) -> None:
        with self._engine.begin() as s:
            s.execute(
                update(Association)
                .where(Association.id == assoc_id)
                .values(
                    ended_at=self._clock(),
                    end_reason=end_reason,
                    instances_stored=stored,
                    instances_failed=failed,
                    bytes_received=nbytes,
                )
            )
            if end_reason != "released":
                write_audit(
                    s,
                    "system",
                    "association_ended",
                    "warning",
                    "association",
                    assoc_id,
                    {"end_reason": end_reason, "stored": stored, "failed": failed},
                )

    def audit(self, actor: str, action: str, outcome: str, **kwargs: Any) -> None:
        try:
            with self._engine.begin() as s:
                write_audit(s, actor, action, outcome, **kwargs)
        except SQLAlchemyError:
            pass  # auditing a failure must not raise a second one; the log has it

    # --- instances -----------------------------------------------------------------------

    def record_instance(
        self,
        assoc_id: int,
        calling_ae: str,
        header: InstanceHeader,
        stored: StoredFile,
        transfer_syntax: str,
        cache: AssociationCache,
        before_commit: Callable[[], object] = lambda: None,
    ) -> RecordOutcome:
        """Record one instance; ``before_commit`` runs inside the transaction just before it
        commits (the spool file's fsync is awaited there), and may raise to roll it back."""
        try:
            with self._engine.begin() as s:
                outcome = self._record(
                    s, assoc_id, calling_ae, header, stored, transfer_syntax, cache
                )
                before_commit()
                return outcome
        except Exception as exc:
            # Ids cached during a rolled-back transaction may not exist.
            cache.studies.clear()
            cache.series.clear()
            if isinstance(exc, SQLAlchemyError):
                raise DatabaseUnavailable(
                    f"database write failed: {exc.__class__.__name__}"
                ) from exc
            raise

    def transaction(self) -> AbstractContextManager[Connection]:
        """One write transaction (commits at the end of the ``with``; rolls back on error)."""
        return self._engine.begin()

    def record_in(
        self,
        conn: Connection,
        assoc_id: int,
        calling_ae: str,
        header: InstanceHeader,
        stored: StoredFile,
        transfer_syntax: str,
        cache: AssociationCache,
    ) -> RecordOutcome:
        """The statements of one instance inside the caller's transaction (group commit);
        the caller commits, or rolls back and clears ``cache``."""
        return self._record(conn, assoc_id, calling_ae, header, stored, transfer_syntax, cache)

    def _study_id(
        self, s: Connection, h: InstanceHeader, now: dt.datetime, cache: AssociationCache
    ) -> int:
        hit = cache.studies.get(h.study_uid)
        if hit is None:
            row = s.execute(_SELECT_STUDY, {"uid": h.study_uid}).first()
            if row is None:
                values = {
                    "study_uid": h.study_uid,
                    "patient_id": h.patient_id,
                    "patient_name": h.patient_name,
                    "accession_number": h.accession_number,
                    "study_date": h.study_date,
                    "study_description": h.study_description,
                    "state": StudyState.RECEIVING,
                    "revision": 0,
                    "instance_count": 0,
                    "first_received_at": now,
                    "last_received_at": now,
                    "state_changed_at": now,
                }
                _insert_ignoring_conflict(s, _STUDIES, "study_uid", values)
                row = s.execute(_SELECT_STUDY, {"uid": h.study_uid}).one()
            hit = cache.studies[h.study_uid] = (int(row[0]), row[1])
        study_id, patient_id = hit
        if patient_id and h.patient_id and patient_id != h.patient_id:
            raise IdentityConflict("StudyInstanceUID already recorded for another patient")
        return study_id

    def _series_id(
        self,
        s: Connection,
        h: InstanceHeader,
        study_id: int,
        now: dt.datetime,
        cache: AssociationCache,
    ) -> int:
        hit = cache.series.get(h.series_uid)
        if hit is None:
            row = s.execute(_SELECT_SERIES, {"uid": h.series_uid}).first()
            if row is None:
                values = {
                    "study_id": study_id,
                    "series_uid": h.series_uid,
                    "modality": h.modality,
                    "body_part": h.body_part,
                    "series_number": h.series_number,
                    "series_description": h.series_description,
                    "state": SeriesState.RECEIVING,
                    "instance_count": 0,
                    "last_received_at": now,
                }
                _insert_ignoring_conflict(s, _SERIES, "series_uid", values)
                row = s.execute(_SELECT_SERIES, {"uid": h.series_uid}).one()
            hit = cache.series[h.series_uid] = (int(row[0]), int(row[1]))
        series_id, owner_study = hit
        if owner_study != study_id:
            raise IdentityConflict("SeriesInstanceUID already recorded under another study")
        return series_id

    def _record(
        self,
        s: Connection,
        assoc_id: int,
        calling_ae: str,
        h: InstanceHeader,
        stored: StoredFile,
        transfer_syntax: str,
        cache: AssociationCache,
    ) -> RecordOutcome:
        now = self._clock()
        study_id = self._study_id(s, h, now, cache)
        series_id = self._series_id(s, h, study_id, now, cache)

        earlier = s.execute(_SELECT_SAME_SOP, {"sop": h.sop_instance_uid}).all()
        if any(row_series != series_id for _, _, row_series in earlier):
            raise IdentityConflict("SOPInstanceUID already recorded under another series")
        for inst_id, sha, _ in earlier:
            if sha == stored.sha256:
                if s.execute(_BUMP_TIMES_RECEIVED, {"row_id": inst_id}).first() is not None:
                    return RecordOutcome.DUPLICATE
                # Its file was purged by retention: this copy is stored again.
                return self._restore(
                    s, inst_id, study_id, series_id, assoc_id, calling_ae, now, stored
                )

        conflicts_with = earlier[0][0] if earlier else None
        inst_id = s.execute(
            _INSERT_INSTANCE,
            {
                "study_id": study_id,
                "series_id": series_id,
                "association_id": assoc_id,
                "sop_instance_uid": h.sop_instance_uid,
                "sop_class_uid": h.sop_class_uid,
                "transfer_syntax_uid": transfer_syntax,
                "instance_number": h.instance_number,
                "size_bytes": stored.size,
                "sha256": stored.sha256,
                "path": stored.relpath,
                "received_at": now,
                "conflicts_with_id": conflicts_with,
                "times_received": 1,
                "gateway": self._gateway,
            },
        ).scalar_one()
        s.execute(_TOUCH_SERIES, {"row_id": series_id, "now": now, "assoc": assoc_id})
        state, revision = s.execute(_TOUCH_STUDY, {"row_id": study_id, "now": now}).one()
        outcome = RecordOutcome.NEW
        if conflicts_with is not None:
            outcome = RecordOutcome.CONFLICT
            write_audit(
                s,
                calling_ae,
                "instance_conflict",
                "warning",
                "instance",
                inst_id,
                {"conflicts_with": conflicts_with},
            )
        if state != StudyState.RECEIVING:
            previous = StudyState(state).value
            s.execute(
                update(_STUDIES)
                .where(_STUDIES.c.id == study_id)
                .values(
                    state=StudyState.RECEIVING,
                    revision=revision + 1,
                    state_changed_at=now,
                    state_reason=f"late instance after {previous}",
                )
            )
            write_audit(
                s,
                calling_ae,
                "late_instance",
                "ok",
                "study",
                study_id,
                {"previous_state": previous, "revision": revision + 1},
            )
            if outcome is RecordOutcome.NEW:
                outcome = RecordOutcome.LATE
        return outcome

    def _restore(
        self,
        s: Connection,
        inst_id: int,
        study_id: int,
        series_id: int,
        assoc_id: int,
        calling_ae: str,
        now: dt.datetime,
        stored: StoredFile,
    ) -> RecordOutcome:
        """The same instance again after retention purged its file: the row is restored
        (it locks against a purge deleting this very file) and the study re-opened."""
        s.execute(
            _RESTORE_PURGED,
            {
                "row_id": inst_id,
                "now": now,
                "assoc": assoc_id,
                "path": stored.relpath,
                "gateway": self._gateway,
            },
        )
        if self._spool_root is not None and not (self._spool_root / stored.relpath).exists():
            # A purge deleted the file this arrival had just placed: refuse; the sender retries.
            raise SpoolIOError("the stored file was purged concurrently")
        s.execute(
            update(_SERIES)
            .where(_SERIES.c.id == series_id)
            .values(
                last_received_at=now,
                last_association_id=assoc_id,
                state=SeriesState.RECEIVING,
                completed_at=None,
            )
        )
        revision = s.execute(
            update(_STUDIES)
            .where(_STUDIES.c.id == study_id)
            .values(
                state=StudyState.RECEIVING,
                revision=_STUDIES.c.revision + 1,
                last_received_at=now,
                state_changed_at=now,
                state_reason="instance received again after its file was purged",
            )
            .returning(_STUDIES.c.revision)
        ).scalar_one()
        write_audit(
            s,
            calling_ae,
            "purged_instance_restored",
            "ok",
            "instance",
            inst_id,
            {"study_id": study_id, "revision": revision},
        )
        return RecordOutcome.LATE


# Hot-path statements, built once on the tables (not the ORM classes): executing a prebuilt
# statement with parameters skips per-call statement construction and ORM bookkeeping.
_STUDIES = cast(Table, Study.__table__)
_SERIES = cast(Table, Series.__table__)
_INSTANCES = cast(Table, Instance.__table__)
_SELECT_SAME_SOP = select(_INSTANCES.c.id, _INSTANCES.c.sha256, _INSTANCES.c.series_id).where(
    _INSTANCES.c.sop_instance_uid == bindparam("sop")
)
_SELECT_STUDY = select(_STUDIES.c.id, _STUDIES.c.patient_id).where(
    _STUDIES.c.study_uid == bindparam("uid")
)
_SELECT_SERIES = select(_SERIES.c.id, _SERIES.c.study_id).where(
    _SERIES.c.series_uid == bindparam("uid")
)
_BUMP_TIMES_RECEIVED = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("row_id"), _INSTANCES.c.purged_at.is_(None))
    .values(times_received=_INSTANCES.c.times_received + 1)
    .returning(_INSTANCES.c.id)
)
_RESTORE_PURGED = (
    update(_INSTANCES)
    .where(_INSTANCES.c.id == bindparam("row_id"))
    .values(
        purged_at=None,
        path=bindparam("path"),
        received_at=bindparam("now"),
        association_id=bindparam("assoc"),
        gateway=bindparam("gateway"),  # the file is in this gateway's spool now
        times_received=_INSTANCES.c.times_received + 1,
    )
)
_INSERT_INSTANCE = insert(_INSTANCES).returning(_INSTANCES.c.id)
_TOUCH_SERIES = (
    update(_SERIES)
    .where(_SERIES.c.id == bindparam("row_id"))
    .values(
        instance_count=_SERIES.c.instance_count + 1,
        last_received_at=bindparam("now"),
        last_association_id=bindparam("assoc"),
        state=SeriesState.RECEIVING,
        completed_at=None,
    )
)
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("row_id"))
    .values(instance_count=_STUDIES.c.instance_count + 1, last_received_at=bindparam("now"))
    .returning(_STUDIES.c.state, _STUDIES.c.revision)
)
