"""``pacs-ai db upgrade|current``: schema migrations."""

from __future__ import annotations

import argparse

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
