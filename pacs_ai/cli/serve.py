"""``pacs-ai serve``: run the gateway."""

from __future__ import annotations

import argparse

from pacs_ai.cli import add_config_arg
from pacs_ai.config import load_settings
from pacs_ai.logs import configure_logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the DICOM listener, assembly and pipeline until SIGTERM/SIGINT",
        description="Run the gateway on the given config until SIGTERM or SIGINT. "
        "The database must be at the latest schema (`pacs-ai db upgrade`). Refuses to start "
        "(one line on stderr, exit 3) when the schema is out of date, the port is taken, a "
        "model cannot be loaded or the spool is not writable; then logs a summary.",
    )
    add_config_arg(p)
    p.add_argument(
        "--role",
        choices=("all", "gateway", "worker", "sender"),
        default=None,
        help="what this process runs (default: service.role, which defaults to all): "
        "gateway = DICOM listener, assembly, retention, console; worker = claims and scores "
        "studies (one per GPU in CUDA_VISIBLE_DEVICES, else pipeline.workers); sender = "
        "delivery outbox; all = everything. Separate roles share one PostgreSQL database",
    )
    p.set_defaults(handler=_serve)
    w = sub.add_parser(
        "worker",
        help="run only the pipeline worker and outbox (no listener), e.g. beside `serve` "
        "with pipeline.enabled = false, or several of them on PostgreSQL",
    )
    add_config_arg(w)
    w.set_defaults(handler=_worker)


def _serve(args: argparse.Namespace, listener: bool = True) -> int:
    from pacs_ai.service import Service, components
    from pacs_ai.startup import preflight

    settings = load_settings(args.config)
    configure_logging(settings.logging)
    role = getattr(args, "role", None)
    parts = components(settings, role, listener)
    # Before the service is built: a refused start creates nothing (no empty database).
    preflight(settings, listener=parts.listener, pipeline=parts.pipeline)
    Service(settings, listener=listener, role=role).run_forever()
    return 0


def _worker(args: argparse.Namespace) -> int:
    return _serve(args, listener=False)
