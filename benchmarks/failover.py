"""Fail-over: a worker killed (-9) mid-study; how long until another worker has reported it.

    .venv/bin/python benchmarks/failover.py [--runs 2] [--stalled 30] [--heartbeat 5] [--retry 10]

One `pacs-ai serve --role gateway` and two `--role worker` processes on a scratch PostgreSQL
database (from PACS_AI_TEST_POSTGRES_URL, else postgres@127.0.0.1:5432). Worker A hangs in
every study (the test hook PACS_AI_TEST_WORKER_FAULT=hang), so it is mid-study when killed;
worker B is healthy. Measured from the kill: until B's attempt 2 is claimed (stalled detection
+ retry delay) and until the study is `reported`; and the SR reports and outbox rows of the
study (1 and 1 expected). Prints a table, writes benchmarks/results/failover.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import Engine, make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.ingest import free_port, tool  # noqa: E402
from pacs_ai.db.models import Delivery, Job, Report, Study, StudyState  # noqa: E402
from pacs_ai.scoring_worker import FAULT_ENV  # noqa: E402
from pacs_ai.training import dicomwriter as dw  # noqa: E402
from pacs_ai.training.phantoms import cxr_phantom  # noqa: E402

POSTGRES = os.environ.get(
    "PACS_AI_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Role:
    def __init__(self, workdir: Path, name: str, role: str, env: dict[str, str]) -> None:
        self.log = workdir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pacs_ai", "serve", "--role", role, "-c", "config.toml"],
            cwd=workdir,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        )

        def started() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {self.log.read_text()[-2000:]}")
            return f"role {role}: runs" in self.log.read_text()

        poll(started, 300, f"{name} started")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def write_config(workdir: Path, url: str, port: int, args: argparse.Namespace) -> None:
    (workdir / "config.toml").write_text(
        f'[dicom]\nae_title = "PACS_AI"\nport = {port}\n'
        '[access]\nallowed = [{ ae_title = "STORESCU", host = "127.0.0.1" }]\n'
        '[storage]\npath = "spool"\nmin_free_mb = 100\n'
        f'[database]\nurl = "{url}"\n'
        "[assembly]\nxray_grace_seconds = 0.2\n"
        f"[pipeline]\npoll_seconds = 0.5\nretry_seconds = [{args.retry}, {args.retry}]\n"
        f"heartbeat_seconds = {args.heartbeat}\nstalled_seconds = {args.stalled}\n"
        '[reports]\npath = "reports"\nobjects = ["sr"]\n'
        # Nobody listens there: the outbox row stays, which is what is counted.
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {free_port()}\n"
        '[logging]\nlevel = "INFO"\n'
    )


def one_run(workdir: Path, engine: Engine, port: int, seed: int) -> dict[str, Any]:
    gateway = Role(workdir, f"gateway-{seed}", "gateway", {})
    a = Role(workdir, f"worker-a-{seed}", "worker", {FAULT_ENV: "hang"})
    b: Role | None = None
    try:
        img = cxr_phantom("covid", np.random.default_rng(seed), 512)
        ds = dw.xray_image(200 + img * 3500, modality="DX")
        path = workdir / f"dx-{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        uid = str(ds.StudyInstanceUID)
        subprocess.run(
            [tool("storescu"), "-aec", "PACS_AI", "127.0.0.1", str(port), str(path)],
            check=True,
            capture_output=True,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
            timeout=60,
        )

        def attempts() -> int:
            with engine.connect() as c:
                return int(
                    c.scalar(
                        select(func.count())
                        .select_from(Job)
                        .join(Study)
                        .where(Study.study_uid == uid)
                    )
                    or 0
                )

        poll(lambda: attempts() == 1, 120, "worker A mid-study")
        b = Role(workdir, f"worker-b-{seed}", "worker", {})
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        killed = time.monotonic()
        poll(lambda: attempts() == 2, 600, "the retry claimed")
        claimed = time.monotonic() - killed

        def reported() -> bool:
            with engine.connect() as c:
                state = c.scalar(select(Study.state).where(Study.study_uid == uid))
            return state == StudyState.REPORTED

        poll(reported, 600, "reported")
        done = time.monotonic() - killed
        with engine.connect() as c:
            sid = c.scalar(select(Study.id).where(Study.study_uid == uid))
            srs = c.scalar(select(func.count()).where(Report.study_id == sid, Report.kind == "sr"))
            outbox = c.scalar(select(func.count()).where(Delivery.study_id == sid))
        return {
            "kill_to_retry_claimed_s": claimed,
            "kill_to_reported_s": done,
            "sr_reports": srs,
            "outbox_rows": outbox,
        }
    finally:
        for r in (b, a, gateway):
            if r is not None:
                r.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--stalled", type=float, default=30.0, help="pipeline.stalled_seconds")
    ap.add_argument("--heartbeat", type=float, default=5.0, help="pipeline.heartbeat_seconds")
    ap.add_argument("--retry", type=float, default=10.0, help="pipeline.retry_seconds[0]")
    args = ap.parse_args()
    admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    name = f"pacs_ai_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES).set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            port = free_port()
            write_config(workdir, url, port, args)
            subprocess.run(
                [sys.executable, "-m", "pacs_ai", "db", "upgrade", "-c", "config.toml"],
                cwd=workdir,
                check=True,
                capture_output=True,
            )
            for run in range(args.runs):
                rows.append(one_run(workdir, engine, port, seed=100 + run))
    finally:
        engine.dispose()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(
        f"stalled_seconds {args.stalled:g}, heartbeat_seconds {args.heartbeat:g}, "
        f"first retry {args.retry:g} s; {platform.processor() or platform.machine()}"
    )
    print(f"{'run':>3} | {'kill→retry claimed s':>20} | {'kill→reported s':>15} | SR | outbox")
    for i, r in enumerate(rows, 1):
        print(
            f"{i:>3} | {r['kill_to_retry_claimed_s']:>20.1f} | {r['kill_to_reported_s']:>15.1f} "
            f"| {r['sr_reports']:>2} | {r['outbox_rows']:>6}"
        )
    out = ROOT / "benchmarks" / "results" / "failover.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
