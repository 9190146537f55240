"""One accepted connection, from A-ASSOCIATE-RQ to release or abort, on its own thread.

Layers as in pynetdicom: :mod:`~pacs_ai.ingest.protocol` reads PDUs,
:class:`~pacs_ai.ingest.messages.MessageAssembler` turns PDVs into DIMSE messages, and the
services answer them (C-ECHO here, C-STORE in :mod:`~pacs_ai.ingest.store`).

Before association: one total deadline (``dicom.acse_timeout``) covers the TLS handshake and
the whole A-ASSOCIATE-RQ, and no database row is written until the request is decoded (a bare
or idle connection costs no write; one that fails before association is recorded once, at its
end). Every way an association can end is recorded on its ``associations`` row.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pacs_ai.config import Settings
from pacs_ai.db.models import utcnow
from pacs_ai.errors import AssociationRejected, ProtocolError, StoreError
from pacs_ai.ingest import protocol as p
from pacs_ai.ingest.groupcommit import GroupCommitter
from pacs_ai.ingest.messages import DATA, MessageAssembler
from pacs_ai.ingest.negotiation import Negotiated, decode_request, negotiate
from pacs_ai.ingest.recorder import IngestRecorder
from pacs_ai.ingest.spool import Spool
from pacs_ai.ingest.store import StoreService

log = logging.getLogger(__name__)


class AssociationSlots:
    """The association cap: a slot is taken at acceptance and given back at the end."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self.in_use = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_use >= self._limit:
                return False
            self.in_use += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_use -= 1


class PendingConnections:
    """Connections per peer address that have not yet sent their A-ASSOCIATE-RQ
    (``dicom.max_pending_per_address``): idle sockets from one host cannot crowd out others."""

    def __init__(self, per_address: int) -> None:
        self._limit = per_address
        self._lock = threading.Lock()
        self._count: Counter[str] = Counter()

    def try_enter(self, address: str) -> bool:
        with self._lock:
            if self._count[address] >= self._limit:
                return False
            self._count[address] += 1
            return True

    def leave(self, address: str) -> None:
        with self._lock:
            self._count[address] -= 1
            if self._count[address] <= 0:
                del self._count[address]


@dataclass
class ServerContext:
    """What every association shares with the server that spawned it."""

    settings: Settings
    spool: Spool
    recorder: IngestRecorder
    stop: threading.Event
    ssl_context: ssl.SSLContext | None
    slots: AssociationSlots
    pending: PendingConnections
    on_association_end: Callable[[int], None]
    io_pool: ThreadPoolExecutor
    committer: GroupCommitter


