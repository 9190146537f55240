"""Shared fixtures: configuration, databases (SQLite and a real PostgreSQL), a running
service on loopback, and generated DICOM data."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from pacs_ai.config import Settings, settings_from_dict
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.training import dicomwriter as dw

POSTGRES_URL = os.environ.get(
    "PACS_AI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SCU_AE = "TEST_SCU"


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` until it is truthy (bounded in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not met within {timeout} s: {what or predicate}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server for this test session."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"pacs_ai_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        why = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc.__class__.__name__}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """An empty schema per test (tables dropped afterwards)."""
    yield postgres_server_url
    engine = create_engine(postgres_server_url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pacs-ai.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pacs-ai.db'}"


def make_settings(tmp_path: Path, db_url: str, **sections: Any) -> Settings:
    data: dict[str, Any] = {
        "dicom": {"ae_title": "PACS_AI", "port": free_port(), "network_timeout": 10.0},
        "access": {
            "allowed": [
                {"ae_title": SCU_AE, "host": "127.0.0.1"},
                {"ae_title": "STORESCU", "host": "127.0.0.1"},
                {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
            ]
        },
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": db_url},
        "assembly": {
            "xray_grace_seconds": 0.2,
            "ct_quiet_seconds": 1.0,
            "sweep_interval_seconds": 0.2,
        },
        "logging": {"level": "DEBUG"},
        # Ingest tests look at studies as assembly leaves them; pipeline tests turn it on.
        "pipeline": {"enabled": False},
    }
    for section, values in sections.items():
        if isinstance(values, list):  # arrays of tables: [[destinations]], [[routing]]
            data[section] = values
        else:
            data.setdefault(section, {}).update(values)
    return settings_from_dict(data, base=tmp_path)


def prepared_database(settings: Settings) -> None:
    engine = make_engine(settings.database)
    upgrade(engine)
    engine.dispose()


# --- DICOM data --------------------------------------------------------------------------

PATIENT = dw.Patient(name="Doe^Jane^Secret", patient_id="PHI-123456", birth_date="19800101")


def dx_dataset(size: int = 256, **kwargs: Any) -> Dataset:
    rng = np.random.default_rng(kwargs.pop("seed", 0))
    pixels = rng.integers(200, 3800, (size, size))
    kwargs.setdefault("patient", PATIENT)
    return dw.xray_image(pixels, modality=kwargs.pop("modality", "DX"), **kwargs)


def ct_datasets(n: int = 12, size: int = 64, **kwargs: Any) -> list[Dataset]:
    rng = np.random.default_rng(kwargs.pop("seed", 1))
    volume = rng.normal(-700, 200, (n, size, size))
    kwargs.setdefault("patient", PATIENT)
    return dw.ct_series(volume, **kwargs)


def write_all(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = folder / f"{i:04d}.dcm"
        dw.write(ds, p)
        paths.append(p)
    return paths
