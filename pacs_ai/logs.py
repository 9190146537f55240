"""Logging set-up and the helpers that keep PHI out of logs.

Rule: logs carry internal ids and hashed UIDs only (:func:`uid_ref`), never patient names,
IDs, accession numbers or raw UIDs. A test runs the whole service on PHI-bearing and
malformed datasets and checks no name, ID or UID appears in any log line.

Safety net for what we do not write ourselves (:class:`RedactingFilter`, on the handler):
tracebacks are rendered as exception classes and frames only (a message may quote a parsed
value); third-party messages have quoted values and UIDs replaced; pydicom's logger is at
ERROR and Python warnings (pydicom warns with raw element values) are logged as their
category and origin only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import traceback
import warnings
from types import TracebackType
from typing import Any, TextIO

from pacs_ai.config import LoggingSettings


def uid_ref(uid: str | None) -> str:
    """A short, stable, non-reversible reference to a UID for logs."""
    if not uid:
        return "-"
    return "u" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


# Five or more numeric components: a UID, not an IPv4 address or a version number.
_UID_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w.])")
_QUOTED_RE = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")
_OWN_LOGGER = "pacs_ai"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def scrub(text: str) -> str:
    """Replace UIDs with their :func:`uid_ref` and quoted values with ``'…'``."""
    text = _UID_RE.sub(lambda m: uid_ref(m.group(0)), text)
    return _QUOTED_RE.sub("'…'", text)


def safe_traceback(exc_info: ExcInfo) -> str:
    """A traceback without exception messages: classes and frames (file, line, function)."""
    lines: list[str] = []
    exc: BaseException | None = exc_info[1]
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)
        lines.append(f"{exc.__class__.__module__}.{exc.__class__.__qualname__} (message omitted)")
        lines += [f"  at {f.filename}:{f.lineno} in {f.name}" for f in frames]
        exc = exc.__cause__ or exc.__context__
    return "\n".join(lines)


class RedactingFilter(logging.Filter):
    """The handler's last check before a record is written (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == _OWN_LOGGER or record.name.startswith(_OWN_LOGGER + ".")
        message = record.getMessage()
        cleaned = _UID_RE.sub(lambda m: uid_ref(m.group(0)), message) if own else scrub(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = safe_traceback(record.exc_info)
            record.exc_info = None
        return True


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Python warnings go to the log as category and origin only: pydicom's warnings quote
    raw element values (names, UIDs)."""
    logging.getLogger("py.warnings").warning(
        "%s at %s:%d (text omitted: it may carry DICOM values)",
        category.__name__,
        filename,
        lineno,
    )


class _TextFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return safe_traceback(ei)


class _JsonFormatter(logging.Formatter):
    def formatException(self, ei: Any) -> str:
        return safe_traceback(ei)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out)


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    quiet_third_party()


def quiet_third_party() -> None:
    """pynetdicom logs dataset identifiers (PHI) at INFO/DEBUG; keep it at WARNING and turn
    its identifier logging off. pydicom at ERROR; warnings without their text."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    for name in (
        *("pynetdicom", "apscheduler", "alembic", "highdicom", "sqlalchemy.engine"),
        *("pylibjpeg", "openjpeg", "libjpeg", "PIL"),
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    # pydicom logs and warns with raw element values (names, UIDs) while parsing.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
