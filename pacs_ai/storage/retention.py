"""Storage lifecycle: delete what is finished, keep the history.

What goes, and when (``[retention]``):

* received objects of a *finished* study (reported or not applicable, every delivery
  delivered) ``objects_days`` after it finished; of a failed study, or one whose delivery went
  dead, ``failed_objects_days`` after;
* when free space in the spool is below ``min_free_mb``: the objects of the oldest finished
  studies, oldest first, before their age (failed studies only by age);
* report files ``reports_days`` after they were made, once every delivery of them is delivered;
* audit events and association records older than ``audit_days``.

Never touched: studies still receiving, ready or processing; anything with a delivery not yet
delivered (pending, sending, retrying); ``quarantine/``. Rows stay, marked ``purged_at``, and
every purge writes an audit event with counts and bytes, so ``pacs-ai audit study`` still tells
what happened to a study.

Safe against concurrent ingest: a study's objects are purged in one transaction that first
re-checks, with a conditional update of the study row, that it is still finished (an instance
arriving meanwhile puts it back to ``receiving``); its rows are marked before its files are
deleted, and both commit together. Files are named by content, so the same instance received
again while its row is marked purged is stored again by ingest (the row is restored and the
study re-opened); if that arrival's file was deleted under it, ingest refuses the C-STORE and
the sender retries, so nothing answered Success is lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    true,
    update,
)

from pacs_ai.config import Settings
from pacs_ai.db.events import write_audit
from pacs_ai.db.models import (
    Association,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Report,
    Series,
    Study,
    StudyState,
    utcnow,
)
from pacs_ai.storage.objects import ObjectStore, S3Store, open_store
from pacs_ai.storage.reports import report_key
from pacs_ai.storage.uploader import evict_uploaded

log = logging.getLogger(__name__)

ACTOR = "system:retention"
_FINISHED = (StudyState.REPORTED, StudyState.DELIVERED, StudyState.NOT_APPLICABLE)
_TERMINAL = (*_FINISHED, StudyState.FAILED)
_IN_FLIGHT = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED)
_CHUNK = 500  # ids per IN (...) list


def _delivery_exists(*where: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists().where(Delivery.study_id == Study.id, *where)


def finished_condition() -> ColumnElement[bool]:
    """Reported or not applicable, and every delivery delivered (or none)."""
    return and_(
        Study.state.in_(_FINISHED),
        ~_delivery_exists(Delivery.state != DeliveryState.DELIVERED),
    )


def failed_condition() -> ColumnElement[bool]:
    """Failed (dead job), or reported with a delivery that went dead and none still in flight."""
    return and_(
        or_(
            Study.state == StudyState.FAILED,
            and_(
                Study.state.in_((StudyState.REPORTED, StudyState.DELIVERED)),
                _delivery_exists(Delivery.state == DeliveryState.DEAD),
            ),
        ),
        ~_delivery_exists(Delivery.state.in_(_IN_FLIGHT)),
    )


def _has_live_objects() -> ColumnElement[bool]:
    return exists().where(Instance.study_id == Study.id, Instance.purged_at.is_(None))


@dataclass
class Purged:
    """What one category purged (or would purge, in a dry run)."""

    studies: int = 0
    files: int = 0
    bytes: int = 0

    def add(self, files: int, nbytes: int) -> None:
        self.studies += 1
        self.files += files
        self.bytes += nbytes


@dataclass
class RetentionReport:
    dry_run: bool
    objects_finished: Purged = field(default_factory=Purged)
    objects_failed: Purged = field(default_factory=Purged)
    objects_free_space: Purged = field(default_factory=Purged)
    reports: Purged = field(default_factory=Purged)
    audit_events: int = 0
    associations: int = 0
    free_bytes_before: int | None = None
    free_bytes_after: int | None = None

    @property
    def bytes(self) -> int:
        return sum(
            p.bytes
            for p in (
                self.objects_finished,
                self.objects_failed,
                self.objects_free_space,
                self.reports,
            )
        )

    def rows(self) -> list[dict[str, Any]]:
        """One row per category, for a table or JSON."""
        out: list[dict[str, Any]] = []
        for what, p in (
            ("objects (finished, by age)", self.objects_finished),
            ("objects (failed/dead, by age)", self.objects_failed),
            ("objects (free space)", self.objects_free_space),
            ("report files", self.reports),
        ):
            out.append({"what": what, "studies": p.studies, "rows": p.files, "bytes": p.bytes})
        out.append({"what": "audit events", "studies": 0, "rows": self.audit_events, "bytes": 0})
        out.append({"what": "associations", "studies": 0, "rows": self.associations, "bytes": 0})
        return out


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


class Retention:
    """One retention run: :meth:`run` (periodic job, and ``pacs-ai retention run``)."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        clock: Callable[[], dt.datetime] = utcnow,
        free_bytes: Callable[[], int] | None = None,
    ) -> None:
        self._engine = engine
        self._cfg = settings.retention
        self._spool_root = settings.storage.path.resolve()
        self._reports_root = settings.reports.path.resolve()
        self._clock = clock
        self._free_bytes = free_bytes or self._statvfs_free
        self._seen: set[int] = set()  # studies whose objects this run purged
        # storage.backend = "s3": objects are deleted from the bucket too, a study only once
        # every instance of it is uploaded, and local copies go local_keep_seconds after
        # their upload.
        self._storage = settings.storage
        self._store: ObjectStore | None = (
            open_store(settings.storage) if settings.storage.backend == "s3" else None
        )

    def _statvfs_free(self) -> int:
        path = self._spool_root
        while not path.exists() and path != path.parent:
            path = path.parent  # no spool yet (nothing received): its file system
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def _in(self, root: Path, relpath: str) -> Path | None:
        p = (root / relpath).resolve()
        return p if p.is_relative_to(root) else None

    # --- the run ---------------------------------------------------------------------------

    def run(self, dry_run: bool = False) -> RetentionReport:
        report = RetentionReport(dry_run=dry_run)
        self._seen = set()
        report.free_bytes_before = self._free_bytes()
        now = self._clock()
        cfg = self._cfg
        for condition, days, purged, reason in (
            (finished_condition(), cfg.objects_days, report.objects_finished, "finished"),
            (failed_condition(), cfg.failed_objects_days, report.objects_failed, "failed"),
        ):
            cutoff = now - dt.timedelta(days=days)
            aged = and_(condition, Study.state_changed_at <= cutoff)
            for sid in self._candidates(aged):
                self._purge_objects(sid, aged, reason, purged, dry_run)
        self._free_space(report, dry_run)
        keep = self._storage.local_keep_seconds
        if self._store is not None and keep is not None and not dry_run:
            evicted = evict_uploaded(
                self._engine, self._spool_root, now - dt.timedelta(seconds=keep)
            )
            if evicted:
                log.info("retention: %d uploaded local copies deleted", evicted)
        self._purge_reports(now - dt.timedelta(days=cfg.reports_days), report, dry_run)
        self._purge_audit(now - dt.timedelta(days=cfg.audit_days), report, dry_run)
        if report.bytes or report.audit_events or report.associations:
            log.info(
                "retention%s: %d studies' objects, %d report files, %d bytes, "
                "%d audit events, %d associations",
                " (dry run)" if dry_run else "",
                report.objects_finished.studies
                + report.objects_failed.studies
                + report.objects_free_space.studies,
                report.reports.files,
                report.bytes,
                report.audit_events,
                report.associations,
            )
        return report

    def _uploaded(self) -> ColumnElement[bool]:
        """With an object store: every live instance of the study is uploaded (a purge
        before that would leave the upload's object behind)."""
        if self._store is None:
            return true()
        return ~exists().where(
            Instance.study_id == Study.id,
            Instance.purged_at.is_(None),
            Instance.uploaded_at.is_(None),
        )

    def _candidates(self, condition: ColumnElement[bool]) -> list[int]:
        """Study ids matching ``condition`` that still have objects, oldest finished first."""
        with self._engine.connect() as conn:
            return list(
                conn.scalars(
                    select(Study.id)
                    .where(condition, self._uploaded(), _has_live_objects())
                    .order_by(Study.state_changed_at, Study.id)
                )
            )

    def _free_space(self, report: RetentionReport, dry_run: bool) -> None:
        target = self._cfg.min_free_mb * 1024 * 1024
        free = self._free_bytes()
        if target and free + (report.bytes if dry_run else 0) < target:
            condition = finished_condition()
            for sid in self._candidates(condition):
                if sid in self._seen:
                    continue
                self._purge_objects(
                    sid, condition, "free_space", report.objects_free_space, dry_run
                )
                freed_in_dry_run = report.bytes if dry_run else 0
                if self._free_bytes() + freed_in_dry_run >= target:
                    break
        report.free_bytes_after = self._free_bytes()

    # --- received objects ------------------------------------------------------------------

    def _purge_objects(
        self,
        study_id: int,
        condition: ColumnElement[bool],
        reason: str,
        purged: Purged,
        dry_run: bool,
    ) -> None:
        now = self._clock()
        with self._engine.begin() as conn:
            # Re-check inside the transaction: an instance that arrived since the candidate
            # query made the study "receiving" again, and then nothing here matches.
            where = (Study.id == study_id, condition, self._uploaded())
            if dry_run:
                still = conn.scalar(select(Study.id).where(*where))
                rows = conn.execute(
                    select(Instance.id, Instance.path, Instance.sha256).where(
                        Instance.study_id == study_id, Instance.purged_at.is_(None)
                    )
                ).all()
            else:
                still = conn.scalar(
                    update(Study).where(*where).values(purged_at=now).returning(Study.id)
                )
                rows = (
                    conn.execute(
                        update(Instance)
                        .where(Instance.study_id == study_id, Instance.purged_at.is_(None))
                        # Its object goes too: an instance received again is uploaded again.
                        .values(purged_at=now, uploaded_at=None)
                        .returning(Instance.id, Instance.path, Instance.sha256)
                    ).all()
                    if still is not None
                    else []
                )
            if still is None or not rows:
                return
            paths = [p for p in (self._in(self._spool_root, r.path) for r in rows) if p]
            nbytes = sum(_file_size(p) for p in paths)
            if not dry_run:
                # Rows are marked (and locked) first; the files go before the commit, so a
                # crash here leaves rows unmarked and the next run finishes the job. Objects
                # in the bucket go first: a store that fails rolls everything back.
                if self._store is not None:
                    self._delete_objects(conn, {r.sha256 for r in rows})
                for p in paths:
                    _unlink(p)
                write_audit(
                    conn,
                    ACTOR,
                    "objects_purged",
                    "ok",
                    "study",
                    study_id,
                    {"instances": len(rows), "bytes": nbytes, "reason": reason},
                )
        purged.add(len(rows), nbytes)
        self._seen.add(study_id)

    def _delete_objects(self, conn: Connection, shas: set[str]) -> None:
        """Delete the objects of ``shas`` no live instance row still references."""
        assert self._store is not None
        for sha in sorted(shas):
            others = conn.scalar(
                select(func.count())
                .select_from(Instance)
                .where(Instance.sha256 == sha, Instance.purged_at.is_(None))
            )
            if not others:
                self._store.delete(sha)

    # --- report files ----------------------------------------------------------------------

    def _purge_reports(self, cutoff: dt.datetime, report: RetentionReport, dry_run: bool) -> None:
        undelivered = exists().where(
            Delivery.report_id == Report.id, Delivery.state != DeliveryState.DELIVERED
        )
        terminal = exists().where(Study.id == Report.study_id, Study.state.in_(_TERMINAL))
        due = and_(Report.purged_at.is_(None), Report.created_at <= cutoff, ~undelivered, terminal)
        if self._store is not None:  # the object goes too, so only once it is there
            due = and_(due, Report.uploaded_at.is_not(None))
        with self._engine.connect() as conn:
            studies = list(conn.scalars(select(Report.study_id).where(due).distinct()))
        for study_id in studies:
            now = self._clock()
            with self._engine.begin() as conn:
                where = (Report.study_id == study_id, due)
                if dry_run:
                    rows = conn.execute(select(Report.id, Report.path).where(*where)).all()
                else:
                    rows = conn.execute(
                        update(Report)
                        .where(*where)
                        .values(purged_at=now)
                        .returning(Report.id, Report.path)
                    ).all()
                if not rows:
                    continue
                paths = [p for p in (self._in(self._reports_root, r.path) for r in rows) if p]
                # A summary image's PNG (reports.objects "png") sits beside it with its stem.
                paths += [p.with_suffix(".png") for p in paths if p.with_suffix(".png").exists()]
                nbytes = sum(_file_size(p) for p in paths)
                if not dry_run:
                    if isinstance(self._store, S3Store):  # first: a failure rolls back
                        for r in rows:
                            self._store.delete_named(report_key(r.path))
                    for p in paths:
                        _unlink(p)
                    for folder in {p.parent for p in paths}:
                        with contextlib.suppress(OSError):
                            folder.rmdir()  # only if now empty
                    write_audit(
                        conn,
                        ACTOR,
                        "reports_purged",
                        "ok",
                        "study",
                        study_id,
                        {"reports": len(rows), "bytes": nbytes},
                    )
            report.reports.add(len(rows), nbytes)

    # --- audit rows ------------------------------------------------------------------------

    def _purge_audit(self, cutoff: dt.datetime, report: RetentionReport, dry_run: bool) -> None:
        in_use = exists().where(
            Instance.association_id == Association.id, Instance.purged_at.is_(None)
        )
        # Never an open association (ended_at is null): its instances may be on their way.
        old_assoc = and_(Association.ended_at.is_not(None), Association.ended_at < cutoff, ~in_use)
        with self._engine.begin() as conn:
            n_events = conn.scalar(
                select(func.count()).select_from(AuditEvent).where(AuditEvent.at < cutoff)
            )
            assoc_ids = list(conn.scalars(select(Association.id).where(old_assoc)))
            report.audit_events, report.associations = int(n_events or 0), len(assoc_ids)
            if dry_run or not (n_events or assoc_ids):
                return
            conn.execute(delete(AuditEvent).where(AuditEvent.at < cutoff))
            for chunk in _chunks(assoc_ids):
                # Purged instances forget which association brought them; the rest of their
                # history stays.
                conn.execute(
                    update(Instance)
                    .where(Instance.association_id.in_(chunk))
                    .values(association_id=None)
                )
                conn.execute(
                    update(Series)
                    .where(Series.last_association_id.in_(chunk))
                    .values(last_association_id=None)
                )
                conn.execute(delete(Association).where(Association.id.in_(chunk)))
            write_audit(
                conn,
                ACTOR,
                "audit_purged",
                "ok",
                detail={
                    "audit_events": report.audit_events,
                    "associations": report.associations,
                    "before": cutoff.isoformat(timespec="seconds"),
                },
            )


def run_retention(engine: Engine, settings: Settings, dry_run: bool = False) -> RetentionReport:
    return Retention(engine, settings).run(dry_run=dry_run)
