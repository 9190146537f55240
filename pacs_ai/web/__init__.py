"""The HTTP face: the admin console, ``/metrics``, ``/healthz`` and ``/readyz``.

Public surface::

    WebContext(settings, engine, ...)   what the pages and checks read
    build_app(ctx) -> Starlette         the ASGI application
    HttpServer(settings.http, app)      uvicorn in a thread: start() / stop()
"""

from __future__ import annotations

from pacs_ai.web.app import build_app
from pacs_ai.web.context import WebContext
from pacs_ai.web.server import HttpServer

__all__ = ["HttpServer", "WebContext", "build_app"]
