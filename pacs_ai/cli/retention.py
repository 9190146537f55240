"""``pacs-ai retention run [--dry-run]``: purge what the ``[retention]`` rules say is due."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from pacs_ai.cli import add_config_arg, admin_engine
from pacs_ai.cli.audit import format_table
from pacs_ai.config import load_settings
from pacs_ai.storage.retention import Retention


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("retention", help="storage lifecycle: purge finished studies (admins)")
    rsub = p.add_subparsers(dest="retention_command", metavar="ACTION", required=True)
    run = rsub.add_parser(
        "run",
        help="purge now what [retention] says is due; print counts and bytes",
        description="Delete received objects of finished studies, old report files and old "
        "audit rows per [retention]; rows stay, marked purged. Unfinished, undelivered and "
        "quarantined objects are never touched.",
    )
    add_config_arg(run)
    run.add_argument(
        "--dry-run", action="store_true", help="only print what would be purged; change nothing"
    )
    run.add_argument("--format", choices=("table", "json"), default="table")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    engine = admin_engine(settings)
    try:
        report = Retention(engine, settings).run(dry_run=args.dry_run)
    finally:
        engine.dispose()
    if args.format == "json":
        data = dataclasses.asdict(report)
        data["bytes"] = report.bytes
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    print(format_table(report.rows()))
    verb = "would free" if args.dry_run else "freed"
    print(
        f"\n{verb} {report.bytes} bytes" + (" (dry run: nothing changed)" if args.dry_run else "")
    )
    return 0
