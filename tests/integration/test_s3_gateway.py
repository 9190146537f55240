"""The gateway with ``storage.backend = "s3"`` against a real S3 server (Ceph RGW): dcmtk's
storescu sends, the spool stays the write-ahead buffer, the uploader puts every instance
under its sha256 key; the gateway survives RGW going away and catches up when it returns;
a full local buffer answers 0xA700; retention deletes the objects."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from sqlalchemy import select, update

from pacs_ai.db.models import Instance, Report, Study, StudyState
from pacs_ai.service import Service
from pacs_ai.storage.objects import S3Store
from pacs_ai.storage.reports import report_reader
from pacs_ai.storage.retention import Retention
from pacs_ai.storage.uploader import upload_backlog, upload_lag_alert
from pacs_ai.web.metrics import make_registry
from tests.conftest import SCU_AE, ct_datasets, make_settings, wait_for, write_all
from tests.integration.conftest import ServiceFactory, rgw_storage
from tests.integration.rawpeer import EXPLICIT_LE, RawPeer, Rejected, encode_dataset
from tests.integration.rgw import RgwCluster
from tests.integration.test_e2e import storescu
from tests.integration.test_ingest import CT, _raw


def _s3(rgw: RgwCluster, **extra: Any) -> dict[str, Any]:
    storage = rgw_storage(rgw, upload_poll_seconds=0.1, upload_max_backoff_seconds=0.5, **extra)
    return storage.model_dump(exclude={"path", "min_free_mb", "s3_cache_path"})


def _rows(svc: Service, pending: bool = False) -> list[Any]:
    q = select(Instance.sha256, Instance.path, Instance.size_bytes, Instance.uploaded_at)
    if pending:
        q = q.where(Instance.uploaded_at.is_(None))
    with svc.engine.connect() as c:
        return list(c.execute(q.order_by(Instance.id)))


def _all_uploaded(svc: Service, n: int) -> bool:
    rows = _rows(svc)
    return len(rows) == n and all(r.uploaded_at is not None for r in rows)


def _assert_in_bucket(svc: Service, store: S3Store, tmp_path: Path) -> None:
    for i, r in enumerate(_rows(svc)):
        out = tmp_path / "check" / f"{i}.dcm"
        store.fetch(r.sha256, out)  # verified against the key on the way
        assert out.read_bytes() == (svc.spool.root / r.path).read_bytes()


def test_storescu_to_s3_every_instance_under_its_sha256(
    rgw: RgwCluster,
    start_service: ServiceFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    db_url: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    svc = start_service(db_url, storage=_s3(rgw))
    files = write_all(ct_datasets(8), tmp_path / "in")
    storescu(svc, files)
    wait_for(lambda: _all_uploaded(svc, 8), timeout=30, what="8 instances uploaded")
    store = S3Store(rgw_storage(rgw))
    _assert_in_bucket(svc, store, tmp_path)
    keys = {o["Key"] for o in store._client.list_objects_v2(Bucket=rgw.bucket)["Contents"]}
    assert keys == {r.sha256 for r in _rows(svc)}
    wait_for(lambda: svc.uploader is not None and svc.uploader.backlog.count == 0, timeout=5)
    assert upload_backlog(svc.engine).count == 0
    # Credentials come from the environment and never reach a log line (boto's included).
    assert caplog.records
    assert rgw.secret_key not in caplog.text and rgw.access_key not in caplog.text


def test_rgw_killed_during_ingest_then_back_nothing_lost(
    rgw: RgwCluster, start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(storage=_s3(rgw, upload_lag_alert_seconds=0.5))
    assert svc.uploader is not None
    first, second = ct_datasets(4, seed=1), ct_datasets(6, seed=2)
    storescu(svc, write_all(first, tmp_path / "a"))
    wait_for(lambda: _all_uploaded(svc, 4), timeout=30, what="first 4 uploaded")

    rgw.stop_rgw()
    # The store is gone: C-STORE still succeeds into the local buffer (storescu checks 0).
    storescu(svc, write_all(second, tmp_path / "b"))
    wait_for(lambda: svc.uploader.backlog.count == 6, timeout=10, what="backlog of 6")
    lag1 = upload_backlog(svc.engine).lag_seconds(dt.datetime.now(dt.UTC))
    wait_for(lambda: svc.uploader.failures >= 2, timeout=10, what="failed upload rounds")
    lag2 = upload_backlog(svc.engine).lag_seconds(dt.datetime.now(dt.UTC))
    assert lag2 > lag1 > 0  # the lag grows while the store is away
    assert sum(r.uploaded_at is None for r in _rows(svc)) == 6
    # /metrics and the console's alert show it.
    wait_for(lambda: _metric(svc, "pacs_ai_upload_lag_seconds") > 0.5, timeout=10)
    assert _metric(svc, "pacs_ai_upload_pending_instances") == 6
    assert _metric(svc, "pacs_ai_upload_pending_bytes") == sum(
        r.size_bytes for r in _rows(svc, pending=True)
    )
    assert _metric(svc, "pacs_ai_upload_lag_alert") == 1
    alert = upload_lag_alert(svc.settings, svc.engine)
    assert alert is not None and "6 instances" in alert

    rgw.start_rgw()
    wait_for(lambda: _all_uploaded(svc, 10), timeout=60, what="everything uploaded")
    _assert_in_bucket(svc, S3Store(rgw_storage(rgw)), tmp_path)
    wait_for(lambda: svc.uploader.backlog.count == 0, timeout=5)
    assert _metric(svc, "pacs_ai_upload_pending_instances") == 0
    assert _metric(svc, "pacs_ai_upload_lag_alert") == 0
    assert upload_lag_alert(svc.settings, svc.engine) is None


def _metric(svc: Service, name: str) -> float:
    text = generate_latest(make_registry(svc.settings, svc.engine)).decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_local_buffer_over_watermark_answers_out_of_resources(
    rgw: RgwCluster, start_service: ServiceFactory
) -> None:
    svc = start_service(storage=_s3(rgw, local_buffer_high_watermark_mb=1))
    assert svc.uploader is not None
    rgw.stop_rgw()
    raw, cx = _raw(svc)
    # 128x128 CT slices of about 33 kB: 1 MB of backlog takes ~32 of them.
    series = ct_datasets(60, size=128, seed=3)
    statuses = []
    for ds in series:
        statuses.append(raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds)))
        if statuses[-1] != 0:
            break
        if svc.uploader.backlog.bytes <= 1024 * 1024 and upload_backlog(svc.engine).bytes > (
            1024 * 1024
        ):
            # Over the mark in the database: wait until the guard's count has seen it.
            wait_for(lambda: svc.uploader.backlog.bytes > 1024 * 1024, timeout=5)
    assert statuses[-1] == 0xA700
    assert set(statuses[:-1]) == {0}
    stored = len(statuses) - 1
    assert len(_rows(svc)) == stored  # the refused one was not recorded
    raw.release()
    # While the buffer is full, as with a full disk: new associations are rejected (2,3,2).
    assert RawPeer("127.0.0.1", svc.server.port).associate(  # type: ignore[union-attr]
        SCU_AE, contexts=[(CT, [EXPLICIT_LE])]
    ) == Rejected(2, 3, 2)

    rgw.start_rgw()
    wait_for(lambda: _all_uploaded(svc, stored), timeout=60, what="the backlog uploaded")
    wait_for(lambda: svc.uploader.backlog.bytes == 0, timeout=5)
    raw, cx = _raw(svc)
    ds = series[stored]
    assert raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds)) == 0
    raw.release()


def test_retention_deletes_uploaded_objects_and_local_copies(
    rgw: RgwCluster, start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(
        storage=_s3(rgw, local_keep_seconds=0),
        retention={"objects_days": 0, "failed_objects_days": 0, "min_free_mb": 0},
    )
    studies = [ct_datasets(3, seed=10), ct_datasets(2, seed=11)]
    for i, series in enumerate(studies):
        storescu(svc, write_all(series, tmp_path / f"s{i}"))
    wait_for(lambda: _all_uploaded(svc, 5), timeout=30, what="5 uploaded")
    store = S3Store(rgw_storage(rgw))
    first_uid = studies[0][0].StudyInstanceUID
    with svc.engine.begin() as c:  # the first study is finished (reported, nothing to deliver)
        c.execute(
            update(Study)
            .where(Study.study_uid == first_uid)
            .values(
                state=StudyState.NOT_APPLICABLE,
                state_changed_at=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
            )
        )
    Retention(svc.engine, svc.settings).run()
    with svc.engine.connect() as c:
        rows = c.execute(
            select(Instance.sha256, Instance.path, Instance.purged_at, Study.study_uid).join(
                Study, Study.id == Instance.study_id
            )
        ).all()
    purged = [r for r in rows if r.study_uid == first_uid]
    kept = [r for r in rows if r.study_uid != first_uid]
    assert len(purged) == 3 and all(r.purged_at is not None for r in purged)
    assert all(not store.exists(r.sha256) for r in purged)
    assert all(r.purged_at is None and store.exists(r.sha256) for r in kept)
    # local_keep_seconds = 0: the other study's local copies went (the bucket has them).
    assert not any((svc.spool.root / r.path).exists() for r in rows)
    # The purged study sent again: stored locally, uploaded again.
    storescu(svc, write_all(studies[0], tmp_path / "again"))
    wait_for(lambda: _all_uploaded(svc, 5), timeout=30, what="the re-sent study uploaded")
    assert all(store.exists(r.sha256) for r in purged)


def test_retention_waits_for_the_upload(
    rgw: RgwCluster, start_service: ServiceFactory, tmp_path: Path
) -> None:
    """A finished study whose instances are not uploaded yet is not purged (its objects
    would be orphaned by a later upload); it goes once they are."""
    svc = start_service(
        storage=_s3(rgw),
        retention={"objects_days": 0, "failed_objects_days": 0, "min_free_mb": 0},
    )
    rgw.stop_rgw()
    series = ct_datasets(2, seed=20)
    storescu(svc, write_all(series, tmp_path / "s"))
    with svc.engine.begin() as c:
        c.execute(
            update(Study).values(
                state=StudyState.NOT_APPLICABLE,
                state_changed_at=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
            )
        )
    assert Retention(svc.engine, svc.settings).run().objects_finished.files == 0
    assert all(r.uploaded_at is None for r in _rows(svc))
    rgw.start_rgw()
    wait_for(lambda: _all_uploaded(svc, 2), timeout=60, what="uploaded")
    assert Retention(svc.engine, svc.settings).run().objects_finished.files == 2
    store = S3Store(rgw_storage(rgw))
    assert all(not store.exists(r.sha256) for r in _rows(svc))


@pytest.mark.slow
def test_a_worker_on_another_host_scores_from_the_bucket(
    rgw: RgwCluster, start_service: ServiceFactory, tmp_path: Path
) -> None:
    """Multi-host: the gateway receives (no pipeline); a worker with its own, empty spool and
    the same database and bucket scores the study from the object store through its cache."""
    import numpy as np

    from pacs_ai.training import dicomwriter as dw
    from pacs_ai.training.phantoms import cxr_phantom

    gateway = start_service(storage=_s3(rgw))
    img = cxr_phantom("covid", np.random.default_rng(5), 512)
    dx = dw.xray_image(200 + img * 3500, modality="DX")
    storescu(gateway, write_all([dx], tmp_path / "dx"))
    wait_for(lambda: _all_uploaded(gateway, 1), timeout=30, what="uploaded")

    other_host = tmp_path / "worker-host"
    storage = _s3(rgw) | {
        "path": str(other_host / "spool"),
        "s3_cache_path": str(other_host / "cache"),
        "s3_cache_mb": 64,
    }
    settings = make_settings(
        other_host,
        str(gateway.settings.database.url),
        storage=storage,
        pipeline={"enabled": True, "poll_seconds": 0.2},
        reports={"path": str(other_host / "reports")},
    )
    worker = Service(settings, listener=False)
    worker.start()
    try:

        def state() -> StudyState | None:
            with gateway.engine.connect() as c:
                return c.scalar(select(Study.state).where(Study.study_uid == dx.StudyInstanceUID))

        wait_for(lambda: state() == StudyState.REPORTED, timeout=90, what="reported")
    finally:
        worker.stop()
    sha = _rows(gateway)[0].sha256
    assert [p.name for p in (other_host / "cache").glob("*/*") if p.is_file()] == [f"{sha}.dcm"]
    assert not (other_host / "spool" / "objects").exists() or not list(
        (other_host / "spool" / "objects").rglob("*.dcm")
    )

    # The worker's report file went to the bucket (reports/<path>) ...
    def reports() -> list[Any]:
        with gateway.engine.connect() as c:
            return list(c.execute(select(Report.path, Report.uploaded_at, Report.kind)))

    wait_for(
        lambda: reports() and all(r.uploaded_at is not None for r in reports()),
        timeout=30,
        what="reports uploaded",
    )
    rel = next(r.path for r in reports() if r.kind == "sr")
    made = (other_host / "reports" / rel).read_bytes()
    store = S3Store(rgw_storage(rgw))
    assert all(store.exists_named(f"reports/{r.path}") for r in reports())
    # ... so the gateway (no such file on its disk) reads it for a delivery or the console.
    assert not (gateway.settings.reports.path / rel).exists()
    fetched = report_reader(gateway.settings)(rel)
    assert fetched.is_relative_to(gateway.settings.storage.s3_cache_path)
    assert fetched.read_bytes() == made
    # Retention deletes the report's object with it.
    settings = gateway.settings.model_copy(
        update={"retention": gateway.settings.retention.model_copy(update={"reports_days": 0})}
    )
    assert Retention(gateway.engine, settings).run().reports.files == len(reports())
    assert not any(store.exists_named(f"reports/{r.path}") for r in reports())


def test_the_queue_survives_a_restart_and_a_put_whose_mark_was_lost(
    rgw: RgwCluster, start_service: ServiceFactory, tmp_path: Path
) -> None:
    """The rows are the queue: instances received while the store was away are uploaded by
    the next process; one already put before a crash (row not marked) is confirmed by its
    412 and content check, not uploaded twice."""
    first = start_service(storage=_s3(rgw))
    rgw.stop_rgw()
    storescu(first, write_all(ct_datasets(3, seed=30), tmp_path / "s"))
    assert [r.uploaded_at for r in _rows(first)] == [None, None, None]
    first.stop()
    rgw.start_rgw()
    store = S3Store(rgw_storage(rgw))
    crashed = _rows(first)[0]  # put, then the process died before marking the row
    assert store.put_if_absent(crashed.sha256, first.spool.root / crashed.path).value == "created"

    second = start_service(storage=_s3(rgw))  # same database and spool, a new process
    wait_for(lambda: _all_uploaded(second, 3), timeout=30, what="uploaded after restart")
    assert second.uploader is not None and second.uploader.uploaded == 3
    _assert_in_bucket(second, store, tmp_path)
