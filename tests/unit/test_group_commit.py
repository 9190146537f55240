"""Group commit: instances that several associations finish together share one transaction;
each is answered only after that transaction committed, and a refusal or failure in a batch
leaves no row behind for the instances it concerns."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, func, select

from pacs_ai.config import DatabaseSettings
from pacs_ai.db.models import Instance, Series, Study
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.errors import DatabaseUnavailable, IdentityConflict, SpoolIOError
from pacs_ai.ingest.groupcommit import GroupCommitter
from pacs_ai.ingest.recorder import AssociationCache, IngestRecorder, RecordOutcome
from pacs_ai.ingest.spool import StoredFile
from pacs_ai.ingest.validation import InstanceHeader
from tests.conftest import wait_for


def _header(study: str, series: str, sop: str, patient: str = "P1") -> InstanceHeader:
    return InstanceHeader(
        study, series, sop, "1.2.840.10008.5.1.4.1.1.2", "CT", "CHEST", 1, None, 1,
        patient, "Doe^J", "A1", "20260101", None,
    )  # fmt: skip


def _stored(n: int) -> StoredFile:
    sha = f"{n:064x}"
    return StoredFile(sha, 10, f"objects/{sha[:2]}/{sha[2:4]}/{sha}.dcm", True)


def _rows(engine: Engine, model: type) -> int:
    with engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(model)) or 0)


def _sop_committed(engine: Engine, sop: str) -> bool:
    with engine.connect() as c:  # another connection: sees only what was committed
        return c.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop)) is not None


class _Sender:
    """One association's thread handing one instance to the committer."""

    def __init__(
        self,
        committer: GroupCommitter,
        engine: Engine,
        assoc: int,
        header: InstanceHeader,
        n: int,
        durable: Callable[[], object] = lambda: None,
    ) -> None:
        self.result: RecordOutcome | BaseException | None = None
        self.committed_when_answered = False

        def run() -> None:
            try:
                self.result = committer.record(
                    assoc, "MOD", header, _stored(n), "1.2.840.10008.1.2.1",
                    AssociationCache(), durable,
                )  # fmt: skip
                self.committed_when_answered = _sop_committed(engine, header.sop_instance_uid)
            except BaseException as exc:
                self.result = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> RecordOutcome | BaseException | None:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        return self.result


@pytest.fixture
def setup(db_url: str) -> Iterator[tuple[IngestRecorder, GroupCommitter, Engine, list[int]]]:
    engine = make_engine(DatabaseSettings(url=db_url))
    upgrade(engine)
    rec = IngestRecorder(engine)
    assocs = [rec.open_association("127.0.0.1", 1000 + i, False) for i in range(4)]
    yield rec, GroupCommitter(rec, queue_timeout=30), engine, assocs
    engine.dispose()


def _batch_behind_a_blocked_leader(
    committer: GroupCommitter,
    engine: Engine,
    assocs: list[int],
    headers: list[InstanceHeader],
    durables: list[Callable[[], object]] | None = None,
) -> list[_Sender]:
    """The first sender leads and is held in its fsync wait until the others have queued:
    they then form one batch of their own (deterministic, no sleeps)."""
    release = threading.Event()
    first = _Sender(committer, engine, assocs[0], headers[0], 0, lambda: release.wait(10))
    wait_for(lambda: committer._leading, what="first sender leads")
    durables = durables or [lambda: None] * (len(headers) - 1)
    rest = [
        _Sender(committer, engine, assocs[i % len(assocs)], h, i, durables[i - 1])
        for i, h in enumerate(headers[1:], start=1)
    ]
    wait_for(lambda: len(committer._queue) == len(rest), what="others queued")
    release.set()
    return [first, *rest]


def test_concurrent_instances_share_one_commit_and_are_answered_after_it(
    setup: tuple[IngestRecorder, GroupCommitter, Engine, list[int]],
) -> None:
    _rec, committer, engine, assocs = setup
    headers = [_header("1.1", f"1.1.{i}", f"1.1.{i}.1") for i in range(4)]
    senders = _batch_behind_a_blocked_leader(committer, engine, assocs, headers)
    assert [s.join() for s in senders] == [RecordOutcome.NEW] * 4
    assert all(s.committed_when_answered for s in senders)
    assert (committer.commits, committer.instances, committer.largest_batch) == (2, 4, 3)
    assert (_rows(engine, Instance), _rows(engine, Series), _rows(engine, Study)) == (4, 4, 1)


