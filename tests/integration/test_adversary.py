"""A raw-socket adversary: garbage, oversized PDU lengths, stalls, aborts mid-instance.
After each, the server is still serving and nothing half-written stays."""

from __future__ import annotations

import contextlib
import select as io_select
import socket
import struct
import subprocess
import time
from collections import Counter

import pytest
from sqlalchemy import select

from pacs_ai.db.models import Association, Instance
from pacs_ai.service import Service
from tests.conftest import SCU_AE, ct_datasets, wait_for
from tests.integration.conftest import ServiceFactory
from tests.integration.rawpeer import (
    EXPLICIT_LE,
    Accepted,
    RawPeer,
    encode_dataset,
    pdata,
    store_command,
)
from tests.tools import require_tool

CT = "1.2.840.10008.5.1.4.1.1.2"


def still_serving(svc: Service) -> None:
    raw = RawPeer("127.0.0.1", svc.server.port)
    result = raw.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])])
    assert isinstance(result, Accepted)
    ds = ct_datasets(1, seed=42)[0]
    assert raw.c_store(next(iter(result.contexts)), CT, ds.SOPInstanceUID, encode_dataset(ds)) == 0
    assert raw.release()
    raw.close()


def nothing_half_written(svc: Service) -> None:
    deadline = time.monotonic() + 5
    while list((svc.spool.root / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((svc.spool.root / "tmp").iterdir()) == []
    with svc.engine.connect() as c:
        paths = set(c.scalars(select(Instance.path)))
    on_disk = {str(p.relative_to(svc.spool.root)) for p in svc.spool.iter_objects()}
    assert on_disk == paths


def end_reasons(svc: Service) -> list[str | None]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with svc.engine.connect() as c:
            rows = c.execute(select(Association.end_reason, Association.ended_at)).all()
        if all(r.ended_at is not None for r in rows):
            return [r.end_reason for r in rows]
        time.sleep(0.05)
    raise AssertionError("associations did not end")


@pytest.mark.parametrize(
    "payload",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not DICOM at all
        bytes(range(256)) * 8,  # noise
        struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0),  # A-ASSOCIATE-RQ claiming ~4 GiB
        struct.pack(">BBL", 0x01, 0, 40) + b"\x00" * 40,  # malformed association request
        struct.pack(">BBL", 0x04, 0, 100) + b"\x00" * 100,  # P-DATA before association
    ],
    ids=["http", "noise", "huge-length", "malformed-rq", "pdata-first"],
)
def test_garbage_before_association(start_service: ServiceFactory, payload: bytes) -> None:
    svc = start_service()
    raw = RawPeer("127.0.0.1", svc.server.port)
    raw.send_raw(payload)
    assert raw.closed_by_server()
    still_serving(svc)
    nothing_half_written(svc)
    assert end_reasons(svc)[-1] == "released"  # the good one; the bad one is recorded too
    with svc.engine.connect() as c:
        first = c.execute(select(Association).order_by(Association.id)).first()
    assert first is not None and not first.accepted and first.reject_reason


def test_oversized_pdata_and_abort_mid_instance(start_service: ServiceFactory) -> None:
    svc = start_service(dicom={"max_pdu_size": 16384})
    raw = RawPeer("127.0.0.1", svc.server.port)
    result = raw.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])])
    assert isinstance(result, Accepted) and result.max_pdu == 16384
    # A P-DATA claiming far more than the negotiated maximum: aborted, not buffered.
    raw.send_raw(struct.pack(">BBL", 0x04, 0, 50_000_000))
    assert raw.closed_by_server()

    # Peer aborts halfway through an instance: the partial file is discarded.
    raw2 = RawPeer("127.0.0.1", svc.server.port)
    cx = next(iter(raw2.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])]).contexts))  # type: ignore[union-attr]
    ds = ct_datasets(1)[0]
    data = encode_dataset(ds)
    raw2.send_raw(pdata(cx, 0x03, store_command(CT, ds.SOPInstanceUID)))
    raw2.send_raw(pdata(cx, 0x00, data[:8000]))
    raw2.send_raw(struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0))  # A-ABORT
    raw2.close()
    still_serving(svc)
    nothing_half_written(svc)
    reasons = end_reasons(svc)
    assert reasons[:2] == ["aborted", "aborted_by_peer"]


