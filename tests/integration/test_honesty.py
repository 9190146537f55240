"""In service: an image unlike the training data is not applicable (no finding, no report),
a shadow-mode model is recorded but not delivered, and monitoring sees both."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from pacs_ai.db.models import (
    Delivery,
    Finding,
    ModelObservation,
    Report,
    Series,
    Study,
    StudyState,
)
from pacs_ai.service import Service
from tests.conftest import free_port, wait_for, write_all
from tests.integration.conftest import ServiceFactory
from tests.integration.test_e2e import chest_dx, storescu


def _study(svc: Service) -> tuple[StudyState, str | None]:
    with svc.engine.connect() as c:
        row = c.execute(select(Study.state, Study.state_reason)).one()
    return row.state, row.state_reason


def _count(svc: Service, table: type) -> int:
    with svc.engine.connect() as c:
        return int(c.scalar(select(func.count()).select_from(table)) or 0)


def _unreachable_pacs() -> list[dict[str, object]]:
    return [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}]


def test_real_chest_cr_is_refused_as_out_of_distribution(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(pipeline={"enabled": True, "poll_seconds": 0.2})
    rg1 = tmp_path / "rg1" / "RG1_UNCR.dcm"
    rg1.parent.mkdir()
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), rg1)
    storescu(svc, [rg1])
    wait_for(lambda: _study(svc)[0] == StudyState.NOT_APPLICABLE, timeout=60)
    _, reason = _study(svc)
    assert reason is not None
    assert reason.startswith("unlike the images this model was trained on (score ")
    with svc.engine.connect() as c:
        series_reason = c.scalar(select(Series.not_applicable_reason))
        observed = c.execute(select(ModelObservation.label, ModelObservation.refused)).all()
    assert series_reason == reason
    assert _count(svc, Finding) == 0 and _count(svc, Report) == 0
    assert [(o.label, o.refused) for o in observed] == [("", True)]


def test_shadow_mode_records_findings_and_delivers_nothing(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    svc = start_service(
        pipeline={"enabled": True, "poll_seconds": 0.2},
        inference={"cxr_mode": "shadow"},
        destinations=_unreachable_pacs(),
    )
    storescu(svc, write_all([chest_dx("covid", seed=3)], tmp_path / "dx"))
    wait_for(lambda: _study(svc)[0] == StudyState.REPORTED, timeout=60)
    assert _study(svc) == (StudyState.REPORTED, "shadow mode: recorded, not delivered")
    assert _count(svc, Finding) == 2  # covid, pneumonia: visible to admins
    assert _count(svc, Delivery) == 0
    with svc.engine.connect() as c:
        # the SR and the summary image (reports.objects), written under reports.path
        kinds = sorted(c.scalars(select(Report.kind)))
        modes = set(c.scalars(select(ModelObservation.mode)))
        path = c.scalar(select(Report.path))
    assert kinds == ["sr", "summary"]
    assert modes == {"shadow"}
    assert (svc.settings.reports.path / str(path)).is_file()


def test_active_mode_enqueues_delivery(start_service: ServiceFactory, tmp_path: Path) -> None:
    svc = start_service(
        pipeline={"enabled": True, "poll_seconds": 0.2},
        destinations=_unreachable_pacs(),
    )
    storescu(svc, write_all([chest_dx("covid", seed=3)], tmp_path / "dx"))
    wait_for(lambda: _count(svc, Delivery) == 1, timeout=60)
    assert _study(svc)[1] is None
