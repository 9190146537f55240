"""Scale: studies/min with 1 and 2 worker processes; gateway ingest with the S3 uploader on vs
local only; upload lag under a 300-slice CT. One run, ratios within it.

    .venv/bin/python benchmarks/scale.py [--quick] [--json FILE] [--readme FILE]
        [--workers 1x2,1x1,2x1] [--dx 40] [--ct 3] [--ct-slices 40] [--big-ct 300]

Real processes throughout: a scratch PostgreSQL database per measurement (from
PACS_AI_TEST_POSTGRES_URL, else postgres@127.0.0.1:5432; dropped afterwards), the tests'
single-node Ceph RGW (tests/integration/rgw.py) as the bucket, ``pacs-ai serve --role
gateway`` and ``--role worker`` processes, dcmtk ``storescu`` (TCP_NODELAY=1) as the modality.

1. **Workers.** A gateway (local storage) and ``--workers`` set-ups of ``--role worker``
   processes (``pipeline.workers = 1`` each, CPU models; default ``1x2,1x1,2x1``: 1 worker
   with 2 torch threads, 1 with 1 thread, 2 with 1 thread each). The machine's cores are
   split between the workers: each runs under ``taskset`` on its own CPUs with
   ``OMP_NUM_THREADS`` (torch's intra-op threads), the gateway unpinned. Once every role is
   up, one association sends ``--dx`` DX studies (2048², one image each) and ``--ct`` CT
   studies (``--ct-slices`` × 256²); timed from the start of the send until every study is in
   a final state (reported / not applicable / failed). studies/min = studies / that time; the
   states reached are recorded (phantoms: reported, so the models really run).
2. **Ingest.** A gateway alone (no workers) receives one ``--big-ct`` × 512² CT in one
   association, ``storage.backend = "local"`` vs ``"s3"`` (the uploader running in the same
   process). instances/s of the send, and the gateway's CPU ms per instance (uploader
   included); ``--ingest-runs`` pairs, interleaved, medians (a 1-2 s send swings with the
   shared disk; CPU per instance is the steadier number).
3. **Upload lag** (the s3 runs of 2): the largest number of instances waiting for upload
   (rows with ``uploaded_at`` NULL, sampled every 0.1 s; the largest over the runs), and the
   time from storescu's end (the last C-STORE Success) until the last instance is marked
   uploaded (median).

Prints a markdown table; ``--json FILE`` writes the numbers, ``--readme FILE`` replaces the
block between ``<!-- bench:scale:start -->`` and ``<!-- bench:scale:end -->`` in FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import cpu_seconds, free_port, tool  # noqa: E402
from pacs_ai.config import StorageSettings  # noqa: E402
from pacs_ai.db.models import Instance, Study, StudyState  # noqa: E402
from pacs_ai.storage.objects import S3Store  # noqa: E402
from pacs_ai.training import dicomwriter as dw  # noqa: E402
from pacs_ai.training.phantoms import ct_phantom, cxr_phantom  # noqa: E402
from tests.integration.rgw import RgwCluster  # noqa: E402

POSTGRES = os.environ.get(
    "PACS_AI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
FINAL = (StudyState.REPORTED, StudyState.DELIVERED, StudyState.NOT_APPLICABLE, StudyState.FAILED)
MARK = ("<!-- bench:scale:start -->", "<!-- bench:scale:end -->")


def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


@contextmanager
def scratch_database() -> Iterator[str]:
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"pacs_ai_scale_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class Role:
    """One ``pacs-ai serve --role ROLE`` process, optionally pinned with taskset."""

    def __init__(
        self, workdir: Path, name: str, role: str, env: dict[str, str], cpus: str | None = None
    ) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        pin = [tool("taskset"), "-c", cpus] if cpus else []
        cmd = [sys.executable, "-m", "pacs_ai", "serve", "--role", role, "-c", "config.toml"]
        self.proc = subprocess.Popen(
            [*pin, *cmd],
            cwd=workdir,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )
        self.marker = f"role {role}: runs"

    def started(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        return self.marker in self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def write_config(workdir: Path, url: str, port: int, storage: dict[str, Any]) -> None:
    store = "".join(
        f"{k} = {json.dumps(v)}\n"
        for k, v in {"path": "spool", "min_free_mb": 100, **storage}.items()
    )
    (workdir / "config.toml").write_text(
        f'[dicom]\nae_title = "PACS_AI"\nport = {port}\n'
        '[access]\nallowed = [{ ae_title = "STORESCU", host = "127.0.0.1" }]\n'
        f"[storage]\n{store}"
        f'[database]\nurl = "{url}"\n'
        "[assembly]\nxray_grace_seconds = 0.2\nct_quiet_seconds = 1.0\n"
        "sweep_interval_seconds = 0.2\n"
        "[pipeline]\npoll_seconds = 0.5\nworkers = 1\n"
        '[reports]\npath = "reports"\nobjects = ["sr"]\n'
        '[logging]\nlevel = "INFO"\n'
    )
    subprocess.run(
        [sys.executable, "-m", "pacs_ai", "db", "upgrade", "-c", "config.toml"],
        cwd=workdir,
        check=True,
        capture_output=True,
    )


def storescu(port: int, files: list[Path]) -> None:
    res = subprocess.run(
        [tool("storescu"), "-aec", "PACS_AI", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        timeout=900,
    )
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-2000:]}")


def make_data(out: Path, dx: int, ct: int, ct_slices: int, big_ct: int) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    files: dict[str, list[Path]] = {"batch": [], "big": []}
    # Phantoms, as benchmarks/e2e.py: random pixels would be gated out (not applicable).
    pool = [cxr_phantom(k, rng, 2048) for k in ("covid", "pneumonia", "normal")]
    for i in range(dx):
        p = out / "dx" / f"{i:04d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        img = pool[i % len(pool)]
        ds = dw.xray_image(
            200 + img * 3700, modality="DX", study=dw.StudyInfo(), pixel_spacing_mm=0.175
        )
        dw.write(ds, p)
        files["batch"].append(p)
    vol = ct_phantom("covid", rng, (ct_slices, 256, 256))
    for s in range(ct):
        for i, ds in enumerate(dw.ct_series(vol, study=dw.StudyInfo(), slice_thickness_mm=5.0)):
            p = out / f"ct{s}" / f"{i:04d}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            dw.write(ds, p)
            files["batch"].append(p)
    big = rng.normal(-600, 300, (512, 512)).astype(np.float32)
    volume = np.stack([big + rng.normal(0, 20, big.shape) for _ in range(big_ct)])
    for i, ds in enumerate(dw.ct_series(volume, slice_thickness_mm=1.0)):
        p = out / "big" / f"{i:04d}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        dw.write(ds, p)
        files["big"].append(p)
    return files


def workers_run(tmp: Path, spec: str, files: list[Path], studies: int) -> dict[str, Any]:
    """``spec``: "N" (N workers, the cores split between them, as many torch threads as CPUs
    each) or "NxT" (the same CPUs, T threads each)."""
    cores = os.cpu_count() or 1
    n_text, _, t_text = spec.partition("x")
    n = int(n_text)
    share = max(1, cores // n)
    threads = str(int(t_text) if t_text else share)
    workdir = tmp / f"workers-{spec}"
    workdir.mkdir()
    with scratch_database() as url:
        port = free_port()
        write_config(workdir, url, port, {})
        roles: list[Role] = []
        engine = create_engine(url)
        try:
            roles.append(Role(workdir, "gateway", "gateway", {}))
            for i in range(n):
                cpus = ",".join(str((i * share + k) % cores) for k in range(share))
                env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
                roles.append(Role(workdir, f"worker{i}", "worker", env, cpus))
            poll(lambda: all(r.started() for r in roles), 600, "roles started")

            def final() -> int:
                with engine.connect() as c:
                    q = select(func.count()).select_from(Study).where(Study.state.in_(FINAL))
                    return int(c.scalar(q) or 0)

            t0 = time.monotonic()
            storescu(port, files)
            poll(lambda: final() == studies, 900, "every study final")
            elapsed = time.monotonic() - t0
            with engine.connect() as c:
                q = select(Study.state, func.count()).group_by(Study.state)
                states = {str(k): int(v) for k, v in c.execute(q).all()}
        finally:
            for r in reversed(roles):
                r.stop()
            engine.dispose()
    return {
        "workers": n,
        "threads_per_worker": int(threads),
        "cpus_per_worker": share,
        "studies": studies,
        "seconds": round(elapsed, 2),
        "studies_per_min": round(studies * 60 / elapsed, 1),
        "states": states,
    }


def ingest_run(
    tmp: Path, backend: str, files: list[Path], rgw: RgwCluster | None, tag: int = 0
) -> dict[str, Any]:
    workdir = tmp / f"ingest-{backend}-{tag}"
    workdir.mkdir()
    storage: dict[str, Any] = {"backend": backend}
    env: dict[str, str] = {}
    if rgw is not None:
        storage |= {
            "s3_endpoint": rgw.endpoint,
            "s3_bucket": rgw.bucket,
            "s3_region": rgw.region,
            "s3_prefix": f"{backend}-{uuid.uuid4().hex[:6]}/",
        }
        env = rgw.client_env()
        os.environ.update(env)
        S3Store(StorageSettings(path=workdir / "spool", **storage)).ensure_bucket()
    with scratch_database() as url:
        port = free_port()
        write_config(workdir, url, port, storage)
        engine = create_engine(url)
        gateway = Role(workdir, "gateway", "gateway", env)
        samples: list[int] = []
        stop = threading.Event()

        def pending() -> int:
            with engine.connect() as c:
                q = select(func.count()).select_from(Instance).where(Instance.uploaded_at.is_(None))
                return int(c.scalar(q) or 0)

        def sampler() -> None:
            for _ in range(100_000):  # bounded: 0.1 s apart, stopped by the event
                samples.append(pending())
                if stop.wait(0.1):
                    return

        try:
            poll(gateway.started, 300, "gateway started")
            time.sleep(0.5)
            cpu0 = cpu_seconds(gateway.proc.pid)
            thread = threading.Thread(target=sampler, daemon=True) if rgw else None
            if thread:
                thread.start()
            t0 = time.monotonic()
            storescu(port, files)
            sent = time.monotonic() - t0
            lag = None
            if thread:
                t1 = time.monotonic()
                poll(lambda: pending() == 0, 600, "every instance uploaded")
                lag = time.monotonic() - t1
                stop.set()
                thread.join(timeout=5)
            cpu = cpu_seconds(gateway.proc.pid) - cpu0
            with engine.connect() as c:
                stored = int(c.scalar(select(func.count()).select_from(Instance)) or 0)
        finally:
            stop.set()
            gateway.stop()
            engine.dispose()
    if stored != len(files):
        raise RuntimeError(f"{backend}: {stored} instances recorded, {len(files)} sent")
    return {
        "backend": backend,
        "instances": len(files),
        "seconds": round(sent, 2),
        "instances_per_s": round(len(files) / sent, 1),
        "gateway_cpu_ms_per_instance": round(cpu * 1000 / len(files), 2),
        "max_pending": max(samples) if samples else None,
        "upload_lag_s": None if lag is None else round(lag, 2),
    }


def median_run(backend: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"backend": backend, "instances": runs[0]["instances"], "runs": runs}
    for k in ("seconds", "instances_per_s", "gateway_cpu_ms_per_instance", "upload_lag_s"):
        vals = [r[k] for r in runs if r[k] is not None]
        out[k] = round(statistics.median(vals), 2) if vals else None
    pend = [r["max_pending"] for r in runs if r["max_pending"] is not None]
    out["max_pending"] = max(pend) if pend else None
    return out


def table(res: dict[str, Any]) -> str:
    g = {r["backend"]: r for r in res["ingest"]}
    s3, local = g["s3"], g["local"]
    lines = [
        "| measurement | value | ratio |",
        "|---|---:|---:|",
    ]
    first = res["workers"][0]
    for r in res["workers"]:
        n = r["workers"]
        ratio = (
            f"{r['studies_per_min'] / first['studies_per_min']:.2f}× of the first row"
            if r is not first
            else ""
        )
        lines.append(
            f"| studies/min, {n} worker{'s' if n > 1 else ''} × {r['threads_per_worker']} "
            f"thread{'s' if r['threads_per_worker'] > 1 else ''} "
            f"({r['studies']} studies) | {r['studies_per_min']} | {ratio} |"
        )
    for r in (local, s3):
        ratio = (
            f"{s3['instances_per_s'] / local['instances_per_s']:.2f}× of local" if r is s3 else ""
        )
        lines.append(
            f"| ingest inst/s, CT {r['instances']} × 512², backend {r['backend']} | "
            f"{r['instances_per_s']} | {ratio} |"
        )
    for r in (local, s3):
        ratio = (
            f"{s3['gateway_cpu_ms_per_instance'] / local['gateway_cpu_ms_per_instance']:.2f}×"
            if r is s3
            else ""
        )
        lines.append(
            f"| gateway CPU ms / instance, backend {r['backend']} | "
            f"{r['gateway_cpu_ms_per_instance']} | {ratio} |"
        )
    lines.append(
        f"| upload lag: last C-STORE Success → last instance uploaded, s | {s3['upload_lag_s']} | "
        f"{s3['upload_lag_s'] / s3['seconds']:.2f}× of the send time |"
    )
    lines.append(f"| upload lag: most instances pending at once | {s3['max_pending']} | "
                 f"{s3['max_pending'] / s3['instances']:.2f}× of the study |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 DX, 1 CT, a 100-slice big CT")
    ap.add_argument("--dx", type=int, default=40)
    ap.add_argument("--ct", type=int, default=3)
    ap.add_argument("--ct-slices", type=int, default=40)
    ap.add_argument("--big-ct", type=int, default=300)
    ap.add_argument("--ingest-runs", type=int, default=3, help="local/s3 pairs (median)")
    ap.add_argument(
        "--workers",
        default="1x2,1x1,2x1",
        help="worker set-ups: N workers, or NxT with T torch threads each",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--readme", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.dx, args.ct, args.big_ct, args.ingest_runs = 10, 1, 100, 1
    for name in ("storescu", "taskset"):
        tool(name)
    (ROOT / "var").mkdir(exist_ok=True)
    started = time.monotonic()
    res: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("json", "readme")},
    }
    tmp = Path(tempfile.mkdtemp(prefix="pacs-ai-scale-", dir=ROOT / "var"))
    rgw = RgwCluster(tmp / "ceph")
    try:
        files = make_data(tmp / "data", args.dx, args.ct, args.ct_slices, args.big_ct)
        studies = args.dx + args.ct
        res["workers"] = [
            workers_run(tmp, spec, files["batch"], studies) for spec in args.workers.split(",")
        ]
        rgw.start()
        runs: dict[str, list[dict[str, Any]]] = {"local": [], "s3": []}
        for i in range(args.ingest_runs):  # interleaved: disk drift hits both alike
            runs["local"].append(ingest_run(tmp, "local", files["big"], None, i))
            runs["s3"].append(ingest_run(tmp, "s3", files["big"], rgw, i))
        res["ingest"] = [median_run(b, r) for b, r in runs.items()]
    finally:
        rgw.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    res["total_seconds"] = round(time.monotonic() - started, 1)
    out = table(res)
    print(out)
    print(f"\n{os.cpu_count()} CPUs; whole run {res['total_seconds']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    if args.readme:
        doc = args.readme.read_text()
        if MARK[0] in doc and MARK[1] in doc:
            head, rest = doc.split(MARK[0], 1)
            _, tail = rest.split(MARK[1], 1)
            args.readme.write_text(f"{head}{MARK[0]}\n{out}\n{MARK[1]}{tail}")
        else:
            print(f"{args.readme}: no {MARK[0]} … {MARK[1]} block, not updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
