"""Start-up that tells the truth: checks that refuse to start with one clear line, and the
summary logged once everything is up.

``serve``/``worker`` run :func:`preflight` before anything is created (so a refused start
leaves no empty database file behind); :class:`~pacs_ai.service.Service` then binds the port
(:func:`listen_problem`), loads the models (:func:`model_problem`) and, when running, logs
:func:`summary_lines`. Every refusal is a :class:`~pacs_ai.errors.StartupError`: the CLI
prints it as one line on stderr and exits with status 3.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from pacs_ai import __version__
from pacs_ai.config import DicomSettings, Settings
from pacs_ai.errors import PacsAiError, StartupError

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from pacs_ai.scoring import ModelSummary

_MB = 1024 * 1024
log = logging.getLogger(__name__)


def masked_url(url: str) -> str:
    """The database URL as it may be shown: password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL: show only its scheme
        return url.split("://", 1)[0] + "://..."


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (None for PostgreSQL and in-memory databases)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix) :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _upgrade_hint(settings: Settings) -> str:
    where = f" --config {settings.source}" if settings.source is not None else ""
    return f"run `pacs-ai db upgrade{where}`"


def schema_problem(settings: Settings, current: str | None, head: str | None) -> str | None:
    """Why the schema at ``current`` cannot be served (None: it is at ``head``)."""
    if current == head:
        return None
    return (
        f"database schema is at {current or '(empty)'}, this version needs {head}: "
        f"{_upgrade_hint(settings)} (database {masked_url(settings.database.url)})"
    )


def check_database(settings: Settings) -> None:
    """The configured database exists, answers and has the latest schema. A SQLite file
    that does not exist is not created (nor its folder): an empty schema is refused as is."""
    from pacs_ai.db.session import current_revision, head_revision, make_engine

    head = head_revision()
    path = sqlite_file(settings.database.url)
    if path is not None and not path.is_file():
        raise StartupError(schema_problem(settings, None, head) or "")
    engine = make_engine(settings.database)
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise StartupError(
            f"database {masked_url(settings.database.url)} cannot be opened "
            f"({type(exc).__name__}); check database.url in {settings.source}"
        ) from exc
    finally:
        engine.dispose()
    problem = schema_problem(settings, current, head)
    if problem:
        raise StartupError(problem)


