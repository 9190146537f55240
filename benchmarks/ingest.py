"""Ingest benchmark: the same storescu load against dcmtk storescp, Orthanc and pacs-ai.

    .venv/bin/python benchmarks/ingest.py [--runs 3] [--ct-slices 300] [--dx 20] [--senders 4]
        [--loads ct,dx,ct-concurrent]

Each run starts the receiver fresh (empty storage), sends with dcmtk ``storescu``
(TCP_NODELAY=1, as DESIGN.md §7 requires for a fair comparison) and records instances/s,
MB/s, the receiver's CPU seconds (and per instance) and peak RSS. Loads: ``ct`` (one
association), ``dx`` (one association) and ``ct-concurrent`` (the same CT split over
``--senders`` storescu processes at once, one association each; storescp runs with
``--fork`` there, its children's CPU counted). Medians over the runs are printed as a table,
with pacs-ai's ratios to the peers measured in the same run, and written as JSON to
``benchmarks/results/ingest.json``.

pacs-ai is measured as it runs in production: every instance renamed into place, fsynced
with its directory, recorded in SQLite (WAL, synchronous=FULL) before Success; concurrent
associations share group commits. storescp writes without fsync and keeps no database;
Orthanc keeps its SQLite index (and fsyncs only that). On a shared machine instances/s swing
with other jobs' disk and CPU use; CPU ms per instance (the receiver process's own time) is
the steadier comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pacs_ai.training import dicomwriter as dw  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tool(name: str) -> str:
    """A system executable (dcmtk, Orthanc), never the same-named pynetdicom console script
    that an activated virtual environment puts first on PATH."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    dirs = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d]
    found = shutil.which(
        name, path=os.pathsep.join(d for d in dirs if Path(d).resolve() != venv_bin)
    )
    if found is None:
        raise SystemExit(f"{name} not found: `make system-deps`")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("receiver did not listen")


