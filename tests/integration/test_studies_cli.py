"""Admin commands on one study against a running service: `studies rerun` (a new revision
whose SR names the old one), `studies redeliver` (to a destination added later; idempotent
unless --force), `deliveries retry` with an unknown id; and the output folder's layout."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from sqlalchemy import insert, select

from pacs_ai.cli import main
from pacs_ai.db.lookup import find_study
from pacs_ai.db.models import AuditEvent, Delivery, DeliveryState, Report, Study, StudyState
from pacs_ai.db.session import make_engine
from pacs_ai.errors import AmbiguousStudy, StudyNotFound
from pacs_ai.service import Service
from tests.conftest import make_settings, prepared_database, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.orthanc import Orthanc
from tests.integration.process import write_config
from tests.integration.test_e2e import chest_dx, storescu


def _study(svc: Service) -> Study:
    with svc.engine.connect() as c:
        return c.execute(select(Study)).one()  # type: ignore[return-value]


def _reports(svc: Service) -> list[Report]:
    with svc.engine.connect() as c:
        return list(c.execute(select(Report).order_by(Report.id)).all())  # type: ignore[arg-type]


def test_output_folder_rerun_and_redeliver(
    start_service: ServiceFactory,
    tmp_path: Path,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 1. No PACS: the output folder gets the SR, the summary image and its PNG.
    svc = start_service(sqlite_url, pipeline={"enabled": True, "poll_seconds": 0.2})
    dx = chest_dx("covid", seed=21)
    storescu(svc, write_all([dx], tmp_path / "dx"))
    wait_for(lambda: _study(svc).state == StudyState.REPORTED, timeout=60, what="reported")
    study = _study(svc)
    reports = _reports(svc)
    assert [r.kind for r in reports] == ["sr", "summary"]
    root = svc.settings.reports.path
    folder = root / reports[0].created_at.strftime("%Y-%m-%d") / f"study-{study.id}"
    names = sorted(p.name for p in folder.iterdir())
    stems = {r.kind: Path(r.path).stem for r in reports}
    assert names == sorted(
        [f"{stems['sr']}.dcm", f"{stems['summary']}.dcm", f"{stems['summary']}.png"]
    )
    assert stems["sr"].startswith("sr-rev0-") and stems["summary"].startswith("summary-rev0-")
    assert all(Path(r.path).parent == folder.relative_to(root) for r in reports)
    summary = pydicom.dcmread(folder / f"{stems['summary']}.dcm")
    with Image.open(folder / f"{stems['summary']}.png") as png:
        assert (png.height, png.width, png.mode) == (summary.Rows, summary.Columns, "RGB")
    cfg = str(write_config(svc.settings, tmp_path / "config.toml"))

    # 2. Re-run by a unique UID prefix: revision 1, its SR names the first one.
    prefix = dx.StudyInstanceUID[:-3]
    assert main(["studies", "rerun", "-c", cfg, prefix]) == 0
    assert f"study {study.id}: re-run queued as revision 1" in capsys.readouterr().out

    def rerun_done() -> bool:
        s = _study(svc)
        return s.revision == 1 and s.state == StudyState.REPORTED

    wait_for(rerun_done, timeout=60, what="revision 1 reported")
    old_sr, new_sr = (r for r in _reports(svc) if r.kind == "sr")
    assert new_sr.study_revision == 1 and Path(new_sr.path).name.startswith("sr-rev1-")
    new = pydicom.dcmread(root / new_sr.path)
    prior = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert prior.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_sr.sop_instance_uid
    with svc.engine.connect() as c:
        event = c.execute(select(AuditEvent).where(AuditEvent.action == "study_rerun")).one()
    assert event.actor == f"admin:{getpass.getuser()}" and event.object_id == study.id
    assert json.loads(event.detail) == {
        "previous_revision": 0,
        "previous_state": "reported",
        "revision": 1,
    }
    svc.stop()

    # 3. A DICOMweb PACS is added to the configuration later; its reports are re-delivered.
    pacs = Orthanc(tmp_path / "orthanc", {}, dicomweb=True)
    pacs.start()
    try:
        svc = start_service(
            sqlite_url,
            pipeline={"enabled": True, "poll_seconds": 0.2},
            destinations=[{"name": "cloud", "kind": "dicomweb", "url": pacs.dicomweb_url}],
            delivery={"poll_seconds": 0.2},
        )
        cfg = str(write_config(svc.settings, tmp_path / "config2.toml"))
        assert main(["studies", "redeliver", "-c", cfg, str(study.id), "--destination", "x"]) == 1
        assert "no destination named 'x' (configured: cloud)" in capsys.readouterr().err
        assert main(["studies", "redeliver", "-c", cfg, dx.StudyInstanceUID]) == 0
        assert "1 queued, 0 re-queued, 0 already" in capsys.readouterr().out

        def delivered() -> bool:
            with svc.engine.connect() as c:
                return c.scalar(select(Delivery.state)) == DeliveryState.DELIVERED

        wait_for(delivered, timeout=30, what="re-delivered")
        wait_for(lambda: _study(svc).state == StudyState.DELIVERED, timeout=10)
        with svc.engine.connect() as c:
            sent = c.execute(select(Delivery.report_id, Delivery.destination)).all()
        assert sent == [(new_sr.id, "cloud")]  # the current revision's SR only
        stored = pacs.find_instances(dx.StudyInstanceUID)
        assert [i["MainDicomTags"]["SOPInstanceUID"] for i in stored] == [new_sr.sop_instance_uid]

        # Again: nothing new is queued. With --force it is sent again (same UID: one copy).
        assert main(["studies", "redeliver", "-c", cfg, str(study.id)]) == 0
        out = capsys.readouterr().out
        assert "0 queued, 0 re-queued, 1 already delivered or on their way" in out
        assert "--force" in out
        assert main(["studies", "redeliver", "-c", cfg, str(study.id), "--force"]) == 0
        assert "0 queued, 1 re-queued" in capsys.readouterr().out
        wait_for(delivered, timeout=30, what="re-delivered with --force")
        with svc.engine.connect() as c:
            assert c.scalar(select(Delivery.attempts)) == 1
            actions = c.scalars(
                select(AuditEvent.action).where(AuditEvent.action == "study_redelivered")
            ).all()
        assert len(actions) == 3
        assert len(pacs.find_instances(dx.StudyInstanceUID)) == 1

        # Unknown ids: a clear message and a non-zero exit.
        assert main(["studies", "rerun", "-c", cfg, "999"]) == 1
        assert "no study with id 999" in capsys.readouterr().err
        assert main(["deliveries", "retry", "-c", cfg, "999"]) == 1
        assert "no delivery with id 999" in capsys.readouterr().err
        with svc.engine.connect() as c:
            delivery_id = c.scalar(select(Delivery.id))
        assert main(["deliveries", "retry", "-c", cfg, str(delivery_id)]) == 1
        assert f"delivery {delivery_id} is delivered, not re-queued" in capsys.readouterr().err
    finally:
        pacs.stop()


def test_find_study_by_id_uid_and_prefix(tmp_path: Path, sqlite_url: str) -> None:
    settings = make_settings(tmp_path, sqlite_url)
    prepared_database(settings)
    engine = make_engine(settings.database)
    uids = ["1.2.3.4", "1.2.3.45", "1.2.3.46", "1.2.9.1"]
    with engine.begin() as conn:
        ids = [
            conn.execute(insert(Study).values(study_uid=u).returning(Study.id)).scalar_one()
            for u in uids
        ]
    try:
        with engine.connect() as conn:
            assert find_study(conn, str(ids[1])).study_uid == "1.2.3.45"
            assert find_study(conn, "1.2.3.4").id == ids[0]  # exact beats prefix
            assert find_study(conn, "1.2.9").id == ids[3]
            assert find_study(conn, " 1.2.3.46 ").id == ids[2]
            with pytest.raises(AmbiguousStudy, match=r"^3 studies have") as amb:
                find_study(conn, "1.2.3")
            assert amb.value.count == 3
            with pytest.raises(StudyNotFound, match="no study with id 99"):
                find_study(conn, "99")
            with pytest.raises(StudyNotFound, match=r"starting with 1\.3"):
                find_study(conn, "1.3")
            with pytest.raises(StudyNotFound, match="neither a study id"):
                find_study(conn, "1.2%")
    finally:
        engine.dispose()


def test_ambiguous_prefix_exits_2(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(tmp_path, sqlite_url)
    prepared_database(settings)
    engine = make_engine(settings.database)
    with engine.begin() as conn:
        for uid in ("1.2.5.1", "1.2.5.2"):
            conn.execute(insert(Study).values(study_uid=uid, state=StudyState.REPORTED))
    engine.dispose()
    cfg = str(write_config(settings, tmp_path / "config.toml"))
    assert main(["studies", "rerun", "-c", cfg, "1.2.5"]) == 2
    assert "2 studies have a Study Instance UID starting with 1.2.5" in capsys.readouterr().err
    assert main(["studies", "rerun", "-c", cfg, "1.2.5.1"]) == 0
    assert main(["studies", "rerun", "-c", cfg, "1.2.5.1"]) == 1  # now ready: not finished
    assert "is ready: it will be processed anyway" in capsys.readouterr().err
