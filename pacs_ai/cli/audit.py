"""``pacs-ai audit associations|instances|studies|events``: the audit trail, for admins."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

from pacs_ai.cli import add_config_arg
from pacs_ai.config import load_settings
from pacs_ai.db import audit
from pacs_ai.db.session import make_engine

_WHAT = {
    "associations": "DICOM associations: peer, AE titles, TLS, accepted/rejected and why, counts",
    "instances": "received instances: UIDs, transfer syntax, size, sha256, spool path",
    "studies": "studies: state, revision, series/instance counts, timestamps",
    "events": "audit events: rejections, refusals, conflicts, recovery, state changes",
}


def _iso(value: str) -> dt.datetime:
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date/time: {value!r}") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="query the audit database (admins)")
    asub = p.add_subparsers(dest="audit_what", metavar="WHAT", required=True)
    for what, help_text in _WHAT.items():
        q = asub.add_parser(what, help=help_text, description=help_text)
        add_config_arg(q)
        q.add_argument("--since", type=_iso, help="only rows at or after this ISO time (UTC)")
        q.add_argument("--ae", help="only rows for this calling AE title")
        if what in ("instances", "studies"):
            q.add_argument("--study", metavar="UID", help="only this Study Instance UID")
        if what == "studies":
            q.add_argument("--show-phi", action="store_true", help="include patient names (PHI)")
        if what == "events":
            q.add_argument("--action", help="only this action, e.g. association_rejected")
        q.add_argument("--limit", type=int, default=200, help="newest N rows (default 200)")
        q.add_argument(
            "--format", choices=("table", "json", "csv"), default="table", help="output format"
        )
        q.set_defaults(handler=_run)
    m = asub.add_parser(
        "models",
        help="per model and finding: scored, refused, positive rate vs validation, alerts",
    )
    add_config_arg(m)
    m.add_argument("--format", choices=("table", "json", "csv"), default="table")
    m.set_defaults(handler=_models)
    one = asub.add_parser(
        "study",
        help="one study's full timeline: received, ready, scored, reported, delivered",
    )
    add_config_arg(one)
    one.add_argument("study_uid", metavar="UID")
    one.add_argument("--format", choices=("table", "json"), default="table")
    one.set_defaults(handler=_study)


def _query(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = make_engine(load_settings(args.config).database)
    try:
        if args.audit_what == "associations":
            return audit.associations(engine, args.since, args.ae, args.limit)
        if args.audit_what == "instances":
            return audit.instances(engine, args.since, args.ae, args.study, args.limit)
        if args.audit_what == "studies":
            return audit.studies(engine, args.since, args.study, args.ae, args.show_phi, args.limit)
        return audit.events(engine, args.since, args.action, args.ae, args.limit)
    finally:
        engine.dispose()


def _models(args: argparse.Namespace) -> int:
    from pacs_ai import monitoring
    from pacs_ai.errors import PacsAiError
    from pacs_ai.inference import load_card, resolve_model_dir

    settings = load_settings(args.config)
    cards = []
    for source in (settings.inference.cxr_model, settings.inference.ct_model):
        # a model that cannot be read has no validation reference to show
        with contextlib.suppress(PacsAiError):
            cards.append(load_card(resolve_model_dir(source)))
    engine = make_engine(settings.database)
    try:
        args.rows = monitoring.summary(engine, cards, settings.monitoring.window)
    finally:
        engine.dispose()
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    rows = args.rows if getattr(args, "rows", None) is not None else _query(args)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif args.format == "csv":
        if rows:
            w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        print(format_table(rows))
    return 0


def _study(args: argparse.Namespace) -> int:
    engine = make_engine(load_settings(args.config).database)
    try:
        data = audit.study_timeline(engine, args.study_uid)
    finally:
        engine.dispose()
    if data is None:
        print(f"no study {args.study_uid}", file=sys.stderr)
        return 1
    if args.format == "json":
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    st = data["study"]
    print(f"study {st['study_uid']}  state={st['state']}  revision={st['revision']}")
    for section in ("timeline", "series", "jobs", "findings", "reports", "deliveries"):
        print(f"\n{section}:")
        print(format_table(data[section], max_width=60))
    return 0


def format_table(rows: Sequence[dict[str, Any]], max_width: int = 40) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])

    def cell(v: Any) -> str:
        text = "" if v is None else str(v)
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    table = [[cell(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(row[i]) for row in table)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(lines)
