"""`pacs-ai db backup` while `pacs-ai serve` runs, then a restore (copy into place) that the
service starts from, with every row and the audit trail as they were."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_ai.db.models import Base
from pacs_ai.delivery.scu import Outgoing, Peer, send
from tests.conftest import SCU_AE, ct_datasets, dx_dataset, make_settings, wait_for
from tests.integration.process import ServerProcess, write_config

Rows = dict[str, list[tuple[object, ...]]]


def _dump(db: Path) -> Rows:
    """Every row of every table, in id order."""
    with sqlite3.connect(db) as conn:
        return {
            t.name: conn.execute(f'SELECT * FROM "{t.name}" ORDER BY 1').fetchall()  # noqa: S608
            for t in Base.metadata.sorted_tables
        }


def _ended_associations(db: Path) -> int:
    """Associations recorded as ended (0 while any is still open or being recorded)."""
    with sqlite3.connect(db) as conn:
        total, ended = conn.execute("SELECT count(*), count(ended_at) FROM associations").fetchone()
    return int(ended) if ended == total else 0


def _study_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT state FROM studies ORDER BY id")]


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[ServerProcess, int, Path, Path]]:
    settings = make_settings(tmp_path, sqlite_url, logging={"level": "INFO"})
    cfg = write_config(settings, tmp_path / "config.toml")
    proc = ServerProcess(cfg, tmp_path / "server.log")
    assert proc.cli("db", "upgrade", "--config", str(cfg)).returncode == 0
    yield proc, settings.dicom.port, cfg, Path(sqlite_url.removeprefix("sqlite:///"))
    proc.stop()


def _send(port: int, datasets: list[object]) -> None:
    peer = Peer("127.0.0.1", port, "PACS_AI", SCU_AE)
    results = send(peer, [Outgoing(ds.SOPInstanceUID, dataset=ds) for ds in datasets])  # type: ignore[attr-defined]
    assert [r.status for r in results] == [0] * len(datasets)


def test_backup_while_serving_then_restore_and_serve(
    served: tuple[ServerProcess, int, Path, Path], tmp_path: Path
) -> None:
    proc, port, cfg, db = served
    proc.start(port)
    dx = dx_dataset(seed=3)
    ct = ct_datasets(12, size=32, seed=4)
    _send(port, [dx])
    _send(port, ct)
    wait_for(lambda: _study_states(db) == ["ready", "ready"], timeout=30, what="studies ready")
    wait_for(lambda: _ended_associations(db) == 3, timeout=30, what="associations recorded")
    live = _dump(db)
    assert len(live["instances"]) == 13
    # The start-up probe's bare connection, then our two associations.
    assert [row[1] for row in live["associations"]] == [None, SCU_AE, SCU_AE]
    assert live["audit_events"]

    backup = tmp_path / "backups" / "pacs-ai-backup.db"
    backup.parent.mkdir()
    run = proc.cli("db", "backup", str(backup), "--config", str(cfg))
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"backed up {db} to {backup} (")
    assert _dump(db) == live  # nothing was written meanwhile: the backup must equal it
    assert proc.terminate() == 0

    # Restore: the service stopped, the database and its WAL files replaced by the backup.
    for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.copyfile(backup, db)
    assert _dump(db) == live

    proc.start(port)
    wait_for(lambda: _ended_associations(db) == 4, timeout=30, what="probe recorded")
    events = json.loads(
        proc.cli("audit", "events", "--format", "json", "--config", str(cfg)).stdout
    )
    # Every restored row is there unchanged; the restart only added rows after them (its
    # start-up probe's connection).
    restarted = _dump(db)
    assert {t: rows[: len(live[t])] for t, rows in restarted.items()} == live
    assert [row[1] for row in restarted["associations"][len(live["associations"]) :]] == [None]
    assert sorted(e["id"] for e in events) == [row[0] for row in restarted["audit_events"]]
    studies = json.loads(
        proc.cli("audit", "studies", "--format", "json", "--config", str(cfg)).stdout
    )
    assert sorted(s["study_uid"] for s in studies) == sorted(
        [dx.StudyInstanceUID, ct[0].StudyInstanceUID]
    )
    timeline = proc.cli("audit", "study", ct[0].StudyInstanceUID, "--config", str(cfg))
    assert timeline.returncode == 0, timeline.stderr
    # The restored service keeps receiving.
    _send(port, [dx_dataset(seed=5)])
    wait_for(lambda: len(_study_states(db)) == 3, timeout=30, what="third study")
    assert proc.terminate() == 0
