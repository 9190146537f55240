"""A real `pacs-ai serve` (pipeline on, SQLite) scores a study in its spawned scoring child
while the parent (listener, assembly, pipeline slot, outbox) never loads torch: no torch
library is mapped into the parent's address space, before or after the study is scored, and
the scoring child has it. RSS is measured, not asserted: README "Memory of the listener
process"."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_ai.delivery.scu import Outgoing, Peer, send
from tests.conftest import SCU_AE, make_settings, wait_for
from tests.integration.process import ServerProcess, write_config
from tests.integration.test_e2e import chest_dx

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc/PID/maps (Linux only)"
)


def _torch_libraries(pid: int) -> set[str]:
    """The torch shared libraries mapped into process ``pid``."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    paths = {line.split()[-1] for line in lines if len(line.split()) >= 6}
    return {p for p in paths if "/torch/lib/" in p}


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:  # state, ppid, ...
            kids.append(int(stat.parent.name))
    return kids


def _study_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT state FROM studies ORDER BY id")]


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[ServerProcess, int, Path]]:
    settings = make_settings(
        tmp_path,
        sqlite_url,
        logging={"level": "INFO"},
        pipeline={"enabled": True, "poll_seconds": 0.2},
    )
    cfg = write_config(settings, tmp_path / "config.toml")
    proc = ServerProcess(cfg, tmp_path / "server.log")
    assert proc.cli("db", "upgrade", "--config", str(cfg)).returncode == 0
    yield proc, settings.dicom.port, Path(sqlite_url.removeprefix("sqlite:///"))
    proc.stop()


def test_serve_parent_never_maps_torch(served: tuple[ServerProcess, int, Path]) -> None:
    proc, port, db = served
    proc.start(port, timeout=120)
    assert proc.proc is not None
    parent = proc.proc.pid
    wait_for(
        lambda: "database: sqlite" in proc.log_path.read_text(),
        timeout=120,
        what="start-up summary",
    )
    assert _torch_libraries(parent) == set()

    dx = chest_dx("normal", seed=5)
    peer = Peer("127.0.0.1", port, "PACS_AI", SCU_AE)
    results = send(peer, [Outgoing(dx.SOPInstanceUID, dataset=dx)])
    assert [r.status for r in results] == [0]
    wait_for(lambda: _study_states(db) == ["reported"], timeout=120, what="study reported")

    assert _torch_libraries(parent) == set()
    # The detector works: the scoring child (a spawned process) has torch mapped.
    assert any(_torch_libraries(kid) for kid in _children(parent))
