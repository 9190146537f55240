"""The ``pacs-ai`` command line.

Each sub-module adds its sub-commands with ``register(subparsers)``; a command's handler takes
the parsed namespace and returns the process exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pacs_ai import __version__
from pacs_ai.errors import ConfigError, PacsAiError, StartupError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from pacs_ai.config import Settings

# Sub-modules registering commands, in the order --help lists them.
_COMMAND_MODULES = (
    "init",
    "serve",
    "net",
    "db",
    "audit",
    "deliveries",
    "studies",
    "retention",
    "models",
    "user",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="pacs-ai",
        description="DICOM-AI gateway: receive chest X-ray/CT, score, report back as DICOM SR.",
    )
    parser.add_argument("--version", action="version", version=f"pacs-ai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pacs_ai.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pacs_ai.cli.{name}":
                continue  # that group is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"pacs-ai: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"pacs-ai: cannot start: {exc}", file=sys.stderr)
        return 3
    except PacsAiError as exc:
        print(f"pacs-ai: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=None,
        help="config.toml to use (default: $PACS_AI_CONFIG, else a source checkout's "
        "config.toml; PACS_AI_<SECTION>__<KEY> variables override single keys)",
    )


def admin_engine(settings: Settings) -> Engine:
    """The database engine for an admin command, after the same check ``serve`` makes: a
    missing SQLite file or an out-of-date schema exits 3 with the ``db upgrade`` hint
    instead of a traceback (and no empty SQLite file is left behind)."""
    from pacs_ai.db.session import make_engine
    from pacs_ai.startup import check_database

    check_database(settings)
    return make_engine(settings.database)
