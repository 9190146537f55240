"""Report build times: one chest X-ray SR must stay well inside the 1 s end-to-end budget.

    .venv/bin/python benchmarks/reporting.py

Prints the median build time of each object kind for a DX image, a 20-slice and a 300-slice
CT, and writes benchmarks/results/reporting.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def main() -> None:
    builders = {"sr": build_sr, "text_sr": build_text_sr, "summary": build_summary_image}
    cases = requests()
    table: dict[str, dict[str, float]] = {}
    for case, req in cases.items():
        runs = 3 if case == "CT300" else 9
        table[case] = {kind: _median_s(b, req, runs) * 1000 for kind, b in builders.items()}
    print("| case | " + " | ".join(f"{k} ms" for k in builders) + " |")
    print("|---|" + "---:|" * len(builders))
    for case, row in table.items():
        print(f"| {case} | " + " | ".join(f"{row[k]:.1f}" for k in builders) + " |")
    out = Path(__file__).resolve().parent / "results" / "reporting.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"median_ms": table}, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
