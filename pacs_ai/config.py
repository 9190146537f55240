"""One typed, immutable settings object, loaded from ``config.toml`` plus environment overrides.

Environment variables override single keys: ``PACS_AI_<SECTION>__<KEY>=value``, e.g.
``PACS_AI_DICOM__PORT=104`` or ``PACS_AI_DATABASE__URL=postgresql+psycopg://...``. A value is
read as a TOML value when it parses as one (numbers, booleans, arrays), otherwise as a string.
Relative paths in the file are resolved against the directory of the config file, so the
embedded default works from any working directory.

Which file: ``--config FILE``, else the file named by ``PACS_AI_CONFIG``, else (in a source
checkout) the repository's ``config.toml``. ``default_config.toml`` in this package is the
documented template that ``pacs-ai init DIR`` writes.

Nothing here reads the environment at import time; :func:`load_settings` is the only entry.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pacs_ai.errors import ConfigError

ENV_PREFIX = "PACS_AI_"
# The variable naming the config file when no --config is given (no "__": not a key override).
CONFIG_ENV = "PACS_AI_CONFIG"
# The developer config of a source checkout (absent in an installed wheel).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"
# The documented template shipped in the package; `pacs-ai init DIR` copies it.
PACKAGED_CONFIG = Path(__file__).resolve().parent / "default_config.toml"

# PS3.5 AE title: 1-16 characters of the default repertoire, no backslash or control characters,
# not all spaces. Leading/trailing spaces are not significant, so we refuse them to avoid
# confusion between "PACS " and "PACS".
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def validate_ae_title(value: str) -> str:
    if not _AE_RE.match(value) or value.strip() != value or not value.strip():
        raise ValueError(
            f"AE title {value!r} must be 1-16 printable ASCII characters, no backslash, "
            "no leading or trailing spaces"
        )
    return value


AETitle = Annotated[str, Field(min_length=1, max_length=16)]
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0, le=86400)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DicomSettings(_Section):
    ae_title: AETitle = "PACS_AI"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 16
    # Largest P-DATA PDU we accept; we advertise it in A-ASSOCIATE-AC. 0 is not allowed:
    # an unlimited PDU would let a peer make us read arbitrarily large frames.
    max_pdu_size: Annotated[int, Field(ge=4096, le=16 * 1024 * 1024)] = 262144
    # Largest dataset accepted in one C-STORE (bytes); larger ones are refused mid-stream.
    max_instance_bytes: Annotated[int, Field(ge=1024)] = 2 * 1024**3
    # Largest decoded image a header may declare (rows x cols x frames x samples x bits/8);
    # larger ones are refused on receipt (0xC004) as a decompression-bomb guard.
    max_pixel_bytes: Annotated[int, Field(ge=1024)] = 1024**3
    acse_timeout: PositiveSeconds = 30.0
    dimse_timeout: PositiveSeconds = 60.0
    network_timeout: PositiveSeconds = 60.0
    # A Deflated Explicit VR dataset may inflate to at most this many times its deflated size
    # (plus 16 MiB, and never beyond max_instance_bytes); beyond it: 0xC004 (a deflate bomb).
    max_inflate_ratio: Annotated[float, Field(ge=1, le=1100)] = 100.0
    # Connections from one address that have not yet sent their A-ASSOCIATE-RQ; more are
    # closed at once, so idle connections cannot crowd out modalities from other addresses.
    max_pending_per_address: Annotated[int, Field(ge=1, le=1000)] = 4

    _ae = field_validator("ae_title")(validate_ae_title)


class AllowedPeer(_Section):
    ae_title: AETitle
    # An IP address or a network in CIDR notation (e.g. 10.1.2.0/24).
    host: str

    _ae = field_validator("ae_title")(validate_ae_title)

    @field_validator("host")
    @classmethod
    def _host_is_ip_or_network(cls, v: str) -> str:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError as exc:
            raise ValueError(f"host {v!r} must be an IP address or CIDR network") from exc
        return v

    def matches(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


class AccessSettings(_Section):
    reject_unknown: bool = True
    allowed: tuple[AllowedPeer, ...] = ()

    def is_allowed(self, ae_title: str, address: str) -> bool:
        if not self.reject_unknown:
            return True
        return any(p.matches(ae_title, address) for p in self.allowed)


class TlsSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    # CA bundle used to verify peers' certificates; with require_client_cert the handshake
    # fails for peers without a certificate signed by it.
    ca_file: Path | None = None
    require_client_cert: bool = False
    # Name of an environment variable holding the private key's password (never the
    # password itself: secrets stay off command lines and out of config files).
    key_password_env: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs tls.cert_file and tls.key_file")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.require_client_cert needs tls.ca_file")
        return self


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_RE = re.compile(r"^([A-Za-z0-9._-]+/)*$")


class StorageSettings(_Section):
    path: Path = Path("var/spool")
    # Below this much free space new associations and C-STOREs are refused (0xA700).
    min_free_mb: Annotated[int, Field(ge=0)] = 500
    # "local": the spool is the store. "s3": the spool is the write-ahead buffer and every
    # instance is uploaded under its sha256 (pacs_ai.storage). Credentials come from the
    # environment only (PACS_AI_S3_ACCESS_KEY_ID/..._SECRET_ACCESS_KEY or AWS_...).
    backend: Literal["local", "s3"] = "local"
    s3_endpoint: str | None = None
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = ""
    s3_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    # Workers' bounded read cache of downloaded objects (least recently used evicted).
    s3_cache_path: Path = Path("var/s3-cache")
    s3_cache_mb: Annotated[int, Field(ge=1)] = 2048
    # A worker waits this long for an object the gateway has not uploaded yet.
    s3_read_wait_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0
    # Not-yet-uploaded bytes above this refuse new C-STOREs (0xA700) and associations; 0: off.
    local_buffer_high_watermark_mb: Annotated[int, Field(ge=0)] = 0
    # Local copies of uploaded instances are deleted this long after their upload (the
    # retention job); absent: kept until retention purges the study.
    local_keep_seconds: Annotated[float, Field(ge=0)] | None = None
    upload_batch: Annotated[int, Field(ge=1, le=1000)] = 100
    upload_concurrency: Annotated[int, Field(ge=1, le=32)] = 4
    upload_poll_seconds: Annotated[float, Field(gt=0, le=60)] = 0.5
    upload_max_backoff_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # /metrics and the console flag the upload lag (oldest instance not uploaded) above
    # this; not /readyz: a lagging uploader does not stop the gateway receiving.
    upload_lag_alert_seconds: Annotated[float, Field(gt=0)] = 300.0

    @model_validator(mode="after")
    def _s3_complete(self) -> StorageSettings:
        if self.backend == "s3":
            if not _BUCKET_RE.match(self.s3_bucket) or ".." in self.s3_bucket:
                raise ValueError(
                    'storage.backend = "s3" needs storage.s3_bucket: 3-63 lowercase letters, '
                    "digits, dots and hyphens"
                )
            if self.s3_endpoint is not None and not re.match(r"^https?://", self.s3_endpoint):
                raise ValueError("storage.s3_endpoint must be an http:// or https:// URL")
        if not _PREFIX_RE.match(self.s3_prefix):
            raise ValueError(
                "storage.s3_prefix must be empty or end with '/' (letters, digits, . _ - /)"
            )
        return self


class DatabaseSettings(_Section):
    url: str = "sqlite:///var/pacs-ai.db"
    echo: bool = False
    # How long a statement waits for a lock (SQLite busy timeout, PostgreSQL lock_timeout and
    # connect timeout); a C-STORE whose row cannot be written within it is answered 0xA702.
    busy_timeout_seconds: Annotated[float, Field(gt=0, le=10)] = 5.0

    @field_validator("url")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if not v.startswith(("sqlite://", "postgresql")):
            raise ValueError("database.url must be a sqlite:// or postgresql:// URL")
        return v


class AssemblySettings(_Section):
    # CR/DX: a series is complete this long after the association that brought it ended.
    xray_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 0.5
    # CT (and other multi-image series): complete after this long without a new instance.
    ct_quiet_seconds: Annotated[float, Field(ge=0, le=86400)] = 10.0
    # How often the completion sweep runs (it is also woken at association release).
    sweep_interval_seconds: PositiveSeconds = 1.0


class RoutingRule(_Section):
    """Which series go to which model. Rules are tried in order; the first whose filters all
    match wins (an empty filter matches anything). Gating (view, localizer, slice count, ...)
    still decides afterwards whether the matched model can take the series."""

    name: str
    model: Literal["cxr", "ct"]
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    # Body Part Examined values; "" matches a series that does not state one.
    body_parts: tuple[str, ...] = ()
    # Refuse series whose Image Type contains any of these values (e.g. "LOCALIZER").
    exclude_image_types: tuple[str, ...] = ()


def _default_routing() -> tuple[RoutingRule, ...]:
    return (
        RoutingRule(
            name="chest-xray",
            model="cxr",
            modalities=("CR", "DX"),
            body_parts=("CHEST", "THORAX", "LUNG", ""),
        ),
        RoutingRule(
            name="chest-ct",
            model="ct",
            modalities=("CT",),
            body_parts=("CHEST", "THORAX", "LUNG", "CHEST_ABDOMEN", ""),
            exclude_image_types=("LOCALIZER",),
        ),
    )


class PipelineSettings(_Section):
    # Run the pipeline worker inside `pacs-ai serve` (else run `pacs-ai worker` separately).
    enabled: bool = True
    # The worker is woken when a study becomes ready; it also polls this often.
    poll_seconds: PositiveSeconds = 2.0
    # A failing job (model error, out of memory) is retried after these delays, then
    # dead-lettered (study state "failed").
    retry_seconds: tuple[PositiveSeconds, ...] = (10.0, 60.0, 300.0)
    # Pipeline slots of a worker on CPU (each its own scoring child, one study at a time).
    # With CUDA_VISIBLE_DEVICES set, a worker runs one slot per visible GPU instead.
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    # A running attempt refreshes its heartbeat this often (in the jobs row); every worker
    # also looks for stalled attempts this often.
    heartbeat_seconds: Annotated[float, Field(gt=0, le=3600)] = 5.0
    # An attempt whose heartbeat is older than this belongs to a worker that died (kill -9,
    # machine lost, network cut): it counts as a failed attempt and the study is retried by
    # another worker after its retry delay. Its late result, if it comes back, is refused.
    stalled_seconds: Annotated[float, Field(gt=0, le=86400)] = 30.0
    # Address-space limit (RLIMIT_AS) of the scoring worker process that decodes and runs the
    # models, in MiB; 0 = none. torch alone reserves about 4 GiB of address space. Not applied
    # when a CUDA device may be used (the driver reserves address space beyond real use).
    worker_memory_mb: Annotated[int, Field(ge=0, le=1024 * 1024)] = 12288
    # A study the scoring worker has not answered within this long fails its attempt; the
    # worker is killed and restarted.
    worker_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0

    @model_validator(mode="after")
    def _room_for_torch(self) -> PipelineSettings:
        if 0 < self.worker_memory_mb < 4096:
            raise ValueError("worker_memory_mb must be 0 (no limit) or at least 4096")
        if self.heartbeat_seconds * 2 > self.stalled_seconds:
            raise ValueError("stalled_seconds must be at least twice heartbeat_seconds")
        return self


Role = Literal["all", "gateway", "worker", "sender"]


class ServiceSettings(_Section):
    # What `pacs-ai serve` runs in this process (`--role` overrides): "all" (everything, one
    # machine), "gateway" (DICOM listener, assembly, retention, console), "worker" (claims and
    # scores studies only), "sender" (delivery outbox only). Several processes with different
    # roles share one PostgreSQL database.
    role: Role = "all"
    # This gateway's name (1-64 characters; default: the host name), recorded on the
    # associations and instances it receives. Its uploader and start-up recovery touch only
    # its own rows (and rows from before the name was recorded): two gateways on one
    # database, each with its own spool, must have distinct names.
    node_name: str = Field(
        default_factory=lambda: socket.gethostname()[:64] or "gateway",
        min_length=1,
        max_length=64,
    )


ObjectKind = Literal["sr", "summary", "text_sr"]
# What reports.path keeps: report objects, plus "png", a PNG of the summary image to look at.
OutputKind = Literal["sr", "summary", "text_sr", "png"]


class ReportsSettings(_Section):
    # Where report objects (SR, summary images) are written; with no [[destinations]] this is
    # where users pick them up: <report date, UTC>/study-<internal id>/.
    path: Path = Path("var/reports")
    # Kinds written there for every scored study (destinations' kinds are written too).
    objects: tuple[OutputKind, ...] = ("sr", "summary", "png")


_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class DestinationSettings(_Section):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    # "dimse": C-STORE to an AE; "dicomweb": STOW-RS to a DICOMweb base URL.
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: AETitle | None = None  # None only with return_to_sender
    host: str | None = None
    port: Port | None = None
    # Our AE title on this association (default: dicom.ae_title).
    calling_ae_title: AETitle | None = None
    # Which objects go here: the TID 1500 SR, and/or fallbacks for viewers that cannot draw
    # it (a Secondary Capture summary image, a Basic Text SR).
    objects: tuple[ObjectKind, ...] = ("sr",)
    # Send to the AE title and address that sent the study (port from this entry).
    return_to_sender: bool = False
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    timeout_seconds: PositiveSeconds = 30.0
    # DICOMweb: the service's base URL (STOW-RS posts to <url>/studies); credentials come
    # from environment variables named here, never from this file.
    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")] | None = None
    username: str | None = None
    password_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    token_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    ca_file: Path | None = None

    _ae = field_validator("ae_title", "calling_ae_title")(
        lambda v: v if v is None else validate_ae_title(v)
    )

    @model_validator(mode="after")
    def _target(self) -> DestinationSettings:
        if not self.objects:
            raise ValueError("a destination needs at least one object kind")
        web_only = ("url", "username", "password_env", "token_env", "ca_file")
        dimse_only: tuple[str, ...] = ("ae_title", "host", "port", "calling_ae_title")
        dimse_only += ("tls_ca_file", "tls_cert_file", "tls_key_file")
        if self.kind == "dicomweb":
            if self.url is None:
                raise ValueError("a dicomweb destination needs url")
            extra = [k for k in dimse_only if getattr(self, k) is not None]
            if extra or self.return_to_sender or self.tls:
                wrong = extra or ["return_to_sender/tls"]
                raise ValueError(f"{', '.join(wrong)}: not for a dicomweb destination")
            if (self.username is None) != (self.password_env is None):
                raise ValueError("basic credentials need both username and password_env")
            if self.username is not None and self.token_env is not None:
                raise ValueError("give username/password_env or token_env, not both")
            return self
        extra = [k for k in web_only if getattr(self, k) is not None]
        if extra:
            raise ValueError(f'{", ".join(extra)}: only for kind = "dicomweb"')
        if self.port is None:
            raise ValueError("a destination needs port")
        if not self.return_to_sender and (self.ae_title is None or self.host is None):
            raise ValueError("a destination needs ae_title and host (or return_to_sender)")
        return self


class DeliverySettings(_Section):
    # Delays before retry 1, 2, ...; the last one repeats until max_attempts.
    retry_ladder_seconds: tuple[PositiveSeconds, ...] = (30.0, 120.0, 600.0, 3600.0, 21600.0)
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 20
    # How often the outbox looks for due deliveries (it is also woken when reports are made).
    poll_seconds: PositiveSeconds = 5.0
    # Objects per association.
    batch_size: Annotated[int, Field(ge=1, le=1000)] = 100


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


class InferenceSettings(_Section):
    # "auto": the first CUDA GPU if one is usable, else the CPU; or "cpu", "cuda", "cuda:N".
    device: str = "auto"
    # "auto": mixed precision (bf16, else fp16) on a GPU; on the CPU bf16 when it has native
    # bf16 and the measured difference is within bf16_tolerance, else fp32; or force one.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Images per forward pass; images of several series are batched together.
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 16
    # Model directories (card.json + weights): "bundled:cxr" / "bundled:ct" are the demo
    # models shipped in the package; a relative path is relative to this file.
    cxr_model: str = "bundled:cxr"
    ct_model: str = "bundled:ct"
    # A CT series with fewer distinct slice positions is not applicable.
    min_ct_slices: Annotated[int, Field(ge=1, le=10000)] = 10
    # Grad-CAM heatmap per scored series (for the summary image).
    heatmaps: bool = True
    # "active": reports are delivered; "shadow": findings and reports are recorded (audit,
    # reports.path) and monitored, nothing is delivered to the PACS (validate before go-live).
    cxr_mode: Literal["active", "shadow"] = "active"
    ct_mode: Literal["active", "shadow"] = "active"
    # precision "auto" on a CPU with native bf16 runs bf16 only while the largest bf16 vs
    # fp32 probability difference (measured at load on reference phantoms, and the model
    # card's precision_check if any) stays within this; else fp32.
    bf16_tolerance: Annotated[float, Field(gt=0, le=1)] = 0.01
    # Processes that decode images beside the model (pacs_ai.inference.decodepool): "auto" =
    # one per core (at most 8) for a GPU model, threads (0) for a CPU model; 0 = decode in
    # threads of the scoring process; or a number. Each inherits pipeline.worker_memory_mb.
    decode_processes: Literal["auto"] | Annotated[int, Field(ge=0, le=64)] = "auto"

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE_RE.match(v):
            raise ValueError("inference.device must be auto, cpu, cuda or cuda:N")
        return v


Days = Annotated[float, Field(ge=0, le=36500)]


class RetentionSettings(_Section):
    """Storage lifecycle: what is deleted when. Only finished studies are ever touched
    (reported or not applicable with every delivery delivered; failed ones after a longer
    keep); rows stay, marked purged, so the audit trail still answers."""

    # Run the retention job inside `pacs-ai serve` (`pacs-ai retention run` works regardless).
    enabled: bool = True
    # How often the job runs.
    interval_seconds: Annotated[float, Field(ge=1, le=86400)] = 3600.0
    # Received objects are deleted this many days after their study finished.
    objects_days: Days = 30.0
    # ... and this many days after it failed, or after a delivery of it went dead.
    failed_objects_days: Days = 90.0
    # Report files (SR, summary image, text SR) this many days after they were made, once
    # every delivery of them is delivered.
    reports_days: Days = 90.0
    # Audit events and association records older than this are deleted.
    audit_days: Days = 2190.0
    # Below this much free space in the spool, the oldest finished studies' objects go first,
    # before their age (0: off). Keep it above storage.min_free_mb, where ingest refuses.
    min_free_mb: Annotated[int, Field(ge=0)] = 1000

    @model_validator(mode="after")
    def _failed_keep_longer(self) -> RetentionSettings:
        if self.failed_objects_days < self.objects_days:
            raise ValueError("retention.failed_objects_days must be >= retention.objects_days")
        return self


class HttpSettings(_Section):
    """The HTTP face (console, /metrics, /healthz, /readyz) inside `serve` and `worker`."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8080
    # HTTPS when both are set (session cookies are then marked Secure).
    cert_file: Path | None = None
    key_file: Path | None = None
    # /metrics without logging in (for a Prometheus server on a trusted network).
    metrics_public: bool = True
    # Name of an environment variable holding the session-signing key; unset: a random key is
    # generated once and kept in secret_key_file (shared by every process on this machine).
    secret_key_env: str | None = None
    secret_key_file: Path = Path("var/console-secret.key")
    # Console sessions end after this long without a request.
    session_minutes: Annotated[int, Field(ge=1, le=7 * 24 * 60)] = 480
    # Failed logins per user name and client address within login_window_seconds before more
    # attempts are refused (HTTP 429) until the window has passed.
    login_max_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    login_window_seconds: Annotated[float, Field(ge=1, le=86400)] = 300.0

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("http.cert_file and http.key_file go together")
        return self

    @property
    def tls(self) -> bool:
        return self.cert_file is not None


