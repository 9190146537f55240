"""C-STORE/C-ECHO over real associations on loopback: pynetdicom as the peer, plus a raw
peer for what pynetdicom will not send. Covers the bad-input table of DESIGN.md §4."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless, generate_uid
from sqlalchemy import Connection, func, select

from pacs_ai.db.models import (
    Association,
    AuditEvent,
    Instance,
    Series,
    SeriesState,
    Study,
    StudyState,
)
from pacs_ai.delivery.scu import Outgoing, Peer, send
from pacs_ai.ingest import store as store_module
from pacs_ai.service import Service
from tests.conftest import SCU_AE, ct_datasets, dx_dataset, wait_for
from tests.integration.conftest import ServiceFactory
from tests.integration.rawpeer import EXPLICIT_LE, Accepted, RawPeer, Rejected, encode_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"


def peer(svc: Service, calling: str = SCU_AE, called: str = "PACS_AI") -> Peer:
    return Peer("127.0.0.1", svc.server.port, called_ae=called, calling_ae=calling)


def store(svc: Service, datasets: list[pydicom.Dataset], calling: str = SCU_AE) -> list[int | None]:
    items = [Outgoing(label=str(i), dataset=ds) for i, ds in enumerate(datasets)]
    return [r.status for r in send(peer(svc, calling), items)]


def count(svc: Service, model: type) -> int:
    with svc.engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(model)) or 0)


def test_ct_series_stored_durably_and_recorded(start_service: ServiceFactory, db_url: str) -> None:
    svc = start_service(db_url)
    series = ct_datasets(12)
    assert store(svc, series) == [0] * 12
    with svc.engine.connect() as c:
        rows = c.execute(select(Instance.sop_instance_uid, Instance.sha256, Instance.path)).all()
        assoc = c.execute(select(Association)).one()
    assert {r.sop_instance_uid for r in rows} == {ds.SOPInstanceUID for ds in series}
    for r in rows:
        path = svc.spool.root / r.path
        stored = pydicom.dcmread(path)
        # The dataset is stored as received; the name is its hash, never a UID.
        assert r.sha256 in path.name and stored.SOPInstanceUID not in str(path)
        assert stored.file_meta.SourceApplicationEntityTitle == SCU_AE
        header_len = len(path.read_bytes()) - stored_dataset_len(path)
        assert hashlib.sha256(path.read_bytes()[header_len:]).hexdigest() == r.sha256
    assert assoc.accepted and assoc.calling_ae == SCU_AE
    wait_for(lambda: _ended(svc))
    assert list((svc.spool.root / "tmp").iterdir()) == []


def stored_dataset_len(path: Path) -> int:
    data = path.read_bytes()
    group_len = int.from_bytes(data[140:144], "little")
    return len(data) - (144 + group_len)


def _ended(svc: Service) -> bool:
    with svc.engine.connect() as c:
        return c.scalar(select(Association.ended_at)) is not None


def test_echo_and_assembly_states(start_service: ServiceFactory, db_url: str) -> None:
    svc = start_service(db_url)
    dx = dx_dataset()
    ct = ct_datasets(4)
    assert store(svc, [dx, *ct]) == [0] * 5

    def state(uid: str) -> str:
        with svc.engine.connect() as c:
            return str(c.scalar(select(Study.state).where(Study.study_uid == uid)))

    # X-ray: ready shortly after release (grace 0.2 s); CT: after its quiet timer (1 s).
    wait_for(lambda: state(dx.StudyInstanceUID) == StudyState.READY, timeout=3)
    wait_for(lambda: state(ct[0].StudyInstanceUID) == StudyState.READY, timeout=5)
    with svc.engine.connect() as c:
        assert c.scalar(select(func.count()).where(Series.state == SeriesState.COMPLETE)) == 2

    # A late instance returns the study to receiving with a new revision, then ready again.
    late = ct_datasets(1, seed=9, study=_study_of(ct[0]), series_uid=ct[0].SeriesInstanceUID)
    assert store(svc, late) == [0]
    with svc.engine.connect() as c:
        study = c.execute(select(Study).where(Study.study_uid == ct[0].StudyInstanceUID)).one()
    assert study.revision == 1
    wait_for(lambda: state(ct[0].StudyInstanceUID) == StudyState.READY, timeout=5)


def _study_of(ds: pydicom.Dataset):  # type: ignore[no-untyped-def]
    from pacs_ai.training.dicomwriter import StudyInfo

    return StudyInfo(study_uid=ds.StudyInstanceUID)


def test_duplicates_same_bytes_and_conflicts(start_service: ServiceFactory, db_url: str) -> None:
    svc = start_service(db_url)
    ds = dx_dataset()
    assert store(svc, [ds]) == [0]
    assert store(svc, [ds]) == [0]  # same instance, same bytes: Success, nothing new
    assert count(svc, Instance) == 1
    with svc.engine.connect() as c:
        assert c.scalar(select(Instance.times_received)) == 2

    changed = dx_dataset(seed=5)
    changed.SOPInstanceUID = ds.SOPInstanceUID
    changed.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    # The same instance under another study is an identity collision: refused.
    assert store(svc, [changed]) == [0xC006]
    changed.StudyInstanceUID = ds.StudyInstanceUID
    changed.SeriesInstanceUID = ds.SeriesInstanceUID
    assert store(svc, [changed]) == [0]  # different bytes: kept both, flagged
    with svc.engine.connect() as c:
        rows = c.execute(select(Instance.id, Instance.conflicts_with_id, Instance.path)).all()
        events = c.scalars(select(AuditEvent.action)).all()
    assert len(rows) == 2 and rows[1].conflicts_with_id == rows[0].id
    assert rows[0].path != rows[1].path
    assert "instance_conflict" in events


def test_compressed_transfer_syntax_stored_unchanged(start_service: ServiceFactory) -> None:
    svc = start_service()
    ds = dx_dataset(size=128)
    ds.compress(RLELossless)
    assert store(svc, [ds]) == [0]
    with svc.engine.connect() as c:
        row = c.execute(select(Instance.transfer_syntax_uid, Instance.path)).one()
    assert row.transfer_syntax_uid == RLELossless
    stored = pydicom.dcmread(svc.spool.root / row.path)
    assert stored.PixelData == ds.PixelData


def _raw(svc: Service, calling: str = SCU_AE) -> tuple[RawPeer, int]:
    raw = RawPeer("127.0.0.1", svc.server.port)
    result = raw.associate(calling, contexts=[(CT, [EXPLICIT_LE])])
    assert isinstance(result, Accepted)
    return raw, next(iter(result.contexts))


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        ("uid_mismatch", 0xA900),
        ("hostile_uid", 0xC001),
        ("missing_study_uid", 0xC002),
        ("missing_modality", 0xC002),
        ("short_pixels", 0xC003),
        ("absurd_dimensions", 0xC004),
        ("truncated", 0xC003),
        ("garbage", 0xC000),
        ("cut_before_image_pixel_module", 0xC002),
        ("cut_inside_element_header", 0xC000),
        ("cut_inside_value", 0xC000),
        ("cut_before_pixel_data", 0xC002),
        ("image_without_pixel_data", 0xC002),
        ("missing_bits_stored", 0xC002),
        ("impossible_value_length", 0xC000),
        ("unknown_vr", 0xC000),
        ("undelimited_sequence", 0xC000),
    ],
)
def test_bad_datasets_refused_nothing_kept(
    start_service: ServiceFactory, mutate: str, status: int
) -> None:
    svc = start_service()
    ds = ct_datasets(1)[0]
    sop_class, sop_uid = CT, ds.SOPInstanceUID
    if mutate == "uid_mismatch":
        sop_uid = generate_uid()
    elif mutate == "hostile_uid":
        ds.SOPInstanceUID = sop_uid = "../../etc/passwd"
    elif mutate == "missing_study_uid":
        del ds.StudyInstanceUID
    elif mutate == "missing_modality":
        ds.Modality = ""
    elif mutate == "short_pixels":
        ds.PixelData = ds.PixelData[:1000]
    elif mutate == "absurd_dimensions":
        ds.Rows = ds.Columns = 65535
        ds.NumberOfFrames = 1000
    elif mutate == "image_without_pixel_data":
        del ds.PixelData
    elif mutate == "missing_bits_stored":
        del ds.BitsStored
    data = encode_dataset(ds)
    name_at = data.index(b"\x10\x00\x10\x00PN")  # PatientName, explicit VR LE
    rows_at = data.index(b"\x28\x00\x10\x00US")
    if mutate == "truncated":
        data = data[: len(data) - 2000]  # inside Pixel Data
    elif mutate == "garbage":
        data = b"\x08\x00\x05\x00CS\xff\xff" + bytes(range(256)) * 4
    elif mutate == "cut_before_image_pixel_module":
        data = encode_dataset(ds[:0x00280000])
    elif mutate == "cut_inside_element_header":
        data = data[: name_at + 3]
    elif mutate == "cut_inside_value":
        data = data[: name_at + 10]
    elif mutate == "cut_before_pixel_data":
        data = encode_dataset(ds[:0x7FE00010])
    elif mutate == "impossible_value_length":  # Rows (US) with 3 bytes
        data = data[:rows_at] + b"\x28\x00\x10\x00US\x03\x00abc" + data[rows_at + 10 :]
    elif mutate == "unknown_vr":
        data = data[:name_at] + b"\x10\x00\x10\x00QQ" + data[name_at + 6 :]
    elif mutate == "undelimited_sequence":
        sq = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
        data = data[:name_at] + sq + data[name_at:]
    raw, cx = _raw(svc)
    assert raw.c_store(cx, sop_class, sop_uid, data) == status
    # The association survives a refused instance: a good one follows.
    good = ct_datasets(1, seed=3)[0]
    assert raw.c_store(cx, CT, good.SOPInstanceUID, encode_dataset(good)) == 0
    assert raw.release()
    raw.close()
    assert count(svc, Instance) == 1
    assert list((svc.spool.root / "tmp").iterdir()) == []
    objects = list((svc.spool.root / "objects").rglob("*.dcm"))
    assert len(objects) == 1 and ".." not in str(objects[0])
    with svc.engine.connect() as c:
        refused = c.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "instance_refused")
        ).all()
    assert len(refused) == 1 and f"0x{status:04X}" in refused[0]


def test_association_policy(start_service: ServiceFactory) -> None:
    svc = start_service(dicom={"max_associations": 1})
    port = svc.server.port

    unknown = RawPeer("127.0.0.1", port).associate("INTRUDER", contexts=[(CT, [EXPLICIT_LE])])
    assert unknown == Rejected(1, 1, 3)
    wrong_called = RawPeer("127.0.0.1", port).associate(
        SCU_AE, called="NOT_US", contexts=[(CT, [EXPLICIT_LE])]
    )
    assert wrong_called == Rejected(1, 1, 7)
    # Allowed AE title, but from another address than the allowlist binds it to.
    other_host = RawPeer("127.0.0.1", port, bind="127.0.0.2").associate(
        SCU_AE, contexts=[(CT, [EXPLICIT_LE])]
    )
    assert other_host == Rejected(1, 1, 3)

    # Unsupported abstract syntax (worklist FIND): that context is rejected, CT accepted.
    mixed = RawPeer("127.0.0.1", port)
    result = mixed.associate(
        SCU_AE, contexts=[("1.2.840.10008.5.1.4.31", [EXPLICIT_LE]), (CT, [EXPLICIT_LE])]
    )
    assert isinstance(result, Accepted)
    assert list(result.contexts) == [3]  # context ids 1 (FIND) and 3 (CT) were proposed

    # The cap is 1 and `mixed` holds it: the next association is refused (2,3,2).
    assert RawPeer("127.0.0.1", port).associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])]) == (
        Rejected(2, 3, 2)
    )
    assert mixed.release()
    mixed.close()
    wait_for(lambda: svc.server.active_associations() == 0)

    def reasons() -> list[str | None]:
        with svc.engine.connect() as c:
            return list(c.scalars(select(Association.reject_reason).where(~Association.accepted)))

    wait_for(lambda: len(reasons()) == 4 and all(reasons()), what="4 recorded rejections")


def test_disk_watermark(start_service: ServiceFactory) -> None:
    svc = start_service()
    raw, cx = _raw(svc)
    svc.spool.min_free_bytes = svc.spool.free_bytes() * 2  # disk "fills up" mid-association
    ds = ct_datasets(1)[0]
    assert raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds)) == 0xA700
    raw.release()
    assert RawPeer("127.0.0.1", svc.server.port).associate(
        SCU_AE, contexts=[(CT, [EXPLICIT_LE])]
    ) == Rejected(2, 3, 2)
    assert count(svc, Instance) == 0


def test_database_down_is_out_of_resources(start_service: ServiceFactory, tmp_path: Path) -> None:
    svc = start_service()
    raw, cx = _raw(svc)
    # Break the instances table from under the running service.
    with svc.engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE instances RENAME TO instances_gone")
    ds = ct_datasets(1)[0]
    assert raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds)) == 0xA702
    raw.release()
    with svc.engine.begin() as c:
        c.exec_driver_sql("ALTER TABLE instances_gone RENAME TO instances")
    # The file written before the failed commit was removed again: nothing half-recorded.
    assert list((svc.spool.root / "objects").rglob("*.dcm")) == []


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("Doe^Jane 1.2.826.0.1.3680043.8.498.999"),
        struct.error("Doe^Jane"),
        OverflowError("Doe^Jane"),
        MemoryError("Doe^Jane"),
        RecursionError("Doe^Jane"),
        KeyError("Doe^Jane"),
    ],
    ids=lambda e: e.__class__.__name__,
)
@pytest.mark.parametrize("where", ["validate", "record"])
def test_unexpected_errors_answer_0110_and_the_association_goes_on(
    start_service: ServiceFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    exc: BaseException,
    where: str,
) -> None:
    """The C-STORE boundary is total: whatever a parser, the file system or the database
    driver raises, the peer gets 0x0110, the placed file is gone, the next C-STORE on the same
    association is stored, and the log names the exception class, never its text."""
    svc = start_service()
    calls = {"n": 0}
    target = (
        (store_module, "read_and_validate")
        if where == "validate"
        else (svc.server._ctx.recorder, "record_in")  # type: ignore[union-attr]
    )
    real = getattr(*target)

    def fail_once(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(*target, fail_once)
    raw, cx = _raw(svc)
    bad, good = ct_datasets(2, seed=11)
    assert raw.c_store(cx, CT, bad.SOPInstanceUID, encode_dataset(bad)) == 0x0110
    assert raw.c_store(cx, CT, good.SOPInstanceUID, encode_dataset(good)) == 0x0000
    assert raw.release()
    raw.close()
    with svc.engine.connect() as c:
        assert c.scalars(select(Instance.sop_instance_uid)).all() == [good.SOPInstanceUID]
        detail = c.scalar(select(AuditEvent.detail).where(AuditEvent.action == "instance_refused"))
    assert detail is not None and '"status": "0x0110"' in detail
    assert exc.__class__.__name__ in detail and "Doe" not in detail
    assert len(list((svc.spool.root / "objects").rglob("*.dcm"))) == 1
    assert list((svc.spool.root / "tmp").iterdir()) == []
    assert f"unexpected {exc.__class__.__name__}" in caplog.text
    assert "Doe^Jane" not in caplog.text and "3680043.8.498.999" not in caplog.text


def test_series_uid_under_two_studies_strands_nothing(
    start_service: ServiceFactory, db_url: str
) -> None:
    """The same SeriesInstanceUID arriving under a second study (a separate association) is
    refused with an identity audit event; the first study completes with its one series and
    the second study never exists (no `receiving` study with 0 series)."""
    svc = start_service(db_url)
    first = dx_dataset(seed=1)
    second = dx_dataset(seed=2)  # another study...
    second.SeriesInstanceUID = first.SeriesInstanceUID  # ...claiming the first one's series
    assert store(svc, [first]) == [0]
    assert store(svc, [second]) == [0xC006]
    # A SOP Instance UID known under another study is refused the same way.
    third = dx_dataset(seed=3)
    third.SOPInstanceUID = first.SOPInstanceUID
    third.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert store(svc, [third]) == [0xC006]
    # A known Study UID sent for another patient too.
    fourth = dx_dataset(seed=4)
    fourth.StudyInstanceUID = first.StudyInstanceUID
    fourth.PatientID = "OTHER-PATIENT"
    assert store(svc, [fourth]) == [0xC006]

    def settled() -> bool:
        with svc.engine.connect() as c:
            return c.scalar(select(Study.state)) == StudyState.READY

    wait_for(settled, timeout=5, what="first study ready")
    with svc.engine.connect() as c:
        studies = c.execute(select(Study.study_uid, Study.state, Study.instance_count)).all()
        series = c.execute(select(Series.series_uid, Series.study_id, Series.state)).all()
        instances = c.scalars(select(Instance.sop_instance_uid)).all()
        refused = c.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "instance_refused")
        ).all()
    assert [tuple(r) for r in studies] == [(first.StudyInstanceUID, StudyState.READY, 1)]
    assert [(r.series_uid, r.state) for r in series] == [
        (first.SeriesInstanceUID, SeriesState.COMPLETE)
    ]
    assert instances == [first.SOPInstanceUID]
    assert len(refused) == 3 and all("IdentityConflict" in d for d in refused)
    assert len(list((svc.spool.root / "objects").rglob("*.dcm"))) == 1


def test_locked_database_answers_a702_within_the_busy_bound(
    start_service: ServiceFactory, sqlite_url: str
) -> None:
    """Another connection holds SQLite's write lock: the C-STORE is answered 0xA702 within
    `database.busy_timeout_seconds` (plus margin), far inside the DIMSE timeout, and the file
    is not kept."""
    svc = start_service(database={"busy_timeout_seconds": 1.5})
    raw, cx = _raw(svc)
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        ds = ct_datasets(1)[0]
        started = time.monotonic()
        status = raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds))
        elapsed = time.monotonic() - started
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert status == 0xA702
    assert 1.5 <= elapsed < 3.0, elapsed
    print(f"0xA702 with the database locked: {elapsed:.3f} s (busy bound 1.5 s)")
    assert raw.release()
    raw.close()
    assert list((svc.spool.root / "objects").rglob("*.dcm")) == []
    assert list((svc.spool.root / "tmp").iterdir()) == []
    assert count(svc, Instance) == 0


def test_deflated_dataset_stored_as_received(start_service: ServiceFactory) -> None:
    """Deflated Explicit VR Little Endian is walked through the capped streaming inflater and
    stored exactly as received (still deflated); a corrupt deflate stream is 0xC000."""
    deflated_ts = "1.2.840.10008.1.2.1.99"
    svc = start_service()
    raw = RawPeer("127.0.0.1", svc.server.port)  # type: ignore[union-attr]
    result = raw.associate(SCU_AE, contexts=[(CT, [deflated_ts])])
    assert isinstance(result, Accepted)
    assert [ts for _, ts in result.contexts.values()] == [deflated_ts]
    cx = next(iter(result.contexts))
    ds, broken = ct_datasets(2, seed=5)
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = packer.compress(encode_dataset(ds)) + packer.flush()
    assert raw.c_store(cx, CT, ds.SOPInstanceUID, payload) == 0
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    corrupt = bytearray(packer.compress(encode_dataset(broken)) + packer.flush())
    corrupt[len(corrupt) // 2 :] = bytes(len(corrupt) - len(corrupt) // 2)
    assert raw.c_store(cx, CT, broken.SOPInstanceUID, bytes(corrupt)) == 0xC000
    assert raw.release()
    raw.close()
    with svc.engine.connect() as c:
        row = c.execute(select(Instance.sop_instance_uid, Instance.path)).one()
    assert row.sop_instance_uid == ds.SOPInstanceUID
    path = svc.spool.root / row.path
    assert path.read_bytes()[-len(payload) :] == payload
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def _concurrent_stores(
    svc: Service, series: list[pydicom.Dataset], senders: int
) -> list[tuple[int | None, bool]]:
    """``senders`` associations at once, each storing its share of ``series``; per C-STORE:
    (status, whether its row was committed when the status arrived)."""
    results: list[tuple[int | None, bool]] = []
    lock = threading.Lock()

    def send_share(share: list[pydicom.Dataset]) -> None:
        raw, cx = _raw(svc)
        try:
            for ds in share:
                status = raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds))
                with svc.engine.connect() as c:
                    row = c.scalar(
                        select(Instance.id).where(Instance.sop_instance_uid == ds.SOPInstanceUID)
                    )
                with lock:
                    results.append((status, row is not None))
            assert raw.release()
        finally:
            raw.close()

    threads = [
        threading.Thread(target=send_share, args=(series[i::senders],), daemon=True)
        for i in range(senders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    return results


def test_concurrent_associations_each_answered_after_their_rows_commit(
    start_service: ServiceFactory, db_url: str
) -> None:
    """Four associations at once (their instances may share group commits): every C-STORE
    is Success only once its row is committed, and every file is in place."""
    svc = start_service(db_url)
    series = ct_datasets(16, seed=21)
    results = _concurrent_stores(svc, series, 4)
    assert results == [(0x0000, True)] * 16
    committer = svc.server._ctx.committer  # type: ignore[union-attr]
    assert committer.instances == 16 and 1 <= committer.commits <= 16
    with svc.engine.connect() as c:
        rows = c.execute(select(Instance.sop_instance_uid, Instance.path)).all()
    assert {r.sop_instance_uid for r in rows} == {ds.SOPInstanceUID for ds in series}
    assert all((svc.spool.root / r.path).is_file() for r in rows)
    assert list((svc.spool.root / "tmp").iterdir()) == []


def test_failed_group_commit_answers_every_association_a702_and_keeps_nothing(
    start_service: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every commit fails (the database breaks under four concurrent associations): each
    C-STORE is answered 0xA702, no instance row exists and no file stays in the spool."""
    svc = start_service()
    recorder = svc.server._ctx.recorder  # type: ignore[union-attr]
    real = recorder.transaction

    @contextlib.contextmanager
    def failing() -> Iterator[Connection]:
        with real() as conn:
            yield conn
            conn.exec_driver_sql("SELECT * FROM no_such_table")  # fails: rolled back

    monkeypatch.setattr(recorder, "transaction", failing)
    results = _concurrent_stores(svc, ct_datasets(8, seed=23), 4)
    assert results == [(0xA702, False)] * 8
    assert count(svc, Instance) == 0
    assert list((svc.spool.root / "objects").rglob("*.dcm")) == []
    assert list((svc.spool.root / "tmp").iterdir()) == []
