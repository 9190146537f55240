"""``pacs-ai studies rerun|redeliver``: act on one study (admins).

A study is named by its database id, its full Study Instance UID, or a unique prefix of it.
Exit status: 0 done, 1 unknown study or nothing to do, 2 ambiguous prefix or bad arguments.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from pacs_ai.cli import add_config_arg, admin_engine
from pacs_ai.config import load_settings
from pacs_ai.db.lookup import find_study
from pacs_ai.errors import AmbiguousStudy, PacsAiError, StudyNotFound

_STUDY_HELP = "database id, Study Instance UID, or a unique prefix of the UID"


def admin_actor() -> str:
    """Who ran the command, for audit events: ``admin:<login name>``."""
    try:
        return f"admin:{getpass.getuser()}"[:64]
    except (OSError, KeyError):
        return "admin"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("studies", help="re-run a study or re-deliver its reports (admins)")
    ssub = p.add_subparsers(dest="studies_command", metavar="ACTION", required=True)
    rr = ssub.add_parser(
        "rerun",
        help="score a finished study again as a new revision (its new report names the old)",
    )
    add_config_arg(rr)
    rr.add_argument("study", metavar="STUDY", help=_STUDY_HELP)
    rr.set_defaults(handler=_rerun)
    rd = ssub.add_parser(
        "redeliver",
        help="queue a study's current reports for a destination (e.g. one added later)",
    )
    add_config_arg(rd)
    rd.add_argument("study", metavar="STUDY", help=_STUDY_HELP)
    rd.add_argument(
        "--destination", metavar="NAME", help="only this destination (default: every one)"
    )
    rd.add_argument(
        "--force",
        action="store_true",
        help="send again what was already delivered there (the PACS gets the same UIDs again)",
    )
    rd.set_defaults(handler=_redeliver)


def _fail(exc: PacsAiError) -> int:
    print(f"pacs-ai studies: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, AmbiguousStudy) else 1


def _rerun(args: argparse.Namespace) -> int:
    from pacs_ai.studies import rerun_study

    settings = load_settings(args.config)
    engine = admin_engine(settings)
    try:
        before = rerun_study(engine, args.study, admin_actor())
    except PacsAiError as exc:
        return _fail(exc)
    finally:
        engine.dispose()
    print(
        f"study {before.id}: re-run queued as revision {before.revision + 1} "
        f"(was {before.state.value}, revision {before.revision}); "
        "a running service scores it at its next pipeline poll"
    )
    return 0


def _redeliver(args: argparse.Namespace) -> int:
    from pacs_ai.delivery.outbox import Outbox

    settings = load_settings(args.config)
    names = [d.name for d in settings.destinations]
    if not names:
        print("pacs-ai studies: no [[destinations]] configured", file=sys.stderr)
        return 1
    if args.destination is not None and args.destination not in names:
        print(
            f"pacs-ai studies: no destination named {args.destination!r} "
            f"(configured: {', '.join(names)})",
            file=sys.stderr,
        )
        return 1
    engine = admin_engine(settings)
    try:
        with engine.connect() as conn:
            study = find_study(conn, args.study)
        result = Outbox(engine, settings).redeliver(
            study.id, args.destination, args.force, admin_actor()
        )
    except (StudyNotFound, AmbiguousStudy) as exc:
        return _fail(exc)
    finally:
        engine.dispose()
    if result.reports == 0:
        print(
            f"pacs-ai studies: study {study.id} has no reports ({study.state.value})",
            file=sys.stderr,
        )
        return 1
    where = args.destination or "every destination"
    print(
        f"study {study.id} to {where}: {result.queued} queued, {result.requeued} re-queued, "
        f"{result.skipped} already delivered or on their way"
        + ("" if args.force or not result.skipped else " (--force sends them again)")
    )
    return 0
