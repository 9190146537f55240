"""Start-up that tells the truth: `pacs-ai serve`/`worker` as real processes refuse to start
with one line on stderr and exit status 3 (no traceback, nothing created), and a service that
starts logs one summary of what it runs with."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from pacs_ai.config import Settings
from pacs_ai.db.session import head_revision
from pacs_ai.errors import StartupError
from pacs_ai.service import Service
from pacs_ai.startup import check_tls, preflight
from tests.conftest import free_port, make_settings, prepared_database
from tests.integration.process import write_config


def _run(command: str, settings: Settings, cfg: Path) -> subprocess.CompletedProcess[str]:
    write_config(settings, cfg)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AI_")}
    return subprocess.run(
        [sys.executable, "-m", "pacs_ai", *command.split(), "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )


def _refused(run: subprocess.CompletedProcess[str], message: str) -> None:
    expected = (3, "", f"pacs-ai: cannot start: {message}\n")
    assert (run.returncode, run.stdout, run.stderr) == expected


def _settings(tmp_path: Path, db_url: str, **sections: Any) -> Settings:
    # INFO as in production: a refusal must be the only line on stderr.
    sections.setdefault("logging", {"level": "INFO"})
    return make_settings(tmp_path, db_url, **sections)


@pytest.mark.parametrize(
    "command",
    ["serve", "worker", "deliveries list", "user list", "audit studies", "retention run --dry-run"],
)
def test_out_of_date_schema_refused_and_no_database_created(tmp_path: Path, command: str) -> None:
    db = tmp_path / "db" / "pacs-ai.db"
    settings = _settings(tmp_path, f"sqlite:///{db}")
    cfg = tmp_path / "site.toml"
    run = _run(command, settings, cfg)
    _refused(
        run,
        f"database schema is at (empty), this version needs {head_revision()}: "
        f"run `pacs-ai db upgrade --config {cfg}` (database sqlite:///{db})",
    )
    assert not db.exists() and not db.parent.exists()


def test_out_of_date_schema_on_postgresql_masks_the_password(
    tmp_path: Path, postgres_url: str
) -> None:
    url = make_url(postgres_url).set(password="s3cret-pw")  # trust auth: accepted, unused
    settings = _settings(tmp_path, url.render_as_string(hide_password=False))
    cfg = tmp_path / "config.toml"
    run = _run("serve", settings, cfg)
    _refused(
        run,
        f"database schema is at (empty), this version needs {head_revision()}: "
        f"run `pacs-ai db upgrade --config {cfg}` "
        f"(database {url.render_as_string(hide_password=True)})",
    )
    assert "s3cret-pw" not in run.stderr


def test_port_taken_refused(tmp_path: Path, sqlite_url: str) -> None:
    settings = _settings(tmp_path, sqlite_url)
    prepared_database(settings)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", settings.dicom.port))
        holder.listen(1)
        run = _run("serve", settings, tmp_path / "config.toml")
    _refused(
        run,
        f"dicom.port {settings.dicom.port} on 127.0.0.1 is already in use by another process",
    )


def test_model_that_cannot_load_refused(tmp_path: Path, sqlite_url: str) -> None:
    missing = tmp_path / "models" / "ct-v2"
    settings = _settings(
        tmp_path,
        sqlite_url,
        pipeline={"enabled": True},
        inference={"device": "cpu", "ct_model": str(missing)},
    )
    prepared_database(settings)
    run = _run("serve", settings, tmp_path / "config.toml")
    # The chest X-ray model loaded first (silently); the CT model refuses the start.
    _refused(run, f"inference.ct_model ({missing}) cannot be loaded: no card.json in {missing}")


def test_spool_not_writable_refused(tmp_path: Path, sqlite_url: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    spool = blocker / "spool"
    settings = _settings(tmp_path, sqlite_url, storage={"path": str(spool)})
    prepared_database(settings)
    run = _run("serve", settings, tmp_path / "config.toml")
    _refused(run, f"storage.path {spool} is not writable: Not a directory")


def test_started_service_logs_one_summary(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url(postgres_url).set(password="s3cret-pw")
    settings = make_settings(
        tmp_path,
        url.render_as_string(hide_password=False),
        pipeline={"enabled": True},
        inference={"device": "cpu", "precision": "fp32"},
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242},
            {
                "name": "modality",
                "return_to_sender": True,
                "port": 104,
                "objects": ["summary", "text_sr"],
            },
        ],
    )
    prepared_database(settings)
    svc = Service(settings)
    with caplog.at_level(logging.INFO, logger="pacs_ai.service"):
        svc.start()
    try:
        lines = [r.getMessage() for r in caplog.records if r.name == "pacs_ai.service"]
    finally:
        svc.stop()
    spool = lines[-2]
    assert spool.startswith(f"spool: {tmp_path / 'spool'}, ")
    assert spool.endswith(" free (new studies refused below 1 MB)")
    assert lines[:-2] + lines[-1:] == [
        "pacs-ai 0.1.0 started with config <dict>",
        "role all: runs DICOM listener + assembly + retention, pipeline worker, "
        "delivery outbox; pipeline slots: 1",
        f"dicom: AE PACS_AI on 127.0.0.1:{settings.dicom.port}, TLS off; "
        "3 peer(s) allowed, others rejected",
        "model cxr: pacs-ai-cxr-demo 1.0 (DEMO, not for clinical use), device cpu, precision fp32",
        "model ct: pacs-ai-ct-demo 1.0 (DEMO, not for clinical use), device cpu, precision fp32",
        "destination pacs: ORTHANC at 127.0.0.1:4242, objects sr, TLS off",
        "destination modality: the sender's AE and address, port 104, "
        "objects summary, text_sr, TLS off",
        f"reports: {tmp_path / 'var' / 'reports'}",
        f"database: {url.render_as_string(hide_password=True)} (schema {head_revision()})",
        "retention: objects after 30 d (failed 90 d), reports 90 d, audit 2190 d, "
        "oldest first below 1000 MB free, every 3600 s",
    ]
    assert not any("s3cret-pw" in line for line in lines)


def test_unreachable_database_and_unreadable_tls_are_one_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    settings = _settings(tmp_path, f"postgresql+psycopg://pacs:s3cret-pw@127.0.0.1:{port}/pacs")
    with pytest.raises(StartupError) as exc:
        preflight(settings, listener=True)
    assert str(exc.value) == (
        f"database postgresql+psycopg://pacs:***@127.0.0.1:{port}/pacs cannot be opened "
        "(OperationalError); check database.url in <dict>"
    )
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    settings = _settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'x.db'}",
        tls={"enabled": True, "cert_file": str(cert), "key_file": str(key)},
    )
    with pytest.raises(StartupError) as exc:
        check_tls(settings)
    assert str(exc.value) == (
        f"tls.cert_file {cert} / tls.key_file {key} cannot be loaded: No such file or directory"
    )
