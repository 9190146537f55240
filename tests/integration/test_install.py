"""A real install: the wheel built from this tree, installed with pip into a fresh virtual
environment that cannot see the source tree, then `init`, `db upgrade`, `serve`, a C-ECHO
from dcmtk's echoscu and `systemd-analyze verify` of the unit the wheel ships.

The fresh venv gets its dependencies (torch & co., already installed in the development venv)
through a .pth file naming a folder of links to that venv's packages, minus pacs-ai's own
editable install; pip then checks every pinned requirement against them (`--no-index`:
nothing is downloaded) and installs pacs-ai itself from the wheel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from pacs_ai import __version__
from pacs_ai.db.session import head_revision
from tests.conftest import free_port
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of an admin's shell: nothing pointing at this tree or venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PACS_AI_")}
    return {**env, **extra}


def _run(*cmd: str | Path, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_clean_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _build_wheel(work: Path) -> Path:
    """`pip wheel` of a copy of the package sources (the build writes build/ and egg-info
    beside them, which must not land in the working tree)."""
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pacs_ai", src / "pacs_ai", ignore=shutil.ignore_patterns("__pycache__"))
    dist = work / "dist"
    run = _run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-w",
        dist,
        src,
        cwd=work,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = dist.glob("pacs_ai-*.whl")
    return wheel


def _venv_sharing_dependencies(work: Path) -> Path:
    venv = work / "venv"
    run = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    assert run.returncode == 0, run.stderr
    deps = work / "deps"
    deps.mkdir()
    shared = Path(sysconfig.get_paths()["purelib"])
    for entry in shared.iterdir():
        if entry.name.startswith(("pacs_ai", "__editable__", "_pacs_ai")) or entry.suffix == ".pth":
            continue  # pacs-ai itself (the editable install of the source tree) stays out
        (deps / entry.name).symlink_to(entry)
    (site_packages,) = venv.glob("lib/python3*/site-packages")
    (site_packages / "shared-deps.pth").write_text(f"{deps}\n")
    return venv


def test_wheel_installs_into_a_clean_venv_and_serves(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "pacs_ai/default_config.toml",
        "pacs_ai/systemd/pacs-ai.service",
        "pacs_ai/db/migrations/env.py",
        "pacs_ai/db/migrations/script.py.mako",
        "pacs_ai/models/cxr-demo/model.safetensors",
        "pacs_ai/models/ct-demo/card.json",
    ):
        assert shipped in names, shipped
    versions = "pacs_ai/db/migrations/versions/"
    assert {n for n in names if n.startswith(versions)} == {
        versions + p.name
        for p in (REPO / versions).iterdir()
        if p.suffix in (".py", ".sql")  # every migration and the queue schema it applies
    }

    venv = _venv_sharing_dependencies(tmp_path)
    python, pacs_ai = venv / "bin" / "python", venv / "bin" / "pacs-ai"
    home = tmp_path / "admin"
    home.mkdir()
    # Without pacs-ai installed the fresh venv cannot import it: the source tree is invisible.
    run = _run(python, "-c", "import pacs_ai", cwd=home)
    assert run.returncode == 1 and "No module named 'pacs_ai'" in run.stderr
    # Every pinned requirement must already be satisfied (no index: nothing is fetched).
    run = _run(python, "-m", "pip", "install", "--no-index", wheel, cwd=home)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Successfully installed pacs-ai" in run.stdout
    run = _run(python, "-c", "import pacs_ai; print(pacs_ai.__file__)", cwd=home)
    assert Path(run.stdout.strip()).is_relative_to(venv / "lib")

    assert _run(pacs_ai, "--version", cwd=home).stdout == f"pacs-ai {__version__}\n"
    site = tmp_path / "site"
    run = _run(pacs_ai, "init", site, cwd=home)
    assert run.returncode == 0, run.stderr
    config = site / "config.toml"
    run = _run(pacs_ai, "db", "upgrade", "--config", config, cwd=home)
    assert (run.returncode, run.stdout) == (0, f"database at revision {head_revision()}\n")

    port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    # As under systemd (Type=notify): READY=1 arrives once the checks passed.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(f"\0pacs-ai-test-{os.getpid()}-{port}")
    notify.settimeout(0.5)
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [str(pacs_ai), "serve", "--config", str(config)],
            cwd=home,
            env=_clean_env(
                PACS_AI_DICOM__PORT=str(port),
                PACS_AI_HTTP__PORT=str(http_port),
                PYTHONUNBUFFERED="1",
                NOTIFY_SOCKET=f"@pacs-ai-test-{os.getpid()}-{port}",
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        ready = b""
        while not ready:
            assert serve.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(TimeoutError):
                ready = notify.recv(64)
        assert ready == b"READY=1"
        text = log.read_text()
        # The summary's last line, then the console (on in the packaged config), no users yet.
        lines = text.splitlines()
        assert lines[-3].endswith(
            "retention: objects after 30 d (failed 90 d), reports 90 d, audit 2190 d, "
            "oldest first below 1000 MB free, every 3600 s"
        )
        assert lines[-2].endswith(
            f"console: http://127.0.0.1:{http_port}/ (also /metrics, /healthz, /readyz)"
        )
        assert lines[-1].endswith("no console users yet: `pacs-ai user add NAME --role admin`")
        assert f"pacs-ai {__version__} started with config {config}" in text
        assert f"dicom: AE PACS_AI on 127.0.0.1:{port}, TLS off" in text
        assert "model cxr: pacs-ai-cxr-demo 1.0 (DEMO, not for clinical use)" in text
        assert (
            f"database: sqlite:///{site / 'db' / 'pacs-ai.db'} (schema {head_revision()})" in text
        )
        assert f"spool: {site / 'spool'}, " in text

        echo = _run(echoscu, "-aet", "STORESCU", "-aec", "PACS_AI", "127.0.0.1", port, cwd=home)
        assert (echo.returncode, echo.stderr) == (0, "")
        echo = _run(pacs_ai, "echo", "127.0.0.1", port, cwd=home)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        notify.close()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0

    # The unit the wheel ships, pointed at this installation's executable, verifies cleanly.
    (unit_src,) = (venv / "lib").glob("python3*/site-packages/pacs_ai/systemd/pacs-ai.service")
    unit = tmp_path / "pacs-ai.service"
    unit.write_text(unit_src.read_text().replace("/opt/pacs-ai/bin/pacs-ai", str(pacs_ai)))
    run = _run(require_tool("systemd-analyze"), "verify", unit, cwd=home)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
