"""Retention with a controlled clock: what is purged, what never is, and what is recorded."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, insert, select, update

from pacs_ai.config import Settings
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
)
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.errors import SpoolIOError
from pacs_ai.ingest.recorder import AssociationCache, IngestRecorder, RecordOutcome
from pacs_ai.ingest.spool import StoredFile
from pacs_ai.ingest.validation import InstanceHeader
from pacs_ai.storage.retention import Retention, RetentionReport
from tests.conftest import make_settings

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


class Env:
    """A database and spool with hand-made studies in chosen states."""

    def __init__(self, tmp_path: Path, db_url: str, **retention: Any) -> None:
        retention.setdefault("min_free_mb", 0)
        self.settings: Settings = make_settings(
            tmp_path,
            db_url,
            retention=retention,
            reports={"path": str(tmp_path / "reports")},
        )
        self.engine: Engine = make_engine(self.settings.database)
        upgrade(self.engine)
        self.spool = self.settings.storage.path
        self.reports = self.settings.reports.path
        self.clock = Clock()
        self.capacity: int | None = None  # simulated disk: free = capacity - spool bytes
        self._n = 0
        with self.engine.begin() as conn:
            self.assoc = conn.execute(
                insert(Association)
                .values(peer_host="127.0.0.1", peer_port=1, calling_ae="MOD", started_at=NOW)
                .returning(Association.id)
            ).scalar_one()

    def free_bytes(self) -> int:
        assert self.capacity is not None
        used = sum(p.stat().st_size for p in self.spool.rglob("*.dcm"))
        return self.capacity - used

    def retention(self) -> Retention:
        free = self.free_bytes if self.capacity is not None else (lambda: 10**15)
        return Retention(self.engine, self.settings, clock=self.clock, free_bytes=free)

    def study(
        self,
        state: StudyState,
        finished_days_ago: float,
        sizes: tuple[int, ...] = (1000, 3000),
        deliveries: tuple[DeliveryState, ...] = (),
        report_days_ago: float | None = None,
    ) -> int:
        self._n += 1
        n = self._n
        changed = NOW - finished_days_ago * DAY
        with self.engine.begin() as conn:
            sid = conn.execute(
                insert(Study)
                .values(
                    study_uid=f"1.2.3.{n}",
                    state=state,
                    state_changed_at=changed,
                    first_received_at=changed,
                    last_received_at=changed,
                    instance_count=len(sizes),
                    patient_id="PHI-1",
                )
                .returning(Study.id)
            ).scalar_one()
            series_id = conn.execute(
                insert(Series)
                .values(study_id=sid, series_uid=f"1.2.3.{n}.1", modality="DX")
                .returning(Series.id)
            ).scalar_one()
            for i, size in enumerate(sizes):
                data = bytes([n, i]) * (size // 2)
                sha = hashlib.sha256(data).hexdigest()
                rel = f"objects/{sha[:2]}/{sha[2:4]}/{sha}.dcm"
                (self.spool / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.spool / rel).write_bytes(data)
                conn.execute(
                    insert(Instance).values(
                        study_id=sid,
                        series_id=series_id,
                        association_id=self.assoc,
                        sop_instance_uid=f"1.2.3.{n}.1.{i}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        size_bytes=size,
                        sha256=sha,
                        path=rel,
                        received_at=changed,
                    )
                )
            if deliveries or report_days_ago is not None:
                created = NOW - (report_days_ago or finished_days_ago) * DAY
                rel = f"study-{sid}/sr-{n}.dcm"
                (self.reports / rel).parent.mkdir(parents=True, exist_ok=True)
                (self.reports / rel).write_bytes(b"S" * 500)
                rid = conn.execute(
                    insert(Report)
                    .values(
                        study_id=sid,
                        study_revision=0,
                        kind="sr",
                        sop_instance_uid=f"9.9.{n}",
                        series_instance_uid=f"9.9.{n}.1",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                        path=rel,
                        created_at=created,
                    )
                    .returning(Report.id)
                ).scalar_one()
                for k, dstate in enumerate(deliveries):
                    conn.execute(
                        insert(Delivery).values(
                            report_id=rid,
                            study_id=sid,
                            destination=f"pacs{k}",
                            ae_title="PACS",
                            host="127.0.0.1",
                            port=104,
                            state=dstate,
                        )
                    )
        return int(sid)

    def files(self, sid: int) -> list[bool]:
        with self.engine.connect() as conn:
            paths = conn.scalars(
                select(Instance.path).where(Instance.study_id == sid).order_by(Instance.id)
            ).all()
        return [(self.spool / p).exists() for p in paths]

    def purged(self, sid: int) -> list[bool]:
        with self.engine.connect() as conn:
            marks = conn.scalars(
                select(Instance.purged_at).where(Instance.study_id == sid).order_by(Instance.id)
            ).all()
        return [m is not None for m in marks]

    def events(self, action: str) -> list[tuple[int | None, dict[str, Any]]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(AuditEvent.object_id, AuditEvent.detail)
                .where(AuditEvent.action == action)
                .order_by(AuditEvent.id)
            ).all()
        return [(r.object_id, json.loads(r.detail)) for r in rows]

    def snapshot(self) -> tuple[list[Any], list[str]]:
        with self.engine.connect() as conn:
            rows: list[Any] = []
            for model in (Study, Instance, Report, Delivery, AuditEvent, Association):
                rows += [tuple(r) for r in conn.execute(select(model.__table__))]
        files = sorted(str(p) for p in self.spool.rglob("*") if p.is_file())
        files += sorted(str(p) for p in self.reports.rglob("*") if p.is_file())
        return rows, files


S = StudyState
D = DeliveryState


def test_only_finished_and_delivered_studies_lose_their_objects(
    tmp_path: Path, db_url: str
) -> None:
    env = Env(tmp_path, db_url, objects_days=30, failed_objects_days=90, reports_days=30)
    done = {
        "reported_no_destination": env.study(S.REPORTED, 31),
        "delivered": env.study(S.DELIVERED, 31, deliveries=(D.DELIVERED, D.DELIVERED)),
        "not_applicable": env.study(S.NOT_APPLICABLE, 31),
    }
    kept = {
        "too_young": env.study(S.DELIVERED, 29, deliveries=(D.DELIVERED,)),
        "receiving": env.study(S.RECEIVING, 400),
        "ready": env.study(S.READY, 400),
        "processing": env.study(S.PROCESSING, 400),
        "pending_delivery": env.study(S.REPORTED, 400, deliveries=(D.DELIVERED, D.PENDING)),
        "sending": env.study(S.REPORTED, 400, deliveries=(D.SENDING,)),
        "retrying": env.study(S.REPORTED, 400, deliveries=(D.FAILED, D.DEAD)),
        "failed_young": env.study(S.FAILED, 89),
        "dead_young": env.study(S.REPORTED, 89, deliveries=(D.DEAD,)),
    }
    report = env.retention().run()

    for name, sid in done.items():
        assert (name, env.files(sid), env.purged(sid)) == (name, [False] * 2, [True] * 2)
    for name, sid in kept.items():
        assert (name, env.files(sid), env.purged(sid)) == (name, [True] * 2, [False] * 2)
    assert report.objects_finished.studies == 3
    assert report.objects_finished.files == 6
    assert report.objects_finished.bytes == 3 * 4000
    assert (report.objects_failed.studies, report.objects_free_space.studies) == (0, 0)
    with env.engine.connect() as conn:
        marked = set(conn.scalars(select(Study.id).where(Study.purged_at.is_not(None))))
        reports = set(conn.scalars(select(Report.study_id).where(Report.purged_at.is_not(None))))
    assert marked == set(done.values())
    # Report files: only the delivered one old enough; none with a delivery still open.
    assert reports == {done["delivered"]}
    assert (report.reports.files, report.reports.bytes) == (1, 500)
    env.engine.dispose()


def test_failed_and_dead_studies_are_kept_longer(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=30, failed_objects_days=90)
    failed = env.study(S.FAILED, 60)
    dead = env.study(S.REPORTED, 60, deliveries=(D.DELIVERED, D.DEAD))
    assert env.retention().run().objects_failed.studies == 0
    assert env.files(failed) == env.files(dead) == [True, True]

    env.clock.now = NOW + 31 * DAY  # 91 days after they failed
    report = env.retention().run()
    assert env.files(failed) == env.files(dead) == [False, False]
    assert (report.objects_failed.studies, report.objects_failed.bytes) == (2, 8000)
    assert [e[1]["reason"] for e in env.events("objects_purged")] == ["failed", "failed"]
    # The report of the dead delivery stays: it was never delivered.
    with env.engine.connect() as conn:
        assert conn.scalar(select(Report.purged_at).where(Report.study_id == dead)) is None
    env.engine.dispose()


def test_audit_event_per_purge_with_exact_counts_and_bytes(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=0, reports_days=0)
    a = env.study(S.DELIVERED, 1, sizes=(1234, 5678, 10), deliveries=(D.DELIVERED,))
    b = env.study(S.NOT_APPLICABLE, 2, sizes=(4096,))
    report = env.retention().run()
    assert env.events("objects_purged") == [
        (b, {"instances": 1, "bytes": 4096, "reason": "finished"}),
        (a, {"instances": 3, "bytes": 1234 + 5678 + 10, "reason": "finished"}),
    ]
    assert env.events("reports_purged") == [(a, {"reports": 1, "bytes": 500})]
    assert report.bytes == 1234 + 5678 + 10 + 4096 + 500
    assert not (env.reports / f"study-{a}").exists()  # emptied folder removed
    # A second run finds nothing left and records nothing more.
    again = env.retention().run()
    assert again.bytes == 0 and len(env.events("objects_purged")) == 2
    env.engine.dispose()


def test_dry_run_changes_nothing_and_predicts_the_real_run(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=10, reports_days=10, audit_days=100)
    env.study(S.DELIVERED, 11, deliveries=(D.DELIVERED,))
    env.study(S.FAILED, 200)
    env.study(S.RECEIVING, 200)
    with env.engine.begin() as conn:
        conn.execute(
            insert(AuditEvent).values(at=NOW - 101 * DAY, actor="x", action="old", outcome="ok")
        )
    before = env.snapshot()
    dry = env.retention().run(dry_run=True)
    assert env.snapshot() == before
    real = env.retention().run()
    assert dry.rows() == real.rows()
    assert (dry.objects_finished.studies, dry.objects_failed.studies) == (1, 1)
    assert (dry.reports.files, dry.audit_events, dry.dry_run, real.dry_run) == (1, 1, True, False)
    env.engine.dispose()


def test_quarantine_is_never_touched(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=0, min_free_mb=1)
    env.capacity = 0  # always below the target
    quarantined = env.spool / "quarantine" / ("ab" * 32 + ".dcm")
    quarantined.parent.mkdir(parents=True)
    quarantined.write_bytes(b"q" * 100)
    sid = env.study(S.DELIVERED, 5)
    env.retention().run()
    assert env.files(sid) == [False, False]
    assert quarantined.read_bytes() == b"q" * 100
    env.engine.dispose()


def test_free_space_pressure_purges_oldest_finished_first(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=30, failed_objects_days=90, min_free_mb=1)
    mib = 1024 * 1024
    unfinished = env.study(S.READY, 50, sizes=(mib,))
    failed = env.study(S.FAILED, 40, sizes=(mib,))
    pending = env.study(S.REPORTED, 30, sizes=(mib,), deliveries=(D.PENDING,))
    oldest = env.study(S.DELIVERED, 3, sizes=(mib // 2,), deliveries=(D.DELIVERED,))
    middle = env.study(S.NOT_APPLICABLE, 2, sizes=(mib // 2,))
    newest = env.study(S.REPORTED, 1, sizes=(mib // 2,))
    # 4.5 MiB stored, 0.4 MiB free, target 1 MiB: freeing the oldest (0.5 MiB) is not enough.
    env.capacity = int(4.5 * mib + 0.4 * mib)

    dry = env.retention().run(dry_run=True)
    assert (dry.objects_free_space.studies, dry.objects_free_space.bytes) == (2, mib)
    assert env.files(oldest) == [True]

    report = env.retention().run()
    assert (report.objects_free_space.studies, report.objects_free_space.bytes) == (2, mib)
    assert (env.files(oldest), env.files(middle), env.files(newest)) == ([False], [False], [True])
    assert [e[0] for e in env.events("objects_purged")] == [oldest, middle]
    assert {e[1]["reason"] for e in env.events("objects_purged")} == {"free_space"}
    assert report.free_bytes_after == int(1.4 * mib)

    # Far below the target: every finished study goes, never the unfinished, undelivered or
    # failed-but-young ones.
    env.capacity = 0
    env.retention().run()
    assert env.files(newest) == [False]
    for sid in (unfinished, failed, pending):
        assert env.files(sid) == [True]
    env.engine.dispose()


def test_report_files_go_by_their_own_age_once_delivered(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=1000, failed_objects_days=1000, reports_days=7)
    delivered = env.study(S.DELIVERED, 8, deliveries=(D.DELIVERED,))
    young = env.study(S.DELIVERED, 6, deliveries=(D.DELIVERED,))
    waiting = env.study(S.REPORTED, 30, deliveries=(D.FAILED,))
    no_destination = env.study(S.REPORTED, 9, report_days_ago=9)
    report = env.retention().run()
    assert (report.reports.studies, report.reports.files, report.reports.bytes) == (2, 2, 1000)
    with env.engine.connect() as conn:
        marks = {
            r.study_id: r.purged_at for r in conn.execute(select(Report.study_id, Report.purged_at))
        }
    assert {sid for sid, at in marks.items() if at is not None} == {delivered, no_destination}
    assert (env.reports / f"study-{young}").exists()
    assert (env.reports / f"study-{waiting}").exists()
    assert env.files(delivered) == [True, True]  # received objects have their own age
    env.engine.dispose()


def test_audit_rows_and_associations_by_age(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=0, audit_days=365)
    live = env.study(S.RECEIVING, 400)  # its instances still reference env.assoc
    old = NOW - 400 * DAY
    with env.engine.begin() as conn:
        for at in (old, NOW - 366 * DAY, NOW - 10 * DAY):
            conn.execute(insert(AuditEvent).values(at=at, actor="x", action="t", outcome="ok"))
        echo = conn.execute(
            insert(Association)
            .values(peer_host="h", peer_port=1, started_at=old, ended_at=old)
            .returning(Association.id)
        ).scalar_one()
        sender = conn.execute(
            insert(Association)
            .values(peer_host="h", peer_port=2, started_at=old, ended_at=old)
            .returning(Association.id)
        ).scalar_one()
        open_now = conn.execute(  # open for a year, nothing stored yet: never deleted
            insert(Association)
            .values(peer_host="h", peer_port=3, started_at=old)
            .returning(Association.id)
        ).scalar_one()
        conn.execute(
            update(Association)
            .where(Association.id == env.assoc)
            .values(started_at=old, ended_at=old)
        )
    done = env.study(S.NOT_APPLICABLE, 400)
    with env.engine.begin() as conn:
        conn.execute(
            update(Instance).where(Instance.study_id == done).values(association_id=sender)
        )
        conn.execute(
            update(Series).where(Series.study_id == done).values(last_association_id=sender)
        )
    report = env.retention().run()
    assert (report.audit_events, report.associations) == (2, 2)
    with env.engine.connect() as conn:
        assocs = set(conn.scalars(select(Association.id)))
        n_events = conn.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "t")
        )
        senders = set(
            conn.scalars(select(Instance.association_id).where(Instance.study_id == done))
        )
    assert assocs == {env.assoc, open_now}  # env.assoc: a study being received uses it
    assert echo not in assocs and n_events == 1 and senders == {None}
    assert env.purged(live) == [False, False]
    assert env.events("audit_purged")[0][1]["associations"] == 2
    env.engine.dispose()


def _header(sop: str) -> InstanceHeader:
    return InstanceHeader(
        study_uid="1.2.3.1",
        series_uid="1.2.3.1.1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        modality="DX",
        body_part="CHEST",
        series_number=1,
        series_description=None,
        instance_number=1,
        patient_id="PHI-1",
        patient_name="Doe^J",
        accession_number="A1",
        study_date="20260101",
        study_description=None,
    )


def _stored_again(env: Env, sid: int, index: int) -> StoredFile:
    with env.engine.connect() as conn:
        row = conn.execute(
            select(Instance.sha256, Instance.path, Instance.size_bytes)
            .where(Instance.study_id == sid)
            .order_by(Instance.id)
        ).all()[index]
    return StoredFile(row.sha256, row.size_bytes, row.path, True)


def test_same_instance_after_purge_is_stored_again_and_reopens_the_study(
    tmp_path: Path, db_url: str
) -> None:
    env = Env(tmp_path, db_url, objects_days=0)
    sid = env.study(S.DELIVERED, 1, deliveries=(D.DELIVERED,))
    rec = IngestRecorder(env.engine, env.clock, spool_root=env.spool)
    stored = _stored_again(env, sid, 0)
    # Before the purge the same bytes are a plain duplicate.
    (env.spool / stored.relpath).write_bytes(b"\x01\x00" * 500)
    outcome = rec.record_instance(
        env.assoc, "MOD", _header("1.2.3.1.1.0"), stored, "1.2.840.10008.1.2.1", AssociationCache()
    )
    assert outcome is RecordOutcome.DUPLICATE
    env.retention().run()
    assert env.files(sid) == [False, False]

    # The sender places the file again; the purged row is restored, not called a duplicate.
    (env.spool / stored.relpath).write_bytes(b"\x01\x00" * 500)
    outcome = rec.record_instance(
        env.assoc, "MOD", _header("1.2.3.1.1.0"), stored, "1.2.840.10008.1.2.1", AssociationCache()
    )
    assert outcome is RecordOutcome.LATE
    assert env.purged(sid) == [False, True]
    with env.engine.connect() as conn:
        st = conn.execute(select(Study.state, Study.revision).where(Study.id == sid)).one()
        times = conn.scalar(select(Instance.times_received).where(Instance.path == stored.relpath))
    assert (st.state, st.revision, times) == (S.RECEIVING, 1, 3)
    assert [e[1]["revision"] for e in env.events("purged_instance_restored")] == [1]
    env.engine.dispose()


def test_restore_refused_when_the_purge_deleted_the_new_file(
    tmp_path: Path, sqlite_url: str
) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=0)
    sid = env.study(S.NOT_APPLICABLE, 1)
    stored = _stored_again(env, sid, 1)
    env.retention().run()
    rec = IngestRecorder(env.engine, env.clock, spool_root=env.spool)
    # The file the arrival placed is gone (deleted by the purge under it): refused, and the
    # row stays purged, so the sender's retry stores it.
    with pytest.raises(SpoolIOError):
        rec.record_instance(
            env.assoc,
            "MOD",
            _header("1.2.3.1.1.1"),
            stored,
            "1.2.840.10008.1.2.1",
            AssociationCache(),
        )
    assert env.purged(sid) == [True, True]
    with env.engine.connect() as conn:
        assert conn.scalar(select(Study.state).where(Study.id == sid)) == S.NOT_APPLICABLE
    env.engine.dispose()


def test_study_changed_after_selection_is_not_purged(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=0)
    sid = env.study(S.DELIVERED, 1, deliveries=(D.DELIVERED,))
    retention = env.retention()
    original = retention._candidates

    def late_instance_arrives(condition: Any) -> list[int]:
        ids = original(condition)
        with env.engine.begin() as conn:  # a late instance re-opens it meanwhile
            conn.execute(update(Study).where(Study.id == sid).values(state=S.RECEIVING))
        return ids

    retention._candidates = late_instance_arrives  # type: ignore[method-assign]
    report: RetentionReport = retention.run()
    assert report.objects_finished.studies == 0
    assert env.files(sid) == [True, True] and env.purged(sid) == [False, False]
    env.engine.dispose()


def test_config_is_validated(tmp_path: Path) -> None:
    from pacs_ai.config import settings_from_dict
    from pacs_ai.errors import ConfigError

    defaults = settings_from_dict({}, base=tmp_path).retention
    assert (defaults.objects_days, defaults.failed_objects_days, defaults.reports_days) == (
        30.0,
        90.0,
        90.0,
    )
    assert (defaults.audit_days, defaults.min_free_mb, defaults.enabled) == (2190.0, 1000, True)
    for bad, key in (
        ({"objects_days": 10, "failed_objects_days": 5}, "failed_objects_days"),
        ({"objects_days": -1}, "retention.objects_days"),
        ({"interval_seconds": 0}, "retention.interval_seconds"),
        ({"min_free_mb": -5}, "retention.min_free_mb"),
        ({"keep_forever": True}, "retention.keep_forever"),
    ):
        with pytest.raises(ConfigError, match=key):
            settings_from_dict({"retention": bad}, base=tmp_path)


def test_a_summary_png_goes_with_its_report(tmp_path: Path, sqlite_url: str) -> None:
    env = Env(tmp_path, sqlite_url, objects_days=1000, failed_objects_days=1000, reports_days=7)
    sid = env.study(S.DELIVERED, 8, deliveries=(D.DELIVERED,))
    with env.engine.connect() as conn:
        rel = conn.scalar(select(Report.path).where(Report.study_id == sid))
    png = (env.reports / str(rel)).with_suffix(".png")  # as reporting.output writes it
    png.write_bytes(b"P" * 300)
    report = env.retention().run()
    assert (report.reports.files, report.reports.bytes) == (1, 800)  # one report row, two files
    assert not png.exists() and not (env.reports / str(rel)).exists()
    assert env.events("reports_purged") == [(sid, {"reports": 1, "bytes": 800})]
    env.engine.dispose()
