"""The outbox against real peers: which refusals are retried and which go ``dead`` at once
(with the reason an admin reads), DIMSE and DICOMweb STOW-RS alike.

Each test records one real TID 1500 SR as a report of a study, runs the outbox once against
the peer and reads the ``deliveries`` row: state, attempts, last status and the exact reason.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import Engine, insert, select

from pacs_ai.config import Settings
from pacs_ai.db.models import AuditEvent, Delivery, DeliveryState, Report, Study, StudyState
from pacs_ai.db.session import make_engine
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.reporting import (
    AlgorithmInfo,
    FindingResult,
    ReportRequest,
    build_sr,
    build_text_sr,
    write_object,
)
from pacs_ai.reporting import codes as rcodes
from tests.conftest import dx_dataset, free_port, make_settings, prepared_database, wait_for
from tests.integration.orthanc import Orthanc
from tests.integration.test_tls import _openssl

ALGO = AlgorithmInfo(name="test model", version="1", manufacturer="pacs-ai project", demo=True)
FINDINGS = (FindingResult("covid", rcodes.COVID19, probability=0.8, threshold=0.5, present=True),)


class Seeded:
    """A study with one SR report (and a Basic Text SR) queued for the destinations."""

    def __init__(self, settings: Settings) -> None:
        prepared_database(settings)
        self.settings = settings
        self.engine: Engine = make_engine(settings.database)
        self.outbox = Outbox(self.engine, settings)
        self.source = dx_dataset(seed=7)
        request = ReportRequest([self.source], FINDINGS, ALGO)
        self.sr = build_sr(request)
        self.text_sr = build_text_sr(request)
        folder = settings.reports.path / "study-1"
        with self.engine.begin() as conn:
            self.study_id = conn.execute(
                insert(Study)
                .values(study_uid=self.source.StudyInstanceUID, state=StudyState.REPORTED)
                .returning(Study.id)
            ).scalar_one()
            reports = []
            for kind, ds in (("sr", self.sr), ("text_sr", self.text_sr)):
                path = write_object(ds, folder)
                report_id = conn.execute(
                    insert(Report)
                    .values(
                        study_id=self.study_id,
                        study_revision=0,
                        kind=kind,
                        sop_instance_uid=ds.SOPInstanceUID,
                        series_instance_uid=ds.SeriesInstanceUID,
                        sop_class_uid=ds.SOPClassUID,
                        path=str(path.relative_to(settings.reports.path)),
                    )
                    .returning(Report.id)
                ).scalar_one()
                reports.append((report_id, kind))
            self.outbox.enqueue(conn, self.study_id, reports)

    def delivery(self) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(Delivery)).one()

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture
def seeded(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    made: list[Seeded] = []

    def make(*destinations: dict[str, Any]) -> Seeded:
        settings = make_settings(
            tmp_path,
            sqlite_url,
            destinations=[{"name": "pacs", "timeout_seconds": 5, **d} for d in destinations],
            delivery={"retry_ladder_seconds": [0.2], "max_attempts": 20},
        )
        made.append(Seeded(settings))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _dimse(port: int, ae_title: str = "PEER", **extra: Any) -> dict[str, Any]:
    return {"ae_title": ae_title, "host": "127.0.0.1", "port": port, **extra}


def _assert_dead(s: Seeded, error: str, status: int | None = None) -> None:
    d = s.delivery()
    assert (d.state, d.attempts, d.last_status, d.last_error) == (
        DeliveryState.DEAD,
        1,
        status,
        error,
    )
    assert d.next_attempt_at is None and d.delivered_at is None
    with s.engine.connect() as conn:
        detail = conn.scalar(select(AuditEvent.detail).where(AuditEvent.action == "delivery_dead"))
    assert detail is not None and json.loads(detail)["error"] == error


def _assert_retried(s: Seeded, error: str | None, status: int | None = None) -> None:
    d = s.delivery()
    assert (d.state, d.attempts, d.last_status, d.last_error) == (
        DeliveryState.FAILED,
        1,
        status,
        error,
    )
    assert d.next_attempt_at is not None


# --- DIMSE ----------------------------------------------------------------------------------


def test_unknown_to_the_pacs_is_dead_at_once(seeded: Any, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {})  # does not know our AE title
    pacs.start()
    try:
        s = seeded(_dimse(pacs.dicom_port, pacs.aet))
        assert s.outbox.run_due() == 1
    finally:
        pacs.stop()
    _assert_dead(
        s,
        "association rejected (1,1,3), permanent: Calling AE title not recognised; "
        "the peer must list our AE title (calling_ae_title) and address",
    )


@pytest.fixture
def scp() -> Iterator[Any]:
    """A pynetdicom storage SCP accepting only the given SOP classes, answering ``status``."""
    servers: list[Any] = []

    def start(contexts: list[str], status: int = 0x0000) -> int:
        ae = AE(ae_title="PEER")
        for c in contexts:
            ae.add_supported_context(c)
        port = free_port()
        handlers = [(evt.EVT_C_STORE, lambda event: status)]
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return port

    yield start
    for server in servers:
        server.shutdown()


def test_sr_presentation_context_rejected_is_dead(seeded: Any, scp: Any) -> None:
    s = seeded(_dimse(scp([CTImageStorage, Verification])))
    s.outbox.run_due()
    _assert_dead(
        s, "the peer does not accept Comprehensive 3D SR Storage (presentation context rejected)"
    )


def test_only_the_refused_sop_class_is_dead(seeded: Any, scp: Any) -> None:
    from pydicom.uid import BasicTextSRStorage

    s = seeded(_dimse(scp([BasicTextSRStorage]), objects=["sr", "text_sr"]))
    assert s.outbox.run_due() == 2  # one association: text SR stored, TID 1500 SR refused
    with s.engine.connect() as conn:
        rows = conn.execute(
            select(Report.kind, Delivery.state, Delivery.attempts, Delivery.last_error)
            .join(Report, Report.id == Delivery.report_id)
            .order_by(Report.kind)
        ).all()
    assert [tuple(r) for r in rows] == [
        (
            "sr",
            DeliveryState.DEAD,
            1,
            "the peer does not accept Comprehensive 3D SR Storage (presentation context rejected)",
        ),
        ("text_sr", DeliveryState.DELIVERED, 1, None),
    ]


@pytest.mark.parametrize("status", [0xA700, 0x0110])
def test_transient_status_is_retried(seeded: Any, scp: Any, status: int) -> None:
    from pydicom.uid import Comprehensive3DSRStorage

    s = seeded(_dimse(scp([Comprehensive3DSRStorage], status)))
    s.outbox.run_due()
    _assert_retried(s, None, status)


def _raw_acceptor(answer: bytes) -> tuple[int, threading.Thread]:
    """Answers one A-ASSOCIATE-RQ with ``answer`` (raw PDU bytes), then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)
                conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def test_transient_association_reject_is_retried(seeded: Any) -> None:
    # A-ASSOCIATE-RJ: result 2 (transient), source 3 (provider, presentation), reason 2.
    port, thread = _raw_acceptor(bytes([0x03, 0, 0, 0, 0, 4, 0, 2, 3, 2]))
    s = seeded(_dimse(port))
    s.outbox.run_due()
    thread.join(5)
    _assert_retried(s, "association rejected (2,3,2): Local limit exceeded")


