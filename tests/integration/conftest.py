from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pacs_ai.service import Service
from tests.conftest import make_settings, prepared_database

ServiceFactory = Callable[..., Service]


@pytest.fixture
def start_service(tmp_path: Path, sqlite_url: str) -> Iterator[ServiceFactory]:
    """Start pacs-ai in this process on a free loopback port; stopped after the test."""
    started: list[Service] = []

    def start(db_url: str | None = None, **sections: dict[str, Any]) -> Service:
        settings = make_settings(tmp_path, db_url or sqlite_url, **sections)
        prepared_database(settings)
        svc = Service(settings)
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.stop()
