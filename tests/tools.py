"""Real external tools (dcmtk, Orthanc, dciodvfy, openssl) used by the tests.

On CI (``CI`` set) a missing tool fails the test; on a developer machine it skips with the
reason, so a partial set-up still runs what it can.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    why = f"{name} not found on PATH (run `make system-deps`)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)
    raise AssertionError("unreachable")
