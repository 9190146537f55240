"""The admin-facing command line against a running service: send, echo, audit, --help."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from pacs_ai.cli import build_parser, main
from tests.conftest import ct_datasets, dx_dataset, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.process import write_config


def test_send_echo_and_audit(
    start_service: ServiceFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svc = start_service()
    port = str(svc.server.port)
    cfg = str(write_config(svc.settings, tmp_path / "config.toml"))
    ct = ct_datasets(6)
    files = write_all([dx_dataset(), *ct], tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not dicom")

    assert main(["echo", "127.0.0.1", port, "--aet", "TEST_SCU"]) == 0
    assert "C-ECHO OK" in capsys.readouterr().out

    # A folder: its 7 DICOM files stored, the text file in it skipped.
    assert main(["send", "127.0.0.1", port, str(tmp_path / "in"), "--aet", "TEST_SCU"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("SUCCESS  0x0000") == 7 and "7 files: 7 success" in captured.out
    assert "skipped 1 non-DICOM" in captured.err
    # A non-DICOM file named explicitly is an error: exit 1.
    notes = str(tmp_path / "in" / "notes.txt")
    assert main(["send", "127.0.0.1", port, notes, str(files[1]), "--aet", "TEST_SCU"]) == 1
    out = capsys.readouterr().out
    assert "not readable as DICOM" in out and "2 files: 1 error, 1 success" in out
    assert main(["send", "127.0.0.1", port, str(files[0]), "--aet", "TEST_SCU", "-q"]) == 0
    assert main(["send", "127.0.0.1", port, str(files[0]), "--aet", "NOT_ALLOWED"]) == 1
    assert "association rejected (1,1,3)" in capsys.readouterr().out

    def swept_and_ready() -> bool:
        assert svc.assembler is not None
        svc.assembler.sweep()
        return _ready(cfg, capsys) == 2

    wait_for(swept_and_ready, timeout=10, what="2 ready studies")

    assert main(["audit", "associations", "-c", cfg, "--format", "json"]) == 0
    assocs = json.loads(capsys.readouterr().out)
    assert {a["calling_ae"] for a in assocs} == {"TEST_SCU", "NOT_ALLOWED"}
    assert any(a["reject_reason"] for a in assocs)

    assert (
        main(
            ["audit", "instances", "-c", cfg, "--study", ct[0].StudyInstanceUID, "--format", "csv"]
        )
        == 0
    )
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 6 and {r["modality"] for r in rows} == {"CT"}

    assert main(["audit", "studies", "-c", cfg, "--ae", "TEST_SCU", "--show-phi"]) == 0
    table = capsys.readouterr().out
    assert "Doe^Jane^Secret" in table and "ready" in table
    assert main(["audit", "events", "-c", cfg, "--action", "association_rejected"]) == 0
    assert "NOT_ALLOWED" in capsys.readouterr().out
    assert main(["audit", "events", "-c", cfg, "--since", "2999-01-01"]) == 0
    assert "(no rows)" in capsys.readouterr().out


def _ready(cfg: str, capsys: pytest.CaptureFixture[str]) -> int:
    main(["audit", "studies", "-c", cfg, "--format", "json"])
    return sum(s["state"] == "ready" for s in json.loads(capsys.readouterr().out))


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    commands = [
        ["serve"],
        ["send"],
        ["echo"],
        ["db", "upgrade"],
        ["db", "current"],
        ["audit", "associations"],
        ["audit", "instances"],
        ["audit", "studies"],
        ["audit", "events"],
        ["studies", "rerun"],
        ["studies", "redeliver"],
        ["deliveries", "retry"],
        ["audit", "study"],
        ["retention", "run"],
    ]
    for cmd in commands:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: pacs-ai" in capsys.readouterr().out


def test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n')
    assert main(["db", "upgrade", "-c", str(bad)]) == 2
    assert "dicom.ae_title" in capsys.readouterr().err
