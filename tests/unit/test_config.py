from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from pacs_ai import config
from pacs_ai.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    PACKAGED_CONFIG,
    DestinationSettings,
    RoutingRule,
    Settings,
    load_settings,
)
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


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"PACS_AI_DICOM__PORT": "abc"},
            "  dicom.port: Input should be a valid integer, unable to parse string as an "
            "integer (from PACS_AI_DICOM__PORT)",
        ),
        (
            {"PACS_AI_DICOM__NO_SUCH_KEY": "1"},
            "  dicom.no_such_key: Extra inputs are not permitted (from PACS_AI_DICOM__NO_SUCH_KEY)",
        ),
        (
            {"PACS_AI_TLS__ENABLED": "true"},
            "  tls: Value error, tls.enabled needs tls.cert_file and tls.key_file "
            "(from PACS_AI_TLS__ENABLED)",
        ),
    ],
)
def test_errors_from_environment_variables_name_the_variable(
    env: dict[str, str], line: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(env=env)
    assert str(exc.value).splitlines()[1:] == [line]


def test_config_file_from_environment_and_none_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text("[dicom]\nport = 4242\n")
    assert load_settings(env={CONFIG_ENV: str(cfg)}).dicom.port == 4242
    with pytest.raises(ConfigError) as exc:
        load_settings(env={CONFIG_ENV: str(tmp_path / "missing.toml")})
    assert (
        str(exc.value) == f"config file not found: {tmp_path / 'missing.toml'} (from {CONFIG_ENV})"
    )
    # An installed wheel has no checkout config.toml beside the package.
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "no-checkout" / "config.toml")
    with pytest.raises(ConfigError) as exc:
        load_settings(env={})
    assert str(exc.value) == (
        "no configuration: pass --config FILE or set PACS_AI_CONFIG "
        "(`pacs-ai init DIR` writes DIR/config.toml)"
    )


def _section_text(text: str, header: str) -> str:
    """The lines of one table of the template, up to the next table header."""
    start = text.index(header + "\n")
    rest = text[start + len(header) + 1 :]
    nxt = re.search(r"^(# )?\[", rest, re.MULTILINE)
    return rest[: nxt.start()] if nxt else rest


def test_packaged_config_documents_every_key() -> None:
    text = PACKAGED_CONFIG.read_text()
    tables: dict[str, tuple[str, type[BaseModel]]] = {
        "routing": ("[[routing]]", RoutingRule),
        "destinations": ("# [[destinations]]", DestinationSettings),
    }
    missing = []
    for name, field in Settings.model_fields.items():
        if name == "source":
            continue
        header, model = tables.get(name, (f"[{name}]", field.annotation))
        assert isinstance(model, type) and issubclass(model, BaseModel), name
        body = _section_text(text, header)
        for key in model.model_fields:
            # Every key with its value, or commented out where it has no default value.
            if not re.search(rf"^(# )?{key} = ", body, re.MULTILINE):
                missing.append(f"{name}.{key}")
            elif not re.search(rf"^#.*\n(# )?{key} = |^(# )?{key} = .*#", body, re.MULTILINE):
                missing.append(f"{name}.{key} (no comment)")
    assert missing == []


def _without_data_paths(s: Settings) -> dict[str, object]:
    data = s.model_dump(mode="json", exclude={"source"})
    del data["storage"]["path"], data["reports"]["path"], data["database"]["url"]
    del data["storage"]["s3_cache_path"]
    del data["http"]["secret_key_file"]
    return data


def test_packaged_config_is_the_code_defaults_and_the_checkout_config() -> None:
    packaged = load_settings(PACKAGED_CONFIG, env={})
    base = PACKAGED_CONFIG.parent
    assert packaged.storage.path == base / "spool"
    assert packaged.reports.path == base / "reports"
    assert packaged.database.url == f"sqlite:///{base / 'db' / 'pacs-ai.db'}"
    # The checkout's config.toml sets only data paths (and the loopback allowlist the
    # template has too): everything else comes from the code defaults.
    assert _without_data_paths(load_settings(DEFAULT_CONFIG, env={})) == _without_data_paths(
        packaged
    )
    defaults = _without_data_paths(Settings())
    assert defaults["access"]["allowed"] == []  # type: ignore[index]
    defaults["access"]["allowed"] = _without_data_paths(packaged)["access"]["allowed"]  # type: ignore[index]
    # The console is off in code (tests never bind 8080) and on in every config file.
    assert defaults["http"]["enabled"] is False  # type: ignore[index]
    defaults["http"]["enabled"] = True  # type: ignore[index]
    assert defaults == _without_data_paths(packaged)


