"""The HTTP server itself: HTTPS with Secure cookies, a port in use, graceful stop."""

from __future__ import annotations

import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from pacs_ai.config import HttpSettings
from pacs_ai.errors import StartupError
from pacs_ai.web import HttpServer, WebContext, build_app
from tests.conftest import free_port, make_settings, prepared_database
from tests.integration.test_tls import pki  # noqa: F401 - fixture


def _server(tmp_path: Path, **http: object) -> HttpServer:
    settings = make_settings(
        tmp_path,
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        http={"enabled": True, "port": free_port(), **http},
    )
    prepared_database(settings)
    engine = create_engine(settings.database.url)
    return HttpServer(settings.http, build_app(WebContext(settings, engine)))


def test_https_and_secure_cookie(tmp_path: Path, pki: Path) -> None:  # noqa: F811
    server = _server(tmp_path, cert_file=str(pki / "server.pem"), key_file=str(pki / "server.key"))
    server.start()
    try:
        assert server.url == f"https://127.0.0.1:{server.port}/"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with urllib.request.urlopen(server.url + "login", context=ctx, timeout=10) as rsp:  # noqa: S310
            cookie = rsp.headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b'"alive"' not in plain.recv(4096)  # no plain HTTP answer
    finally:
        server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_port_in_use_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        server = _server(tmp_path, port=port)
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.start()


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValueError, match="go together"):
        HttpSettings(cert_file=Path("a.pem"))
