"""The S3 backend against a real S3 server (Ceph RGW 16.2, tests/integration/rgw.py):
conditional writes, verified downloads, the bounded cache."""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from pacs_ai.errors import StartupError
from pacs_ai.ingest.spool import dataset_sha256, part10_header
from pacs_ai.startup import check_object_store
from pacs_ai.storage import cache as cache_module
from pacs_ai.storage.cache import ObjectCache, instance_reader
from pacs_ai.storage.objects import (
    NO_BUCKET,
    ObjectConflict,
    ObjectMissing,
    ObjectStoreUnavailable,
    PutOutcome,
    S3Store,
)
from tests.conftest import free_port, make_settings
from tests.integration.conftest import rgw_storage
from tests.integration.rgw import RgwCluster


def _part10(folder: Path, dataset: bytes, ae: str = "SCU") -> tuple[str, Path]:
    """A spool-style file: our File Meta header + ``dataset``; its key is the dataset's hash."""
    header = part10_header("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", "1.2.840.10008.1.2.1", ae)
    sha = hashlib.sha256(dataset).hexdigest()
    path = folder / f"{sha}-{ae}.dcm"
    path.write_bytes(header + dataset)
    assert dataset_sha256(path) == sha
    return sha, path


def _raw_client(rgw: RgwCluster) -> object:
    return boto3.session.Session().client(
        "s3",
        endpoint_url=rgw.endpoint,
        region_name=rgw.region,
        aws_access_key_id=rgw.access_key,
        aws_secret_access_key=rgw.secret_key,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def test_rgw_honours_if_none_match_star(rgw: RgwCluster) -> None:
    """The server itself answers 412 to a second conditional put of a key (RGW 16.2)."""
    client = _raw_client(rgw)
    client.put_object(Bucket=rgw.bucket, Key="k", Body=b"one", IfNoneMatch="*")  # type: ignore[attr-defined]
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=rgw.bucket, Key="k", Body=b"two", IfNoneMatch="*")  # type: ignore[attr-defined]
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    body = client.get_object(Bucket=rgw.bucket, Key="k")["Body"].read()  # type: ignore[attr-defined]
    assert body == b"one"


def test_put_if_absent_fetch_delete(rgw: RgwCluster, tmp_path: Path) -> None:
    store = S3Store(rgw_storage(rgw, s3_prefix="site-a/"))
    sha, path = _part10(tmp_path, b"\x08\x00\x16\x00" + b"x" * 5000)
    assert not store.exists(sha)
    assert store.put_if_absent(sha, path) is PutOutcome.CREATED
    assert store.exists(sha)
    # Again (a retry after a crash before the row was marked): 412, same content -> stored.
    assert store.put_if_absent(sha, path) is PutOutcome.EXISTED
    # The same dataset received from another AE (other File Meta): the same object.
    _, other_header = _part10(tmp_path, b"\x08\x00\x16\x00" + b"x" * 5000, ae="OTHER")
    assert store.put_if_absent(sha, other_header) is PutOutcome.EXISTED
    # What is in the bucket is our file, byte for byte, under prefix + sha256.
    raw = _raw_client(rgw).get_object(Bucket=rgw.bucket, Key=f"site-a/{sha}")  # type: ignore[attr-defined]
    assert raw["Body"].read() == path.read_bytes()
    assert raw["Metadata"] == {"dataset-sha256": sha}
    out = tmp_path / "fetched" / "x.dcm"
    store.fetch(sha, out)
    assert out.read_bytes() == path.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["x.dcm"]  # no temporary left
    store.delete(sha)
    assert not store.exists(sha)
    store.delete(sha)  # deleting twice is fine
    with pytest.raises(ObjectMissing):
        store.fetch(sha, tmp_path / "gone.dcm")
    assert not (tmp_path / "gone.dcm").exists()


def test_a_different_object_under_the_key_is_never_overwritten(
    rgw: RgwCluster, tmp_path: Path
) -> None:
    store = S3Store(rgw_storage(rgw))
    sha, path = _part10(tmp_path, b"\x08\x00\x16\x00" + b"a" * 100)
    _, impostor = _part10(tmp_path, b"\x08\x00\x16\x00" + b"b" * 100)
    # Someone else wrote other bytes under our key.
    _raw_client(rgw).put_object(Bucket=rgw.bucket, Key=sha, Body=impostor.read_bytes())  # type: ignore[attr-defined]
    with pytest.raises(ObjectConflict):
        store.put_if_absent(sha, path)
    with pytest.raises(ObjectConflict):  # a download is checked against its key too
        store.fetch(sha, tmp_path / "bad.dcm")
    assert not (tmp_path / "bad.dcm").exists()
    raw = _raw_client(rgw).get_object(Bucket=rgw.bucket, Key=sha)  # type: ignore[attr-defined]
    assert raw["Body"].read() == impostor.read_bytes()


def test_unreachable_store_is_unavailable(rgw: RgwCluster, tmp_path: Path) -> None:
    settings = rgw_storage(rgw).model_copy(
        update={"s3_endpoint": f"http://127.0.0.1:{_closed_port()}", "s3_timeout_seconds": 1.0}
    )
    sha, path = _part10(tmp_path, b"\x08\x00\x16\x00zz")
    with pytest.raises(ObjectStoreUnavailable):
        S3Store(settings).put_if_absent(sha, path)


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()


