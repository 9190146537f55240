"""The namespace harness itself: hosts reach PostgreSQL across the bridge, a cut link is cut."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from tests.integration.netns import Network, PostgresHost


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()


def _select_one(host: object, url: str) -> int:
    code = (
        "import psycopg,sys\n"
        "try:\n"
        f"    psycopg.connect({url!r}, connect_timeout=2).execute('select 1').fetchone()\n"
        "except psycopg.OperationalError:\n"
        "    sys.exit(7)\n"
    )
    return int(host.run([sys.executable, "-c", code], timeout=30).returncode)  # type: ignore[attr-defined]


def test_postgres_across_the_bridge_and_a_cut_link(network: Network) -> None:
    db = network.host("db")
    worker = network.host("w1")
    pg = PostgresHost(db)
    try:
        url = pg.url.replace("+psycopg", "")
        with psycopg.connect(url, connect_timeout=5) as conn:
            assert conn.execute("select inet_server_addr()::text").fetchone() == (
                f"{db.address}/32",
            )
        assert _select_one(worker, url) == 0
        worker.cut()
        assert _select_one(worker, url) == 7
        worker.restore()
        deadline = time.monotonic() + 30
        while _select_one(worker, url) != 0:
            assert time.monotonic() < deadline, "the restored link never carried traffic"
    finally:
        pg.stop()
    assert pg.proc.returncode == 0
