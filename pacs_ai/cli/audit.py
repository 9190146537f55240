"""``pacs-ai audit associations|instances|studies|events``: the audit trail, for admins."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

from pacs_ai.cli import add_config_arg, admin_engine
from pacs_ai.config import load_settings
from pacs_ai.db import audit
from pacs_ai.db.lookup import find_study
from pacs_ai.errors import AmbiguousStudy, StudyNotFound

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
        _add_phi_arg(q)
        if what == "events":
            q.add_argument("--action", help="only this action, e.g. association_rejected")
        q.add_argument("--limit", type=int, default=200, help="newest N rows (default 200)")
        q.add_argument(
            "--format",
            choices=("table", "json", "csv"),
            default="table",
            help="output format (table: fits 120 columns; json/csv: every column, full values)",
        )
        _add_wide_arg(q)
        q.set_defaults(handler=_run)
    m = asub.add_parser(
        "models",
        help="per model and finding: scored, refused, positive rate vs validation, alerts",
    )
    add_config_arg(m)
    m.add_argument("--format", choices=("table", "json", "csv"), default="table")
    _add_wide_arg(m)
    m.set_defaults(handler=_models)
    one = asub.add_parser(
        "study",
        help="one study's full timeline: received, ready, scored, reported, delivered, purged",
    )
    add_config_arg(one)
    one.add_argument(
        "study_ref",
        metavar="STUDY",
        help="database id, Study Instance UID, or a unique prefix of one",
    )
    _add_phi_arg(one)
    one.add_argument("--format", choices=("table", "json"), default="table")
    _add_wide_arg(one)
    one.set_defaults(handler=_study)


def _add_phi_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--show-phi",
        action="store_true",
        help="include patient name, ID, birth date and accession number (PHI)",
    )


def _add_wide_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wide", action="store_true", help="table: every column with full values (no 120 fit)"
    )


def _query(args: argparse.Namespace) -> list[dict[str, Any]]:
    engine = admin_engine(load_settings(args.config))
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
    engine = admin_engine(settings)
    try:
        args.rows = monitoring.summary(engine, cards, settings.monitoring.window)
    finally:
        engine.dispose()
    return _run(args)


# Columns of the default (fitted) table; --wide, JSON and CSV show them all.
_NARROW = {
    "associations": (
        "id", "started_at", "calling_ae", "peer_host", "tls", "accepted", "reject_reason",
        "end_reason", "instances_stored",
    ),
    "instances": (
        "id", "received_at", "calling_ae", "modality", "sop_instance_uid", "size_bytes",
        "times_received", "purged_at",
    ),
    "studies": (
        "id", "study_uid", "state", "modality", "series", "instances", "last_received_at",
        "findings", "deliveries", "purged_at",
    ),
    "events": ("id", "at", "actor", "action", "object_type", "object_id", "outcome", "detail"),
}  # fmt: skip
# With --show-phi the studies table trades counts for the patient columns, shown whole.
_NARROW_PHI = (
    "id", "study_uid", "state", "last_received_at", "findings", "deliveries",
    *audit.PHI_COLUMNS,
)  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    rows = args.rows if getattr(args, "rows", None) is not None else _query(args)
    if args.format == "table" and not args.wide and args.audit_what in _NARROW:
        phi = args.audit_what == "studies" and args.show_phi
        keep = _NARROW_PHI if phi else _NARROW[args.audit_what]
        rows = [{k: v for k, v in r.items() if k in keep} for r in rows]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif args.format == "csv":
        if rows:
            w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        print(format_table(rows, wide=args.wide, whole=audit.PHI_COLUMNS))
    return 0


def _study(args: argparse.Namespace) -> int:
    engine = admin_engine(load_settings(args.config))
    try:
        with engine.connect() as conn:
            uid = find_study(conn, args.study_ref).study_uid
        data = audit.study_timeline(engine, uid, show_phi=args.show_phi)
    except (StudyNotFound, AmbiguousStudy) as exc:
        print(f"pacs-ai: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, AmbiguousStudy) else 1
    finally:
        engine.dispose()
    assert data is not None
    if args.format == "json":
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    st = data["study"]
    head = f"study {st['id']}  {st['study_uid']}  state={st['state']}  revision={st['revision']}"
    if st.get("purged_at"):
        head += f"  objects purged {_short_time(st['purged_at'])}"
    print(head)
    if args.show_phi:
        print("  ".join(f"{k}={st[k]}" for k in audit.PHI_COLUMNS if k in st))
    for section in ("timeline", "series", "jobs", "findings", "reports", "deliveries"):
        print(f"\n{section}:")
        print(format_table(data[section], wide=args.wide))
    return 0


TERMINAL_WIDTH = 120
_ISO = re.compile(r"^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(\.\d+)?(\+00:00|Z)?$")


def _short_time(text: str) -> str:
    m = _ISO.match(text)
    return f"{m.group(1)} {m.group(2)}" if m else text


def _cell(key: str, value: Any, wide: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        # Durations in whole milliseconds; probabilities and thresholds to 3 decimals.
        return f"{value:.0f}" if key.endswith("_ms") else f"{value:.3f}"
    text = str(value)
    return text if wide else _short_time(text)


def _fit(widths: list[int], limit: int, fixed: set[int], minimum: int = 6) -> list[int]:
    """Narrow the widest columns (not those in ``fixed``) one character at a time until the
    row fits ``limit``."""
    widths = list(widths)
    free = [i for i in range(len(widths)) if i not in fixed]
    while free and sum(widths) + 2 * (len(widths) - 1) > limit:
        i = max(free, key=lambda j: widths[j])
        if widths[i] <= minimum:
            break
        widths[i] -= 1
    return widths


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_rows(rows: Sequence[dict[str, Any]], fmt: str) -> None:
    """``json``: the rows as a JSON list; otherwise a table that fits the terminal."""
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=2)
        print()
    else:
        print(format_table(rows))


def format_table(
    rows: Sequence[dict[str, Any]],
    wide: bool = False,
    width: int = TERMINAL_WIDTH,
    whole: Sequence[str] = (),
) -> str:
    """A plain-text table that fits ``width`` columns (long values cut with "…", except the
    columns named in ``whole``); ``wide`` keeps every value whole."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    table = [[_cell(k, r[k], wide) for k in keys] for r in rows]
    natural = [max(len(k), *(len(row[i]) for row in table)) for i, k in enumerate(keys)]
    fixed = {i for i, k in enumerate(keys) if k in whole}
    widths = natural if wide else _fit(natural, width, fixed)
    lines = ["  ".join(_clip(k, w).ljust(w) for k, w in zip(keys, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(_clip(c, w).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in table
    ]
    return "\n".join(lines)
