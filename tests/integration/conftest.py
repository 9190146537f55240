from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.config import StorageSettings
from pacs_ai.service import Service
from pacs_ai.storage.objects import S3Store
from tests.conftest import make_settings, prepared_database
from tests.integration.rgw import RgwCluster

ServiceFactory = Callable[..., Service]


@pytest.fixture
def start_service(tmp_path: Path, sqlite_url: str) -> Iterator[ServiceFactory]:
    """Start pacs-ai in this process on a free loopback port; stopped after the test."""
    started: list[Service] = []

    def start(db_url: str | None = None, **sections: dict[str, Any]) -> Service:
        settings = make_settings(tmp_path, db_url or sqlite_url, **sections)
        prepared_database(settings)
        svc = Service(settings)
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()


@pytest.fixture(scope="session")
def rgw_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RgwCluster]:
    """A real S3 server (single-node Ceph + RGW, tests/integration/rgw.py), started once per
    test session (about 15 s here) and torn down at its end."""
    cluster = RgwCluster(tmp_path_factory.mktemp("rgw"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def rgw(rgw_cluster: RgwCluster, monkeypatch: pytest.MonkeyPatch) -> RgwCluster:
    """The session's RGW, running (a test may have killed it), with a fresh bucket and its
    credentials in the environment."""
    if not rgw_cluster.rgw_running():
        rgw_cluster.start_rgw()
    for name, value in rgw_cluster.client_env().items():
        monkeypatch.setenv(name, value)
    rgw_cluster.bucket = f"t-{uuid.uuid4().hex[:20]}"
    S3Store(rgw_storage(rgw_cluster)).ensure_bucket()
    return rgw_cluster


def rgw_storage(rgw: RgwCluster, **extra: Any) -> StorageSettings:
    return StorageSettings(
        backend="s3",
        s3_endpoint=rgw.endpoint,
        s3_bucket=rgw.bucket,
        s3_region=rgw.region,
        s3_timeout_seconds=3.0,
        **extra,
    )
