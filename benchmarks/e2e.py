"""End-to-end latency: modality send -> pacs-ai -> SR retrievable from a real PACS (Orthanc).

    .venv/bin/python benchmarks/e2e.py [--dx-runs 10] [--ct-runs 3] [--stream 200]

pacs-ai runs as `pacs-ai serve` (SQLite, bundled demo models, CPU unless CUDA is present) with
Orthanc as its destination; the modality is dcmtk `storescu` (TCP_NODELAY=1). Latency is from
the moment storescu exits (the modality's send is over) to the moment Orthanc's REST API lists
the SR in the study (polled every 5 ms). For CT the quiet timer is reported separately:
"after quiet" = latency - ct_quiet_seconds. The stream sends 200 single-image DX studies in
one storescu run and reports studies/minute from the first byte sent to the last SR stored.
Prints a table, writes benchmarks/results/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import free_port, tool, wait_port  # noqa: E402
from pacs_ai.training import dicomwriter as dw  # noqa: E402
from pacs_ai.training.phantoms import ct_phantom, cxr_phantom  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CT_QUIET = 2.0


class Orthanc:
    def __init__(self, workdir: Path, pacs_ai_port: int) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        (workdir / "orthanc").mkdir()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(workdir / "orthanc"),
            "IndexDirectory": str(workdir / "orthanc"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {"pacsai": ["PACS_AI", "127.0.0.1", pacs_ai_port]},
            "Plugins": [],
        }
        (workdir / "orthanc.json").write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(
            [tool("Orthanc"), str(workdir / "orthanc.json")],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.http_port, self.proc)

    def sr_count(self, study_uid: str) -> int:
        body = json.dumps(
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "SOPClassUID": SR_CLASS}}
        ).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/tools/find", data=body)
        with urllib.request.urlopen(req, timeout=5) as rsp:  # noqa: S310 - loopback
            return len(json.loads(rsp.read()))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def start_pacs_ai(workdir: Path, port: int, orthanc_port: int) -> subprocess.Popen[bytes]:
    cfg = workdir / "config.toml"
    cfg.write_text(
        f'[dicom]\nae_title = "PACS_AI"\nport = {port}\n'
        '[access]\nallowed = [{ ae_title = "STORESCU", host = "127.0.0.1" }]\n'
        '[storage]\npath = "spool"\nmin_free_mb = 100\n'
        '[database]\nurl = "sqlite:///pacs-ai.db"\n'
        f"[assembly]\nct_quiet_seconds = {CT_QUIET}\n"
        '[reports]\npath = "reports"\nobjects = ["sr"]\n'
        '[[destinations]]\nname = "orthanc"\nae_title = "ORTHANC"\nhost = "127.0.0.1"\n'
        f'port = {orthanc_port}\nobjects = ["sr"]\n'
        '[logging]\nlevel = "WARNING"\n'
    )
    subprocess.run(
        [sys.executable, "-m", "pacs_ai", "db", "upgrade", "-c", str(cfg)],
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_ai", "serve", "-c", str(cfg)],
        stderr=(workdir / "pacs-ai.log").open("wb"),
    )
    wait_port(port, proc, timeout=60)
    return proc


def storescu(port: int, files: list[Path]) -> None:
    subprocess.run(
        [tool("storescu"), "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
    )


def wait_sr(orthanc: Orthanc, study_uid: str, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.sr_count(study_uid):
            return time.perf_counter()
        time.sleep(0.005)
    raise TimeoutError(f"no SR for study after {timeout} s")


_PHANTOMS: dict[int, np.ndarray] = {}


def dx_study(folder: Path, seed: int, size: int = 2048) -> tuple[str, list[Path]]:
    """A new DX study (new UIDs); pixels from a pool of 6 phantoms (drawing a 2048² phantom
    takes seconds, and the content does not change the timing)."""
    key = seed % 6
    if key not in _PHANTOMS:
        kind = ("covid", "pneumonia", "normal")[key % 3]
        _PHANTOMS[key] = cxr_phantom(kind, np.random.default_rng(key), size)  # type: ignore[arg-type]
    img = _PHANTOMS[key]
    ds = dw.xray_image(
        200 + img * 3700, modality="DX", study=dw.StudyInfo(), pixel_spacing_mm=0.175
    )
    path = folder / f"dx{seed:04d}.dcm"
    dw.write(ds, path)
    return str(ds.StudyInstanceUID), [path]


def ct_study(folder: Path, seed: int, slices: int = 300) -> tuple[str, list[Path]]:
    vol = ct_phantom("covid", np.random.default_rng(seed), (slices, 512, 512))
    series = dw.ct_series(vol, study=dw.StudyInfo(), slice_thickness_mm=1.0, pixel_spacing_mm=0.7)
    out = folder / f"ct{seed}"
    out.mkdir()
    paths = []
    for i, ds in enumerate(series):
        paths.append(out / f"{i:04d}.dcm")
        dw.write(ds, paths[-1])
    return str(series[0].StudyInstanceUID), paths


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "median_s": statistics.median(values),
        "p95_s": p95,
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "n": len(values),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dx-runs", type=int, default=10)
    ap.add_argument("--ct-runs", type=int, default=3)
    ap.add_argument("--stream", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "e2e.json")
    args = ap.parse_args()
    (ROOT / "var").mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        port = free_port()
        orthanc = Orthanc(work, port)
        pacs = start_pacs_ai(work, port, orthanc.dicom_port)
        try:
            # Warm-up: the first study loads and warms the models.
            uid, files = dx_study(data, 9999)
            storescu(port, files)
            wait_sr(orthanc, uid)

            dx = []
            for i in range(args.dx_runs):
                uid, files = dx_study(data, i)
                storescu(port, files)
                sent = time.perf_counter()
                dx.append(wait_sr(orthanc, uid) - sent)
            results["dx_2048"] = summary(dx)

            ct = []
            for i in range(args.ct_runs):
                uid, files = ct_study(data, 100 + i)
                storescu(port, files)
                sent = time.perf_counter()
                ct.append(wait_sr(orthanc, uid) - sent)
            results["ct_300"] = summary(ct)
            results["ct_300_after_quiet"] = summary([v - CT_QUIET for v in ct])
            results["ct_quiet_seconds"] = CT_QUIET

            if args.stream:  # --stream 0: latency runs only
                stream = [dx_study(data, 1000 + i) for i in range(args.stream)]
                started = time.perf_counter()
                storescu(port, [f for _, files in stream for f in files])
                for uid, _ in stream:
                    wait_sr(orthanc, uid, timeout=1800)
                elapsed = time.perf_counter() - started
                results["stream"] = {
                    "studies": args.stream,
                    "seconds": elapsed,
                    "studies_per_minute": args.stream / elapsed * 60,
                }
        finally:
            pacs.terminate()
            pacs.wait(timeout=60)
            orthanc.stop()
    report(results, args)
    return 0


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    rows = ["| case | median s | p95 s | min s | max s | runs |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (
        ("dx_2048", "DX 2048², send end → SR in Orthanc"),
        ("ct_300", "CT 300×512², send end → SR in Orthanc"),
        ("ct_300_after_quiet", f"CT, minus the {CT_QUIET:g} s quiet timer"),
    ):
        r = results[key]
        rows.append(
            f"| {label} | {r['median_s']:.2f} | {r['p95_s']:.2f} | {r['min_s']:.2f} | "
            f"{r['max_s']:.2f} | {r['n']} |"
        )
    s = results.get("stream")
    if s:
        rows.append("")
        rows.append(
            f"stream of {s['studies']} DX studies: {s['studies_per_minute']:.1f} studies/min "
            f"({s['seconds']:.1f} s)"
        )
    rows.append("targets: DX median <= 1 s; CT <= 10 s after the quiet timer")
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "results": results,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
