"""P-DATA-TF PDVs to DIMSE messages (PS3.8 §9.3.5, PS3.7 §6.3.1): the DIMSE layer between
the PDU stream (:mod:`pacs_ai.ingest.protocol`) and the services (C-ECHO, C-STORE), as
pynetdicom separates dul / dimse / service_class.

The assembler buffers command fragments (small, capped) until the command set is complete
and passes dataset fragments straight through: a C-STORE dataset is never held in memory,
the service streams it into the spool.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import Any

from pacs_ai.errors import ProtocolError
from pacs_ai.ingest import protocol as p

COMMAND = 0  # (COMMAND, context id, Command, True)
DATA = 1  # (DATA, context id, fragment memoryview, last fragment?)

MAX_COMMAND_BYTES = 65536

Event = tuple[int, int, Any, bool]


class MessageAssembler:
    """Turns the PDVs of successive P-DATA-TF PDUs into message events, checking the
    order rules: one presentation context per message, command before dataset, nothing after
    the last fragment."""

    __slots__ = ("_command", "_context_id", "_contexts", "_expect_data")

    def __init__(self, accepted_contexts: Container[int]) -> None:
        self._contexts = accepted_contexts
        self._context_id: int | None = None
        self._command = bytearray()
        self._expect_data = False

    @property
    def in_message(self) -> bool:
        """True between the first fragment of a message and its last."""
        return self._context_id is not None

    def feed(self, body: memoryview) -> Iterator[Event]:
        for context_id, control, fragment in p.iter_pdvs(body):
            if context_id not in self._contexts:
                raise ProtocolError("PDV on a presentation context that was not accepted")
            if self._context_id is None:
                self._context_id = context_id
            elif context_id != self._context_id:
                raise ProtocolError("presentation context changed within a message")
            last = bool(control & 0x02)
            if control & 0x01:
                if self._expect_data:
                    raise ProtocolError("command fragment after the command was complete")
                self._command += fragment
                if len(self._command) > MAX_COMMAND_BYTES:
                    raise ProtocolError("command set too large")
                if last:
                    command = p.decode_command(bytes(self._command))
                    self._command.clear()
                    if command.has_dataset:
                        self._expect_data = True
                    else:
                        self._context_id = None
                    yield COMMAND, context_id, command, True
            else:
                if not self._expect_data:
                    raise ProtocolError("dataset fragment before the command")
                if last:
                    self._expect_data = False
                    self._context_id = None
                yield DATA, context_id, fragment, last
