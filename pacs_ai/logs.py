"""Logging set-up and the helpers that keep PHI out of logs.

Rule: logs carry internal ids and hashed UIDs only (:func:`uid_ref`), never patient names,
IDs, accession numbers or raw UIDs. A test sends a study with a known name and ID, captures
all log output and checks neither appears.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from typing import Any

from pacs_ai.config import LoggingSettings


def uid_ref(uid: str | None) -> str:
    """A short, stable, non-reversible reference to a UID for logs."""
    if not uid:
        return "-"
    return "u" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(settings: LoggingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    quiet_third_party()


def quiet_third_party() -> None:
    """pynetdicom logs dataset identifiers (PHI) at INFO/DEBUG; keep it at WARNING and turn
    its identifier logging off."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    for name in ("pynetdicom", "apscheduler", "alembic", "highdicom", "sqlalchemy.engine"):
        logging.getLogger(name).setLevel(logging.WARNING)
