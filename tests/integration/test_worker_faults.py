"""Hostile or broken studies in the pipeline: the scoring worker child fails or dies, the job
fails with a reason, is retried, then dead; the listener keeps answering; a crash loop across
`kill -9` restarts of the whole service ends `failed`.

Studies are placed straight into the spool and the database (as if an older ingest had let
them through), so these tests do not depend on the ingest checks.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from sqlalchemy import Engine, create_engine, insert, select

from pacs_ai.db.models import (
    Instance,
    Job,
    JobState,
    Report,
    Series,
    SeriesState,
    Study,
    StudyState,
    utcnow,
)
from pacs_ai.scoring_worker import FAULT_ENV
from tests.conftest import make_settings, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.process import ServerProcess, write_config
from tests.integration.test_e2e import chest_dx, storescu
from tests.tools import require_tool

GB = 1024**3


def place_ready_study(engine: Engine, spool_root: Path, files: list[tuple[Dataset, bytes]]) -> str:
    """Put files (dataset header, file bytes) of one series into the spool and the database
    as a ready study; returns its Study Instance UID."""
    first = files[0][0]
    now = utcnow()
    with engine.begin() as c:
        study_id = c.execute(
            insert(Study)
            .values(
                study_uid=first.StudyInstanceUID,
                state=StudyState.READY,
                ready_at=now,
                instance_count=len(files),
            )
            .returning(Study.id)
        ).scalar_one()
        series_id = c.execute(
            insert(Series)
            .values(
                study_id=study_id,
                series_uid=first.SeriesInstanceUID,
                modality=str(first.Modality),
                state=SeriesState.COMPLETE,
                instance_count=len(files),
                completed_at=now,
            )
            .returning(Series.id)
        ).scalar_one()
        for ds, data in files:
            sha = hashlib.sha256(data).hexdigest()
            rel = f"objects/{sha[:2]}/{sha[2:4]}/{sha}.dcm"
            (spool_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (spool_root / rel).write_bytes(data)
            c.execute(
                insert(Instance).values(
                    study_id=study_id,
                    series_id=series_id,
                    sop_instance_uid=ds.SOPInstanceUID,
                    sop_class_uid=ds.SOPClassUID,
                    transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                    size_bytes=len(data),
                    sha256=sha,
                    path=rel,
                )
            )
    return str(first.StudyInstanceUID)


def _file_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def undecodable_rle_dx() -> tuple[Dataset, bytes]:
    """A frontal chest DX whose RLE header declares 5 segments where 16-bit grey needs 2."""
    ds = chest_dx("normal", seed=21)
    ds.file_meta.TransferSyntaxUID = RLELossless
    header = (5).to_bytes(4, "little") + b"".join(
        (64 + 8 * i).to_bytes(4, "little") for i in range(5)
    )
    ds.PixelData = encapsulate([header.ljust(64, b"\0") + bytes(40)])
    ds["PixelData"].VR = "OB"
    return ds, _file_bytes(ds)


def j2k_frame_header_bypass_dx() -> tuple[Dataset, bytes]:
    """A 512x512 chest DX whose JPEG 2000 codestream (SIZ) declares 40000 x 40000."""
    ds = chest_dx("normal", seed=22)
    ref = pydicom.dcmread(get_testdata_file("RG1_J2KR.dcm"))  # type: ignore[arg-type]
    frame = bytearray(get_frame(ref.PixelData, 0, number_of_frames=1))
    at = frame.index(b"\xff\x51")
    frame[at + 6 : at + 14] = (40000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return ds, _file_bytes(ds)


def deflate_bomb_dx(side: int = 16384) -> tuple[Dataset, bytes]:
    """A chest DX in Deflated Explicit VR whose Pixel Data (side x side, 16 bit: 512 MiB)
    inflates from well under 1 MB. Built as a stream: the zeros never exist in memory."""
    ds = chest_dx("normal", seed=23, size=8)
    ds.Rows = ds.Columns = side
    del ds.PixelData
    body = io.BytesIO()
    ds.save_as(body, implicit_vr=False, little_endian=True)  # dataset only, no meta
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    pixels = side * side * 2
    out = [deflater.compress(body.getvalue())]
    out.append(deflater.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + pixels.to_bytes(4, "little")))
    chunk = bytes(1 << 24)
    for _ in range(pixels // len(chunk)):
        out.append(deflater.compress(chunk))
    out.append(deflater.flush())
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    head = pydicom.filebase.DicomBytesIO()
    head.write(bytes(128) + b"DICM")
    write_file_meta_info(head, meta)
    ds.file_meta = meta
    return ds, head.getvalue() + b"".join(out)


def _jobs(engine: Engine, uid: str) -> list[tuple[int, JobState, str]]:
    with engine.connect() as c:
        rows = c.execute(
            select(Job.attempt, Job.state, Job.error)
            .join(Study, Study.id == Job.study_id)
            .where(Study.study_uid == uid)
            .order_by(Job.attempt)
        ).all()
    return [(r.attempt, r.state, r.error or "") for r in rows]


def _study(engine: Engine, uid: str) -> tuple[StudyState, str | None] | None:
    with engine.connect() as c:
        row = c.execute(
            select(Study.state, Study.state_reason).where(Study.study_uid == uid)
        ).first()
    return None if row is None else (row.state, row.state_reason)


def _echo(port: int) -> int:
    return subprocess.run(
        [require_tool("echoscu"), "-aec", "PACS_AI", "127.0.0.1", str(port)],
        capture_output=True,
        timeout=30,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    ).returncode


def test_undecodable_and_j2k_bypass_fail_then_dead_never_not_applicable(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(pipeline={"enabled": True, "poll_seconds": 0.2, "retry_seconds": [0.2]})
    spool = svc.settings.storage.path
    corrupt = place_ready_study(svc.engine, spool, [undecodable_rle_dx()])
    bypass = place_ready_study(svc.engine, spool, [j2k_frame_header_bypass_dx()])
    assert svc.pipeline is not None
    svc.pipeline.wake()
    wait_for(
        lambda: all(_study(svc.engine, u)[0] == StudyState.FAILED for u in (corrupt, bypass)),  # type: ignore[index]
        timeout=180,
        what="both studies failed",
    )
    for uid, error in (
        (corrupt, "ImagingError: pixel data cannot be decoded"),
        (bypass, "DecodeLimitExceeded: codestream declares 40000x40000x1"),
    ):
        jobs = _jobs(svc.engine, uid)
        assert [(a, s) for a, s, _ in jobs] == [(1, JobState.FAILED), (2, JobState.DEAD)]
        assert all(e.startswith(error) for _, _, e in jobs), jobs
        assert _study(svc.engine, uid) == (StudyState.FAILED, jobs[-1][2])
    with svc.engine.connect() as c:
        assert c.scalars(select(Series.not_applicable_reason)).all() == [None, None]
        assert c.scalar(select(Report.id)) is None
    # The worker is healthy afterwards: a good study is reported.
    dx = chest_dx("covid", seed=24)
    storescu(svc, write_all([dx], tmp_path / "dx"))
    wait_for(
        lambda: _study(svc.engine, dx.StudyInstanceUID) == (StudyState.REPORTED, None),
        timeout=120,
        what="the good study reported",
    )


def test_worker_killed_during_each_job_fails_then_dead_listener_answers(
    start_service: ServiceFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "kill")  # the child SIGKILLs itself at each job
    svc = start_service(pipeline={"enabled": True, "poll_seconds": 0.2, "retry_seconds": [0.2]})
    assert svc.server is not None and svc.pipeline is not None
    dx = chest_dx("normal", seed=25)
    storescu(svc, write_all([dx], tmp_path / "dx"))
    uid = dx.StudyInstanceUID
    wait_for(lambda: _study(svc.engine, uid)[0] == StudyState.FAILED, timeout=240)  # type: ignore[index]
    died = "WorkerDied: the scoring worker died from SIGKILL (out of memory?)"
    assert _jobs(svc.engine, uid) == [(1, JobState.FAILED, died), (2, JobState.DEAD, died)]
    assert _echo(svc.server.port) == 0  # the listener never went away
    assert svc.pipeline.scorer.pid is not None  # and a fresh child was started


@pytest.fixture
def serve(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[ServerProcess, int, Engine]]:
    settings = make_settings(
        tmp_path,
        sqlite_url,
        pipeline={
            "enabled": True,
            "poll_seconds": 0.2,
            "retry_seconds": [0.2],
            "worker_memory_mb": 5120,
        },
        logging={"level": "INFO"},
    )
    cfg = write_config(settings, tmp_path / "config.toml")
    proc = ServerProcess(cfg, tmp_path / "server.log")
    assert proc.cli("db", "upgrade", "--config", str(cfg)).returncode == 0
    engine = create_engine(sqlite_url)
    yield proc, settings.dicom.port, engine
    proc.stop()
    engine.dispose()


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def test_deflate_bomb_fails_only_the_worker(
    serve: tuple[ServerProcess, int, Engine], tmp_path: Path
) -> None:
    proc, port, engine = serve
    proc.start(port)
    assert proc.proc is not None
    pid = proc.proc.pid
    rss_before = _status(pid, "VmRSS")
    bomb_ds, bomb = deflate_bomb_dx()
    assert len(bomb) < 1_000_000
    uid = place_ready_study(engine, tmp_path / "spool", [(bomb_ds, bomb)])
    wait_for(lambda: len(_jobs(engine, uid)) == 1, timeout=120, what="attempt 1 started")
    assert _echo(port) == 0  # answered while the worker chews on the bomb
    wait_for(lambda: _study(engine, uid)[0] == StudyState.FAILED, timeout=300)  # type: ignore[index]
    oom = "MemoryError: out of memory (limit 5120 MB)"
    assert _jobs(engine, uid) == [(1, JobState.FAILED, oom), (2, JobState.DEAD, oom)]
    assert _status(pid, "VmHWM") - rss_before < 1 * GB
    # The listener and the (restarted) worker still do their jobs.
    assert _echo(port) == 0
    dx = chest_dx("covid", seed=26)
    files = write_all([dx], tmp_path / "dx")
    done = subprocess.run(
        [require_tool("storescu"), "-aec", "PACS_AI", "127.0.0.1", str(port), str(files[0])],
        capture_output=True,
        timeout=60,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0
    wait_for(
        lambda: _study(engine, dx.StudyInstanceUID) == (StudyState.REPORTED, None),
        timeout=180,
        what="a good study reported after the bomb",
    )


def test_crash_loop_across_kill9_restarts_ends_failed(
    serve: tuple[ServerProcess, int, Engine], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each attempt hangs the worker and the whole service is killed (-9) mid-job: the
    interrupted attempts count, and after the retries the study is failed, not re-claimed."""
    monkeypatch.setenv(FAULT_ENV, "hang")
    proc, port, engine = serve
    proc.start(port)
    dx = chest_dx("normal", seed=27)
    uid = place_ready_study(engine, tmp_path / "spool", [(dx, _file_bytes(dx))])
    for attempt in (1, 2):
        wait_for(
            lambda: (attempt, JobState.RUNNING) in [(a, s) for a, s, _ in _jobs(engine, uid)],  # noqa: B023
            timeout=180,
            what=f"attempt {attempt} running",
        )
        assert proc.proc is not None
        children = _children(proc.proc.pid)
        assert children  # the scoring worker (and multiprocessing's resource tracker)
        proc.kill9()
        # The orphaned worker notices and exits (no process left behind).
        wait_for(
            lambda: not any(_alive(c) for c in children),  # noqa: B023
            timeout=10,
            what="the orphaned worker gone",
        )
        proc.start(port)
    wait_for(lambda: _study(engine, uid)[0] == StudyState.FAILED, timeout=60)  # type: ignore[index]
    interrupted = "interrupted: the worker stopped during the job"
    assert _jobs(engine, uid) == [
        (1, JobState.FAILED, interrupted),
        (2, JobState.DEAD, interrupted),
    ]
    assert _study(engine, uid) == (StudyState.FAILED, interrupted)
    assert _echo(port) == 0