class MonitoringSettings(_Section):
    """Per model and finding, the last ``window`` scored series compared with the model
    card's validation reference (pacs_ai.monitoring)."""

    enabled: bool = True
    window: Annotated[int, Field(ge=10, le=100000)] = 200
    # No check before the window holds this many scored series.
    min_scored: Annotated[int, Field(ge=5, le=100000)] = 50
    # Alert when the window's positive rate leaves validation rate +- this (absolute).
    positive_rate_tolerance: Annotated[float, Field(gt=0, le=1)] = 0.25
    # Alert when the PSI of the window's scores vs the validation deciles exceeds this.
    psi_max: Annotated[float, Field(gt=0)] = 0.5
    # Alert when more than this fraction of the window's series were refused as OOD.
    ood_refusal_max: Annotated[float, Field(gt=0, le=1)] = 0.2

    @model_validator(mode="after")
    def _window_fits(self) -> MonitoringSettings:
        if self.min_scored > self.window:
            raise ValueError("monitoring.min_scored must not exceed monitoring.window")
        return self


class Settings(_Section):
    dicom: DicomSettings = DicomSettings()
    access: AccessSettings = AccessSettings()
    tls: TlsSettings = TlsSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    assembly: AssemblySettings = AssemblySettings()
    routing: tuple[RoutingRule, ...] = Field(default_factory=_default_routing)
    service: ServiceSettings = ServiceSettings()
    pipeline: PipelineSettings = PipelineSettings()
    reports: ReportsSettings = ReportsSettings()
    destinations: tuple[DestinationSettings, ...] = ()
    delivery: DeliverySettings = DeliverySettings()
    logging: LoggingSettings = LoggingSettings()
    inference: InferenceSettings = InferenceSettings()
    retention: RetentionSettings = RetentionSettings()
    http: HttpSettings = HttpSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    # Where the file was read from (None for pure defaults); relative paths were resolved
    # against its directory.
    source: Path | None = None

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        if len(names) != len(set(names)):
            raise ValueError("destination names must be unique")
        return self


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Merge ``PACS_AI_<SECTION>__<KEY>`` variables into ``data``; returns which key path
    each variable set, so validation errors can name the variable."""
    applied: dict[tuple[str, ...], str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a table")
            node = child
        node[path[-1]] = _parse_env_value(raw)
        applied[tuple(path)] = name
    return applied


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def fix(p: Path | None) -> Path | None:
        if p is None or p.is_absolute():
            return p
        return (base / p).resolve()

    storage = settings.storage.model_copy(
        update={
            "path": fix(settings.storage.path),
            "s3_cache_path": fix(settings.storage.s3_cache_path),
        }
    )
    tls = settings.tls.model_copy(
        update={k: fix(getattr(settings.tls, k)) for k in ("cert_file", "key_file", "ca_file")}
    )
    db_url = settings.database.url
    prefix = "sqlite:///"
    if db_url.startswith(prefix) and not db_url.startswith(prefix + "/"):
        rel = db_url[len(prefix) :]
        if rel and rel != ":memory:":
            db_url = prefix + str((base / rel).resolve())
    database = settings.database.model_copy(update={"url": db_url})
    reports = settings.reports.model_copy(update={"path": fix(settings.reports.path)})
    destinations = tuple(
        d.model_copy(
            update={
                k: fix(getattr(d, k))
                for k in ("tls_ca_file", "tls_cert_file", "tls_key_file", "ca_file")
            }
        )
        for d in settings.destinations
    )

    def fix_model(value: str) -> str:
        if value.startswith("bundled:") or Path(value).is_absolute():
            return value
        return str((base / value).resolve())

    inference = settings.inference.model_copy(
        update={
            "cxr_model": fix_model(settings.inference.cxr_model),
            "ct_model": fix_model(settings.inference.ct_model),
        }
    )
    http = settings.http.model_copy(
        update={
            k: fix(getattr(settings.http, k)) for k in ("cert_file", "key_file", "secret_key_file")
        }
    )
    return settings.model_copy(
        update={
            "http": http,
            "storage": storage,
            "tls": tls,
            "database": database,
            "reports": reports,
            "destinations": destinations,
            "inference": inference,
        }
    )


def _format_validation_error(
    exc: ValidationError, origin: str, from_env: Mapping[tuple[str, ...], str] | None = None
) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        # The variable that set this key, a key inside it, or the table it belongs to.
        names = sorted(
            name
            for path, name in (from_env or {}).items()
            if path[: len(loc)] == loc or loc[: len(path)] == path
        )
        via = f" (from {', '.join(names)})" if names else ""
        lines.append(f"  {'.'.join(loc)}: {err['msg']}{via}")
    return "\n".join(lines)


def config_path(path: Path | str | None, env: Mapping[str, str] | None = None) -> Path:
    """The config file to read: ``path``, else ``$PACS_AI_CONFIG``, else the source
    checkout's ``config.toml``. Raises :class:`ConfigError` when there is none."""
    if path is not None:
        return Path(path)
    named = (os.environ if env is None else env).get(CONFIG_ENV)
    if named:
        return Path(named)
    if DEFAULT_CONFIG.is_file() and (DEFAULT_CONFIG.parent / "pyproject.toml").is_file():
        return DEFAULT_CONFIG
    raise ConfigError(
        f"no configuration: pass --config FILE or set {CONFIG_ENV} "
        "(`pacs-ai init DIR` writes DIR/config.toml)"
    )


def load_settings(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read settings from ``path`` (default: :func:`config_path`).

    ``env`` defaults to ``os.environ``; ``overrides`` is a nested dict merged last (tests).
    Raises :class:`ConfigError` with one line per problem; a problem with a value from an
    environment variable names the variable.
    """
    env = os.environ if env is None else env
    cfg_path = config_path(path, env)
    try:
        data: dict[str, Any] = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        via = f" (from {CONFIG_ENV})" if path is None and env.get(CONFIG_ENV) else ""
        raise ConfigError(f"config file not found: {cfg_path}{via}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid TOML: {exc}") from exc
    from_env = _apply_env(data, env)
    if overrides:
        _deep_merge(data, overrides)
    return settings_from_dict(
        data, base=cfg_path.resolve().parent, origin=str(cfg_path.resolve()), from_env=from_env
    )


def settings_from_dict(
    data: Mapping[str, Any],
    base: Path,
    origin: str = "<dict>",
    from_env: Mapping[tuple[str, ...], str] | None = None,
) -> Settings:
    try:
        settings = Settings.model_validate({**data, "source": Path(origin)})
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origin, from_env)) from exc
    return _resolve_paths(settings, base)


def _deep_merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value
