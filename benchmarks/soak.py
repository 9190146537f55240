"""Soak: a stream of DX and CT studies for N minutes with retention at its shortest.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--ct-every 5] [--sample-seconds 5]

Starts `pacs-ai serve` (SQLite, bundled demo models, no destinations: a study is finished
when it is reported or not applicable) with every retention age at 0 and the job every second,
then streams studies with dcmtk `storescu` (TCP_NODELAY=1): single-image DX 1024², and every
``--ct-every``-th study a 40-slice CT 256². The sender keeps at most ``--backlog`` studies
unfinished, so the pipeline (the slowest stage on a CPU) sets the pace and the spool measures
retention, not a queue. Every ``--sample-seconds`` it records, for the serve process and its
children: RSS, open file descriptors, threads; and the spool's bytes and the database's size
(with its WAL). At the end it prints start/end/max per metric and the growth per 1,000
studies (least-squares slope over the samples after the first minute), and writes
benchmarks/results/soak.json. Target: flat (within noise) spool, RSS and descriptors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import free_port, tool, wait_port  # noqa: E402
from pacs_ai.training import dicomwriter as dw  # noqa: E402
from pacs_ai.training.phantoms import ct_phantom, cxr_phantom  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
FINISHED = ("reported", "delivered", "not_applicable", "failed")
_UNFINISHED_SQL = "SELECT count(*) FROM studies WHERE state NOT IN (?, ?, ?, ?)"


def start_pacs_ai(
    workdir: Path, port: int, retention: bool, log_level: str
) -> subprocess.Popen[bytes]:
    cfg = workdir / "config.toml"
    cfg.write_text(
        f'[dicom]\nae_title = "PACS_AI"\nport = {port}\n'
        '[access]\nallowed = [{ ae_title = "STORESCU", host = "127.0.0.1" }]\n'
        '[storage]\npath = "spool"\nmin_free_mb = 100\n'
        '[database]\nurl = "sqlite:///pacs-ai.db"\n'
        "[assembly]\nct_quiet_seconds = 1.0\n"
        '[reports]\npath = "reports"\n'
        f"[retention]\nenabled = {str(retention).lower()}\ninterval_seconds = 1\nobjects_days = 0\n"
        "failed_objects_days = 0\nreports_days = 0\naudit_days = 0\nmin_free_mb = 0\n"
        f'[logging]\nlevel = "{log_level}"\n'
    )
    subprocess.run(
        [sys.executable, "-m", "pacs_ai", "db", "upgrade", "-c", str(cfg)],
        check=True,
        capture_output=True,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pacs_ai", "serve", "-c", str(cfg)],
        stderr=(workdir / "pacs-ai.log").open("wb"),
        cwd=workdir,
    )
    wait_port(port, proc, timeout=120)
    return proc


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (worker processes count too)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def process_stats(pid: int) -> dict[str, float]:
    rss = fds = threads = 0
    for p in _tree(pid):
        try:
            rss += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
            fds += len(os.listdir(f"/proc/{p}/fd"))
            status = Path(f"/proc/{p}/status").read_text()
            threads += int(status.split("Threads:")[1].split()[0])
        except (OSError, IndexError):
            continue
    return {"rss_mb": rss / 2**20, "open_files": fds, "threads": threads}


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):  # purged while walking
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


def db_bytes(workdir: Path) -> int:
    return sum(
        p.stat().st_size for p in (workdir / "pacs-ai.db", workdir / "pacs-ai.db-wal") if p.exists()
    )


def unfinished(workdir: Path) -> int:
    conn = sqlite3.connect(f"file:{workdir / 'pacs-ai.db'}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(_UNFINISHED_SQL, FINISHED)
        return int(row.fetchone()[0])
    finally:
        conn.close()


class Studies:
    """New UIDs for every study; pixels from a small pool (drawing phantoms is slow and the
    content does not change what is measured)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        rng = np.random.default_rng(0)
        self.dx = [cxr_phantom(k, rng, 1024) for k in ("covid", "pneumonia", "normal")]  # type: ignore[arg-type]
        self.ct = ct_phantom("covid", rng, (40, 256, 256))

    def make(self, n: int, ct: bool) -> list[Path]:
        out = self.folder / f"s{n}"
        out.mkdir()
        if ct:
            datasets = dw.ct_series(self.ct, study=dw.StudyInfo(), slice_thickness_mm=5.0)
        else:
            img = self.dx[n % len(self.dx)]
            datasets = [dw.xray_image(200 + img * 3700, modality="DX", study=dw.StudyInfo())]
        paths = []
        for i, ds in enumerate(datasets):
            paths.append(out / f"{i:04d}.dcm")
            dw.write(ds, paths[-1])
        return paths


