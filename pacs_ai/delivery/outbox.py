"""The durable outbox: report objects waiting to reach their destinations.

Every (report object, destination) pair is a ``deliveries`` row, created in the same
transaction that records the report. A run claims due rows (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so several processes never send the same row at once), sends each destination's
batch over one association, and records the status of every C-STORE-RSP:

- 0x0000 Success -> ``delivered``;
- a warning, or a failure the peer will not change its mind about (0xA9xx/0xCxxx cannot
  understand, 0x0122 SOP class not supported...) -> ``dead``: an admin must look;
- a refusal that retrying cannot change (association rejected permanently, the report's
  SOP class not accepted, the peer's TLS certificate not trusted, HTTP 4xx) -> ``dead`` at
  once, with a reason that says what to fix;
- no response (peer down, association rejected transiently or aborted, timeout, HTTP 5xx) or
  a transient refusal (0xA7xx out of resources, 0x0110 processing failure) -> ``failed``,
  retried on the ladder.

``dicomweb`` destinations are sent by STOW-RS (``delivery.stow``) into the same rows and states.

Report SOP Instance UIDs are deterministic, so a re-send after a crash between sending and
recording is the same object again, which a PACS stores once.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import Connection, Engine, and_, func, insert, or_, select, update

from pacs_ai.config import DestinationSettings, Settings
from pacs_ai.db.events import write_audit
from pacs_ai.db.models import (
    Association,
    Delivery,
    DeliveryState,
    Instance,
    Report,
    Study,
    StudyState,
    utcnow,
)
from pacs_ai.delivery.scu import Outgoing, Peer, SendResult, send
from pacs_ai.delivery.stow import stow
from pacs_ai.storage.reports import report_reader

log = logging.getLogger(__name__)

# A claim older than this is assumed to belong to a process that died mid-send.
_STALE_CLAIM = dt.timedelta(minutes=10)
_TRANSIENT_FAILURES = frozenset({0x0110, 0x0111, 0x0212})


def is_transient(result: SendResult) -> bool:
    if result.permanent:
        return False
    if result.status is None:
        return True
    return (result.status & 0xFF00) == 0xA700 or result.status in _TRANSIENT_FAILURES


@dataclass(frozen=True)
class _Due:
    id: int
    study_id: int
    destination: str
    ae_title: str
    host: str
    port: int
    attempts: int
    path: str
    sop_instance_uid: str


def destination_ssl_context(dest: DestinationSettings) -> ssl.SSLContext | None:
    if not dest.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(dest.tls_ca_file) if dest.tls_ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_cert_file and dest.tls_key_file:
        ctx.load_cert_chain(str(dest.tls_cert_file), str(dest.tls_key_file))
    return ctx


class Outbox:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._destinations = {d.name: d for d in settings.destinations}
        self._report_file = report_reader(settings)

    @property
    def reports_root(self) -> Path:
        return self._settings.reports.path

    # --- enqueue ---------------------------------------------------------------------------

    def enqueue(self, conn: Connection, study_id: int, reports: Sequence[tuple[int, str]]) -> int:
        """Create the deliveries of new report objects ``(report id, kind)`` for every
        destination that wants that kind; in the caller's transaction. Returns the count."""
        now = self._clock()
        created = 0
        for dest, ae, host, port in self._targets_for(conn, study_id):
            for report_id, kind in reports:
                if kind not in dest.objects:
                    continue
                exists = conn.scalar(
                    select(Delivery.id).where(
                        Delivery.report_id == report_id, Delivery.destination == dest.name
                    )
                )
                if exists is not None:
                    continue
                _insert_delivery(conn, report_id, study_id, dest.name, (ae, host, port), now)
                created += 1
        return created

    def _targets_for(
        self, conn: Connection, study_id: int, only: str | None = None
    ) -> list[tuple[DestinationSettings, str, str, int]]:
        """(destination, AE title, host, port) for each configured destination of a study
        (DICOMweb: no AE title; the URL's host and port)."""
        out = []
        for dest in self._settings.destinations:
            if only is not None and dest.name != only:
                continue
            if dest.kind == "dicomweb":
                assert dest.url is not None
                url = urlsplit(dest.url)
                port = url.port or (443 if url.scheme == "https" else 80)
                out.append((dest, "", url.hostname or "", port))
            elif dest.return_to_sender:
                sender = conn.execute(
                    select(Association.calling_ae, Association.peer_host)
                    .join(Instance, Instance.association_id == Association.id)
                    .where(Instance.study_id == study_id)
                    .order_by(Instance.id.desc())
                    .limit(1)
                ).first()
                if sender is None or not sender.calling_ae:
                    log.warning("study %d: no sender known for %s", study_id, dest.name)
                    continue
                assert dest.port is not None
                out.append((dest, sender.calling_ae, sender.peer_host, dest.port))
            else:
                assert dest.ae_title is not None and dest.host is not None
                assert dest.port is not None
                out.append((dest, dest.ae_title, dest.host, dest.port))
        return out

    # --- sending ---------------------------------------------------------------------------

    def run_due(self) -> int:
        """Send everything that is due; returns how many objects were attempted."""
        with self._lock:
            due = self._claim()
            if not due:
                return 0
            groups: dict[tuple[str, str, str, int], list[_Due]] = {}
            for d in due:
                groups.setdefault((d.destination, d.ae_title, d.host, d.port), []).append(d)
            for (name, ae, host, port), rows in groups.items():
                for start in range(0, len(rows), self._settings.delivery.batch_size):
                    self._send_batch(
                        name,
                        ae,
                        host,
                        port,
                        rows[start : start + self._settings.delivery.batch_size],
                    )
            return len(due)

    def _claim(self) -> list[_Due]:
        now = self._clock()
        stale = now - _STALE_CLAIM
        with self._engine.begin() as conn:
            due_filter = or_(
                and_(
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.FAILED]),
                    or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                ),
                and_(Delivery.state == DeliveryState.SENDING, Delivery.claimed_at < stale),
            )
            ids_q = select(Delivery.id).where(due_filter).order_by(Delivery.id).limit(1000)
            if conn.dialect.name == "postgresql":
                ids_q = ids_q.with_for_update(skip_locked=True)
            ids = list(conn.scalars(ids_q))
            if not ids:
                return []
            conn.execute(
                update(Delivery)
                .where(Delivery.id.in_(ids))
                .values(state=DeliveryState.SENDING, claimed_at=now)
            )
            rows = conn.execute(
                select(
                    Delivery.id,
                    Delivery.study_id,
                    Delivery.destination,
                    Delivery.ae_title,
                    Delivery.host,
                    Delivery.port,
                    Delivery.attempts,
                    Report.path,
                    Report.sop_instance_uid,
                )
                .join(Report, Report.id == Delivery.report_id)
                .where(Delivery.id.in_(ids))
                .order_by(Delivery.id)
            ).all()
        return [_Due(*r) for r in rows]

    def _peer(self, name: str, ae: str, host: str, port: int) -> Peer:
        dest = self._destinations.get(name)
        timeout = dest.timeout_seconds if dest else 30.0
        calling = (dest.calling_ae_title if dest else None) or self._settings.dicom.ae_title
        return Peer(
            host=host,
            port=port,
            called_ae=ae,
            calling_ae=calling,
            tls=destination_ssl_context(dest) if dest else None,
            acse_timeout=timeout,
            dimse_timeout=timeout,
            network_timeout=timeout,
        )

    def _send_batch(self, name: str, ae: str, host: str, port: int, rows: Sequence[_Due]) -> None:
        # The report file here, or (storage.backend = "s3") from the bucket.
        items = [Outgoing(label=str(r.id), path=self._report_file(r.path)) for r in rows]
        dest = self._destinations.get(name)
        if dest is None and not ae:  # a DICOMweb destination removed from the config
            why = f"destination {name} is no longer configured"
            self._record(rows, [SendResult(i.label, None, None, why, True) for i in items])
            return
        try:
            if dest is not None and dest.kind == "dicomweb":
                results = stow(dest, items)
            else:
                results = send(self._peer(name, ae, host, port), items)
        except Exception as exc:  # never lose the rows to an unexpected error
            log.exception("delivery to %s failed unexpectedly", name)
            results = [
                SendResult(i.label, None, None, f"error: {exc.__class__.__name__}") for i in items
            ]
        self._record(rows, results)

    def _record(self, rows: Sequence[_Due], results: Sequence[SendResult]) -> None:
        now = self._clock()
        ladder = self._settings.delivery.retry_ladder_seconds
        max_attempts = self._settings.delivery.max_attempts
        delivered_studies: set[int] = set()
        with self._engine.begin() as conn:
            for row, res in zip(rows, results, strict=True):
                attempts = row.attempts + 1
                values: dict[str, object] = {
                    "attempts": attempts,
                    "last_status": res.status,
                    "last_error": (res.error or "")[:300] or None,
                    "claimed_at": None,
                }
                if res.ok:
                    values |= {
                        "state": DeliveryState.DELIVERED,
                        "delivered_at": now,
                        "next_attempt_at": None,
                    }
                    delivered_studies.add(row.study_id)
                elif is_transient(res) and attempts < max_attempts:
                    delay = ladder[min(attempts - 1, len(ladder) - 1)]
                    values |= {
                        "state": DeliveryState.FAILED,
                        "next_attempt_at": now + dt.timedelta(seconds=delay),
                    }
                else:
                    values |= {"state": DeliveryState.DEAD, "next_attempt_at": None}
                    write_audit(
                        conn,
                        "system",
                        "delivery_dead",
                        "error",
                        "delivery",
                        row.id,
                        {
                            "destination": row.destination,
                            "status": res.status,
                            "error": res.error,
                            "attempts": attempts,
                            "permanent": res.permanent,
                        },
                    )
                conn.execute(update(Delivery).where(Delivery.id == row.id).values(**values))
                outcome = "ok" if res.ok else "error"
                status = f"0x{res.status:04X}" if res.status is not None else "none"
                log.info(
                    "delivery %d to %s: %s status=%s attempt=%d",
                    row.id,
                    row.destination,
                    outcome,
                    status,
                    attempts,
                )
            for study_id in delivered_studies:
                self._mark_study_delivered(conn, study_id, now)

    def _mark_study_delivered(self, conn: Connection, study_id: int, now: dt.datetime) -> None:
        undelivered = conn.scalar(
            select(func.count())
            .select_from(Delivery)
            .where(Delivery.study_id == study_id, Delivery.state != DeliveryState.DELIVERED)
        )
        if undelivered == 0:
            conn.execute(
                update(Study)
                .where(Study.id == study_id, Study.state == StudyState.REPORTED)
                .values(state=StudyState.DELIVERED, state_changed_at=now)
            )

    # --- admin -----------------------------------------------------------------------------

    def requeue(self, delivery_ids: Sequence[int] | None = None, actor: str = "admin") -> int:
        """Put dead (or failed) deliveries back to pending now. None = every dead one."""
        with self._engine.begin() as conn:
            stmt = update(Delivery).values(
                state=DeliveryState.PENDING, next_attempt_at=None, attempts=0, claimed_at=None
            )
            if delivery_ids is None:
                stmt = stmt.where(Delivery.state == DeliveryState.DEAD)
            else:
                stmt = stmt.where(
                    Delivery.id.in_(delivery_ids),
                    Delivery.state.in_([DeliveryState.DEAD, DeliveryState.FAILED]),
                )
            ids = list(conn.scalars(stmt.returning(Delivery.id)))
            for i in ids:
                write_audit(conn, actor, "delivery_requeued", "ok", "delivery", i)
        return len(ids)

    def redeliver(
        self,
        study_id: int,
        destination: str | None = None,
        force: bool = False,
        actor: str = "admin",
    ) -> Redelivery:
        """Queue the study's current reports (its latest reported revision) for one or every
        configured destination that wants their kind. A report already delivered there, or
        already on its way, is left alone unless ``force``; a dead one is re-queued."""
        now = self._clock()
        out = Redelivery()
        with self._engine.begin() as conn:
            latest = conn.scalar(
                select(func.max(Report.study_revision)).where(Report.study_id == study_id)
            )
            if latest is None:
                return out
            reports = conn.execute(
                select(Report.id, Report.kind)
                .where(Report.study_id == study_id, Report.study_revision == latest)
                .order_by(Report.id)
            ).all()
            for dest, ae, host, port in self._targets_for(conn, study_id, destination):
                for report_id, kind in reports:
                    if kind not in dest.objects:
                        continue
                    row = conn.execute(
                        select(Delivery.id, Delivery.state).where(
                            Delivery.report_id == report_id, Delivery.destination == dest.name
                        )
                    ).first()
                    if row is None:
                        _insert_delivery(
                            conn, report_id, study_id, dest.name, (ae, host, port), now
                        )
                        out.queued += 1
                        continue
                    resend = row.state == DeliveryState.DEAD or (
                        force and row.state in (DeliveryState.DELIVERED, DeliveryState.FAILED)
                    )
                    if not resend:
                        out.skipped += 1
                        continue
                    conn.execute(
                        update(Delivery)
                        .where(Delivery.id == row.id)
                        .values(
                            state=DeliveryState.PENDING,
                            attempts=0,
                            next_attempt_at=now,
                            claimed_at=None,
                            delivered_at=None,
                            ae_title=ae,
                            host=host,
                            port=port,
                        )
                    )
                    out.requeued += 1
            if out.queued or out.requeued:
                conn.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.state == StudyState.DELIVERED)
                    .values(state=StudyState.REPORTED, state_changed_at=now)
                )
            write_audit(
                conn,
                actor,
                "study_redelivered",
                "ok",
                "study",
                study_id,
                {
                    "destination": destination or "*",
                    "force": force,
                    "revision": latest,
                    "queued": out.queued,
                    "requeued": out.requeued,
                    "skipped": out.skipped,
                },
            )
        out.reports = len(reports)
        return out


def _insert_delivery(
    conn: Connection,
    report_id: int,
    study_id: int,
    destination: str,
    target: tuple[str, str, int],
    now: dt.datetime,
) -> None:
    """A new outbox row for one report object to one destination, due now."""
    ae, host, port = target
    conn.execute(
        insert(Delivery).values(
            report_id=report_id,
            study_id=study_id,
            destination=destination,
            ae_title=ae,
            host=host,
            port=port,
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )


@dataclass
class Redelivery:
    reports: int = 0  # report objects of the study's latest revision
    queued: int = 0  # new deliveries
    requeued: int = 0  # existing ones sent again (dead, or --force)
    skipped: int = 0  # already delivered or on their way
