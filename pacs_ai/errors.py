"""The exception tree, and the one table that maps exceptions to DIMSE statuses.

Code raises the most specific exception it knows; the ingest boundary
(:func:`dimse_status_for`) turns it into the C-STORE status the peer sees. Nothing else in
the code base picks a status number.
"""

from __future__ import annotations

import re


class PacsAiError(Exception):
    """Base of every error pacs-ai raises on purpose."""


class ConfigError(PacsAiError):
    """The configuration file or an override is invalid."""


class StartupError(PacsAiError):
    """``serve``/``worker`` cannot start as configured (a model does not load, the port is
    taken, the schema is out of date, the spool is not writable, ...). The message is the one
    line the admin sees; the process exits with status 3."""


class AdminError(PacsAiError):
    """An admin command cannot do what was asked (a file exists and --force was not given,
    a database kind it does not handle, ...)."""


# --- association level --------------------------------------------------------------------


class AssociationRejected(PacsAiError):
    """An A-ASSOCIATE-RQ is refused with (result, source, reason) per PS3.8 9.3.4."""

    def __init__(self, result: int, source: int, reason: int, why: str) -> None:
        super().__init__(why)
        self.result = result
        self.source = source
        self.reason = reason
        self.why = why


def reject_calling_ae(why: str) -> AssociationRejected:
    return AssociationRejected(1, 1, 3, why)  # permanent, service-user, calling AE unknown


def reject_called_ae(why: str) -> AssociationRejected:
    return AssociationRejected(1, 1, 7, why)  # permanent, service-user, called AE unknown


def reject_local_limit(why: str) -> AssociationRejected:
    return AssociationRejected(2, 3, 2, why)  # transient, provider (presentation), local limit


def reject_no_reason(why: str) -> AssociationRejected:
    return AssociationRejected(1, 1, 1, why)  # permanent, service-user, no reason given


class ProtocolError(PacsAiError):
    """The peer broke the upper-layer protocol; the association is aborted with an A-ABORT
    whose provider reason (PS3.8 Table 9-26) is ``abort_reason``."""

    UNRECOGNIZED_PDU = 1
    UNEXPECTED_PDU = 2
    INVALID_PARAMETER = 6

    def __init__(self, message: str, abort_reason: int = INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort_reason = abort_reason


# --- instance level (C-STORE) ---------------------------------------------------------------


class StoreError(PacsAiError):
    """A C-STORE that must not be answered with Success."""


class DatasetMismatch(StoreError):
    """The dataset's SOP Class/Instance UID differ from the command's."""


class InvalidDataset(StoreError):
    """The dataset cannot be parsed (truncated, corrupt encoding)."""


class MissingAttribute(StoreError):
    """A Type 1 attribute we rely on is missing or empty."""


class InvalidUid(StoreError):
    """A UID is not a valid DICOM UID (e.g. contains '/', '..' or NUL)."""


class PixelDataError(StoreError):
    """Pixel Data length does not match Rows x Columns x frames x samples x bits."""


class ImageTooLarge(StoreError):
    """Declared dimensions or encoded size exceed the configured limits."""


class OutOfResources(StoreError):
    """Disk below the watermark, disk full."""


class SpoolIOError(StoreError):
    """Writing the spool failed (I/O error other than disk full)."""


class DatabaseUnavailable(StoreError):
    """The database could not record the instance (down, or busy past
    ``database.busy_timeout_seconds``)."""


class IncompleteDataset(InvalidDataset):
    """An element (header or value) runs past the end of the dataset."""


class InflateLimitExceeded(ImageTooLarge):
    """A deflated dataset inflates beyond ``dicom.max_instance_bytes`` or
    ``dicom.max_inflate_ratio`` (a decompression bomb)."""


class CodestreamMismatch(StoreError):
    """No frame size found in the first compressed fragment, or a frame header (JPEG SOFn,
    JPEG-LS SOF55/LSE, JPEG 2000 SIZ) disagrees with Rows/Columns/samples/bits."""


class IdentityConflict(StoreError):
    """A Series or SOP Instance UID already known under another study, or a Study UID
    already known for another patient."""


class UnexpectedStoreError(StoreError):
    """Anything not foreseen while receiving, validating or recording (a parser's
    ValueError, struct.error, MemoryError...): answered 0x0110, message holds only the
    exception class."""


# Warning/failure statuses per PS3.4 Annex B (Storage Service Class) and PS3.7 Annex C.
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
_STATUS: dict[type[StoreError], int] = {
    DatasetMismatch: 0xA900,
    InvalidDataset: 0xC000,
    InvalidUid: 0xC001,
    MissingAttribute: 0xC002,
    PixelDataError: 0xC003,
    ImageTooLarge: 0xC004,
    OutOfResources: 0xA700,
    SpoolIOError: 0xA701,
    DatabaseUnavailable: 0xA702,
    CodestreamMismatch: 0xC005,
    IdentityConflict: 0xC006,
    UnexpectedStoreError: STATUS_PROCESSING_FAILURE,
}


def dimse_status_for(exc: BaseException) -> int:
    """The C-STORE-RSP status for ``exc``: the table above, else 0x0110 processing failure."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return STATUS_PROCESSING_FAILURE


# --- imaging and models ---------------------------------------------------------------------


class ImagingError(PacsAiError):
    """A stored image cannot be read, decoded or preprocessed (corrupt, unsupported, absurd)."""


class DecodeLimitExceeded(ImagingError):
    """Declared dimensions or the inflated size exceed the decode limits (checked before
    decoding: absurd dimensions, decompression bombs)."""


class DecodeProcessFailed(ImagingError):
    """A decode process died (signal, out of memory) or did not answer in time while
    decoding a series (:mod:`pacs_ai.inference.decodepool`); the job fails and is retried."""


class NotApplicable(PacsAiError):
    """A series or image the model cannot take (wrong modality, lateral view, localizer...)."""


class ModelError(PacsAiError):
    """A model directory cannot be loaded or a model failed while scoring."""


class ModelRefused(ModelError):
    """A model fails the deployment checks (predictions collapse to one class, AUC not above
    the baseline, missing validation metrics, weights not matching the card)."""


class StudyNotFound(PacsAiError):
    """No study matches the reference (database id, Study Instance UID or UID prefix)."""


class AmbiguousStudy(PacsAiError):
    """A UID prefix matches more than one study."""

    def __init__(self, message: str, count: int) -> None:
        super().__init__(message)
        self.count = count


# --- the scoring worker and error text --------------------------------------------------------


class WorkerFailed(PacsAiError):
    """The scoring worker process failed a job: it died (signal, out of memory), timed out,
    or raised there. ``kind`` is the original exception class name; the message is already
    scrubbed (see :func:`safe_reason`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# Things that may be DICOM values in exception text: quoted strings and byte strings, UIDs
# (and other dotted numbers), person names (carets), dates and long digit runs (IDs).
_SCRUB = re.compile(
    r"""b?'[^']*'|b?"[^"]*"|\d+(?:\.\d+){2,}|\S*\^\S*|\d{6,}""",
)
_REASON_CHARS = 200


def safe_reason(exc: BaseException) -> str:
    """``"ExceptionClass: message"`` for logs, ``state_reason`` and ``jobs.error``, with
    anything that may be a DICOM value (quoted text, UIDs, names, long numbers) replaced by
    ``…`` and cut to 200 characters."""
    kind = exc.kind if isinstance(exc, WorkerFailed) else type(exc).__name__
    message = " ".join(_SCRUB.sub("…", str(exc)).split())
    text = f"{kind}: {message}" if message else kind
    return text[:_REASON_CHARS]
