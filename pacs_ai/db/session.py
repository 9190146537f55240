"""Engine and session set-up, and schema migration via Alembic.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed instance row survives power
loss, which the "durable before Success" rule needs. PostgreSQL uses its own durable commit.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from pacs_ai.config import DatabaseSettings

# Alembic scripts ship inside the package (an installed wheel has no source tree); the
# repository's top-level `migrations` is a symbolic link to this directory.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def _sqlite_pragmas(busy_ms: int) -> Any:
    def apply(dbapi_conn: Any, _record: Any) -> None:
        if not isinstance(dbapi_conn, sqlite3.Connection):
            return
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={busy_ms}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return apply


def make_engine(settings: DatabaseSettings) -> Engine:
    url = settings.url
    busy = settings.busy_timeout_seconds
    if url.startswith("sqlite"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=settings.echo,
            connect_args={"timeout": busy, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas(int(busy * 1000)))
        return engine
    # A lock wait or an unreachable server fails within the bound instead of stalling the
    # C-STORE past the sender's DIMSE timeout.
    return create_engine(
        url,
        echo=settings.echo,
        pool_pre_ping=True,
        pool_size=10,
        pool_timeout=busy,
        connect_args={
            "connect_timeout": max(1, round(busy)),
            "options": f"-c lock_timeout={int(busy * 1000)}",
        },
    )


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (idempotent)."""
    from alembic import command

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