def test_stalled_peers_are_dropped(start_service: ServiceFactory) -> None:
    svc = start_service(dicom={"acse_timeout": 0.5, "dimse_timeout": 0.5, "network_timeout": 1.0})
    # Connects and says nothing.
    silent = RawPeer("127.0.0.1", svc.server.port)
    # Sends half a PDU header, then stalls.
    half = RawPeer("127.0.0.1", svc.server.port)
    half.send_raw(b"\x01\x00\x00")
    # Associates, starts an instance, stalls mid-dataset.
    mid = RawPeer("127.0.0.1", svc.server.port)
    cx = next(iter(mid.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])]).contexts))  # type: ignore[union-attr]
    ds = ct_datasets(1)[0]
    mid.send_raw(pdata(cx, 0x03, store_command(CT, ds.SOPInstanceUID)))
    mid.send_raw(pdata(cx, 0x00, encode_dataset(ds)[:4000]))
    # Associates and then idles past the network timeout.
    idle = RawPeer("127.0.0.1", svc.server.port)
    assert isinstance(idle.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])]), Accepted)

    for peer in (silent, half, mid, idle):
        assert peer.closed_by_server()
    still_serving(svc)
    nothing_half_written(svc)
    # Four stalled peers, four timeouts (two before association, two after), and the one
    # that was still served.
    assert Counter(end_reasons(svc)) == {"timeout": 4, "released": 1}


def _closed(peers: list[RawPeer]) -> int:
    """How many of ``peers`` the server has closed or aborted (EOF, reset or an A-ABORT
    waiting to be read), without blocking."""
    readable, _, _ = io_select.select([p.sock for p in peers], [], [], 0.05)

    def ended(sock: socket.socket) -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK) in (b"", b"\x07")
        except OSError:
            return True

    return sum(1 for s in readable if ended(s))


def test_idle_connections_do_not_lock_out_a_modality(start_service: ServiceFactory) -> None:
    """40 idle TCP connections from one address: that address keeps at most
    `max_pending_per_address` (4) waiting, the rest are closed at once, none writes a database
    row while idle, and an allowed modality elsewhere gets its C-ECHO answered within 2 s."""
    svc = start_service()  # acse_timeout 30 s: the idle ones would wait that long
    assert svc.server is not None
    port = svc.server.port
    idle = [RawPeer("127.0.0.1", port, bind="127.0.0.2") for _ in range(40)]
    wait_for(lambda: _closed(idle) == 36, timeout=5, what="36 of 40 idle connections closed")
    started = time.monotonic()
    echo = subprocess.run(
        [require_tool("echoscu"), "-aec", "PACS_AI", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    elapsed = time.monotonic() - started
    assert echo.returncode == 0, echo.stderr
    assert elapsed < 2.0, f"C-ECHO took {elapsed:.2f} s"
    print(f"C-ECHO (dcmtk echoscu) beside 40 idle sockets: {elapsed:.3f} s")
    assert _closed(idle) == 36  # the four within the cap still wait for their request
    with svc.engine.connect() as c:
        rows = c.execute(select(Association.calling_ae, Association.accepted)).all()
    assert [tuple(r) for r in rows] == [("ECHOSCU", True)]  # idle sockets wrote nothing
    for peer in idle:
        peer.close()
    # The four that held a place end as lost connections, recorded once each at their end.
    wait_for(lambda: len(end_reasons(svc)) == 5, what="5 association rows")
    assert Counter(end_reasons(svc)) == {"released": 1, "connection_lost": 4}


def test_association_request_has_one_total_deadline(start_service: ServiceFactory) -> None:
    """A peer trickling its A-ASSOCIATE-RQ one byte at a time is cut off when acse_timeout
    has passed in total, not acse_timeout after each byte."""
    svc = start_service(dicom={"acse_timeout": 1.0})
    raw = RawPeer("127.0.0.1", svc.server.port)  # type: ignore[union-attr]
    request = struct.pack(">BBL", 0x01, 0, 200) + bytes(200)
    started = time.monotonic()
    for byte in request:
        if _closed([raw]):
            break
        with contextlib.suppress(OSError):
            raw.send_raw(bytes([byte]))
        time.sleep(0.1)
    elapsed = time.monotonic() - started
    assert _closed([raw]) == 1
    assert 1.0 <= elapsed < 1.8, f"closed after {elapsed:.2f} s"
    print(f"trickled A-ASSOCIATE-RQ cut off after {elapsed:.3f} s (acse_timeout 1.0)")
    wait_for(lambda: end_reasons(svc) == ["timeout"], what="the request's timeout recorded")
    still_serving(svc)
