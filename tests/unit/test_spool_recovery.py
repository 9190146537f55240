from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert, select

from pacs_ai.config import DatabaseSettings
from pacs_ai.db.models import Association, AuditEvent, Instance, Series, Study
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.errors import OutOfResources
from pacs_ai.ingest.recovery import recover
from pacs_ai.ingest.spool import Spool, dataset_sha256, part10_header


def test_commit_names_by_hash_and_discard(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    spool.prepare()
    pending = spool.begin(b"HEADER")
    pending.write(b"dataset-bytes")
    stored = pending.place()
    pending.make_durable()
    path = spool.resolve(stored.relpath)
    assert path.read_bytes() == b"HEADERdataset-bytes"
    assert path.name == f"{stored.sha256}.dcm" and stored.size == len(b"dataset-bytes")
    assert stored.created
    again = spool.begin(b"OTHER-HEADER")
    again.write(b"dataset-bytes")
    assert not again.place().created  # same dataset bytes, same object
    again.discard()  # discarding a duplicate never removes the object it duplicates
    assert path.exists()
    placed = spool.begin(b"H")
    placed.write(b"refused after placing")
    placed_path = spool.resolve(placed.place().relpath)
    placed.discard()
    assert not placed_path.exists()
    gone = spool.begin(b"H")
    gone.write(b"x")
    gone.discard()
    assert list(spool.tmp_dir.iterdir()) == []
    with pytest.raises(ValueError):
        spool.resolve("../outside")
    with pytest.raises(ValueError):
        spool.object_path("../../etc/passwd")


def test_place_recreates_a_cached_directory_removed_behind_its_back(tmp_path: Path) -> None:
    """Object directories are cached per process; retention may remove an emptied one."""
    spool = Spool(tmp_path, 0)
    spool.prepare()
    first = spool.begin(b"H")
    first.write(b"same bytes")
    stored = first.place()
    first.make_durable()
    path = spool.resolve(stored.relpath)
    assert first.final_path == path
    path.unlink()
    path.parent.rmdir()  # as retention does with an emptied folder
    path.parent.parent.rmdir()
    again = spool.begin(b"H")
    again.write(b"same bytes")
    assert again.place() == stored  # created again, at the same place
    again.make_durable()
    assert path.read_bytes() == b"Hsame bytes"


def test_watermark(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 0)
    spool.prepare()
    spool.check_free_space()
    spool.min_free_bytes = spool.free_bytes() * 10
    with pytest.raises(OutOfResources):
        spool.check_free_space()


def test_recovery_quarantines_orphans_and_closes_associations(tmp_path: Path) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    upgrade(engine)
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    header = part10_header("1.2", "1.2.3", "1.2.840.10008.1.2.1", "X")
    kept = spool.begin(header)
    kept.write(b"recorded")
    kept_file = kept.place()
    orphan = spool.begin(header)
    orphan.write(b"placed but never recorded")
    orphan_file = orphan.place()
    torn = spool.begin(header)
    torn.write(b"complete content")
    torn_path = spool.resolve(torn.place().relpath)
    torn_path.write_bytes(header + b"compl")  # a crash before its fsync: torn
    (spool.tmp_dir / "half.part").write_bytes(b"partial")
    with engine.begin() as c:
        assoc = c.execute(
            insert(Association).values(peer_host="127.0.0.1", peer_port=1).returning(Association.id)
        ).scalar_one()
        study = c.execute(insert(Study).values(study_uid="1.2").returning(Study.id)).scalar_one()
        series = c.execute(
            insert(Series).values(study_id=study, series_uid="1.2.3").returning(Series.id)
        ).scalar_one()
        for rel, uid in ((kept_file.relpath, "1.2.3.4"), ("objects/aa/bb/missing.dcm", "1.2.3.5")):
            c.execute(
                insert(Instance).values(
                    study_id=study,
                    series_id=series,
                    association_id=assoc,
                    sop_instance_uid=uid,
                    sop_class_uid="1.2",
                    transfer_syntax_uid="1.2",
                    size_bytes=1,
                    sha256=uid,
                    path=rel,
                )
            )
    report = recover(spool, engine)
    assert (report.partial_removed, report.orphans_quarantined) == (2, 1)
    assert not torn_path.exists()
    assert (report.missing_files, report.associations_closed) == (1, 1)
    assert spool.resolve(kept_file.relpath).exists()
    assert not spool.resolve(orphan_file.relpath).exists()
    assert [p.name for p in spool.quarantine_dir.iterdir()] == [f"{orphan_file.sha256}.dcm"]
    assert list(spool.tmp_dir.iterdir()) == []
    with engine.connect() as c:
        assert c.scalar(select(Association.end_reason)) == "interrupted"
        actions = set(c.scalars(select(AuditEvent.action)))
    assert {"orphan_quarantined", "instance_file_missing", "recovery"} <= actions
    assert recover(spool, engine) == type(report)(0, 0, 1, 0)  # idempotent
    engine.dispose()
    quarantined = spool.quarantine_dir / f"{orphan_file.sha256}.dcm"
    assert dataset_sha256(quarantined) == orphan_file.sha256  # moved intact, never rewritten
