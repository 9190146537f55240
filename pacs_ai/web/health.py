"""``/readyz``: can this process do its work now? Each check answers ok or a reason."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from dataclasses import dataclass

from sqlalchemy import text

from pacs_ai.web.context import WebContext

DB_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


def readiness(ctx: WebContext) -> list[Check]:
    checks = [_database(ctx), _spool(ctx)]
    if ctx.models_loaded is not None:
        loaded = ctx.models_loaded()
        checks.append(Check("models", loaded, "loaded" if loaded else "not loaded yet"))
    if ctx.listener_accepting is not None:
        up = ctx.listener_accepting()
        port = ctx.settings.dicom.port
        checks.append(Check("listener", up, f"accepting on port {port}" if up else "not accepting"))
    return checks


def _database(ctx: WebContext) -> Check:
    """``SELECT 1`` on a side thread, given up on after one second."""
    outcome: list[Check] = []

    def probe() -> None:
        try:
            with ctx.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            outcome.append(Check("database", True, "answers"))
        except Exception as exc:
            outcome.append(Check("database", False, f"error: {exc.__class__.__name__}"))

    t = threading.Thread(target=probe, name="readyz-db", daemon=True)
    t.start()
    t.join(DB_TIMEOUT_SECONDS)
    if not outcome:
        return Check("database", False, f"no answer within {DB_TIMEOUT_SECONDS:g} s")
    return outcome[0]


def _spool(ctx: WebContext) -> Check:
    root = ctx.settings.storage.path
    probe = root / "tmp" / f".readyz-{uuid.uuid4().hex}"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
        free = shutil.disk_usage(root).free
    except OSError as exc:
        return Check("spool", False, f"not writable: {exc.__class__.__name__}")
    need = ctx.settings.storage.min_free_mb * 1024 * 1024
    free_mb = free // (1024 * 1024)
    if free < need:
        return Check(
            "spool", False, f"{free_mb} MB free, below storage.min_free_mb = {need // 2**20}"
        )
    return Check("spool", True, f"writable, {free_mb} MB free")