def test_a_refused_instance_in_a_batch_leaves_no_row_and_spares_the_others(
    setup: tuple[IngestRecorder, GroupCommitter, Engine, list[int]],
) -> None:
    """An identity conflict (a known study for another patient) in the middle of a batch:
    that instance is refused with nothing of it recorded (no stranded study or series); the
    instances before and after it in the same batch commit."""
    _rec, committer, engine, assocs = setup
    headers = [
        _header("2.1", "2.1.1", "2.1.1.1"),
        _header("2.2", "2.2.1", "2.2.1.1"),
        _header("2.1", "2.1.9", "2.1.9.1", patient="OTHER"),  # same study, other patient
        _header("2.3", "2.3.1", "2.3.1.1"),
    ]
    senders = _batch_behind_a_blocked_leader(committer, engine, assocs, headers)
    results = [s.join() for s in senders]
    assert results[0] == results[1] == results[3] == RecordOutcome.NEW
    assert isinstance(results[2], IdentityConflict)
    assert [s.committed_when_answered for s in senders] == [True, True, False, True]
    assert not _sop_committed(engine, "2.1.9.1")
    with engine.connect() as c:
        assert sorted(c.scalars(select(Series.series_uid))) == ["2.1.1", "2.2.1", "2.3.1"]
        assert sorted(c.scalars(select(Study.study_uid))) == ["2.1", "2.2", "2.3"]


def test_a_failed_fsync_refuses_only_that_instance(
    setup: tuple[IngestRecorder, GroupCommitter, Engine, list[int]],
) -> None:
    _rec, committer, engine, assocs = setup
    headers = [_header("3.1", f"3.1.{i}", f"3.1.{i}.1") for i in range(3)]

    def failed_fsync() -> None:
        raise SpoolIOError("I/O error while flushing the spool")

    senders = _batch_behind_a_blocked_leader(
        committer, engine, assocs, headers, [failed_fsync, lambda: None]
    )
    results = [s.join() for s in senders]
    assert results[0] == results[2] == RecordOutcome.NEW
    assert isinstance(results[1], SpoolIOError)
    assert _rows(engine, Instance) == 2 and not _sop_committed(engine, "3.1.1.1")


def test_a_failed_commit_answers_every_waiter_with_an_error_and_records_nothing(
    setup: tuple[IngestRecorder, GroupCommitter, Engine, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's commit fails (the database went away at that moment): every instance of
    the batch gets DatabaseUnavailable (0xA7xx on the wire), none has a row, and the same
    instances sent again are recorded."""
    rec, committer, engine, assocs = setup
    real = rec.transaction
    calls = {"n": 0}

    @contextmanager
    def commit_fails_once_for_the_batch() -> Iterator[Connection]:
        calls["n"] += 1
        with real() as conn:
            yield conn
            if calls["n"] == 2:  # the second transaction is the batch of three
                conn.exec_driver_sql("SELECT * FROM no_such_table")  # raises: rolled back

    monkeypatch.setattr(rec, "transaction", commit_fails_once_for_the_batch)
    headers = [_header("4.1", f"4.1.{i}", f"4.1.{i}.1") for i in range(4)]
    senders = _batch_behind_a_blocked_leader(committer, engine, assocs, headers)
    results = [s.join() for s in senders]
    assert results[0] == RecordOutcome.NEW
    assert all(isinstance(r, DatabaseUnavailable) for r in results[1:])
    assert [_sop_committed(engine, h.sop_instance_uid) for h in headers] == [
        True, False, False, False,
    ]  # fmt: skip
    # The same instances sent again are recorded (the sender retries after 0xA7xx).
    again = [_Sender(committer, engine, assocs[1], h, i + 10) for i, h in enumerate(headers[1:])]
    assert [s.join() for s in again] == [RecordOutcome.NEW] * 3
    assert _rows(engine, Instance) == 4 and _rows(engine, Series) == 4


def test_a_lone_instance_commits_at_once(
    setup: tuple[IngestRecorder, GroupCommitter, Engine, list[int]],
) -> None:
    _rec, committer, engine, assocs = setup
    waited: list[Any] = []
    outcome = committer.record(
        assocs[0], "MOD", _header("5.1", "5.1.1", "5.1.1.1"), _stored(1),
        "1.2.840.10008.1.2.1", AssociationCache(), lambda: waited.append(True),
    )  # fmt: skip
    assert outcome is RecordOutcome.NEW and waited == [True]
    assert (committer.commits, committer.largest_batch) == (1, 1)
    assert _sop_committed(engine, "5.1.1.1")
