"""The admin tables: fitted to 120 columns, rounded numbers, studies found by id/UID/prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import insert

from pacs_ai.cli.audit import format_table
from pacs_ai.config import DatabaseSettings
from pacs_ai.db.lookup import find_study
from pacs_ai.db.models import Study
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.errors import AmbiguousStudy, StudyNotFound


def test_table_fits_120_columns_and_rounds_numbers() -> None:
    rows = [
        {
            "id": 7,
            "study_uid": "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345",
            "probability": 0.123456789,
            "duration_ms": 1234.5678,
            "at": "2026-12-02T07:12:36.123+00:00",
            "detail": "x" * 200,
        }
    ]
    table = format_table(rows)
    lines = table.splitlines()
    assert max(len(line) for line in lines) == 120
    assert "0.123 " in lines[2] and " 1235 " in lines[2]
    assert "2026-12-02 07:12:36 " in lines[2] and ".123+00:00" not in table
    assert lines[2].rstrip().endswith("…")
    wide = format_table(rows, wide=True)
    assert rows[0]["study_uid"] in wide and "x" * 200 in wide
    assert "2026-12-02T07:12:36.123+00:00" in wide


def test_whole_columns_are_never_cut() -> None:
    rows = [{"a": "a" * 100, "patient_name": "Doe^Jane^" + "Q" * 40}]
    table = format_table(rows, whole=("patient_name",))
    assert rows[0]["patient_name"] in table
    assert max(len(line) for line in table.splitlines()) == 120


def test_study_found_by_id_uid_or_unique_prefix(tmp_path: Path) -> None:
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'db.sqlite'}"))
    upgrade(engine)
    with engine.begin() as conn:
        for uid in ("1.2.840.555.1", "1.2.840.555.2", "1.3.6.1.9", "42"):
            conn.execute(insert(Study).values(study_uid=uid))
    with engine.connect() as conn:
        assert find_study(conn, "1.2.840.555.2").study_uid == "1.2.840.555.2"
        assert find_study(conn, "3").study_uid == "1.3.6.1.9"  # database id 3
        assert find_study(conn, "42").study_uid == "42"  # a full UID wins over an id
        assert find_study(conn, "1.3.6").study_uid == "1.3.6.1.9"
        with pytest.raises(AmbiguousStudy, match="2 studies"):
            find_study(conn, "1.2.840.555")
        with pytest.raises(StudyNotFound, match="no study"):
            find_study(conn, "9.9")
        with pytest.raises(StudyNotFound, match="neither a study id"):
            find_study(conn, "1_2%")  # never a LIKE pattern
    engine.dispose()