def test_no_answer_is_retried(seeded: Any) -> None:
    s = seeded(_dimse(free_port()))  # nothing listens there
    s.outbox.run_due()
    _assert_retried(s, "could not connect (nothing answers at that address and port)")


@pytest.fixture(scope="module")
def two_cas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca-ours.pem (what the destination trusts) and a server certificate signed by another CA."""
    d = tmp_path_factory.mktemp("cas")
    for ca in ("ours", "other"):
        subject = f"/CN=ca-{ca}"
        _openssl(*["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"], "-subj", subject,
                 "-keyout", f"ca-{ca}.key", "-out", f"ca-{ca}.pem", cwd=d)  # fmt: skip
    _openssl(*["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=server"],
             *["-keyout", "server.key", "-out", "server.csr"], cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(*["x509", "-req", "-in", "server.csr", "-CA", "ca-other.pem"],
             *["-CAkey", "ca-other.key", "-CAcreateserial", "-days", "2"],
             *["-extfile", "server.ext", "-out", "server.pem"], cwd=d)  # fmt: skip
    return d


def test_untrusted_tls_certificate_is_dead(seeded: Any, two_cas: Path) -> None:
    import ssl

    from pydicom.uid import Comprehensive3DSRStorage

    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(two_cas / "server.pem"), str(two_cas / "server.key"))
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Comprehensive3DSRStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=server_ctx)
    try:
        s = seeded(_dimse(port, tls=True, tls_ca_file=str(two_cas / "ca-ours.pem")))
        s.outbox.run_due()
    finally:
        server.shutdown()
    _assert_dead(
        s,
        "TLS: the peer's certificate failed verification (unable to get local issuer "
        "certificate); check the destination's CA file and the peer's certificate",
    )


# --- DICOMweb STOW-RS: a real Orthanc with its DICOMweb plugin -------------------------------


def _stow_dest(url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "dicomweb", "url": url, **extra}


def _orthanc_count(pacs: Orthanc, study_uid: str) -> int:
    return len(pacs.find_instances(study_uid))


def test_stow_to_orthanc_without_credentials(seeded: Any, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {}, dicomweb=True)
    pacs.start()
    try:
        s = seeded(_stow_dest(pacs.dicomweb_url, objects=["sr", "text_sr"]))
        assert s.outbox.run_due() == 2  # both objects in one STOW-RS request
        with s.engine.connect() as conn:
            rows = conn.execute(select(Delivery).order_by(Delivery.id)).all()
        assert [(d.state, d.attempts, d.last_status, d.last_error) for d in rows] == [
            (DeliveryState.DELIVERED, 1, 0, None)
        ] * 2
        assert {(d.ae_title, d.host, d.port) for d in rows} == {("", "127.0.0.1", pacs.http_port)}
        stored = {
            i["MainDicomTags"]["SOPInstanceUID"]
            for i in pacs.find_instances(s.source.StudyInstanceUID)
        }
        assert stored == {s.sr.SOPInstanceUID, s.text_sr.SOPInstanceUID}
        with s.engine.connect() as conn:
            assert conn.scalar(select(Study.state)) == StudyState.DELIVERED
    finally:
        pacs.stop()


def test_stow_basic_auth_right_and_wrong(
    seeded: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {}, dicomweb=True, users={"pacsai": "s3cret"})
    pacs.start()
    try:
        monkeypatch.setenv("TEST_STOW_PASSWORD", "wrong")
        bad = seeded(
            _stow_dest(pacs.dicomweb_url, username="pacsai", password_env="TEST_STOW_PASSWORD")
        )
        bad.outbox.run_due()
        _assert_dead(bad, "STOW-RS HTTP 401 Unauthorized; check the destination's credentials")
        assert _orthanc_count(pacs, bad.source.StudyInstanceUID) == 0

        # The admin fixes the password and re-queues: delivered.
        monkeypatch.setenv("TEST_STOW_PASSWORD", "s3cret")
        assert bad.outbox.requeue() == 1
        bad.outbox.run_due()
        assert bad.delivery().state == DeliveryState.DELIVERED
        assert _orthanc_count(pacs, bad.source.StudyInstanceUID) == 1
    finally:
        pacs.stop()


def test_stow_missing_password_variable_is_dead(
    seeded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_STOW_UNSET", raising=False)
    s = seeded(_stow_dest("http://127.0.0.1:9/", username="u", password_env="TEST_STOW_UNSET"))
    s.outbox.run_due()
    _assert_dead(
        s, "environment variable TEST_STOW_UNSET is not set (credentials of destination pacs)"
    )


def test_stow_server_down_then_up_delivers_once(seeded: Any, tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", {}, dicomweb=True)  # not started yet
    s = seeded(_stow_dest(pacs.dicomweb_url))
    s.outbox.run_due()
    _assert_retried(s, "STOW-RS: cannot connect (ConnectError)")
    pacs.start()
    try:
        wait_for(lambda: s.outbox.run_due() == 1, timeout=10, what="the retry")
        d = s.delivery()
        assert (d.state, d.attempts, d.last_status) == (DeliveryState.DELIVERED, 2, 0)
        assert s.outbox.run_due() == 0  # nothing left to send
        assert _orthanc_count(pacs, s.source.StudyInstanceUID) == 1
    finally:
        pacs.stop()


# --- STOW-RS answers Orthanc does not give: a scripted HTTP server on loopback ---------------


def _scripted_server(
    status: int, answer: dict[str, bytes], ctype: str
) -> tuple[str, http.server.HTTPServer]:
    """Answers every POST with ``status`` and ``answer["body"]`` (set after start)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            body = answer.get("body", b"")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/dicomweb", server


