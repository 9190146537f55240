"""What the console reads from the running service (everything optional: a `worker` has no
listener, a `serve` with ``pipeline.enabled = false`` loads no models)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

from pacs_ai.config import Settings


@dataclass(frozen=True)
class WebContext:
    settings: Settings
    engine: Engine
    # True while the DICOM listener accepts connections; None: no listener in this process.
    listener_accepting: Callable[[], bool] | None = None
    # True once every model this process needs is loaded; None: no pipeline in this process.
    models_loaded: Callable[[], bool] | None = None
    # Wake the outbox after a console action queued deliveries (None: next poll).
    wake_outbox: Callable[[], None] | None = None
    # Wake the pipeline after a re-run (None: next poll).
    wake_pipeline: Callable[[], None] | None = None