def storescu(port: int, files: list[Path]) -> None:
    done = subprocess.run(
        [tool("storescu"), "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"storescu exited with {done.returncode}: {done.stdout[-2000:]}")


def growth_per_1000(
    samples: list[dict[str, float]], key: str, skip_s: float, until_s: float = float("inf")
) -> float:
    pts = [(s["studies"], s[key]) for s in samples if skip_s <= s["t_s"] <= until_s]
    xs = np.array([p[0] for p in pts], dtype=float)
    if len(pts) < 3 or xs.max() - xs.min() < 1:
        return float("nan")
    slope = np.polyfit(xs, np.array([p[1] for p in pts], dtype=float), 1)[0]
    return float(slope * 1000)


METRICS = (
    ("rss_mb", "RSS (MB, serve + children)"),
    ("open_files", "open file descriptors"),
    ("threads", "threads"),
    ("spool_mb", "spool (MB)"),
    ("reports_mb", "report files (MB)"),
    ("db_mb", "database + WAL (MB)"),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--ct-every", type=int, default=5, help="every Nth study is a CT")
    ap.add_argument("--backlog", type=int, default=2, help="most unfinished studies at once")
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--warmup-seconds", type=float, default=60.0, help="left out of the fit")
    ap.add_argument("--no-retention", action="store_true", help="baseline: retention off")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    ap.add_argument("--from-json", type=Path, help="only re-print the table of a saved run")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        args.out = ROOT / "var" / "soak-reprint.json"
        report(saved["samples"], saved["studies"], args)
        return 0
    (ROOT / "var").mkdir(exist_ok=True)
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        port = free_port()
        pacs = start_pacs_ai(work, port, not args.no_retention, args.log_level)
        studies = Studies(data)
        sent = 0
        t0 = time.monotonic()
        next_sample = t0
        try:
            while time.monotonic() - t0 < args.minutes * 60:
                if pacs.poll() is not None:
                    raise RuntimeError(f"pacs-ai serve exited with {pacs.returncode}")
                if unfinished(work) < args.backlog:
                    files = studies.make(sent, ct=args.ct_every > 0 and sent % args.ct_every == 1)
                    storescu(port, files)
                    for f in files:
                        f.unlink()
                    files[0].parent.rmdir()
                    sent += 1
                else:
                    time.sleep(0.05)
                if time.monotonic() >= next_sample:
                    next_sample += args.sample_seconds
                    s: dict[str, float] = {
                        "t_s": round(time.monotonic() - t0, 1),
                        "studies": sent,
                        **process_stats(pacs.pid),
                        "spool_mb": dir_bytes(work / "spool") / 2**20,
                        "reports_mb": dir_bytes(work / "reports") / 2**20,
                        "db_mb": db_bytes(work) / 2**20,
                    }
                    samples.append(s)
                    print(
                        f"{s['t_s']:7.0f} s  {sent:5d} studies  rss {s['rss_mb']:7.1f} MB  "
                        f"fds {s['open_files']:4.0f}  threads {s['threads']:3.0f}  "
                        f"spool {s['spool_mb']:7.2f} MB  reports {s['reports_mb']:6.2f} MB  "
                        f"db {s['db_mb']:6.2f} MB",
                        flush=True,
                    )
        finally:
            pacs.terminate()
            pacs.wait(timeout=120)
            kept = ROOT / "var" / "soak-pacs-ai.log"
            kept.write_bytes((work / "pacs-ai.log").read_bytes())
            print(f"pacs-ai log: {kept}")
    report(samples, sent, args)
    return 0


def report(samples: list[dict[str, float]], sent: int, args: argparse.Namespace) -> None:
    skip = args.warmup_seconds
    rows = [
        "| metric | start | end | max | growth per 1,000 studies | first half | second half |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary: dict[str, Any] = {}
    steady = [s for s in samples if s["t_s"] >= skip] or samples
    middle = (steady[0]["t_s"] + steady[-1]["t_s"]) / 2
    for key, label in METRICS:
        values = [s[key] for s in steady]
        g = growth_per_1000(samples, key, skip)
        g1 = growth_per_1000(samples, key, skip, middle)
        g2 = growth_per_1000(samples, key, middle)
        summary[key] = {
            "start": values[0],
            "end": values[-1],
            "max": max(values),
            "growth_per_1000_studies": g,
            "growth_per_1000_studies_first_half": g1,
            "growth_per_1000_studies_second_half": g2,
        }
        rows.append(
            f"| {label} | {values[0]:.1f} | {values[-1]:.1f} | {max(values):.1f} | {g:+.1f} | "
            f"{g1:+.1f} | {g2:+.1f} |"
        )
    minutes = samples[-1]["t_s"] / 60 if samples else 0.0
    rows.append("")
    rows.append(
        f"{sent} studies in {minutes:.1f} min (every {args.ct_every}th a 40-slice CT, else one "
        f"DX 1024²); start = first sample after {skip:g} s of warm-up; fit over the same samples"
    )
    print("\n".join(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "studies": sent,
                "summary": summary,
                "samples": samples,
            },
            indent=2,
        )
    )
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
