"""``pacs-ai user add|list|remove``: console users. Passwords are read from a prompt (or one
line of standard input when it is not a terminal), never from the command line."""

from __future__ import annotations

import argparse
import getpass
import sys

from pacs_ai.cli import add_config_arg, admin_engine
from pacs_ai.cli.audit import print_rows
from pacs_ai.config import load_settings
from pacs_ai.db.models import UserRole
from pacs_ai.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("user", help="console users: add, list, remove")
    usub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = usub.add_parser(
        "add",
        help="add a console user; the password is prompted for (or read from stdin)",
        description="Add a console user. admin: sees PHI, downloads, runs actions; viewer: "
        "sees states and results, never PHI. The password is prompted for twice on a "
        "terminal, or read as one line from standard input.",
    )
    add_config_arg(add)
    add.add_argument("name")
    add.add_argument("--role", choices=[r.value for r in UserRole], required=True)
    add.set_defaults(handler=_add)
    ls = usub.add_parser("list", help="console users and their last login")
    add_config_arg(ls)
    ls.add_argument("--format", choices=("table", "json"), default="table")
    ls.set_defaults(handler=_list)
    rm = usub.add_parser("remove", help="remove a console user (their sessions end at once)")
    add_config_arg(rm)
    rm.add_argument("name")
    rm.set_defaults(handler=_remove)


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise ConfigError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _add(args: argparse.Namespace) -> int:
    from pacs_ai.web.users import add_user

    engine = admin_engine(load_settings(args.config))
    try:
        add_user(engine, args.name, UserRole(args.role), _read_password())
    finally:
        engine.dispose()
    print(f"user {args.name} added ({args.role})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from pacs_ai.web.users import list_users

    engine = admin_engine(load_settings(args.config))
    try:
        rows = list_users(engine)
    finally:
        engine.dispose()
    print_rows(rows, args.format)
    return 0


def _remove(args: argparse.Namespace) -> int:
    from pacs_ai.web.users import remove_user

    engine = admin_engine(load_settings(args.config))
    try:
        removed = remove_user(engine, args.name)
    finally:
        engine.dispose()
    if not removed:
        print(f"pacs-ai user remove: no user {args.name!r}", file=sys.stderr)
        return 1
    print(f"user {args.name} removed")
    return 0
