"""``pacs-ai init DIR``: a new installation's config and folder layout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pacs_ai.config import PACKAGED_CONFIG
from pacs_ai.errors import AdminError

CONFIG_NAME = "config.toml"
# The folders the packaged config names, relative to DIR.
LAYOUT = ("spool", "reports", "db")
SYSTEMD_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "pacs-ai.service"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "init",
        help="write DIR/config.toml (every key commented) and the folders spool/, reports/, db/",
        description="Set up an installation in DIR: a commented config.toml whose paths are "
        "relative to DIR, and the folders it names. An existing config.toml is kept unless "
        "--force is given.",
    )
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument("--force", action="store_true", help="overwrite an existing DIR/config.toml")
    p.set_defaults(handler=_init)


def write_config(directory: Path, force: bool = False) -> Path:
    """Write the packaged, commented config as ``directory/config.toml`` (atomically)."""
    target = directory / CONFIG_NAME
    if target.exists() and not force:
        raise AdminError(f"{target} exists; pass --force to overwrite it")
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{CONFIG_NAME}.partial")
    partial.write_text(PACKAGED_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    partial.chmod(0o640)  # it may come to hold credentials paths and hosts: not world-readable
    os.replace(partial, target)
    return target


def _init(args: argparse.Namespace) -> int:
    directory: Path = args.directory.resolve()
    config = write_config(directory, args.force)
    print(f"wrote {config}")
    for name in LAYOUT:
        folder = directory / name
        folder.mkdir(mode=0o750, exist_ok=True)
        print(f"folder {folder}/")
    print("next steps:")
    print(f"  pacs-ai db upgrade --config {config}")
    print(f"  pacs-ai serve --config {config}")
    print(f"  systemd unit to adapt: {SYSTEMD_UNIT}")
    return 0
