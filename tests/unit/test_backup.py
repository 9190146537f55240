"""`pacs-ai db backup FILE`: SQLite's online backup, and what it refuses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from pacs_ai.cli import main
from pacs_ai.db.models import AuditEvent
from pacs_ai.db.session import head_revision, make_engine
from tests.conftest import make_settings, prepared_database
from tests.integration.process import write_config


def _config(tmp_path: Path, db_url: str) -> Path:
    settings = make_settings(tmp_path, db_url)
    return write_config(settings, tmp_path / "config.toml")


def test_backup_is_a_complete_single_file_database(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, sqlite_url)
    prepared_database(settings)
    engine = make_engine(settings.database)
    with engine.begin() as conn:
        conn.execute(
            insert(AuditEvent),
            [{"actor": "system", "action": f"a{i}", "outcome": "ok"} for i in range(500)],
        )
    # The rows sit in the WAL (the pool keeps a connection open): the copy has them anyway.
    assert Path(sqlite_url.removeprefix("sqlite:///") + "-wal").stat().st_size > 0
    cfg = write_config(settings, tmp_path / "config.toml")
    target = tmp_path / "backups" / "pacs-ai.db"
    target.parent.mkdir()
    assert main(["db", "backup", str(target), "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"backed up {sqlite_url.removeprefix('sqlite:///')} to {target} (")
    assert sorted(p.name for p in target.parent.iterdir()) == ["pacs-ai.db"]  # no -wal
    with sqlite3.connect(target) as copy:
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert copy.execute("SELECT count(*) FROM audit_events").fetchone() == (500,)
        version = copy.execute("SELECT version_num FROM alembic_version").fetchone()
        assert version == (head_revision(),)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(AuditEvent)).scalar() == 500
    engine.dispose()

    # An existing file is kept unless --force.
    assert main(["db", "backup", str(target), "--config", str(cfg)]) == 1
    assert (
        capsys.readouterr().err
        == f"pacs-ai: error: {target} exists; pass --force to overwrite it\n"
    )
    assert main(["db", "backup", str(target), "--config", str(cfg), "--force"]) == 0


def test_backup_without_a_database_creates_nothing(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, sqlite_url)
    target = tmp_path / "copy.db"
    assert main(["db", "backup", str(target), "--config", str(cfg)]) == 1
    db = sqlite_url.removeprefix("sqlite:///")
    assert capsys.readouterr().err == f"pacs-ai: error: no database at {db} (nothing to back up)\n"
    assert not Path(db).exists() and not target.exists()


def test_backup_refuses_postgresql_and_names_pg_dump(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, "postgresql+psycopg://pacs:s3cret@db.example:5432/pacs")
    target = tmp_path / "copy.db"
    assert main(["db", "backup", str(target), "--config", str(cfg)]) == 1
    assert capsys.readouterr().err == (
        "pacs-ai: error: database postgresql+psycopg://pacs:***@db.example:5432/pacs is "
        "PostgreSQL: back it up with pg_dump, e.g. `pg_dump --format=custom --file FILE "
        "'postgresql://pacs:***@db.example:5432/pacs'`\n"
    )
    assert not target.exists()
