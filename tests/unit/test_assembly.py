"""Completion rules with a controlled clock (no sleeping)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from pacs_ai.assembly import Assembler
from pacs_ai.config import AssemblySettings, DatabaseSettings
from pacs_ai.db.models import Series, SeriesState, Study, StudyState
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.ingest.recorder import AssociationCache, IngestRecorder, RecordOutcome
from pacs_ai.ingest.spool import StoredFile
from pacs_ai.ingest.validation import InstanceHeader


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def _header(study: str, series: str, sop: str, modality: str) -> InstanceHeader:
    return InstanceHeader(
        study,
        series,
        sop,
        "1.2.840.10008.5.1.4.1.1.2",
        modality,
        "CHEST",
        1,
        None,
        1,
        "P1",
        "Doe^J",
        "A1",
        "20260101",
        None,
    )


def _setup(db_url: str) -> tuple[IngestRecorder, Assembler, Clock, list[list[int]]]:
    engine = make_engine(DatabaseSettings(url=db_url))
    upgrade(engine)
    clock = Clock()
    ready: list[list[int]] = []
    settings = AssemblySettings(xray_grace_seconds=0.5, ct_quiet_seconds=10)
    return (
        IngestRecorder(engine, clock),
        Assembler(engine, settings, ready.append, clock),
        clock,
        ready,
    )


def _store(
    rec: IngestRecorder, assoc: int, h: InstanceHeader, cache: AssociationCache
) -> RecordOutcome:
    sha = (h.sop_instance_uid.replace(".", "") * 8)[:64].ljust(64, "0")
    return rec.record_instance(
        assoc, "MOD", h, StoredFile(sha, 10, f"objects/{sha}", True), "1.2.840.10008.1.2.1", cache
    )


def test_xray_ready_after_release_plus_grace(db_url: str) -> None:
    rec, asm, clock, ready = _setup(db_url)
    assoc = rec.open_association("127.0.0.1", 1, False)
    _store(rec, assoc, _header("1.1", "1.1.1", "1.1.1.1", "DX"), AssociationCache())
    assert asm.sweep() == []  # association still open
    rec.close_association(assoc, "released", 1, 0, 10)
    clock.advance(0.4)
    assert asm.sweep() == []  # within grace
    clock.advance(0.2)
    assert len(asm.sweep()) == 1 and len(ready) == 1
    assert asm.sweep() == []  # idempotent: never ready twice


def test_xray_on_open_association_completes_after_quiet(db_url: str) -> None:
    rec, asm, clock, _ = _setup(db_url)
    assoc = rec.open_association("127.0.0.1", 1, False)
    _store(rec, assoc, _header("1.2", "1.2.1", "1.2.1.1", "CR"), AssociationCache())
    clock.advance(9.9)
    assert asm.sweep() == []
    clock.advance(0.2)
    assert len(asm.sweep()) == 1


def test_ct_quiet_timer_multi_series_and_late_instance(db_url: str) -> None:
    rec, asm, clock, _ = _setup(db_url)
    assoc = rec.open_association("127.0.0.1", 1, False)
    cache = AssociationCache()
    for i in range(3):
        _store(rec, assoc, _header("1.3", "1.3.1", f"1.3.1.{i}", "CT"), cache)
    rec.close_association(assoc, "released", 3, 0, 30)
    clock.advance(5)
    assert asm.sweep() == []  # CT ignores release: quiet timer only
    _store(rec, assoc, _header("1.3", "1.3.2", "1.3.2.1", "CT"), cache)  # a second series
    clock.advance(6)
    assert asm.sweep() == []  # first series complete, second still quiet-waiting
    with rec._engine.connect() as c:
        states = dict(c.execute(select(Series.series_uid, Series.state)).all())
    assert states == {"1.3.1": SeriesState.COMPLETE, "1.3.2": SeriesState.RECEIVING}
    clock.advance(5)
    (study_id,) = asm.sweep()

    # Late instance: back to receiving with revision 1, then ready again after quiet.
    assert _store(rec, assoc, _header("1.3", "1.3.2", "1.3.2.2", "CT"), cache) is RecordOutcome.LATE
    with rec._engine.connect() as c:
        study = c.execute(select(Study.state, Study.revision).where(Study.id == study_id)).one()
    assert study == (StudyState.RECEIVING, 1)
    clock.advance(10.1)
    assert asm.sweep() == [study_id]
