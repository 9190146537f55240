"""TLS (PS3.15 secure transport): with certificates made here, a TLS association stores,
plain TCP to the TLS port gets nothing, and client certificates are enforced when required."""

from __future__ import annotations

import select as io_select
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import Row, select

from pacs_ai.db.models import Association
from pacs_ai.delivery.scu import Outgoing, Peer, send
from tests.conftest import SCU_AE, dx_dataset, wait_for
from tests.integration.conftest import ServiceFactory
from tests.integration.rawpeer import EXPLICIT_LE, RawPeer
from tests.tools import require_tool


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        [require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def _client_context(pki: Path, with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if with_cert:
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    return ctx


def test_tls_association_and_plain_tcp_refused(start_service: ServiceFactory, pki: Path) -> None:
    svc = start_service(
        tls={
            "enabled": True,
            "cert_file": str(pki / "server.pem"),
            "key_file": str(pki / "server.key"),
            "ca_file": str(pki / "ca.pem"),
            "require_client_cert": True,
        }
    )
    port = svc.server.port
    ds = dx_dataset()
    ok = send(
        Peer("127.0.0.1", port, "PACS_AI", SCU_AE, tls=_client_context(pki, True)),
        [Outgoing("dx", dataset=ds)],
    )
    assert [r.status for r in ok] == [0]

    # No client certificate: the handshake fails, nothing is stored.
    no_cert = send(
        Peer("127.0.0.1", port, "PACS_AI", SCU_AE, tls=_client_context(pki, False)),
        [Outgoing("dx2", dataset=dx_dataset(seed=4))],
    )
    assert no_cert[0].status is None

    # Plain TCP speaking DICOM to the TLS port: no association.
    plain = RawPeer("127.0.0.1", port)
    with pytest.raises((ConnectionError, OSError)):
        plain.associate(SCU_AE, contexts=[("1.2.840.10008.1.1", [EXPLICIT_LE])])

    def fetch() -> list[Row[tuple[bool, bool, str | None]]]:
        with svc.engine.connect() as c:
            stmt = select(Association.tls, Association.accepted, Association.end_reason)
            return list(c.execute(stmt))

    wait_for(lambda: len(fetch()) == 3 and all(r.end_reason for r in fetch()))
    rows = fetch()
    assert rows[0] == (True, True, "released")
    assert all(r.tls for r in rows)
    assert [r.end_reason for r in rows[1:]] == ["tls_failed", "tls_failed"]


def test_tls_handshake_has_one_total_deadline(start_service: ServiceFactory, pki: Path) -> None:
    """A client trickling its TLS ClientHello is cut off once acse_timeout has passed in
    total (handshake and A-ASSOCIATE-RQ share one deadline), and recorded as tls_failed."""
    svc = start_service(
        dicom={"acse_timeout": 1.0},
        tls={
            "enabled": True,
            "cert_file": str(pki / "server.pem"),
            "key_file": str(pki / "server.key"),
        },
    )
    raw = RawPeer("127.0.0.1", svc.server.port)  # type: ignore[union-attr]
    hello = b"\x16\x03\x01\x3e\x80" + bytes(200)  # a handshake record of 16000 bytes, begun
    started = time.monotonic()
    closed = False
    for byte in hello:
        try:
            raw.send_raw(bytes([byte]))
            readable, _, _ = io_select.select([raw.sock], [], [], 0.1)
            if readable and raw.sock.recv(1, socket.MSG_PEEK) in (b"", b"\x15"):
                closed = True
        except OSError:
            closed = True
        if closed:
            break
    elapsed = time.monotonic() - started
    assert closed and 1.0 <= elapsed < 1.8, f"closed={closed} after {elapsed:.2f} s"

    def rows() -> list[tuple[str | None, str | None]]:
        with svc.engine.connect() as c:
            return [
                (r.end_reason, r.reject_reason)
                for r in c.execute(select(Association.end_reason, Association.reject_reason))
            ]

    wait_for(lambda: len(rows()) == 1, what="the failed handshake recorded")
    assert rows() == [("tls_failed", "TLS handshake timed out")]
