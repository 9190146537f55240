from __future__ import annotations

from pathlib import Path

import pytest

from pacs_ai.config import DEFAULT_CONFIG, load_settings
from pacs_ai.errors import ConfigError


def test_embedded_default_loads_with_paths_resolved() -> None:
    s = load_settings(env={})
    base = DEFAULT_CONFIG.parent
    assert s.dicom.ae_title == "PACS_AI" and s.dicom.host == "127.0.0.1"
    assert s.access.reject_unknown is True
    assert s.storage.path == (base / "var" / "spool").resolve()
    assert s.database.url == f"sqlite:///{(base / 'var' / 'pacs-ai.db').resolve()}"
    assert s.assembly.xray_grace_seconds == 0.5 and s.assembly.ct_quiet_seconds == 10.0


def test_environment_overrides_single_keys() -> None:
    s = load_settings(
        env={
            "PACS_AI_DICOM__PORT": "104",
            "PACS_AI_DICOM__AE_TITLE": "GATEWAY",
            "PACS_AI_ACCESS__REJECT_UNKNOWN": "false",
            "PACS_AI_DATABASE__URL": "postgresql+psycopg://u@db/pacs",
            "UNRELATED": "x",
        }
    )
    assert s.dicom.port == 104 and s.dicom.ae_title == "GATEWAY"
    assert s.access.reject_unknown is False
    assert s.database.url == "postgresql+psycopg://u@db/pacs"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PACS_AI_DICOM__AE_TITLE": "THIS_IS_SEVENTEEN"}, "dicom.ae_title"),
        ({"PACS_AI_DICOM__AE_TITLE": "BACK\\SLASH"}, "dicom.ae_title"),
        ({"PACS_AI_DICOM__PORT": "70000"}, "dicom.port"),
        ({"PACS_AI_DICOM__PORT": "0"}, "dicom.port"),
        ({"PACS_AI_DICOM__MAX_PDU_SIZE": "0"}, "dicom.max_pdu_size"),
        ({"PACS_AI_DATABASE__URL": "mysql://x"}, "database.url"),
        ({"PACS_AI_TLS__ENABLED": "true"}, "tls"),
        ({"PACS_AI_DICOM__NO_SUCH_KEY": "1"}, "dicom.no_such_key"),
        ({"PACS_AI_ASSEMBLY__CT_QUIET_SECONDS": "-1"}, "assembly.ct_quiet_seconds"),
    ],
)
def test_bad_values_are_clear_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(env=env)


def test_bad_allowlist_host_and_missing_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[access]\nallowed = [{ ae_title = "X", host = "not-an-ip" }]\n')
    with pytest.raises(ConfigError, match=r"access\.allowed\.0\.host"):
        load_settings(cfg, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", env={})
    cfg.write_text("[dicom\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(cfg, env={})


def test_allowlist_binds_ae_to_network(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[access]\nallowed = [{ ae_title = "CT1", host = "10.1.2.0/24" },'
        ' { ae_title = "DX1", host = "10.9.9.9" }]\n'
    )
    access = load_settings(cfg, env={}).access
    assert access.is_allowed("CT1", "10.1.2.77")
    assert not access.is_allowed("CT1", "10.1.3.1")
    assert access.is_allowed("DX1", "10.9.9.9") and not access.is_allowed("DX1", "10.9.9.8")
    assert not access.is_allowed("OTHER", "10.9.9.9")
    assert not access.is_allowed("CT1", "garbage")


def test_http_defaults_and_override() -> None:
    s = load_settings(env={"PACS_AI_HTTP__PORT": "8181"})
    assert s.http.enabled is True and s.http.host == "127.0.0.1" and s.http.port == 8181
    assert s.http.secret_key_file == (DEFAULT_CONFIG.parent / "var/console-secret.key").resolve()
    assert s.http.metrics_public is True and s.http.tls is False
