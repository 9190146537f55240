"""``pacs-ai deliveries list|retry``: the outbox, for admins."""

from __future__ import annotations

import argparse
import sys

from sqlalchemy import select

from pacs_ai.cli import add_config_arg, admin_engine
from pacs_ai.cli.audit import print_rows
from pacs_ai.cli.studies import admin_actor
from pacs_ai.config import load_settings
from pacs_ai.db import audit
from pacs_ai.db.models import Delivery, DeliveryState


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("deliveries", help="list or re-queue report deliveries (admins)")
    dsub = p.add_subparsers(dest="deliveries_command", metavar="ACTION", required=True)
    ls = dsub.add_parser("list", help="deliveries with their state, attempts and last status")
    add_config_arg(ls)
    ls.add_argument(
        "--state",
        choices=("pending", "sending", "delivered", "failed", "dead"),
        help="only this state",
    )
    ls.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    ls.add_argument("--limit", type=int, default=200)
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.set_defaults(handler=_list)
    rt = dsub.add_parser(
        "retry", help="re-queue dead or failed deliveries now (by id, or --all-dead)"
    )
    add_config_arg(rt)
    rt.add_argument("ids", nargs="*", type=int, metavar="ID")
    rt.add_argument("--all-dead", action="store_true", help="re-queue every dead delivery")
    rt.set_defaults(handler=_retry)


def _list(args: argparse.Namespace) -> int:
    engine = admin_engine(load_settings(args.config))
    try:
        rows = audit.deliveries(engine, args.state, args.study, args.limit)
    finally:
        engine.dispose()
    print_rows(rows, args.format)
    return 0


def _retry(args: argparse.Namespace) -> int:
    from pacs_ai.delivery.outbox import Outbox

    if bool(args.ids) == bool(args.all_dead):
        print("pacs-ai deliveries retry: give delivery ids or --all-dead", file=sys.stderr)
        return 2
    settings = load_settings(args.config)
    engine = admin_engine(settings)
    try:
        before: dict[int, DeliveryState] = {}
        if args.ids:
            with engine.connect() as conn:
                rows = conn.execute(
                    select(Delivery.id, Delivery.state).where(Delivery.id.in_(args.ids))
                )
                before = {row.id: row.state for row in rows}
        n = Outbox(engine, settings).requeue(None if args.all_dead else args.ids, admin_actor())
    finally:
        engine.dispose()
    problems = 0
    for i in dict.fromkeys(args.ids):
        state = before.get(i)
        if state is None:
            print(f"pacs-ai deliveries retry: no delivery with id {i}", file=sys.stderr)
            problems += 1
        elif state not in (DeliveryState.DEAD, DeliveryState.FAILED):
            hint = (
                " (studies redeliver --force sends it again)"
                if state == DeliveryState.DELIVERED
                else ""
            )
            print(
                f"pacs-ai deliveries retry: delivery {i} is {state.value}, not re-queued{hint}",
                file=sys.stderr,
            )
            problems += 1
    print(f"re-queued {n} deliveries; a running service sends them at its next outbox run")
    return 1 if problems else 0