def cpu_seconds(pid: int) -> float:
    """The process's CPU time, with that of its waited-for children (storescp --fork)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime + stime + cutime + cstime
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_data(out: Path, ct_slices: int, dx_count: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    ct_dir, dx_dir = out / "ct", out / "dx"
    ct_dir.mkdir(parents=True)
    dx_dir.mkdir(parents=True)
    base = rng.normal(-600, 300, (512, 512)).astype(np.float32)
    volume = np.stack([base + rng.normal(0, 20, base.shape) for _ in range(ct_slices)])
    ct = dw.ct_series(volume, slice_thickness_mm=1.0)
    ct_paths = []
    for i, ds in enumerate(ct):
        p = ct_dir / f"{i:04d}.dcm"
        dw.write(ds, p)
        ct_paths.append(p)
    dx_paths = []
    pixels = rng.integers(100, 4000, (2048, 2048))
    for i in range(dx_count):
        p = dx_dir / f"{i:04d}.dcm"
        dw.write(dw.xray_image(pixels, modality="DX", study=dw.StudyInfo()), p)
        dx_paths.append(p)
    return {"ct": ct_paths, "dx": dx_paths}


class Receiver:
    name = ""
    aet = "ANY"
    concurrent = False  # set for the ct-concurrent load (storescp must fork for it)

    def start(self, workdir: Path, port: int) -> subprocess.Popen[bytes]:
        raise NotImplementedError


class StoreSCP(Receiver):
    name = "dcmtk storescp"
    aet = "STORESCP"

    def start(self, workdir: Path, port: int) -> subprocess.Popen[bytes]:
        (workdir / "out").mkdir()
        fork = ["--fork"] if self.concurrent else []
        return subprocess.Popen(
            [tool("storescp"), *fork, "-aet", self.aet, "-od", str(workdir / "out"), str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


class Orthanc(Receiver):
    name = "Orthanc"
    aet = "ORTHANC"

    def start(self, workdir: Path, port: int) -> subprocess.Popen[bytes]:
        storage = workdir / "orthanc"
        storage.mkdir()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.aet,
            "DicomPort": port,
            "HttpPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "Plugins": [],
        }
        (workdir / "orthanc.json").write_text(json.dumps(cfg))
        return subprocess.Popen(
            [tool("Orthanc"), str(workdir / "orthanc.json")],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


class PacsAi(Receiver):
    name = "pacs-ai"
    aet = "PACS_AI"

    def start(self, workdir: Path, port: int) -> subprocess.Popen[bytes]:
        cfg = workdir / "config.toml"
        cfg.write_text(
            f'[dicom]\nae_title = "PACS_AI"\nport = {port}\n'
            '[access]\nallowed = [{ ae_title = "STORESCU", host = "127.0.0.1" }]\n'
            '[storage]\npath = "spool"\nmin_free_mb = 100\n'
            '[database]\nurl = "sqlite:///pacs-ai.db"\n'
            '[logging]\nlevel = "WARNING"\n'
            # The receiver alone (the pipeline would load torch and score the CT meanwhile);
            # benchmarks/e2e.py measures the whole service.
            "[pipeline]\nenabled = false\n"
        )
        python = sys.executable
        subprocess.run(
            [python, "-m", "pacs_ai", "db", "upgrade", "-c", str(cfg)],
            check=True,
            capture_output=True,
        )
        return subprocess.Popen(
            [python, "-m", "pacs_ai", "serve", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def one_run(receiver: Receiver, files: list[Path], senders: int = 1) -> dict[str, float]:
    """Send ``files`` with ``senders`` storescu processes at once (each its share, one
    association each); the time runs until the last one finished."""
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as tmp:
        workdir = Path(tmp)
        port = free_port()
        receiver.concurrent = senders > 1
        proc = receiver.start(workdir, port)
        try:
            wait_port(port, proc)
            time.sleep(0.5)
            cpu0 = cpu_seconds(proc.pid)
            t0 = time.perf_counter()
            scus = [
                subprocess.Popen(
                    [
                        tool("storescu"),
                        "-aec",
                        receiver.aet,
                        "127.0.0.1",
                        str(port),
                        *map(str, files[i::senders]),
                    ],
                    env={**os.environ, "TCP_NODELAY": "1"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                for i in range(senders)
            ]
            errors = [scu.communicate()[1] for scu in scus]
            elapsed = time.perf_counter() - t0
            if senders > 1:
                time.sleep(0.3)  # storescp --fork: its children end and are reaped
            cpu = cpu_seconds(proc.pid) - cpu0
            rss = peak_rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for scu, err in zip(scus, errors, strict=True):
            if scu.returncode != 0:
                raise RuntimeError(f"storescu to {receiver.name} failed: {err[-2000:]}")
    nbytes = sum(f.stat().st_size for f in files)
    return {
        "instances_per_s": len(files) / elapsed,
        "mb_per_s": nbytes / 1e6 / elapsed,
        "seconds": elapsed,
        "receiver_cpu_s": cpu,
        "cpu_ms_per_instance": cpu * 1000 / len(files),
        "peak_rss_mb": rss,
    }


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ct-slices", type=int, default=300)
    ap.add_argument("--dx", type=int, default=20)
    ap.add_argument("--senders", type=int, default=4, help="associations at once (ct-concurrent)")
    ap.add_argument("--loads", default="ct,dx,ct-concurrent", help="comma-separated subset")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest.json")
    args = ap.parse_args()
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    unknown = set(loads) - {"ct", "dx", "ct-concurrent"}
    if unknown:
        ap.error(f"unknown load(s): {', '.join(sorted(unknown))}")
    for name in ("storescu", "storescp", "Orthanc"):
        tool(name)
    (ROOT / "var").mkdir(exist_ok=True)
    receivers: list[Receiver] = [StoreSCP(), Orthanc(), PacsAi()]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as data_dir:
        data = make_data(Path(data_dir), args.ct_slices, args.dx if "dx" in loads else 0)
        for load in loads:
            files = data["dx" if load == "dx" else "ct"]
            senders = args.senders if load == "ct-concurrent" else 1
            results[load] = {}
            # Interleave receivers run by run so that drift in disk speed hits all alike.
            runs: dict[str, list[dict[str, float]]] = {r.name: [] for r in receivers}
            for _ in range(args.runs):
                for r in receivers:
                    runs[r.name].append(one_run(r, files, senders))
            for r in receivers:
                results[load][r.name] = {"median": median_of(runs[r.name]), "runs": runs[r.name]}
    report(results, args)
    return 0


def report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    lines = []
    header = (
        "| load | receiver | instances/s | MB/s | receiver CPU s | CPU ms/instance | peak RSS MB |"
    )
    lines += [header, "|---|---|---:|---:|---:|---:|---:|"]
    ratios: dict[str, dict[str, float]] = {}
    for load, per in results.items():
        for name, res in per.items():
            m = res["median"]
            lines.append(
                f"| {load} | {name} | {m['instances_per_s']:.1f} | {m['mb_per_s']:.1f} | "
                f"{m['receiver_cpu_s']:.2f} | {m['cpu_ms_per_instance']:.2f} | "
                f"{m['peak_rss_mb']:.0f} |"
            )
        ours = per["pacs-ai"]["median"]["instances_per_s"]
        ratios[load] = {
            "vs_orthanc": ours / per["Orthanc"]["median"]["instances_per_s"],
            "vs_storescp": ours / per["dcmtk storescp"]["median"]["instances_per_s"],
            "cpu_vs_orthanc": per["pacs-ai"]["median"]["cpu_ms_per_instance"]
            / per["Orthanc"]["median"]["cpu_ms_per_instance"],
        }
    lines.append("")
    for load, r in ratios.items():
        lines.append(
            f"{load}: pacs-ai / Orthanc = {r['vs_orthanc']:.2f}x (target >= 2), "
            f"pacs-ai / storescp = {r['vs_storescp']:.2f}x (target >= 0.5); "
            f"CPU per instance pacs-ai / Orthanc = {r['cpu_vs_orthanc']:.2f}x"
        )
    print("\n".join(lines))
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "runs": args.runs,
                "senders": args.senders,
                "results": results,
                "ratios": ratios,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
