"""The C-STORE service of one association: a dataset is streamed into the spool as its
fragments arrive; at the last one it is validated, made durable, recorded, and only then
answered with Success.

One total boundary per message: whatever is raised while a
dataset is received, validated or recorded (our own :class:`~pacs_ai.errors.StoreError`, or
anything unforeseen from a parser, the file system or the database driver) ends as a
C-STORE-RSP from the status table in :mod:`pacs_ai.errors` (0x0110 for the unforeseen), the
file is discarded, and the association goes on. Only protocol violations abort it. Logs and
audit rows carry the exception class and hashed UIDs, never values.
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pacs_ai.config import Settings
from pacs_ai.errors import (
    STATUS_SUCCESS,
    InvalidDataset,
    ProtocolError,
    StoreError,
    UnexpectedStoreError,
    dimse_status_for,
)
from pacs_ai.ingest import protocol as p
from pacs_ai.ingest.negotiation import Negotiated
from pacs_ai.ingest.recorder import AssociationCache, RecordOutcome
from pacs_ai.ingest.spool import PendingFile, part10_header
from pacs_ai.ingest.validation import Limits, check_uid, read_and_validate
from pacs_ai.logs import uid_ref
from pacs_ai.telemetry import observe_store

if TYPE_CHECKING:
    from pacs_ai.ingest.association import ServerContext

log = logging.getLogger(__name__)


@dataclass
class _Message:
    """The C-STORE being received."""

    context_id: int
    command: p.Command
    pending: PendingFile | None = None
    error: StoreError | None = None
    dataset_bytes: int = 0


def unexpected(exc: BaseException, doing: str) -> UnexpectedStoreError:
    """Wrap an unforeseen exception: its class and where it was raised (file:line), never
    its message, which may quote the values being parsed."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
    err = UnexpectedStoreError(f"internal error ({exc.__class__.__name__})")
    log.error(
        "unexpected %s at %s while %s; answered 0x%04X",
        exc.__class__.__name__,
        where,
        doing,
        dimse_status_for(err),
    )
    return err