def _failed_json(uid: str, reason: int) -> bytes:
    item = {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
    return json.dumps({"00081198": {"vr": "SQ", "Value": [item]}}).encode()


def _warning_xml(uid: str, reason: int) -> bytes:
    return (
        '<?xml version="1.0"?><NativeDicomModel>'
        '<DicomAttribute tag="00081199" vr="SQ"><Item number="1">'
        f'<DicomAttribute tag="00081155" vr="UI"><Value number="1">{uid}</Value>'
        "</DicomAttribute>"
        f'<DicomAttribute tag="00081196" vr="US"><Value number="1">{reason}</Value>'
        "</DicomAttribute>"
        "</Item></DicomAttribute></NativeDicomModel>"
    ).encode()


@pytest.mark.parametrize(
    ("http_status", "how", "ctype", "state", "status", "error"),
    [
        (409, "fail:0xC000", "application/dicom+json", "dead", 0xC000,
         "STOW-RS failure 0xC000 (cannot understand)"),
        (202, "fail:0xA700", "application/dicom+json", "failed", 0xA700,
         "STOW-RS failure 0xA700 (out of resources)"),
        (202, "warn:0xB000", "application/dicom+xml", "dead", 0xB000,
         "STOW-RS warning 0xB000 (coercion of data elements)"),
        (503, "", "text/plain", "failed", None, "STOW-RS HTTP 503 Service Unavailable"),
        (415, "", "text/plain", "dead", None,
         "STOW-RS HTTP 415 Unsupported Media Type; the server does not accept application/dicom"),
    ],
)  # fmt: skip
def test_stow_answers_classified(
    seeded: Any,
    http_status: int,
    how: str,
    ctype: str,
    state: str,
    status: int | None,
    error: str,
) -> None:
    answer: dict[str, bytes] = {}
    url, server = _scripted_server(http_status, answer, ctype)
    try:
        s = seeded(_stow_dest(url))
        kind, _, code = how.partition(":")
        if kind == "fail":
            answer["body"] = _failed_json(str(s.sr.SOPInstanceUID), int(code, 16))
        elif kind == "warn":
            answer["body"] = _warning_xml(str(s.sr.SOPInstanceUID), int(code, 16))
        s.outbox.run_due()
    finally:
        server.shutdown()
        server.server_close()
    if state == "dead":
        _assert_dead(s, error, status)
    else:
        _assert_retried(s, error, status)


def test_stow_request_is_multipart_dicom(seeded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a STOW-RS server receives: one application/dicom part per object, the file bytes,
    and the bearer token from the variable the destination names."""
    seen: dict[str, Any] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["path"] = self.path
            seen["type"] = self.headers["Content-Type"]
            seen["auth"] = self.headers["Authorization"]
            seen["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("TEST_STOW_TOKEN", "tok-123")
        url = f"http://127.0.0.1:{server.server_address[1]}/base/"
        s = seeded(_stow_dest(url, token_env="TEST_STOW_TOKEN"))
        s.outbox.run_due()
    finally:
        server.shutdown()
        server.server_close()
    assert seen["path"] == "/base/studies" and seen["auth"] == "Bearer tok-123"
    _assert_retried(s, "STOW-RS HTTP 500 Internal Server Error")
    ctype = seen["type"]
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = ctype.rsplit("boundary=", 1)[1]
    with s.engine.connect() as conn:
        rel = conn.scalar(select(Report.path))
    data = (s.settings.reports.path / rel).read_bytes()
    expected = (
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    assert seen["body"] == expected
