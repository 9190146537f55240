"""`pacs-ai init DIR` and the shipped systemd unit (checked by systemd-analyze verify)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_ai import __version__
from pacs_ai.cli import main
from pacs_ai.cli.init import SYSTEMD_UNIT
from pacs_ai.config import PACKAGED_CONFIG, load_settings
from pacs_ai.startup import notify_systemd
from tests.tools import require_tool


def test_init_writes_commented_config_and_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "site"
    assert main(["init", str(site)]) == 0
    config = site / "config.toml"
    assert config.read_text() == PACKAGED_CONFIG.read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in site.iterdir()) == ["config.toml", "db", "reports", "spool"]
    settings = load_settings(config, env={})
    assert settings.storage.path == site / "spool"
    assert settings.reports.path == site / "reports"
    assert settings.database.url == f"sqlite:///{site / 'db' / 'pacs-ai.db'}"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {config}"
    assert f"  pacs-ai db upgrade --config {config}" in out

    # An existing config is kept unless --force.
    config.write_text("# edited by the admin\n")
    assert main(["init", str(site)]) == 1
    assert capsys.readouterr().err == (
        f"pacs-ai: error: {config} exists; pass --force to overwrite it\n"
    )
    assert config.read_text() == "# edited by the admin\n"
    assert main(["init", str(site), "--force"]) == 0
    assert config.read_text() == PACKAGED_CONFIG.read_text()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"pacs-ai {__version__}\n"


def systemd_analyze_verify(unit_text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of ``unit_text`` written as ``folder/pacs-ai.service``."""
    tool = require_tool("systemd-analyze")
    unit = folder / "pacs-ai.service"
    unit.write_text(unit_text)
    return subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    text = SYSTEMD_UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["ExecStart"] == (
        "/opt/pacs-ai/bin/pacs-ai serve --config /var/lib/pacs-ai/config.toml"
    )
    assert settings["User"] == settings["Group"] == "pacs-ai"
    assert settings["StateDirectory"] == "pacs-ai"
    assert settings["ReadWritePaths"] == "/var/lib/pacs-ai"
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert settings[key] == "yes", key
    assert settings["ProtectSystem"] == "strict"
    assert settings["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    # verify needs ExecStart's binary to exist: point it at this interpreter.
    real = text.replace("/opt/pacs-ai/bin/pacs-ai", sys.executable)
    run = systemd_analyze_verify(real, tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    # The check is real: a misspelt key is reported.
    run = systemd_analyze_verify(real.replace("ProtectHome=", "ProtectHom="), tmp_path)
    line = real.splitlines().index("ProtectHome=yes") + 1
    assert run.stderr == (
        f"{tmp_path / 'pacs-ai.service'}:{line}: Unknown key 'ProtectHom' in section "
        "[Service], ignoring.\n"
    )


def test_systemd_ready_notification(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify_systemd() is False  # not under systemd: nothing to do
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert notify_systemd() is True
        assert sock.recv(64) == b"READY=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify_systemd() is False  # a vanished socket is not an error