class StoreService:
    def __init__(
        self,
        ctx: ServerContext,
        stream: p.PduStream,
        negotiated: Negotiated,
        assoc_id: int,
        calling_ae: str,
    ) -> None:
        self._ctx = ctx
        self._settings: Settings = ctx.settings
        self._stream = stream
        self._neg = negotiated
        self.assoc_id = assoc_id
        self._calling_ae = calling_ae
        self._cache = AssociationCache()
        self._msg: _Message | None = None
        d = ctx.settings.dicom
        self._limits = Limits(d.max_pixel_bytes, d.max_instance_bytes, d.max_inflate_ratio)
        self.stored = 0
        self.failed = 0

    # --- message events ----------------------------------------------------------------

    def on_command(self, context_id: int, cmd: p.Command) -> None:
        """A complete C-STORE-RQ command set."""
        msg = _Message(context_id, cmd)
        if not cmd.has_dataset:
            self._respond(msg, InvalidDataset("C-STORE-RQ without a dataset"))
            return
        self._msg = msg
        try:
            sop_class = check_uid(cmd.sop_class_uid, "AffectedSOPClassUID")
            sop_instance = check_uid(cmd.sop_instance_uid, "AffectedSOPInstanceUID")
            self._ctx.spool.check_free_space()
            cx = self._neg.contexts[context_id]
            if sop_class != cx.abstract_syntax:
                raise InvalidDataset("SOP Class differs from the presentation context")
            msg.pending = self._ctx.spool.begin(
                part10_header(sop_class, sop_instance, cx.transfer_syntax, self._calling_ae)
            )
        except StoreError as exc:
            msg.error = exc  # the dataset is still read (and discarded), then refused
        except Exception as exc:
            msg.error = unexpected(exc, "starting an instance")

    def on_fragment(self, fragment: memoryview, last: bool) -> None:
        msg = self._msg
        assert msg is not None
        msg.dataset_bytes += len(fragment)
        if msg.dataset_bytes > self._settings.dicom.max_instance_bytes:
            # Reading on would let a peer stream without end; drop the association instead.
            raise ProtocolError("dataset larger than dicom.max_instance_bytes")
        if msg.pending is not None and msg.error is None:
            try:
                msg.pending.write(fragment)
            except StoreError as exc:
                msg.error = exc
            except Exception as exc:
                msg.error = unexpected(exc, "writing the spool")
            if msg.error is not None:
                self._discard(msg)
        if last:
            self._msg = None
            self._complete(msg)

    def abandon(self) -> None:
        """The association ended mid-message: nothing of it stays."""
        if self._msg is not None:
            self._discard(self._msg)
            self._msg = None

    # --- completion ----------------------------------------------------------------------

    def _complete(self, msg: _Message) -> None:
        started = time.perf_counter()
        error = msg.error
        pending, msg.pending = msg.pending, None
        if error is None and pending is not None:
            try:
                self._store(msg, pending)
            except StoreError as exc:
                error = exc
            except Exception as exc:
                error = unexpected(exc, "validating and recording an instance")
        elif pending is not None:
            _discard_quietly(pending)
        self._respond(msg, error)
        observe_store(time.perf_counter() - started, error is None)  # /metrics

    def _store(self, msg: _Message, pending: PendingFile) -> None:
        cmd = msg.command
        cx = self._neg.contexts[msg.context_id]
        try:
            stored = pending.place()
        except BaseException:
            _discard_quietly(pending)
            raise
        # The fsyncs (GIL released) of the file and of its directory run at once on two other
        # threads while this one validates the file and prepares its rows; the transaction
        # commits only once both returned (the file is durable under its final name).
        syncs = [
            self._ctx.io_pool.submit(pending.sync_file),
            self._ctx.io_pool.submit(pending.sync_dir),
        ]

        def durable() -> None:
            for f in syncs:
                f.result()

        try:
            header = read_and_validate(
                pending.final_path,  # under objects/, named by our hash (no realpath needed)
                cx.transfer_syntax,
                cmd.sop_class_uid,
                cmd.sop_instance_uid,
                self._limits,
            )
            # Recorded in a transaction shared with instances that other associations finish
            # at the same moment (group commit); the file's fsync is awaited before it commits.
            outcome = self._ctx.committer.record(
                self.assoc_id,
                self._calling_ae,
                header,
                stored,
                cx.transfer_syntax,
                self._cache,
                durable=durable,
            )
        except BaseException:
            wait(syncs)
            _discard_quietly(pending)
            raise
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

    def _respond(self, msg: _Message, error: StoreError | None) -> None:
        """Answer first (a slow audit write must not delay the status), then account."""
        cmd = msg.command
        status = STATUS_SUCCESS if error is None else dimse_status_for(error)
        self._stream.send(
            p.store_response(
                msg.context_id,
                self._neg.peer_max_pdu,
                cmd.message_id,
                _printable_uid(cmd.sop_class_uid),
                _printable_uid(cmd.sop_instance_uid),
                status,
                None if error is None else str(error),
            )
        )
        if error is None:
            self.stored += 1
            return
        self.failed += 1
        log.warning(
            "association %d: C-STORE of %s refused with 0x%04X: %s",
            self.assoc_id,
            uid_ref(cmd.sop_instance_uid),
            status,
            error.__class__.__name__,
        )
        try:
            self._ctx.recorder.audit(
                self._calling_ae,
                "instance_refused",
                "refused",
                object_type="association",
                object_id=self.assoc_id,
                detail={
                    "status": f"0x{status:04X}",
                    "error": error.__class__.__name__,
                    "reason": str(error),
                    "sop_instance": uid_ref(cmd.sop_instance_uid),
                },
            )
        except Exception as exc:
            log.error("could not audit a refused instance: %s", exc.__class__.__name__)

    def _discard(self, msg: _Message) -> None:
        if msg.pending is not None:
            _discard_quietly(msg.pending)
            msg.pending = None


def _discard_quietly(pending: PendingFile) -> None:
    try:
        pending.discard()
    except Exception as exc:  # the refusal still goes out; recovery sweeps tmp/ at start
        log.error("could not discard a spool file: %s", exc.__class__.__name__)


def _printable_uid(value: object) -> str:
    """Echo a command UID back only when it is a valid UID (never a hostile string)."""
    try:
        return check_uid(value, "uid")
    except StoreError:
        return ""
