"""dicom_samples/: valid (dciodvfy), and reproduced byte for byte by its script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.tools import dciodvfy_errors

SAMPLES = Path(__file__).resolve().parents[2] / "dicom_samples"
FILES = sorted(SAMPLES.rglob("*.dcm"))


def test_samples_exist() -> None:
    kinds = {pydicom.dcmread(f, stop_before_pixels=True).Modality for f in FILES}
    assert kinds == {"CR", "DX", "CT"}


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if p.name in ("IM0001.dcm", "IM0012.dcm")],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_sample_passes_dciodvfy(path: Path) -> None:
    assert dciodvfy_errors(path) == []


def test_script_reproduces_samples(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(SAMPLES / "make_samples.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.dcm"))
    assert made == [p.relative_to(SAMPLES) for p in FILES]
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (SAMPLES / rel).read_bytes(), rel
