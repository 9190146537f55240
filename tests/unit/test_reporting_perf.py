"""Build-time budget: one chest X-ray SR must stay well inside the 1 s end-to-end latency.

Run ``pytest tests/unit/test_reporting_perf.py -q -s`` to see the table of medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest
from pydicom.dataset import Dataset

from pacs_ai.reporting import (
    AlgorithmInfo,
    FindingResult,
    ReportRequest,
    build_sr,
    build_summary_image,
    build_text_sr,
)
from pacs_ai.reporting import codes as rcodes
from pacs_ai.training import dicomwriter

ALGO = AlgorithmInfo("pacs-ai chest demo", "1.2.0", "pacs-ai project", True, {"input": "224"})
FINDINGS = (
    FindingResult("covid19", rcodes.COVID19, 0.87, 0.42, True),
    FindingResult("pneumonia", rcodes.PNEUMONIA, 0.1, 0.5, False),
)
# Budgets (median); measured ~40 ms (DX SR) and ~0.7 s (300-slice CT SR) on 2 slow cores.
DX_SR_BUDGET_S = 0.100
CT300_SR_BUDGET_S = 3.0


def _median_s(build: Callable[[ReportRequest], Dataset], req: ReportRequest, runs: int) -> float:
    build(req)  # warm: first use loads highdicom's IOD tables and the font
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        build(req)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _headers(datasets: list[Dataset]) -> list[Dataset]:
    for ds in datasets:
        del ds.PixelData  # the pipeline passes headers only
    return datasets


@pytest.fixture(scope="module")
def requests() -> dict[str, ReportRequest]:
    display = np.random.default_rng(0).random((512, 512), dtype=np.float32)
    dx = _headers([dicomwriter.xray_image(np.full((64, 64), 1000.0))])
    ct20 = _headers(dicomwriter.ct_series(np.zeros((20, 8, 8))))
    ct300 = _headers(dicomwriter.ct_series(np.zeros((300, 8, 8))))
    return {
        "DX": ReportRequest(dx, FINDINGS, ALGO, display_image=display, heatmap=display),
        "CT20": ReportRequest(ct20, FINDINGS, ALGO, display_image=display, heatmap=display),
        "CT300": ReportRequest(ct300, FINDINGS, ALGO, display_image=display, heatmap=display),
    }


def test_build_times(requests: dict[str, ReportRequest]) -> None:
    builders = {"sr": build_sr, "text_sr": build_text_sr, "summary": build_summary_image}
    table: dict[tuple[str, str], float] = {}
    for case, req in requests.items():
        runs = 2 if case == "CT300" else 7
        for kind, build in builders.items():
            table[case, kind] = _median_s(build, req, runs)
    print("\nreport build time, median ms")
    print(f"{'case':8}" + "".join(f"{k:>10}" for k in builders))
    for case in requests:
        print(f"{case:8}" + "".join(f"{table[case, k] * 1000:10.1f}" for k in builders))
    assert table["DX", "sr"] < DX_SR_BUDGET_S
    assert table["CT300", "sr"] < CT300_SR_BUDGET_S
