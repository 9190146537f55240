"""One accepted connection, from A-ASSOCIATE-RQ to release or abort, on its own thread.

C-STORE datasets are streamed fragment by fragment into the spool; when the last fragment
arrives the file is validated, made durable, recorded, and only then answered with Success.
Every way an association can end is recorded on its ``associations`` row.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from pacs_ai.config import Settings
from pacs_ai.errors import (
    AssociationRejected,
    InvalidDataset,
    ProtocolError,
    StoreError,
    dimse_status_for,
)
from pacs_ai.ingest import protocol as p
from pacs_ai.ingest.negotiation import Negotiated, decode_request, negotiate
from pacs_ai.ingest.recorder import AssociationCache, IngestRecorder, RecordOutcome
from pacs_ai.ingest.spool import PendingFile, Spool, part10_header
from pacs_ai.ingest.validation import check_uid, read_and_validate
from pacs_ai.logs import uid_ref
from pacs_ai.telemetry import observe_store

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


@dataclass
class ServerContext:
    """What every association shares with the server that spawned it."""

    settings: Settings
    spool: Spool
    recorder: IngestRecorder
    stop: threading.Event
    ssl_context: ssl.SSLContext | None
    slots: AssociationSlots
    on_association_end: Callable[[int], None]
    io_pool: ThreadPoolExecutor


@dataclass
class _Message:
    """A DIMSE message being received."""

    command_bytes: bytearray = field(default_factory=bytearray)
    command: p.Command | None = None
    context_id: int = 0
    pending: PendingFile | None = None
    error: StoreError | None = None
    dataset_bytes: int = 0


@dataclass
class _Stats:
    stored: int = 0
    failed: int = 0


class AssociationHandler:
    def __init__(self, sock: socket.socket, peer: tuple[str, int], ctx: ServerContext) -> None:
        self.sock = sock
        self.peer_host, self.peer_port = peer[0], peer[1]
        self.ctx = ctx
        self.settings = ctx.settings
        self.assoc_id = 0
        self.calling_ae = ""
        self.stats = _Stats()
        self._cache = AssociationCache()
        self._accepted = False
        self._has_slot = False

    # --- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        tls = self.ctx.ssl_context is not None
        stream: p.PduStream | None = None
        end_reason = "released"
        try:
            self.assoc_id = self.ctx.recorder.open_association(self.peer_host, self.peer_port, tls)
        except Exception:
            log.exception("cannot record a new association; closing the connection")
            self._close()
            return
        try:
            if self.ctx.ssl_context is not None:
                self.sock = self._tls_handshake(self.ctx.ssl_context)
            stream = p.PduStream(self.sock, self.settings.dicom.max_pdu_size)
            negotiated = self._negotiate(stream)
            if negotiated is None:
                return
            end_reason = self._serve(stream, negotiated)
        except _HandshakeFailed as exc:
            self._refuse("tls_failed", str(exc))
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
            self.ctx.recorder.audit(
                self.calling_ae or "unknown",
                "protocol_error",
                "error",
                object_type="association",
                object_id=self.assoc_id,
                detail={"error": str(exc)},
            )
        except Exception:
            end_reason = "error"
            self._abort(stream, p.ABORT_NOT_SPECIFIED)
            log.exception("association %d failed", self.assoc_id)
        finally:
            self._close()
            if self._has_slot:
                self.ctx.slots.release()
            if self._accepted:
                self._finish(end_reason, stream)
            elif end_reason not in ("released",):
                self._refuse(end_reason, f"ended before acceptance: {end_reason}")

    def _finish(self, end_reason: str, stream: p.PduStream | None) -> None:
        nbytes = stream.bytes_read if stream else 0
        try:
            self.ctx.recorder.close_association(
                self.assoc_id, end_reason, self.stats.stored, self.stats.failed, nbytes
            )
        except Exception:
            log.exception("association %d: could not record its end", self.assoc_id)
        log.info(
            "association %d ended (%s): stored=%d failed=%d bytes=%d",
            self.assoc_id,
            end_reason,
            self.stats.stored,
            self.stats.failed,
            nbytes,
        )
        self.ctx.on_association_end(self.assoc_id)

    def _refuse(self, action: str, reason: str) -> None:
        try:
            self.ctx.recorder.association_refused(
                self.assoc_id, self.calling_ae or None, None, reason, action
            )
        except Exception:
            log.exception("association %d: could not record its refusal", self.assoc_id)

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _abort(self, stream: p.PduStream | None, reason: int) -> None:
        if stream is None:
            return
        with contextlib.suppress(ProtocolError):
            stream.send(p.abort_pdu(2, reason))

    def _tls_handshake(self, context: ssl.SSLContext) -> socket.socket:
        self.sock.settimeout(self.settings.dicom.acse_timeout)
        try:
            tls_sock = context.wrap_socket(self.sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            raise _HandshakeFailed(f"TLS handshake failed: {exc.__class__.__name__}") from exc
        return tls_sock

    # --- association establishment ------------------------------------------------------------

    def _negotiate(self, stream: p.PduStream) -> Negotiated | None:
        timeout = self.settings.dicom.acse_timeout
        pdu_type, body = stream.read_pdu(timeout)
        if pdu_type != p.A_ASSOCIATE_RQ:
            raise ProtocolError(
                f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}",
                ProtocolError.UNEXPECTED_PDU,
            )
        try:
            rq = decode_request(bytes(body))
            self.calling_ae = (rq.calling_ae_title or "").strip()
            negotiated = negotiate(
                rq,
                self.settings,
                self.peer_host,
                self._take_slot,
                self._has_free_space,
            )
        except AssociationRejected as rej:
            stream.send(p.reject_pdu(rej.result, rej.source, rej.reason))
            self._refuse("rejected", rej.why)
            log.info(
                "association %d rejected (%d,%d,%d): %s",
                self.assoc_id,
                rej.result,
                rej.source,
                rej.reason,
                rej.why,
            )
            return None
        stream.send(negotiated.ac_pdu)
        self.ctx.recorder.association_accepted(
            self.assoc_id, negotiated.calling_ae, negotiated.called_ae
        )
        self._accepted = True
        log.info(
            "association %d accepted: calling=%s host=%s contexts=%d tls=%s",
            self.assoc_id,
            negotiated.calling_ae,
            self.peer_host,
            len(negotiated.contexts),
            self.ctx.ssl_context is not None,
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
        msg: _Message | None = None
        try:
            while True:
                if msg is None:
                    stream.wait_readable(d.network_timeout, self.ctx.stop)
                pdu_type, body = stream.read_pdu(d.dimse_timeout)
                if pdu_type == p.P_DATA:
                    msg = self._on_pdata(stream, neg, body, msg)
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
            if msg is not None and msg.pending is not None:
                msg.pending.discard()

    def _on_pdata(
        self, stream: p.PduStream, neg: Negotiated, body: memoryview, msg: _Message | None
    ) -> _Message | None:
        for context_id, control, fragment in p.iter_pdvs(body):
            if context_id not in neg.contexts:
                raise ProtocolError("PDV on a presentation context that was not accepted")
            if msg is None:
                msg = _Message(context_id=context_id)
            elif context_id != msg.context_id:
                raise ProtocolError("presentation context changed within a message")
            last = bool(control & 0x02)
            if control & 0x01:  # command fragment
                if msg.command is not None:
                    raise ProtocolError("command fragment after the command was complete")
                msg.command_bytes += fragment
                if len(msg.command_bytes) > 65536:
                    raise ProtocolError("command set too large")
                if last:
                    msg.command = p.decode_command(bytes(msg.command_bytes))
                    if self._on_command(stream, neg, msg):
                        msg = None
            else:  # dataset fragment
                if msg.command is None:
                    raise ProtocolError("dataset fragment before the command")
                self._on_dataset_fragment(msg, fragment)
                if last:
                    self._complete_store(stream, neg, msg)
                    msg = None
        return msg

    def _on_command(self, stream: p.PduStream, neg: Negotiated, msg: _Message) -> bool:
        """Handle a complete command set; True when the message is finished."""
        cmd = msg.command
        assert cmd is not None
        if cmd.command_field == p.COMMAND_C_ECHO_RQ:
            if cmd.has_dataset:
                raise ProtocolError("C-ECHO-RQ with a dataset")
            stream.send(p.echo_response(msg.context_id, neg.peer_max_pdu, cmd.message_id))
            return True
        if cmd.command_field != p.COMMAND_C_STORE_RQ:
            raise ProtocolError(f"unsupported DIMSE command 0x{cmd.command_field:04X}")
        if not cmd.has_dataset:
            self._respond_store(stream, neg, msg, InvalidDataset("C-STORE-RQ without a dataset"))
            return True
        try:
            sop_class = check_uid(cmd.sop_class_uid, "AffectedSOPClassUID")
            sop_instance = check_uid(cmd.sop_instance_uid, "AffectedSOPInstanceUID")
            self.ctx.spool.check_free_space()
            cx = neg.contexts[msg.context_id]
            if sop_class != cx.abstract_syntax:
                raise InvalidDataset("SOP Class differs from the presentation context")
            msg.pending = self.ctx.spool.begin(
                part10_header(sop_class, sop_instance, cx.transfer_syntax, self.calling_ae)
            )
        except StoreError as exc:
            msg.error = exc  # the dataset is still read (and discarded), then refused
        return False

    def _on_dataset_fragment(self, msg: _Message, fragment: memoryview) -> None:
        msg.dataset_bytes += len(fragment)
        if msg.dataset_bytes > self.settings.dicom.max_instance_bytes:
            # Reading on would let a peer stream without end; drop the association instead.
            raise ProtocolError("dataset larger than dicom.max_instance_bytes")
        if msg.pending is not None and msg.error is None:
            try:
                msg.pending.write(fragment)
            except StoreError as exc:
                msg.error = exc
                msg.pending.discard()

    def _complete_store(self, stream: p.PduStream, neg: Negotiated, msg: _Message) -> None:
        cmd = msg.command
        assert cmd is not None
        started = time.perf_counter()
        error = msg.error
        pending = msg.pending
        msg.pending = None
        if error is None and pending is not None:
            error = self._store(neg, msg, pending)
        elif pending is not None:
            pending.discard()
        self._respond_store(stream, neg, msg, error)
        observe_store(time.perf_counter() - started, error is None)  # /metrics (issue 9)

    def _store(self, neg: Negotiated, msg: _Message, pending: PendingFile) -> StoreError | None:
        cmd = msg.command
        assert cmd is not None
        cx = neg.contexts[msg.context_id]
        try:
            stored = pending.place()
        except StoreError as exc:
            return exc
        # The fsync (GIL released) runs on another thread while this one validates the file
        # and prepares its rows; the transaction commits only once the file is durable.
        durable = self.ctx.io_pool.submit(pending.make_durable)
        try:
            header = read_and_validate(
                self.ctx.spool.resolve(stored.relpath),
                cx.transfer_syntax,
                cmd.sop_class_uid,
                cmd.sop_instance_uid,
                self.settings.dicom.max_pixel_bytes,
            )
            outcome = self.ctx.recorder.record_instance(
                self.assoc_id,
                self.calling_ae,
                header,
                stored,
                cx.transfer_syntax,
                self._cache,
                before_commit=durable.result,
            )
        except StoreError as exc:
            wait([durable])
            pending.discard()
            return exc
        if log.isEnabledFor(logging.DEBUG):  # uid_ref hashes; skip it on the hot path
            log.debug(
                "association %d: instance %s %s (%d bytes)",
                self.assoc_id,
                uid_ref(header.sop_instance_uid),
                outcome.value,
                stored.size,
            )
        if outcome is RecordOutcome.CONFLICT:
            log.warning(
                "association %d: instance %s re-sent with different content; both kept",
                self.assoc_id,
                uid_ref(header.sop_instance_uid),
            )
        return None

    def _respond_store(
        self, stream: p.PduStream, neg: Negotiated, msg: _Message, error: StoreError | None
    ) -> None:
        cmd = msg.command
        assert cmd is not None
        status = 0x0000 if error is None else dimse_status_for(error)
        if error is None:
            self.stats.stored += 1
        else:
            self.stats.failed += 1
            log.warning(
                "association %d: C-STORE refused with 0x%04X: %s",
                self.assoc_id,
                status,
                error.__class__.__name__,
            )
            self.ctx.recorder.audit(
                self.calling_ae,
                "instance_refused",
                "refused",
                object_type="association",
                object_id=self.assoc_id,
                detail={
                    "status": f"0x{status:04X}",
                    "error": str(error),
                    "sop_instance": uid_ref(cmd.sop_instance_uid),
                },
            )
        stream.send(
            p.store_response(
                msg.context_id,
                neg.peer_max_pdu,
                cmd.message_id,
                _printable_uid(cmd.sop_class_uid),
                _printable_uid(cmd.sop_instance_uid),
                status,
                None if error is None else str(error),
            )
        )


class _HandshakeFailed(Exception):
    pass


def _printable_uid(value: object) -> str:
    """Echo a command UID back only when it is a valid UID (never a hostile string)."""
    try:
        return check_uid(value, "uid")
    except StoreError:
        return ""
