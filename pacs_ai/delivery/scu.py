"""C-STORE SCU: send DICOM objects to a peer and report the status of every one.

Used by ``pacs-ai send`` and by the delivery outbox. One association per batch (at most 128
presentation contexts each); every C-STORE-RSP status is returned, never summarised away.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association

log = logging.getLogger(__name__)

_MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    called_ae: str
    calling_ae: str
    tls: ssl.SSLContext | None = None
    tls_hostname: str | None = None
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0


@dataclass(frozen=True)
class SendResult:
    item: str  # the file path or a caller-chosen label
    sop_instance_uid: str | None
    status: int | None  # C-STORE-RSP status; None when no response was received
    error: str | None = None  # why there is no response (rejected, aborted, unreadable file)
    # The failure will not go away by retrying (association rejected permanently, the SOP
    # class refused, the peer's TLS certificate not trusted): an admin must change something.
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status == 0x0000

    @property
    def category(self) -> str:
        if self.status is None:
            return "error"
        if self.status == 0x0000:
            return "success"
        if self.status in (0x0001, 0x0107, 0x0116) or self.status & 0xF000 == 0xB000:
            return "warning"
        return "failure"


@dataclass(frozen=True)
class Outgoing:
    """One object to send: a dataset (or a file to read) and a label for reporting."""

    label: str
    path: Path | None = None
    dataset: Dataset | None = None

    def load(self) -> Dataset:
        if self.dataset is not None:
            return self.dataset
        assert self.path is not None
        return pydicom.dcmread(self.path)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    try:
        with path.open("rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def collect_files(paths: Iterable[Path]) -> tuple[list[Path], list[Path]]:
    """(files to send, files skipped). Files given directly are always sent (and reported
    if unreadable); under folders, every DICOM Part 10 file is sent (sorted) and anything
    else (READMEs, scripts) is skipped."""
    out: list[Path] = []
    skipped: list[Path] = []
    for p in paths:
        if p.is_dir():
            for q in sorted(q for q in p.rglob("*") if q.is_file()):
                (out if is_dicom_file(q) else skipped).append(q)
        else:
            out.append(p)
    return out, skipped


def _contexts_for(datasets: Sequence[Dataset]) -> list[tuple[str, list[str]]]:
    pairs: dict[tuple[str, str], None] = {}
    for ds in datasets:
        pairs[(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))] = None
    contexts: list[tuple[str, list[str]]] = []
    for sop, ts in pairs:
        if UID(ts).is_compressed:
            contexts.append((sop, [ts]))
        else:
            contexts.append((sop, [ts, *(t for t in _UNCOMPRESSED if t != ts)]))
    return contexts


def _batches(items: Sequence[tuple[Outgoing, Dataset]]) -> list[list[tuple[Outgoing, Dataset]]]:
    """Split so that each association needs at most 128 presentation contexts."""
    batches: list[list[tuple[Outgoing, Dataset]]] = []
    current: list[tuple[Outgoing, Dataset]] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        ds = item[1]
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        if key not in seen and len(seen) >= _MAX_CONTEXTS:
            batches.append(current)
            current, seen = [], set()
        seen.add(key)
        current.append(item)
    if current:
        batches.append(current)
    return batches


class _RecordingSSLSocket(ssl.SSLSocket):
    """Keeps the handshake's exception: pynetdicom only logs it and reports "no connection"."""

    failures: ClassVar[list[ssl.SSLError]]

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLError as exc:
            type(self).failures.append(exc)
            raise


def _associate(
    peer: Peer, contexts: list[tuple[str, list[str]]]
) -> tuple[Association, ssl.SSLError | None]:
    """The association, and the TLS handshake's exception when it failed."""
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    for sop, syntaxes in contexts:
        ae.add_requested_context(sop, syntaxes)
    handlers: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, _mark_connected)]
    if peer.tls is None:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae, evt_handlers=handlers)
        return assoc, None
    failures: list[ssl.SSLError] = []
    recording = type("_Recording", (_RecordingSSLSocket,), {"failures": failures})
    previous = peer.tls.sslsocket_class
    peer.tls.sslsocket_class = recording
    try:
        tls_args = (peer.tls, peer.tls_hostname or peer.host)
        assoc = ae.associate(
            peer.host, peer.port, ae_title=peer.called_ae, tls_args=tls_args, evt_handlers=handlers
        )
    finally:
        peer.tls.sslsocket_class = previous
    return assoc, (failures[0] if failures else None)


def _mark_connected(event: evt.Event) -> None:
    event.assoc.pacs_ai_connected = True  # type: ignore[attr-defined]