class AssociationHandler:
    def __init__(self, sock: socket.socket, peer: tuple[str, int], ctx: ServerContext) -> None:
        """``peer``'s address must already hold a place in ``ctx.pending``."""
        self.sock = sock
        self.peer_host, self.peer_port = peer[0], peer[1]
        self.ctx = ctx
        self.settings = ctx.settings
        self.assoc_id = 0
        self.calling_ae = ""
        self.called_ae = ""
        self._started = utcnow()
        self._store: StoreService | None = None
        self._accepted = False
        self._has_slot = False
        self._pending = True
        self._early_end: tuple[str, str] | None = None  # (action, reason) before acceptance

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        stream: p.PduStream | None = None
        end_reason = "released"
        deadline = time.monotonic() + self.settings.dicom.acse_timeout
        try:
            try:
                if self.ctx.ssl_context is not None:
                    self._tls_handshake(self.ctx.ssl_context, deadline)
                stream = p.PduStream(self.sock, self.settings.dicom.max_pdu_size)
                negotiated = self._negotiate(stream, deadline)
            finally:
                self._leave_pending()
            if negotiated is None:
                return
            end_reason = self._serve(stream, negotiated)
        except _HandshakeFailed as exc:
            self._early_end = ("tls_failed", str(exc))
        except p.Stopping:
            end_reason = "shutdown"
            self._abort(stream, p.ABORT_NOT_SPECIFIED)
        except p.PduTimeout as exc:
            end_reason = "timeout"
            self._abort(stream, p.ABORT_NOT_SPECIFIED)
            log.info("association %d: %s", self.assoc_id, exc)
        except p.PeerClosed:
            end_reason = "connection_lost"
        except ProtocolError as exc:
            end_reason = "aborted"
            self._abort(stream, exc.abort_reason)
            log.warning("association %d aborted: %s", self.assoc_id, exc)
            if not self._accepted:
                self._early_end = ("aborted", str(exc))
            else:
                self.ctx.recorder.audit(
                    self.calling_ae or "unknown",
                    "protocol_error",
                    "error",
                    object_type="association",
                    object_id=self.assoc_id,
                    detail={"error": str(exc)},
                )
        except Exception as exc:
            end_reason = "error"
            self._abort(stream, p.ABORT_NOT_SPECIFIED)
            log.error("association %d failed: unexpected %s", self.assoc_id, exc.__class__.__name__)
        finally:
            if not self._accepted and self._early_end is None and end_reason != "released":
                self._early_end = (end_reason, f"ended before acceptance: {end_reason}")
            if self._early_end is not None:
                self._record_early_end(*self._early_end)  # before close: ordered rows
            self._close()
            if self._has_slot:
                self.ctx.slots.release()
            if self._accepted:
                self._finish(end_reason, stream)

    def _leave_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.ctx.pending.leave(self.peer_host)

    def _finish(self, end_reason: str, stream: p.PduStream | None) -> None:
        nbytes = stream.bytes_read if stream else 0
        stored = self._store.stored if self._store else 0
        failed = self._store.failed if self._store else 0
        try:
            self.ctx.recorder.close_association(self.assoc_id, end_reason, stored, failed, nbytes)
        except Exception as exc:
            log.error(
                "association %d: could not record its end: %s",
                self.assoc_id,
                exc.__class__.__name__,
            )
        log.info(
            "association %d ended (%s): stored=%d failed=%d bytes=%d",
            self.assoc_id,
            end_reason,
            stored,
            failed,
            nbytes,
        )
        self.ctx.on_association_end(self.assoc_id)

    def _record_early_end(self, action: str, reason: str) -> None:
        try:
            self.assoc_id = self.ctx.recorder.record_refusal(
                self.peer_host,
                self.peer_port,
                self.ctx.ssl_context is not None,
                self.calling_ae,
                self.called_ae,
                reason,
                action,
                started_at=self._started,
            )
        except Exception as exc:
            log.error("could not record a refused association: %s", exc.__class__.__name__)

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _abort(self, stream: p.PduStream | None, reason: int) -> None:
        if stream is None:
            return
        with contextlib.suppress(ProtocolError):
            stream.send(p.abort_pdu(2, reason))

    def _tls_handshake(self, context: ssl.SSLContext, deadline: float) -> None:
        """TLS handshake within the pre-association deadline (in total, not per read)."""
        tls_sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls_sock
        tls_sock.setblocking(False)
        wanted: tuple[list[ssl.SSLSocket], list[ssl.SSLSocket]]
        try:
            while True:
                try:
                    tls_sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    wanted = ([tls_sock], [])
                except ssl.SSLWantWriteError:
                    wanted = ([], [tls_sock])
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not any(select.select(*wanted, [], remaining)[:2]):
                    raise _HandshakeFailed("TLS handshake timed out")
        except (ssl.SSLError, OSError) as exc:
            raise _HandshakeFailed(f"TLS handshake failed: {exc.__class__.__name__}") from exc
        tls_sock.setblocking(True)

    # --- association establishment ------------------------------------------------------------

    def _negotiate(self, stream: p.PduStream, deadline: float) -> Negotiated | None:
        pdu_type, body = stream.read_pdu(max(deadline - time.monotonic(), 0.001))
        if pdu_type != p.A_ASSOCIATE_RQ:
            raise ProtocolError(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                ProtocolError.UNEXPECTED_PDU,
            )
        tls = self.ctx.ssl_context is not None
        try:
            rq = decode_request(bytes(body))
            self.calling_ae = (rq.calling_ae_title or "").strip()
            self.called_ae = (rq.called_ae_title or "").strip()
            negotiated = negotiate(
                rq,
                self.settings,
                self.peer_host,
                self._take_slot,
                self._has_free_space,
            )
        except AssociationRejected as rej:
            stream.send(p.reject_pdu(rej.result, rej.source, rej.reason))
            self._record_early_end("rejected", rej.why)
            log.info(
                "association %d rejected (%d,%d,%d): %s",
                self.assoc_id,
                rej.result,
                rej.source,
                rej.reason,
                rej.why,
            )
            return None
        self.assoc_id = self.ctx.recorder.open_association(
            self.peer_host,
            self.peer_port,
            tls,
            negotiated.calling_ae,
            negotiated.called_ae,
            accepted=True,
        )
        self._accepted = True
        stream.send(negotiated.ac_pdu)
        log.info(
            "association %d accepted: calling=%s host=%s contexts=%d tls=%s",
            self.assoc_id,
            negotiated.calling_ae,
            self.peer_host,
            len(negotiated.contexts),
            tls,
        )
        return negotiated

    def _take_slot(self) -> bool:
        self._has_slot = self.ctx.slots.try_acquire()
        return self._has_slot

    def _has_free_space(self) -> bool:
        try:
            self.ctx.spool.check_free_space()
        except StoreError:
            return False
        return True

    # --- data transfer ----------------------------------------------------------------------

    def _serve(self, stream: p.PduStream, neg: Negotiated) -> str:
        d = self.settings.dicom
        assembler = MessageAssembler(neg.contexts)
        store = self._store = StoreService(self.ctx, stream, neg, self.assoc_id, self.calling_ae)
        try:
            while True:
                if not assembler.in_message:
                    stream.wait_readable(d.network_timeout, self.ctx.stop)
                pdu_type, body = stream.read_pdu(d.dimse_timeout)
                if pdu_type == p.P_DATA:
                    for kind, context_id, payload, last in assembler.feed(body):
                        if kind == DATA:
                            store.on_fragment(payload, last)
                        else:
                            self._on_command(stream, neg, context_id, payload, store)
                elif pdu_type == p.A_RELEASE_RQ:
                    stream.send(p.release_rp_pdu())
                    return "released"
                elif pdu_type == p.A_ABORT:
                    return "aborted_by_peer"
                else:
                    raise ProtocolError(
                        f"unexpected PDU type 0x{pdu_type:02X}", ProtocolError.UNEXPECTED_PDU
                    )
        finally:
            store.abandon()

    def _on_command(
        self,
        stream: p.PduStream,
        neg: Negotiated,
        context_id: int,
        cmd: p.Command,
        store: StoreService,
    ) -> None:
        if cmd.command_field == p.COMMAND_C_ECHO_RQ:
            if cmd.has_dataset:
                raise ProtocolError("C-ECHO-RQ with a dataset")
            stream.send(p.echo_response(context_id, neg.peer_max_pdu, cmd.message_id))
        elif cmd.command_field == p.COMMAND_C_STORE_RQ:
            store.on_command(context_id, cmd)
        else:
            raise ProtocolError(f"unsupported DIMSE command 0x{cmd.command_field:04X}")


class _HandshakeFailed(Exception):
    pass
