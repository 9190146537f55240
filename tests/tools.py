"""Real external tools (dcmtk, dicom3tools, ...) in tests.

A test that needs a tool calls :func:`require_tool`. When the tool is missing it skips with
the reason on a developer machine, but FAILS when ``CI`` is set: CI installs every tool
(``make system-deps``), so a missing one there is a broken environment, not a reason to pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Debian package providing each tool we call (for the skip/fail message).
PACKAGES = {
    "dciodvfy": "dicom3tools",
    "dsrdump": "dcmtk",
    "dsr2html": "dcmtk",
    "dcmdump": "dcmtk",
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "Orthanc": "orthanc",
    "openssl": "openssl",
    "systemd-analyze": "systemd",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "radosgw": "radosgw",
    "radosgw-admin": "radosgw",
    "ceph": "ceph-common",
    "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-base",
}


def _system_path() -> str:
    """PATH without this virtual environment's bin/: pynetdicom installs console scripts
    named ``storescu``/``echoscu`` there, which must not stand in for dcmtk's."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and Path(d).resolve() != venv_bin)


def require_tool(name: str) -> str:
    """The path of executable ``name``; skip (developer machine) or fail (CI) without it."""
    path = shutil.which(name, path=_system_path())
    if path:
        return path
    package = PACKAGES.get(name, "?")
    why = f"{name} is not installed (Debian package {package}; `make system-deps`)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must have it", pytrace=False)
    pytest.skip(f"{why}; on CI this fails instead of skipping")


def require_file(path: Path, package: str) -> Path:
    """``path`` (a plugin, a data file) installed by Debian ``package``; skip or fail as
    :func:`require_tool` does when it is missing."""
    if path.exists():
        return path
    why = f"{path} is missing (Debian package {package}; `make system-deps`)"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must have it", pytrace=False)
    pytest.skip(f"{why}; on CI this fails instead of skipping")


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_tool(name: str, *args: str | Path, timeout: float = 60) -> ToolRun:
    """Run a required tool and capture its output (never raises on a non-zero exit)."""
    proc = subprocess.run(
        [require_tool(name), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    return ToolRun(proc.returncode, proc.stdout, proc.stderr)


def dciodvfy_errors(path: str | Path) -> list[str]:
    """The "Error" lines dciodvfy prints for ``path`` (an empty list means the IOD is valid)."""
    run = run_tool("dciodvfy", path)
    errors = [line for line in run.output.splitlines() if line.startswith("Error")]
    if run.returncode != 0 and not errors:  # crashed or refused without saying why
        errors.append(f"dciodvfy exit status {run.returncode}: {run.output.strip()[:500]}")
    return errors


def dsrdump(path: str | Path, *options: str) -> ToolRun:
    """dcmtk's SR dump of ``path`` (``+Pl``-style options passed through)."""
    return run_tool("dsrdump", *options, path)