def test_dicomweb_destination_keys(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[destinations]]\nname = "cloud"\nkind = "dicomweb"\n'
        'url = "https://pacs.example/dicom-web"\nusername = "svc"\n'
        'password_env = "CLOUD_PASSWORD"\nca_file = "ca.pem"\ntimeout_seconds = 12\n'
        '[[destinations]]\nname = "dimse"\nae_title = "PACS"\nhost = "10.0.0.1"\nport = 104\n'
    )
    web, dimse = load_settings(cfg, env={}).destinations
    assert (web.kind, web.url, web.username, web.password_env) == (
        "dicomweb",
        "https://pacs.example/dicom-web",
        "svc",
        "CLOUD_PASSWORD",
    )
    assert web.ca_file == (tmp_path / "ca.pem").resolve() and web.timeout_seconds == 12
    assert (dimse.kind, dimse.port) == ("dimse", 104)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('kind = "dicomweb"', "a dicomweb destination needs url"),
        ('kind = "dicomweb"\nurl = "ftp://x"', "destinations.0.url"),
        ('kind = "dicomweb"\nurl = "http://x"\nport = 80', "port: not for a dicomweb destination"),
        ('kind = "dicomweb"\nurl = "http://x"\nusername = "u"', "need both username and"),
        (
            'kind = "dicomweb"\nurl = "http://x"\nusername = "u"\npassword_env = "P"\n'
            'token_env = "T"',
            "not both",
        ),
        ('kind = "dicomweb"\nurl = "http://x"\ntoken_env = "has space"', "token_env"),
        ('ae_title = "P"\nhost = "h"\nport = 1\nurl = "http://x"', 'only for kind = "dicomweb"'),
        ('ae_title = "P"\nhost = "h"', "a destination needs port"),
    ],
)
def test_bad_destinations(tmp_path: Path, table: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[destinations]]\nname = "d"\n{table}\n')
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(cfg, env={})


def test_reports_objects_default_and_choice(tmp_path: Path) -> None:
    assert load_settings(env={}).reports.objects == ("sr", "summary", "png")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[reports]\nobjects = ["sr", "text_sr"]\n')
    assert load_settings(cfg, env={}).reports.objects == ("sr", "text_sr")
    cfg.write_text('[reports]\nobjects = ["pdf"]\n')
    with pytest.raises(ConfigError, match=r"reports\.objects"):
        load_settings(cfg, env={})


def test_http_defaults_and_override() -> None:
    s = load_settings(env={"PACS_AI_HTTP__PORT": "8181"})
    assert s.http.enabled is True and s.http.host == "127.0.0.1" and s.http.port == 8181
    assert s.http.secret_key_file == (DEFAULT_CONFIG.parent / "var/console-secret.key").resolve()
    assert s.http.metrics_public is True and s.http.tls is False


def _storage(tmp_path: Path, body: str) -> Settings:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[storage]\n{body}\n")
    return load_settings(cfg, env={})


def test_s3_storage_keys(tmp_path: Path) -> None:
    s = _storage(
        tmp_path,
        'backend = "s3"\ns3_bucket = "pacs-ai.site-a"\ns3_endpoint = "https://rgw.example:7480"\n'
        's3_prefix = "gw1/"\ns3_cache_path = "cache"\nlocal_buffer_high_watermark_mb = 512',
    )
    assert s.storage.backend == "s3"
    assert s.storage.s3_cache_path == (tmp_path / "cache").resolve()
    assert s.storage.local_buffer_high_watermark_mb == 512
    assert s.storage.local_keep_seconds is None
    assert Settings().storage.backend == "local"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('backend = "s3"', 'storage.backend = "s3" needs storage.s3_bucket'),
        ('backend = "s3"\ns3_bucket = "Bad_Bucket"', "needs storage.s3_bucket"),
        ('backend = "s3"\ns3_bucket = "b..x"', "needs storage.s3_bucket"),
        ('backend = "s3"\ns3_bucket = "ok-b"\ns3_endpoint = "rgw:7480"', "http:// or https://"),
        ('s3_prefix = "/abs/"', "storage.s3_prefix"),
        ('s3_prefix = "no-slash"', "storage.s3_prefix"),
        ('backend = "nfs"', "storage.backend"),
        ("local_buffer_high_watermark_mb = -1", "storage.local_buffer_high_watermark_mb"),
        ("s3_cache_mb = 0", "storage.s3_cache_mb"),
        # Credentials never go in the file: there is no key for them.
        ('s3_secret_access_key = "x"', "storage.s3_secret_access_key"),
        ('aws_access_key_id = "x"', "storage.aws_access_key_id"),
    ],
)
def test_s3_storage_errors(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _storage(tmp_path, body)


def test_s3_credentials_come_from_the_environment_only() -> None:
    from pacs_ai.storage.objects import s3_credentials

    assert s3_credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}) == ("a", "b")
    both = {
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "PACS_AI_S3_ACCESS_KEY_ID": "c",
        "PACS_AI_S3_SECRET_ACCESS_KEY": "d",
    }
    assert s3_credentials(both) == ("c", "d")
    with pytest.raises(ConfigError, match="PACS_AI_S3_ACCESS_KEY_ID"):
        s3_credentials({"AWS_ACCESS_KEY_ID": "a"})