def test_cache_downloads_verifies_and_evicts_least_recently_used(
    rgw: RgwCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache_module, "_PROTECT_SECONDS", 0.0)
    store = S3Store(rgw_storage(rgw))
    files = [_part10(tmp_path, bytes([8, 0, 0x16, 0]) + bytes([i]) * 1000) for i in range(4)]
    for sha, path in files:
        store.put_if_absent(sha, path)
    size = files[0][1].stat().st_size
    cache = ObjectCache(tmp_path / "cache", max_bytes=2 * size + size // 2, store=store)
    a, b, c, d = (sha for sha, _ in files)
    pa = cache.get(a)
    assert pa.read_bytes() == files[0][1].read_bytes()
    cache.get(b)
    cache.get(a)  # a is now more recently used than b
    cache.get(c)  # over the bound: b (least recently used) goes
    assert (cache.hits, cache.misses) == (1, 3)
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*/*")) == sorted([a, c])
    assert cache.bytes == 2 * size
    # A new process indexes what is there and keeps the bound.
    again = ObjectCache(tmp_path / "cache", max_bytes=size + size // 2, store=store)
    assert again.bytes == size
    again.get(d)
    assert again.bytes == size
    assert [p.stem for p in (tmp_path / "cache").glob("*/*")] == [d]


def test_instance_reader_prefers_the_spool_then_the_bucket(rgw: RgwCluster, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "objects").mkdir(parents=True)
    sha, path = _part10(spool / "objects", b"\x08\x00\x16\x00" + b"s" * 300)
    settings = rgw_storage(rgw, s3_cache_path=tmp_path / "cache", s3_cache_mb=1).model_copy(
        update={"path": spool}
    )
    S3Store(settings).put_if_absent(sha, path)
    read = instance_reader(settings)
    rel = str(path.relative_to(spool))
    assert read(sha, rel) == path.resolve()  # this host still has it
    content = path.read_bytes()
    path.unlink()  # evicted locally (or: a worker on another host)
    cached = read(sha, rel)
    assert cached.is_relative_to(tmp_path / "cache")
    assert cached.read_bytes() == content
    with pytest.raises(ValueError):
        read(sha, "../../etc/passwd")


def test_cache_waits_for_an_object_not_uploaded_yet(rgw: RgwCluster, tmp_path: Path) -> None:
    """A worker can be a moment ahead of the gateway's uploader: it polls for the object."""
    store = S3Store(rgw_storage(rgw))
    sha, path = _part10(tmp_path, b"\x08\x00\x16\x00" + b"w" * 400)
    cache = ObjectCache(tmp_path / "cache", 1 << 20, store, wait_seconds=20)
    uploader = threading.Timer(1.0, store.put_if_absent, (sha, path))
    uploader.start()
    try:
        assert cache.get(sha).read_bytes() == path.read_bytes()
    finally:
        uploader.join()
    impatient = ObjectCache(tmp_path / "cache2", 1 << 20, store, wait_seconds=0.5)
    with pytest.raises(ObjectMissing):
        impatient.get("0" * 64)


def test_named_objects_for_report_files(rgw: RgwCluster, tmp_path: Path) -> None:
    store = S3Store(rgw_storage(rgw))
    report = tmp_path / "sr.dcm"
    report.write_bytes(b"report bytes" * 100)
    name = "reports/2026-12-02/study-1/sr-rev0-abc.dcm"
    assert store.put_named(name, report) is PutOutcome.CREATED
    assert store.put_named(name, report) is PutOutcome.EXISTED  # a retry: same bytes
    other = tmp_path / "other.dcm"
    other.write_bytes(b"something else")
    with pytest.raises(ObjectConflict):
        store.put_named(name, other)
    store.fetch_named(name, tmp_path / "out" / "sr.dcm")
    assert (tmp_path / "out" / "sr.dcm").read_bytes() == report.read_bytes()
    for bad in ("../x", "reports/../../x", "/abs", "a//b", "reports/a b"):
        with pytest.raises(ValueError):
            store.put_named(bad, report)
    store.delete_named(name)
    assert not store.exists_named(name)


def test_start_refused_without_the_bucket_warned_without_the_store(
    rgw: RgwCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = rgw_storage(rgw).model_copy(update={"s3_bucket": "no-such-bucket-here"})
    settings = make_settings(tmp_path, "sqlite://").model_copy(update={"storage": missing})
    with pytest.raises(StartupError) as refused:
        check_object_store(settings)
    assert str(refused.value) == NO_BUCKET
    away = rgw_storage(rgw).model_copy(
        update={"s3_endpoint": f"http://127.0.0.1:{free_port()}", "s3_timeout_seconds": 1.0}
    )
    with caplog.at_level(logging.WARNING, logger="pacs_ai.startup"):
        check_object_store(settings.model_copy(update={"storage": away}))
    assert [r.getMessage() for r in caplog.records if r.name == "pacs_ai.startup"] == [
        "object store not reachable at start (S3 head_bucket: EndpointConnectionError); "
        "uploads wait for it"
    ]
    check_object_store(settings.model_copy(update={"storage": rgw_storage(rgw)}))