def check_writable(path: Path, key: str) -> None:
    """``path`` exists (or can be made) and a file can be created and removed in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".pacs-ai-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(
            f"{key} {path} is not writable: {exc.strerror or type(exc).__name__}"
        ) from exc


def check_tls(settings: Settings) -> None:
    from pacs_ai.ingest.server import make_ssl_context

    if not settings.tls.enabled:
        return
    try:
        make_ssl_context(settings.tls)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None)
        raise StartupError(
            f"tls.cert_file {settings.tls.cert_file} / tls.key_file {settings.tls.key_file} "
            f"cannot be loaded: {reason or type(exc).__name__}"
        ) from exc


def preflight(settings: Settings, listener: bool, pipeline: bool | None = None) -> None:
    """What can be checked before the service is built: database, spool, reports, TLS.
    ``pipeline`` None: as ``pipeline.enabled`` (or always without a listener)."""
    check_database(settings)
    check_writable(settings.storage.path, "storage.path")
    if pipeline is None:
        pipeline = settings.pipeline.enabled or not listener
    if pipeline:
        check_writable(settings.reports.path, "reports.path")
    if listener:
        check_tls(settings)
    check_object_store(settings)


def check_object_store(settings: Settings) -> None:
    """With ``storage.backend = "s3"``: a missing bucket or refused credentials refuse the
    start; a store that does not answer only warns (the gateway's local buffer holds what
    arrives until it does, and workers wait for it)."""
    if settings.storage.backend != "s3":
        return
    from pacs_ai.storage.objects import ObjectStoreUnavailable, S3Store

    try:
        S3Store(settings.storage).check_bucket()
    except ObjectStoreUnavailable as exc:
        log.warning("object store not reachable at start (%s); uploads wait for it", exc)
    except PacsAiError as exc:
        raise StartupError(str(exc)) from exc


def listen_problem(dicom: DicomSettings, exc: OSError) -> str:
    """One line for a failed bind of the DICOM port."""
    where = f"{dicom.host}:{dicom.port}"
    if exc.errno == errno.EADDRINUSE:
        return f"dicom.port {dicom.port} on {dicom.host} is already in use by another process"
    if exc.errno == errno.EACCES:
        return (
            f"dicom.port {dicom.port} on {dicom.host}: permission denied (ports below 1024 "
            "need CAP_NET_BIND_SERVICE, which the systemd unit grants)"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"dicom.host {dicom.host} is not an address of this machine"
    return f"cannot listen on {where}: {exc.strerror or type(exc).__name__}"


def model_keys(settings: Settings) -> list[str]:
    """The models the routing rules use, in rule order."""
    return list(dict.fromkeys(rule.model for rule in settings.routing))


def model_problem(settings: Settings, key: str, exc: BaseException) -> str:
    source = getattr(settings.inference, f"{key}_model")
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"inference.{key}_model ({source}) cannot be loaded: {first_line}"


def _free_space(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        return f"free space unknown ({exc.strerror})"
    if free >= 1024 * _MB:
        return f"{free / (1024 * _MB):.1f} GB free"
    return f"{free / _MB:.0f} MB free"


def _retention_line(settings: Settings) -> str:
    r = settings.retention
    if not r.enabled:
        return "retention: off in serve (nothing is deleted unless `pacs-ai retention run`)"
    return (
        f"retention: objects after {r.objects_days:g} d (failed {r.failed_objects_days:g} d), "
        f"reports {r.reports_days:g} d, audit {r.audit_days:g} d, "
        f"oldest first below {r.min_free_mb} MB free, every {r.interval_seconds:g} s"
    )


def summary_lines(
    settings: Settings,
    models: Sequence[ModelSummary],
    engine: Engine,
    listener: bool,
    revision: str | None,
    role: str | None = None,
) -> list[str]:
    """The start-up summary: what this process serves, with what, and where."""
    d, tls, access = settings.dicom, settings.tls, settings.access
    lines = [f"pacs-ai {__version__} started with config {settings.source}"]
    if role:
        lines.append(role)
    if listener:
        tls_text = "off"
        if tls.enabled:
            tls_text = "on, client certificate " + (
                "required" if tls.require_client_cert else "optional"
            )
        allow = (
            f"{len(access.allowed)} peer(s) allowed, others rejected"
            if access.reject_unknown
            else "every peer accepted (access.reject_unknown = false)"
        )
        lines.append(f"dicom: AE {d.ae_title} on {d.host}:{d.port}, TLS {tls_text}; {allow}")
    else:
        lines.append("dicom: no listener in this process")
    if models:
        for m in models:
            demo = "DEMO, not for clinical use" if m.demo else "not a demo"
            why = f" ({m.precision_reason})" if m.precision_reason else ""
            lines.append(
                f"model {m.key}: {m.name} {m.version} ({demo}), "
                f"device {m.device}, precision {m.precision}{why}"
            )
    else:
        lines.append("models: none loaded here (studies are scored by `serve --role worker`)")
    if settings.destinations:
        for dest in settings.destinations:
            target = (
                f"the sender's AE and address, port {dest.port}"
                if dest.return_to_sender
                else f"{dest.ae_title} at {dest.host}:{dest.port}"
            )
            lines.append(
                f"destination {dest.name}: {target}, objects {', '.join(dest.objects)}, "
                f"TLS {'on' if dest.tls else 'off'}"
            )
    else:
        lines.append("destinations: none")
    lines.append(f"reports: {settings.reports.path}")
    lines.append(f"database: {engine.url.render_as_string(hide_password=True)} (schema {revision})")
    lines.append(
        f"spool: {settings.storage.path}, {_free_space(settings.storage.path)} "
        f"(new studies refused below {settings.storage.min_free_mb} MB)"
    )
    st = settings.storage
    if st.backend == "s3":
        lines.append(
            f"object store: s3 bucket {st.s3_bucket} at {st.s3_endpoint or 'AWS'} "
            f"(prefix {st.s3_prefix or 'none'}); the spool is the write-ahead buffer"
            + (
                f", C-STORE refused above {st.local_buffer_high_watermark_mb} MB not uploaded"
                if st.local_buffer_high_watermark_mb
                else ""
            )
        )
    lines.append(_retention_line(settings))
    return lines


def notify_systemd(state: str = "READY=1") -> bool:
    """Tell systemd (``Type=notify``) that start-up finished: ``systemctl start`` then returns
    only once the checks passed and the summary is logged, and fails when the start is
    refused. A no-op (False) outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode("ascii"))
    except OSError:
        return False
    return True
