"""Group commit: the instances that several associations finish at the same time are recorded
in one database transaction, so one commit (one WAL fsync in SQLite) answers all of them.

Leader/follower, without a thread of its own: an association thread that finds nobody
committing becomes the leader, takes what is queued (its own instance and any that arrived
meanwhile, at most :data:`MAX_BATCH`), records them in one transaction and wakes the others.
Nobody waits for company: a lone association commits at once, exactly as before; a batch
forms only from instances that queued while an earlier commit was running.

The durability contract is unchanged (DESIGN.md §4, §6.5). For every instance in a batch the
leader first waits for its spool file's fsync (file and directory), then runs its statements;
the transaction commits only after all of that, and each sender hears Success only after the
commit returned. If the commit (or anything before it) fails, no row of the batch exists and
every waiter gets the error (0xA7xx for a database failure): its thread discards its file, as
for a lone instance. An instance refused on its own (an identity conflict, a failed fsync)
must not take the others down and must leave no row: the transaction is rolled back and
redone without it (at most once per instance in the batch; refusals are rare).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from pacs_ai.errors import DatabaseUnavailable
from pacs_ai.ingest.recorder import AssociationCache, IngestRecorder, RecordOutcome
from pacs_ai.ingest.spool import StoredFile
from pacs_ai.ingest.validation import InstanceHeader

# Instances per transaction at most: bounds one commit's work and how long a follower waits.
MAX_BATCH = 64


@dataclass(eq=False)
class _Request:
    assoc_id: int
    calling_ae: str
    header: InstanceHeader
    stored: StoredFile
    transfer_syntax: str
    cache: AssociationCache
    durable: Callable[[], object]  # waits for the spool file's fsync; raises if it failed
    outcome: RecordOutcome | None = None
    error: BaseException | None = None
    taken: bool = False  # a leader has it: it will be answered, never abandoned
    done: bool = False


class _Redo(Exception):
    """One instance of the batch was refused: roll back, redo the batch without it."""


class GroupCommitter:
    def __init__(self, recorder: IngestRecorder, queue_timeout: float) -> None:
        """``queue_timeout``: how long an instance may wait to be taken into a batch (a
        leader's own work is bounded by the database's busy/lock timeouts)."""
        self._recorder = recorder
        self._queue_timeout = queue_timeout
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._leading = False
        # Counters for benchmarks and tests (read without the lock; approximate while busy).
        self.commits = 0
        self.instances = 0
        self.largest_batch = 0

    def record(
        self,
        assoc_id: int,
        calling_ae: str,
        header: InstanceHeader,
        stored: StoredFile,
        transfer_syntax: str,
        cache: AssociationCache,
        durable: Callable[[], object],
    ) -> RecordOutcome:
        """Record one instance; returns once its row is committed (durable), or raises
        what refused it (:class:`~pacs_ai.errors.DatabaseUnavailable` for the database)."""
        req = _Request(assoc_id, calling_ae, header, stored, transfer_syntax, cache, durable)
        deadline = time.monotonic() + self._queue_timeout
        with self._cond:
            self._queue.append(req)
        while True:
            with self._cond:
                while not req.done and self._leading:
                    remaining = deadline - time.monotonic()
                    if not req.taken and remaining <= 0:
                        self._queue.remove(req)
                        raise DatabaseUnavailable("no database commit within the timeout")
                    self._cond.wait(max(remaining, 0.0) if not req.taken else 1.0)
                if req.done:
                    break
                self._leading = True
                batch = self._queue[:MAX_BATCH]
                del self._queue[: len(batch)]
                for r in batch:
                    r.taken = True
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    for r in batch:
                        r.done = True
                    self._leading = False
                    self._cond.notify_all()
        if req.error is not None:
            if isinstance(req.error, SQLAlchemyError):
                raise DatabaseUnavailable(
                    f"database write failed: {req.error.__class__.__name__}"
                ) from req.error
            raise req.error
        assert req.outcome is not None
        return req.outcome

    def _commit(self, batch: list[_Request]) -> None:
        for r in batch:
            try:
                r.durable()
            except BaseException as exc:  # its file is not durable: no row for it
                r.error = exc
        pending = [r for r in batch if r.error is None]
        for _ in range(len(batch)):  # each redo drops one instance: bounded
            if not pending:
                return
            refused: _Request | None = None
            try:
                with self._recorder.transaction() as conn:
                    for r in pending:
                        try:
                            r.outcome = self._recorder.record_in(
                                conn,
                                r.assoc_id,
                                r.calling_ae,
                                r.header,
                                r.stored,
                                r.transfer_syntax,
                                r.cache,
                            )
                        except Exception as exc:
                            r.error, refused = exc, r
                            raise _Redo() from exc
            except _Redo:
                pending = self._rolled_back(pending, refused)
                continue
            except BaseException as exc:  # begin or commit failed: no row of the batch exists
                for r in self._rolled_back(pending, None):
                    r.error = exc
                raise_if_fatal(exc)
                return
            self.commits += 1
            self.instances += len(pending)
            self.largest_batch = max(self.largest_batch, len(pending))
            return

    @staticmethod
    def _rolled_back(pending: list[_Request], refused: _Request | None) -> list[_Request]:
        """After a rollback: ids cached during it may not exist; outcomes are void."""
        for r in pending:
            r.cache.studies.clear()
            r.cache.series.clear()
            r.outcome = None
        return [r for r in pending if r is not refused]


def raise_if_fatal(exc: BaseException) -> None:
    """KeyboardInterrupt/SystemExit still propagate after the waiters were given the error."""
    if not isinstance(exc, Exception):
        raise exc
