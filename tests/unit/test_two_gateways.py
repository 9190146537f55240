"""Two gateways (``service.node_name`` "gw-a" and "gw-b"), each with its own spool, on one
database: each uploader takes and its buffer guard counts only its own rows (plus rows
recorded before names were), and each start-up recovery neither closes the other's open
associations nor audits the other's files as missing."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, insert, select

from pacs_ai.config import Settings
from pacs_ai.db.models import Association, AuditEvent, Instance
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.errors import OutOfResources
from pacs_ai.ingest.recorder import AssociationCache, IngestRecorder, RecordOutcome
from pacs_ai.ingest.recovery import recover
from pacs_ai.ingest.spool import Spool, StoredFile, part10_header
from pacs_ai.ingest.validation import InstanceHeader
from pacs_ai.storage.objects import LocalStore
from pacs_ai.storage.uploader import Uploader, evict_uploaded, upload_backlog
from tests.conftest import make_settings

MB = 1024 * 1024
TS = "1.2.840.10008.1.2.1"


def _header(sop: str) -> InstanceHeader:
    return InstanceHeader(
        "1.2.9", "1.2.9.1", sop, "1.2.840.10008.5.1.4.1.1.1", "DX", "CHEST", 1, None, 1,
        "P1", "Doe^J", "A1", "20260101", None,
    )  # fmt: skip


def _place(spool: Spool, content: bytes) -> StoredFile:
    pending = spool.begin(part10_header("1.2", "1.2.3", TS, "X"))
    pending.write(content)
    stored = pending.place()
    pending.make_durable()
    return stored


@dataclass
class _Gateway:
    name: str
    spool: Spool
    recorder: IngestRecorder
    settings: Settings
    assoc: int


@dataclass
class _Cluster:
    engine: Engine
    a: _Gateway
    b: _Gateway
    a_only: StoredFile  # received by A only
    both: StoredFile  # the same instance sent to both: A's row, B's duplicate
    b_only: StoredFile  # received by B only (recorded as 2 MiB: above B's watermark)
    legacy: StoredFile  # a row from before gateway names (in A's spool)
    legacy_assoc: int


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[_Cluster]:
    engine = make_engine(make_settings(tmp_path, db_url).database)
    upgrade(engine)
    gws = []
    for name in ("gw-a", "gw-b"):
        settings = make_settings(
            tmp_path / name,
            db_url,
            service={"node_name": name},
            storage={"path": str(tmp_path / name / "spool"), "local_buffer_high_watermark_mb": 1},
        )
        spool = Spool(settings.storage.path, 0)
        spool.prepare()
        rec = IngestRecorder(engine, spool_root=spool.root, gateway=name)
        assoc = rec.open_association("127.0.0.1", 1000, False, "MOD", "PACS_AI", True)
        gws.append(_Gateway(name, spool, rec, settings, assoc))
    a, b = gws

    def record(gw: _Gateway, sop: str, stored: StoredFile) -> RecordOutcome:
        return gw.recorder.record_instance(
            gw.assoc, "MOD", _header(sop), stored, TS, AssociationCache()
        )

    a_only = _place(a.spool, b"received by A")
    both = _place(a.spool, b"sent to both")
    b_only = _place(b.spool, b"received by B")
    legacy = _place(a.spool, b"recorded before gateway names")
    assert record(a, "1.2.9.1.1", a_only) is RecordOutcome.NEW
    assert record(a, "1.2.9.1.2", both) is RecordOutcome.NEW
    assert record(b, "1.2.9.1.3", dataclasses.replace(b_only, size=2 * MB)) is RecordOutcome.NEW
    assert record(b, "1.2.9.1.2", _place(b.spool, b"sent to both")) is RecordOutcome.DUPLICATE
    # A row and an open association from before the migration (gateway null).
    IngestRecorder(engine).record_instance(
        a.assoc, "MOD", _header("1.2.9.1.4"), legacy, TS, AssociationCache()
    )
    with engine.begin() as c:
        legacy_assoc = c.execute(
            insert(Association).values(peer_host="127.0.0.1", peer_port=1).returning(Association.id)
        ).scalar_one()
    yield _Cluster(engine, a, b, a_only, both, b_only, legacy, legacy_assoc)
    engine.dispose()


def _gateway_of(engine: Engine) -> dict[str, str | None]:
    with engine.connect() as c:
        return {sha: gw for sha, gw in c.execute(select(Instance.sha256, Instance.gateway))}


def _uploaded(engine: Engine) -> set[str]:
    with engine.connect() as c:
        return set(c.scalars(select(Instance.sha256).where(Instance.uploaded_at.is_not(None))))


def test_rows_name_their_gateway(cluster: _Cluster) -> None:
    k = cluster
    assert _gateway_of(k.engine) == {
        k.a_only.sha256: "gw-a",
        k.both.sha256: "gw-a",  # B's copy was a duplicate: no row of its own
        k.b_only.sha256: "gw-b",
        k.legacy.sha256: None,
    }
    with k.engine.connect() as c:
        assocs = {i: g for i, g in c.execute(select(Association.id, Association.gateway))}
    assert assocs == {k.a.assoc: "gw-a", k.b.assoc: "gw-b", k.legacy_assoc: None}


def test_each_uploader_takes_and_counts_only_its_own_rows(
    cluster: _Cluster, tmp_path: Path
) -> None:
    k = cluster
    bucket = LocalStore(tmp_path / "bucket")
    up_a = Uploader(k.engine, k.a.settings, bucket)
    up_b = Uploader(k.engine, k.b.settings, bucket)
    try:
        small = k.a_only.size + k.both.size + k.legacy.size
        assert upload_backlog(k.engine, "gw-a").bytes == small
        assert upload_backlog(k.engine, "gw-b").count == 2  # its own and the legacy row
        assert upload_backlog(k.engine).count == 4  # /metrics: all gateways
        # The guard: B's 2 MiB are above the 1 MB watermark; A's few bytes are not.
        assert up_a.refresh().count == 3
        up_a.check_buffer()
        up_b.refresh()
        with pytest.raises(OutOfResources):
            up_b.check_buffer()

        assert up_a.run_once() == 3  # no attempt at B's row: its file is not on A's disk
        assert up_a.failures == 0 and up_a._skip == {}
        assert _uploaded(k.engine) == {k.a_only.sha256, k.both.sha256, k.legacy.sha256}
        assert not bucket.exists(k.b_only.sha256)
        assert up_a.refresh().count == 0
        assert upload_backlog(k.engine, "gw-b").count == 1

        assert up_b.run_once() == 1
        assert up_b._skip == {}
        assert bucket.exists(k.b_only.sha256)
        assert upload_backlog(k.engine).count == 0
        assert up_b.refresh().bytes == 0
        up_b.check_buffer()
    finally:
        up_a.stop()
        up_b.stop()

    # B's copy of the instance A recorded has the same content-named path: eviction of
    # uploaded copies removes it from B's spool too (no orphan left there).
    dup = k.b.spool.resolve(k.both.relpath)
    assert dup.exists()
    far = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    assert evict_uploaded(k.engine, k.b.spool.root, far) == 2  # B's row and the duplicate
    assert not dup.exists() and not k.b.spool.resolve(k.b_only.relpath).exists()
    assert k.a.spool.resolve(k.a_only.relpath).exists()  # A's spool untouched


def test_recovery_touches_only_its_own_gateway(cluster: _Cluster) -> None:
    k = cluster
    report = recover(k.a.spool, k.engine, "gw-a")
    # B's row has no file on A's disk but is not A's: not audited; B's association is live.
    assert (report.missing_files, report.associations_closed) == (0, 2)  # A's and the legacy
    assert report.orphans_quarantined == 0
    with k.engine.connect() as c:
        ended = {i: r for i, r in c.execute(select(Association.id, Association.end_reason))}
        assert ended == {k.a.assoc: "interrupted", k.b.assoc: None, k.legacy_assoc: "interrupted"}
        assert "instance_file_missing" not in set(c.scalars(select(AuditEvent.action)))

    # B's recovery: the duplicate in its spool has a row (A's, same path): not quarantined.
    # The legacy row's file is on A's disk only: B cannot tell, and audits it.
    report = recover(k.b.spool, k.engine, "gw-b")
    assert report == type(report)(0, 0, 1, 1)
    assert k.b.spool.resolve(k.both.relpath).exists()
    with k.engine.connect() as c:
        assert c.scalar(select(Association.end_reason).where(Association.id == k.b.assoc)) == (
            "interrupted"
        )
        missing = list(
            c.scalars(
                select(AuditEvent.object_id).where(AuditEvent.action == "instance_file_missing")
            )
        )
        legacy_id = c.scalar(select(Instance.id).where(Instance.sha256 == k.legacy.sha256))
    assert missing == [legacy_id]
