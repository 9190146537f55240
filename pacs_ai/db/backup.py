"""Online backup of the SQLite database (``pacs-ai db backup FILE``).

SQLite's online backup API copies a consistent snapshot while the service keeps writing (in
WAL mode readers and the writer do not block each other). The copy is written beside FILE,
switched to a self-contained rollback journal (no -wal file needed), fsynced and renamed into
place, so FILE is either absent or a complete database. PostgreSQL is refused: use pg_dump.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from pacs_ai.errors import AdminError


@dataclass(frozen=True)
class BackupResult:
    source: Path
    target: Path
    bytes: int
    seconds: float


def _sqlite_path(url: str) -> Path:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        masked = parsed.render_as_string(hide_password=True)
        raise AdminError(
            f"database {masked} is PostgreSQL: back it up with pg_dump, e.g. "
            f"`pg_dump --format=custom --file FILE '{_libpq_url(url)}'`"
        )
    if not parsed.database or parsed.database == ":memory:":
        raise AdminError("database.url names no SQLite file to back up")
    return Path(parsed.database)


def _libpq_url(url: str) -> str:
    """The URL as pg_dump takes it: no SQLAlchemy driver, password masked."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=True)


def backup(url: str, target: Path, force: bool = False) -> BackupResult:
    """Copy the SQLite database at ``url`` to ``target`` while it may be in use."""
    source = _sqlite_path(url)
    if not source.is_file():
        raise AdminError(f"no database at {source} (nothing to back up)")
    if target.exists() and not force:
        raise AdminError(f"{target} exists; pass --force to overwrite it")
    if target.resolve() == source.resolve():
        raise AdminError("the backup file must not be the database itself")
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    started = time.perf_counter()
    src = sqlite3.connect(source, timeout=30)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)  # one step: a consistent snapshot, writers go on (WAL)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()
    if check != "ok":
        partial.unlink(missing_ok=True)
        raise AdminError(f"the copy failed SQLite's quick_check: {check}")
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, target)
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return BackupResult(source, target, target.stat().st_size, time.perf_counter() - started)
