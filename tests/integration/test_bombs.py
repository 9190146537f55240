"""Bombs against the real `pacs-ai serve` process: a deflate bomb (~3 MB on the wire, 3 GiB
inflated) and compressed frames whose codestream declares a huge image that the DICOM header
does not. Each is refused at ingest with its status from the table, nothing is kept, the
process's peak RSS grows by less than 1 GB, and it keeps serving."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)
from sqlalchemy import create_engine, select

from pacs_ai.db.models import AuditEvent, Instance
from tests import dicomfaults as f
from tests.conftest import SCU_AE, ct_datasets, make_settings
from tests.integration.process import ServerProcess, write_config
from tests.integration.rawpeer import EXPLICIT_LE, Accepted, RawPeer, encode_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
GIB = 1 << 30


def _kib(status: str, key: str) -> int:
    for line in status.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc status")


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) from /proc."""
    return _kib(Path(f"/proc/{pid}/status").read_text(), "VmHWM") * 1024


@pytest.fixture
def server(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[ServerProcess, int, str]]:
    settings = make_settings(tmp_path, sqlite_url, logging={"level": "INFO"})
    cfg = write_config(settings, tmp_path / "config.toml")
    proc = ServerProcess(cfg, tmp_path / "server.log")
    assert proc.cli("db", "upgrade", "--config", str(cfg)).returncode == 0
    proc.start(settings.dicom.port)
    yield proc, settings.dicom.port, sqlite_url
    proc.stop()


def _deflate_bomb_dataset() -> tuple[str, bytes]:
    """A 64x64 DX header, then Pixel Data (OB) declaring 3 GiB of zeros, deflated."""
    ds = f.compressed_dataset(f.jpeg_frame(), DeflatedExplicitVRLittleEndian)
    del ds.PixelData
    header = encode_dataset(ds) + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 3 * GIB)
    return ds.SOPInstanceUID, f.deflate_bomb(header, 3 * GIB)


def test_bombs_refused_in_bounded_memory_and_service_goes_on(
    server: tuple[ServerProcess, int, str], tmp_path: Path
) -> None:
    proc, port, db_url = server
    assert proc.proc is not None
    raw = RawPeer("127.0.0.1", port, timeout=60)
    syntaxes = [DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless]
    result = raw.associate(
        SCU_AE, contexts=[*((DX, [str(ts)]) for ts in syntaxes), (CT, [EXPLICIT_LE])]
    )
    assert isinstance(result, Accepted) and len(result.contexts) == 4
    cx = {ts: cid for cid, (_, ts) in result.contexts.items()}

    warm = ct_datasets(1, seed=1)[0]
    assert raw.c_store(cx[EXPLICIT_LE], CT, warm.SOPInstanceUID, encode_dataset(warm)) == 0
    baseline = peak_rss_bytes(proc.proc.pid)

    bomb_uid, bomb = _deflate_bomb_dataset()
    assert 3_000_000 < len(bomb) < 3_500_000  # ~3 MB on the wire for 3 GiB inflated
    assert raw.c_store(cx[DeflatedExplicitVRLittleEndian], DX, bomb_uid, bomb) == 0xC004

    hostile = [
        (JPEGBaseline8Bit, f.jpeg_huge_sof_after_padding()),
        (JPEGBaseline8Bit, f.jpeg_second_image_after_eoi()),
        (JPEG2000Lossless, f.j2k_huge_siz()),
        (JPEG2000Lossless, f.j2k_second_codestream()),
    ]
    for i, (ts, fragment) in enumerate(hostile):
        ds = f.compressed_dataset(fragment, ts, seed=10 + i)
        data = encode_dataset(ds)
        assert raw.c_store(cx[ts], DX, ds.SOPInstanceUID, data) == 0xC005, (ts, i)

    # Honest compressed images (frame header agrees with the header) are stored.
    good = [
        f.compressed_dataset(f.jpeg_frame(), JPEGBaseline8Bit, seed=20),
        f.compressed_dataset(f.j2k_frame(), JPEG2000Lossless, seed=21),
    ]
    for ds in good:
        ts = ds.file_meta.TransferSyntaxUID
        assert raw.c_store(cx[ts], DX, ds.SOPInstanceUID, encode_dataset(ds)) == 0
    after = ct_datasets(1, seed=2)[0]
    assert raw.c_store(cx[EXPLICIT_LE], CT, after.SOPInstanceUID, encode_dataset(after)) == 0
    assert raw.release()
    raw.close()

    growth = peak_rss_bytes(proc.proc.pid) - baseline
    assert growth < GIB, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    engine = create_engine(db_url)
    with engine.connect() as c:
        stored = set(c.scalars(select(Instance.sop_instance_uid)))
        refused = c.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "instance_refused")
        ).all()
    engine.dispose()
    assert stored == {warm.SOPInstanceUID, after.SOPInstanceUID, *(d.SOPInstanceUID for d in good)}
    assert sorted(r.split('"status": "')[1][:6] for r in refused) == ["0xC004"] + ["0xC005"] * 4
    spool = tmp_path / "spool"
    assert len(list((spool / "objects").rglob("*.dcm"))) == 4
    assert list((spool / "tmp").iterdir()) == []
    print(f"peak RSS growth under the bombs: {growth / 2**20:.1f} MiB")