def tls_failure(exc: ssl.SSLError) -> tuple[str, bool]:
    """(reason, permanent): a certificate that fails verification will not fix itself."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the peer's certificate failed verification ({exc.verify_message}); "
            "check the destination's CA file and the peer's certificate",
            True,
        )
    return f"TLS handshake failed ({exc.reason or exc.__class__.__name__})", False


def _why_not_established(assoc: Association) -> tuple[str, bool]:
    """(reason, permanent) for an association that was not established."""
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        if rsp is not None:
            where = f"({rsp.result},{rsp.result_source},{rsp.diagnostic})"
            if rsp.result == 0x01:
                return (
                    f"association rejected {where}, permanent: "
                    f"{rsp.reason_str}{_reject_hint(rsp.result_source, rsp.diagnostic)}",
                    True,
                )
            return f"association rejected {where}: {rsp.reason_str}", False
        return "association rejected", False
    if not getattr(assoc, "pacs_ai_connected", False):
        return "could not connect (nothing answers at that address and port)", False
    if assoc.is_aborted:
        return "association aborted by the peer", False
    return "could not associate (no answer in time)", False


def _reject_hint(source: Any, diagnostic: Any) -> str:
    if source == 1 and diagnostic == 3:
        return "; the peer must list our AE title (calling_ae_title) and address"
    if source == 1 and diagnostic == 7:
        return "; check the destination's ae_title"
    return ""


def send(
    peer: Peer,
    items: Sequence[Outgoing],
    progress: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """Send ``items``; returns one result per item, in order."""
    results: dict[int, SendResult] = {}
    loaded: list[tuple[int, Outgoing, Dataset]] = []
    for idx, item in enumerate(items):
        try:
            loaded.append((idx, item, item.load()))
        except Exception as exc:  # unreadable or non-DICOM file
            results[idx] = SendResult(item.label, None, None, f"not readable as DICOM: {exc}")
            if progress:
                progress(results[idx])
    index_of = {id(item): idx for idx, item, _ in loaded}
    for batch in _batches([(item, ds) for _, item, ds in loaded]):
        datasets = [ds for _, ds in batch]
        assoc, tls_error = _associate(peer, _contexts_for(datasets))
        if not assoc.is_established:
            if tls_error is not None:
                why, permanent = tls_failure(tls_error)
            else:
                why, permanent = _why_not_established(assoc)
            for item, ds in batch:
                uid = str(ds.get("SOPInstanceUID", ""))
                # Every context rejected: pynetdicom aborts, but the answer was clear.
                refused = _refused_context(assoc, ds) if assoc.rejected_contexts else None
                if refused is not None:
                    res = SendResult(item.label, uid, None, refused, permanent=True)
                else:
                    res = SendResult(item.label, uid, None, why, permanent)
                results[index_of[id(item)]] = res
                if progress:
                    progress(res)
            continue
        try:
            for item, ds in batch:
                res = _store_one(assoc, item, ds)
                results[index_of[id(item)]] = res
                if progress:
                    progress(res)
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()
        for item, ds in batch:  # left unsent because the association dropped
            idx = index_of[id(item)]
            if idx not in results:
                results[idx] = SendResult(
                    item.label, str(ds.get("SOPInstanceUID", "")), None, "association lost"
                )
                if progress:
                    progress(results[idx])
    return [results[i] for i in range(len(items))]


def _refused_context(assoc: Association, ds: Dataset) -> str | None:
    """Why no accepted presentation context can carry ``ds`` (None when one can)."""
    sop_class = str(ds.SOPClassUID)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == sop_class]
    if not accepted:
        return f"the peer does not accept {UID(sop_class).name} (presentation context rejected)"
    if UID(syntax).is_compressed and all(c.transfer_syntax[0] != syntax for c in accepted):
        return f"the peer does not accept {UID(syntax).name} for {UID(sop_class).name}"
    return None


def _store_one(assoc: Association, item: Outgoing, ds: Dataset) -> SendResult:
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    refused = _refused_context(assoc, ds)
    if refused is not None:
        return SendResult(item.label, sop_uid, None, refused, permanent=True)
    try:
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError) as exc:
        return SendResult(item.label, sop_uid, None, f"not sent: {exc}")
    status = rsp.get("Status") if rsp else None
    if status is None:
        return SendResult(item.label, sop_uid, None, "no response (timeout or abort)")
    comment = rsp.get("ErrorComment")
    return SendResult(item.label, sop_uid, int(status), str(comment) if comment else None)
