"""Association acceptance: who may associate, and which presentation contexts we accept.

Deny by default (DESIGN.md rule 4): the calling AE must be on the allowlist *from its listed
address*, the called AE must be ours, and the association cap and disk watermark are checked
before anything else is read. Codecs and context negotiation come from pynetdicom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.pdu import A_ASSOCIATE_AC as _AcPdu
from pynetdicom.pdu import A_ASSOCIATE_RQ as _RqPdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    negotiate_as_acceptor,
)

from pacs_ai import __version__
from pacs_ai.config import Settings
from pacs_ai.errors import (
    AssociationRejected,
    ProtocolError,
    reject_called_ae,
    reject_calling_ae,
    reject_local_limit,
    reject_no_reason,
)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.7291.1"
IMPLEMENTATION_VERSION = f"PACS_AI_{__version__}"[:16]

# Accepted transfer syntaxes, in our order of preference when a context proposes several:
# uncompressed first (cheapest to read), then the lossless and lossy codecs pylibjpeg decodes.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)


def _supported_contexts() -> list[PresentationContext]:
    contexts = []
    for uid in [VERIFICATION] + [cx.abstract_syntax for cx in AllStoragePresentationContexts]:
        cx = PresentationContext()
        cx.abstract_syntax = uid
        cx.transfer_syntax = list(TRANSFER_SYNTAXES)
        contexts.append(cx)
    return contexts


_SUPPORTED = _supported_contexts()


@dataclass(frozen=True)
class AcceptedContext:
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class Negotiated:
    calling_ae: str
    called_ae: str
    contexts: dict[int, AcceptedContext]
    peer_max_pdu: int  # 0 = no limit
    ac_pdu: bytes


def decode_request(body: bytes) -> A_ASSOCIATE:
    """Decode an A-ASSOCIATE-RQ body (without its 6-byte header)."""
    full = bytes([0x01, 0x00]) + len(body).to_bytes(4, "big") + body
    try:
        pdu = _RqPdu()
        pdu.decode(full)
        primitive = pdu.to_primitive()
    except Exception as exc:  # pynetdicom raises assorted errors on malformed items
        raise ProtocolError("malformed A-ASSOCIATE-RQ") from exc
    if not pdu.protocol_version & 0x01:
        raise AssociationRejected(1, 2, 2, "protocol version not supported")
    return primitive


def negotiate(
    rq: A_ASSOCIATE,
    settings: Settings,
    peer_address: str,
    can_accept_more: Callable[[], bool],
    has_free_space: Callable[[], bool],
) -> Negotiated:
    """Decide on an A-ASSOCIATE-RQ; returns the AC to send or raises AssociationRejected."""
    calling = (rq.calling_ae_title or "").strip()
    called = (rq.called_ae_title or "").strip()
    if str(rq.application_context_name) != APPLICATION_CONTEXT:
        raise AssociationRejected(1, 1, 2, "application context name not supported")
    if called != settings.dicom.ae_title:
        raise reject_called_ae(f"called AE title {called!r} is not ours")
    if not settings.access.is_allowed(calling, peer_address):
        raise reject_calling_ae(f"calling AE {calling!r} not allowed from {peer_address}")
    if not can_accept_more():
        raise reject_local_limit("maximum number of associations reached")
    if not has_free_space():
        raise reject_local_limit("disk space below storage.min_free_mb")

    roles = {}
    async_requested = False
    for item in rq.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid:
            roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        elif isinstance(item, AsynchronousOperationsWindowNegotiation):
            async_requested = True
    results, role_items = negotiate_as_acceptor(
        rq.presentation_context_definition_list, _SUPPORTED, roles
    )
    accepted = {
        int(cx.context_id): AcceptedContext(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
        for cx in results
        if cx.result == 0 and cx.context_id is not None
    }
    if not accepted:
        # PS3.8 allows an AC with every context rejected, but nothing useful can follow.
        raise reject_no_reason("no presentation context acceptable")

    ac = A_ASSOCIATE()
    ac.application_context_name = UID(APPLICATION_CONTEXT)
    ac.calling_ae_title = rq.calling_ae_title
    ac.called_ae_title = rq.called_ae_title
    ac.result = 0x00
    ac.result_source = 0x01
    ac.presentation_context_definition_results_list = results
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = settings.dicom.max_pdu_size
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    impl_ver = ImplementationVersionNameNotification()
    impl_ver.implementation_version_name = IMPLEMENTATION_VERSION
    user_info: list[object] = [max_len, impl_uid, impl_ver, *role_items]
    if async_requested:
        # We perform operations one at a time: answer (1, 1).
        window = AsynchronousOperationsWindowNegotiation()
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        user_info.append(window)
    ac.user_information = user_info  # type: ignore[assignment]
    pdu = _AcPdu()
    pdu.from_primitive(ac)
    return Negotiated(
        calling_ae=calling,
        called_ae=called,
        contexts=accepted,
        peer_max_pdu=int(rq.maximum_length_received or 0),
        ac_pdu=pdu.encode(),
    )
