"""dcmtk's echoscu and storescu as real peers (the tools modalities' vendors test against)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from pacs_ai.db.models import Association, Instance
from pacs_ai.service import Service
from tests.conftest import ct_datasets, dx_dataset, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.tools import require_tool


def _run(tool: str, svc: Service, *args: str | Path) -> subprocess.CompletedProcess[str]:
    assert svc.server is not None
    return subprocess.run(
        [require_tool(tool), "-aec", "PACS_AI", "127.0.0.1", str(svc.server.port), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_echoscu(start_service: ServiceFactory) -> None:
    svc = start_service()
    assert _run("echoscu", svc).returncode == 0
    # dcmtk's echoscu from an AE title not on the allowlist is rejected.
    denied = _run("echoscu", svc, "-aet", "NOBODY")
    assert denied.returncode != 0 and "Calling AE Title Not Recognized" in denied.stderr


def test_storescu_folder_and_compressed(start_service: ServiceFactory, tmp_path: Path) -> None:
    svc = start_service()
    write_all([dx_dataset(), *ct_datasets(10)], tmp_path / "study")
    # A real chest CR, JPEG 2000 lossless, from pydicom-data: stored as received.
    j2k = Path(get_testdata_file("RG1_J2KR.dcm"))  # type: ignore[arg-type]
    result = _run("storescu", svc, "+sd", tmp_path / "study")
    assert result.returncode == 0, result.stderr
    result = _run("storescu", svc, "-xv", j2k)  # propose JPEG 2000 lossless as-is
    assert result.returncode == 0, result.stderr
    wait_for(lambda: _count(svc) == 12)
    wait_for(lambda: None not in _end_reasons(svc), what="associations recorded as ended")
    with svc.engine.connect() as c:
        syntaxes = dict(
            c.execute(select(Instance.sop_instance_uid, Instance.transfer_syntax_uid)).all()
        )
        assoc = c.execute(select(Association.calling_ae, Association.end_reason)).all()
    source = pydicom.dcmread(j2k, stop_before_pixels=True)
    assert syntaxes[source.SOPInstanceUID] == source.file_meta.TransferSyntaxUID
    assert set(assoc) == {("STORESCU", "released")}


def _end_reasons(svc: Service) -> list[str | None]:
    with svc.engine.connect() as c:
        return list(c.scalars(select(Association.end_reason)))


def _count(svc: Service) -> int:
    with svc.engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(Instance)) or 0)
