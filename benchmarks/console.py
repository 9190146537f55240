"""Console and /metrics latency on a big database (not a test).

Seeds N studies (default 100,000) with M instances each (default 10: 1,000,000 instance rows),
one association, series, job, two findings, report and delivery per study, spread over 100
days, on SQLite and/or PostgreSQL (a scratch database on 127.0.0.1:5432, dropped afterwards);
then requests the overview, the studies list (plain and filtered) and /metrics over HTTP from
the console's own uvicorn server (one keep-alive connection, as a browser) and prints p50/p95
wall time and this process's CPU time per request.

    python benchmarks/console.py                       # both databases, full size
    python benchmarks/console.py --studies 10000 --db sqlite --json benchmarks/results/console.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacs_ai.config import settings_from_dict
from pacs_ai.db.models import (
    Association,
    Delivery,
    Finding,
    Instance,
    Job,
    Report,
    Series,
    Study,
    UserRole,
)
from pacs_ai.db.session import make_engine, upgrade

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STATES = ["delivered"] * 90 + ["not_applicable"] * 5 + ["failed"] * 2 + ["reported"] * 2 + ["ready"]
CHUNK = 20_000


def seed(engine: Engine, studies: int, per_study: int) -> float:
    """Bulk insert; returns seconds."""
    t0 = time.perf_counter()
    now = dt.datetime.now(dt.UTC)
    span = dt.timedelta(days=100).total_seconds()
    with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA synchronous=OFF")
    for start in range(0, studies, CHUNK // max(1, per_study) or 1):
        stop = min(studies, start + max(1, CHUNK // max(1, per_study)))
        rows: dict[Any, list[dict[str, Any]]] = {
            t: [] for t in (Association, Study, Series, Instance, Job, Finding, Report, Delivery)
        }
        for i in range(start, stop):
            sid = i + 1
            at = now - dt.timedelta(seconds=span * (1 - i / studies))
            state = STATES[i % len(STATES)]
            rows[Association].append(
                dict(
                    id=sid,
                    calling_ae="MODALITY" + str(i % 7),
                    called_ae="PACS_AI",
                    peer_host=f"10.0.0.{i % 250}",
                    peer_port=40000,
                    tls=False,
                    accepted=i % 50 != 0,
                    reject_reason=None,
                    started_at=at,
                    ended_at=at + dt.timedelta(seconds=2),
                    end_reason="released",
                    instances_stored=per_study,
                    instances_failed=0,
                    bytes_received=per_study * 500_000,
                )
            )
            rows[Study].append(
                dict(
                    id=sid,
                    study_uid=f"1.2.826.0.1.3680043.10.77.{sid}",
                    patient_id=f"P{sid}",
                    patient_name=f"Doe^Patient{sid}",
                    accession_number=f"A{sid}",
                    study_date=at.strftime("%Y%m%d"),
                    study_description="CHEST",
                    state=state,
                    revision=0,
                    instance_count=per_study,
                    first_received_at=at,
                    last_received_at=at,
                    ready_at=at + dt.timedelta(seconds=1),
                    state_changed_at=at + dt.timedelta(seconds=3),
                )
            )
            rows[Series].append(
                dict(
                    id=sid,
                    study_id=sid,
                    series_uid=f"1.2.826.0.1.3680043.10.77.{sid}.1",
                    modality="CT" if i % 10 == 0 else "DX",
                    body_part="CHEST",
                    state="complete",
                    instance_count=per_study,
                    last_received_at=at,
                    last_association_id=sid,
                    completed_at=at + dt.timedelta(seconds=1),
                )
            )
            for k in range(per_study):
                iid = i * per_study + k + 1
                rows[Instance].append(
                    dict(
                        id=iid,
                        study_id=sid,
                        series_id=sid,
                        association_id=sid,
                        sop_instance_uid=f"1.2.826.0.1.3680043.10.77.{sid}.1.{k}",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        instance_number=k,
                        size_bytes=500_000,
                        sha256=f"{iid:064x}",
                        path=f"objects/{iid:064x}",
                        received_at=at,
                        times_received=1,
                    )
                )
            if state in ("delivered", "reported", "failed"):
                rows[Job].append(
                    dict(
                        id=sid,
                        study_id=sid,
                        study_revision=0,
                        attempt=1,
                        state="succeeded" if state != "failed" else "dead",
                        models="pacs-ai-cxr-demo 1.0",
                        device="cpu",
                        started_at=at + dt.timedelta(seconds=1),
                        finished_at=at + dt.timedelta(seconds=2),
                        duration_ms=900.0 + i % 300,
                    )
                )
                if state != "failed":
                    for j, label in enumerate(("covid", "pneumonia")):
                        p = ((i * 7 + j * 13) % 100) / 100
                        rows[Finding].append(
                            dict(
                                id=2 * sid + j,
                                job_id=sid,
                                series_id=sid,
                                model_name="pacs-ai-cxr-demo",
                                model_version="1.0",
                                label=label,
                                probability=p,
                                threshold=0.5,
                                present=p >= 0.5,
                            )
                        )
                    rows[Report].append(
                        dict(
                            id=sid,
                            study_id=sid,
                            job_id=sid,
                            study_revision=0,
                            kind="sr",
                            sop_instance_uid=f"1.2.826.0.1.3680043.10.78.{sid}",
                            series_instance_uid=f"1.2.826.0.1.3680043.10.79.{sid}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                            path=f"study-{sid}/sr.dcm",
                            created_at=at + dt.timedelta(seconds=2),
                        )
                    )
                    rows[Delivery].append(
                        dict(
                            id=sid,
                            report_id=sid,
                            study_id=sid,
                            destination="pacs",
                            ae_title="PACS",
                            host="10.0.0.1",
                            port=104,
                            state="delivered" if state == "delivered" else "dead",
                            attempts=1,
                            created_at=at + dt.timedelta(seconds=2),
                            delivered_at=at + dt.timedelta(seconds=3)
                            if state == "delivered"
                            else None,
                        )
                    )
        with engine.begin() as conn:
            for table, values in rows.items():
                if values:
                    conn.execute(insert(table), values)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            for t in (
                "associations",
                "studies",
                "series",
                "instances",
                "jobs",
                "findings",
                "reports",
                "deliveries",
            ):
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "  # noqa: S608
                    f"(SELECT max(id) FROM {t}))"
                )
        else:
            conn.exec_driver_sql("ANALYZE")
    if engine.dialect.name == "postgresql":  # as autovacuum would have: index-only scans work
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    return time.perf_counter() - t0


def measure(engine: Engine, url: str, workdir: Path, repeat: int) -> dict[str, Any]:
    """Real HTTP through uvicorn (as in service) with one keep-alive connection."""
    import http.client
    import socket

    from pacs_ai.web import HttpServer, WebContext, build_app
    from pacs_ai.web.users import add_user

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = settings_from_dict(
        {
            "database": {"url": url},
            "storage": {"path": str(workdir / "spool")},
            "http": {"enabled": True, "port": port, "secret_key_file": str(workdir / "key")},
        },
        base=workdir,
    )
    add_user(engine, "bench", UserRole.ADMIN, "bench password")
    server = HttpServer(
        settings.http, build_app(WebContext(settings, engine, lambda: True, lambda: True))
    )
    server.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    cookie = ""

    def get(path: str, body: str | None = None) -> tuple[int, str]:
        nonlocal cookie
        headers = {"Cookie": cookie} if cookie else {}
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
        rsp = conn.getresponse()
        data = rsp.read().decode()
        set_cookie = rsp.getheader("set-cookie")
        if set_cookie:
            cookie = set_cookie.split(";")[0]
        return rsp.status, data

    try:
        _, page = get("/login")
        token = page.split('name="csrf" value="')[1].split('"')[0]
        status, _ = get("/login", f"username=bench&password=bench+password&csrf={token}&next=/")
        assert status == 303, status
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        assert get("/metrics")[0] == 200
        out["metrics_first_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        with engine.connect() as c:
            max_id = c.scalar(text("SELECT max(id) FROM studies")) or 0
        pages = {
            "overview": "/",
            "studies": "/studies",
            "studies_page_10": f"/studies?before={max(1, max_id - 450)}",
            "studies_state_failed": "/studies?state=failed",
            "studies_finding_covid": "/studies?finding=covid",
            "metrics": "/metrics",
        }
        for name, path in pages.items():
            times, cpu = [], []
            for _ in range(repeat):
                t, c0 = time.perf_counter(), time.process_time()
                status, _ = get(path)
                times.append((time.perf_counter() - t) * 1000)
                cpu.append((time.process_time() - c0) * 1000)
                assert status == 200, (path, status)
            times.sort()
            out[name] = {
                "p50_ms": round(statistics.median(times), 1),
                "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1),
                "cpu_p50_ms": round(statistics.median(cpu), 1),
            }
    finally:
        conn.close()
        server.stop()
    return out


def run(backend: str, studies: int, per_study: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pacs-ai-console-bench-") as tmp:
        workdir = Path(tmp)
        admin = None
        if backend == "sqlite":
            url = f"sqlite:///{workdir / 'bench.db'}"
        else:
            admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
            name = f"pacs_ai_bench_{uuid.uuid4().hex[:8]}"
            with admin.connect() as c:
                c.execute(text(f'CREATE DATABASE "{name}"'))
            url = make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
        try:
            settings = settings_from_dict({"database": {"url": url}}, base=workdir)
            engine = make_engine(settings.database)
            upgrade(engine)
            seconds = seed(engine, studies, per_study)
            print(
                f"{backend}: seeded {studies} studies, {studies * per_study} instances "
                f"in {seconds:.0f} s",
                flush=True,
            )
            result = measure(engine, url, workdir, repeat)
            result["seed_seconds"] = round(seconds, 1)
            engine.dispose()
        finally:
            if admin is not None:
                with admin.connect() as c:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--instances-per-study", type=int, default=10)
    ap.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/results/console.json"))
    args = ap.parse_args()
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results = {b: run(b, args.studies, args.instances_per_study, args.repeat) for b in backends}
    names = [
        "overview",
        "studies",
        "studies_page_10",
        "studies_state_failed",
        "studies_finding_covid",
        "metrics",
    ]
    print(
        f"\n{args.studies} studies, {args.studies * args.instances_per_study} instances; "
        f"{args.repeat} requests per page; wall p50/p95 and this process's CPU p50 (ms)"
    )
    print(f"{'page':24}" + "".join(f"{b + ' p50':>16}{'p95':>8}{'cpu':>8}" for b in backends))
    for n in names:
        cells = "".join(
            f"{results[b][n]['p50_ms']:>16.1f}{results[b][n]['p95_ms']:>8.1f}"
            f"{results[b][n]['cpu_p50_ms']:>8.1f}"
            for b in backends
        )
        print(f"{n:24}{cells}")
    first = "".join(f"{results[b]['metrics_first_ms']:>16.1f}{'':>16}" for b in backends)
    print(f"{'metrics, first scrape':24}{first}")
    print("cpu: server and client in this process; SQLite's work included, PostgreSQL's not")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "studies": args.studies,
                "instances": args.studies * args.instances_per_study,
                "repeat": args.repeat,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
