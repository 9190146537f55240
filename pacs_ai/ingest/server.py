"""The listening socket: accepts connections, applies the association cap, runs one
:class:`~pacs_ai.ingest.association.AssociationHandler` thread per connection, and shuts down
gracefully (no new associations; open ones aborted between messages; nothing half-written
stays, because unfinished instances live only in ``tmp/`` and are discarded).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine

from pacs_ai.config import Settings, TlsSettings
from pacs_ai.ingest.association import (
    AssociationHandler,
    AssociationSlots,
    PendingConnections,
    ServerContext,
)
from pacs_ai.ingest.groupcommit import GroupCommitter
from pacs_ai.ingest.recorder import IngestRecorder
from pacs_ai.ingest.spool import Spool

log = logging.getLogger(__name__)

# Connections beyond the association cap still get a thread long enough to be answered with
# A-ASSOCIATE-RJ (2,3,2); past this many extra, connections are closed unread.
_REJECT_HEADROOM = 16


def make_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    password = os.environ.get(tls.key_password_env) if tls.key_password_env else None
    assert tls.cert_file is not None and tls.key_file is not None
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=password)
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


class DicomServer:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        spool: Spool,
        on_association_end: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._active: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._refused_pending = 0
        recorder = IngestRecorder(engine, spool_root=spool.root, gateway=settings.service.node_name)
        self._ctx = ServerContext(
            settings=settings,
            spool=spool,
            recorder=recorder,
            stop=self._stop,
            ssl_context=make_ssl_context(settings.tls) if settings.tls.enabled else None,
            slots=AssociationSlots(settings.dicom.max_associations),
            pending=PendingConnections(settings.dicom.max_pending_per_address),
            on_association_end=on_association_end or (lambda _id: None),
            # Two fsyncs per instance in flight (file and directory), per association.
            io_pool=ThreadPoolExecutor(
                max_workers=2 * settings.dicom.max_associations, thread_name_prefix="spool-io"
            ),
            # An instance waits for a batch at most as long as the peer waits for its answer.
            committer=GroupCommitter(recorder, queue_timeout=settings.dicom.dimse_timeout),
        )

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    def bind(self) -> None:
        """Open the listening socket; connections wait in its backlog until :meth:`start`.
        Raises ``OSError`` (port taken, no permission for a port below 1024, ...)."""
        d = self.settings.dicom
        family = socket.AF_INET6 if ":" in d.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((d.host, d.port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.settimeout(0.5)
        self._listener = sock

    def close(self) -> None:
        """Close the socket of a server that was bound but never started."""
        if self._listener is not None and self._accept_thread is None:
            self._listener.close()
            self._listener = None

    def start(self) -> None:
        d = self.settings.dicom
        if self._listener is None:
            self.bind()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="dicom-accept", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "listening as %s on %s:%d (tls=%s)",
            d.ae_title,
            d.host,
            self.port,
            self.settings.tls.enabled,
        )

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                log.exception("accept failed")
                continue
            if not self._ctx.pending.try_enter(addr[0]):
                # Not yet associated connections from this address are at their cap: close
                # at once (no thread, no database row) so others are still served.
                conn.close()
                self._refused_pending += 1
                if self._refused_pending in (1, 10, 100) or self._refused_pending % 1000 == 0:
                    log.warning(
                        "connections from %s closed unread: %d not yet associated (%d so far)",
                        addr[0],
                        self.settings.dicom.max_pending_per_address,
                        self._refused_pending,
                    )
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                overloaded = (
                    len(self._active) >= self.settings.dicom.max_associations + _REJECT_HEADROOM
                )
            if overloaded:
                log.warning("connection from %s closed unread: too many connections", addr[0])
                self._ctx.pending.leave(addr[0])
                conn.close()
                continue
            t = threading.Thread(
                target=self._run_association, args=(conn, addr), name="dicom-assoc", daemon=True
            )
            with self._lock:
                self._active.add(t)
            t.start()

    def _run_association(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            AssociationHandler(conn, addr, self._ctx).run()
        finally:
            with self._lock:
                self._active.discard(threading.current_thread())

    @property
    def accepting(self) -> bool:
        """The accept loop is running (for /readyz)."""
        t = self._accept_thread
        return t is not None and t.is_alive() and not self._stop.is_set()

    def active_associations(self) -> int:
        return self._ctx.slots.in_use

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, abort idle associations, wait for in-flight messages."""
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=2)
        with self._lock:
            threads = list(self._active)
        for t in threads:
            t.join(timeout=timeout)
        self._ctx.io_pool.shutdown(wait=True)
        log.info("listener stopped")
