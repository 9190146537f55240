"""uvicorn in a thread of the service: bound before start() returns (a port in use fails the
start with a clear message), stopped gracefully by stop()."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from pacs_ai.config import HttpSettings
from pacs_ai.errors import StartupError

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, settings: HttpSettings, app: Starlette) -> None:
        self.settings = settings
        self._config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=str(settings.cert_file) if settings.cert_file else None,
            ssl_keyfile=str(settings.key_file) if settings.key_file else None,
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls else "http"
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> None:
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.settings.host, self.settings.port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"http: cannot listen on {self.settings.host}:{self.settings.port} "
                f"({exc.strerror}); set [http] port (PACS_AI_HTTP__PORT) per process, "
                "or [http] enabled = false"
            ) from exc
        sock.listen(128)
        sock.set_inheritable(True)
        self._sock = sock
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise StartupError("http: the server did not start (see the log)")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
