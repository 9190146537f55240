"""``pacs-ai db upgrade|current|backup``: schema migrations and backups."""

from __future__ import annotations

import argparse
from pathlib import Path

from pacs_ai.cli import add_config_arg
from pacs_ai.config import load_settings
from pacs_ai.db.session import current_revision, head_revision, make_engine, upgrade


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("db", help="database schema management")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = dbsub.add_parser("upgrade", help="create or migrate the schema to the latest revision")
    add_config_arg(up)
    up.set_defaults(handler=_upgrade)
    cur = dbsub.add_parser("current", help="print the schema revision and the latest known")
    add_config_arg(cur)
    cur.set_defaults(handler=_current)
    bak = dbsub.add_parser(
        "backup",
        help="copy the SQLite database to FILE while the service runs (PostgreSQL: pg_dump)",
        description="Online backup of the SQLite database (SQLite's backup API: a consistent "
        "snapshot, the service keeps running). Restore: stop the service, remove the "
        "database file and its -wal/-shm files, copy FILE into place, start. For PostgreSQL "
        "this refuses and names the pg_dump command instead.",
    )
    add_config_arg(bak)
    bak.add_argument("file", type=Path, metavar="FILE")
    bak.add_argument("--force", action="store_true", help="overwrite an existing FILE")
    bak.set_defaults(handler=_backup)


def _upgrade(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    engine = make_engine(settings.database)
    upgrade(engine)
    print(f"database at revision {current_revision(engine)}")
    return 0


def _current(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    engine = make_engine(settings.database)
    cur, head = current_revision(engine), head_revision()
    print(f"current: {cur or '(empty)'}  head: {head}")
    return 0 if cur == head else 1


def _backup(args: argparse.Namespace) -> int:
    from pacs_ai.db.backup import backup

    settings = load_settings(args.config)
    result = backup(settings.database.url, args.file, force=args.force)
    print(
        f"backed up {result.source} to {result.target} "
        f"({result.bytes / 1e6:.1f} MB in {result.seconds:.1f} s)"
    )
    return 0
