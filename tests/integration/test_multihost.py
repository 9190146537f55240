"""Issue 12 item 5: hosts apart on one machine (tests/integration/netns.py). Two gateways, two
workers and a sender, each ``pacs-ai serve --role X`` in a network namespace of its own; the
database (PostgreSQL) and the object store (Ceph RGW) on hosts of their own, reached across the
bridge; a real Orthanc (root namespace, at the bridge's address) receives the SRs; dcmtk's
storescu sends from the root namespace. Each scenario asserts outcomes in the database, the
bucket and Orthanc:

(a) a worker killed mid-study: the other finishes it after ``stalled_seconds`` (seconds, not a
    10-minute lease); one SR;
(b) a worker's link cut mid-study, then restored: the other finishes it, the first one's late
    commit is refused; one SR;
(d) the same study sent to both gateways: one study, one SR;
(c) RGW killed during ingest: C-STORE succeeds into the local buffer up to its watermark, then
    0xA700; everything is uploaded once RGW is back, nothing lost.

One network, database, RGW, Orthanc, two gateways and the sender per module; the workers are
started per scenario (the faulty one first, so it is the one that claims the study). Timings
(kill or cut -> reported) are printed (``pytest -s``) for the closing notes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import Engine, create_engine, func, select

from pacs_ai.db.models import Delivery, DeliveryState, Instance, JobState, Report, Study, StudyState
from pacs_ai.scoring_worker import FAULT_ENV
from tests.conftest import SCU_AE, ct_datasets, make_settings, wait_for, write_all
from tests.integration.netns import Host, Network, PostgresHost, wait_for_port
from tests.integration.orthanc import Orthanc
from tests.integration.process import ServerProcess, write_config
from tests.integration.rawpeer import EXPLICIT_LE, Accepted, RawPeer, encode_dataset
from tests.integration.rgw import RgwCluster
from tests.integration.test_e2e import chest_dx
from tests.integration.test_ingest import CT
from tests.integration.test_queue import INTERRUPTED, RoleProcess, _counts, _jobs, _state
from tests.tools import require_tool

pytestmark = pytest.mark.slow  # the module's set-up alone takes about a minute here

DICOM_PORT = 11112
WATERMARK_MB = 1


class BridgeOrthanc(Orthanc):
    """Orthanc in the root namespace (DICOM on every interface, so at ``network.gateway``),
    accepting stores from the sender host's address only."""

    def __init__(self, workdir: Path, sender_address: str) -> None:
        super().__init__(workdir, {"pacsai": ("PACS_AI", 1)})
        self.sender_address = sender_address

    def _config(self) -> dict[str, Any]:
        config = super()._config()
        config["DicomModalities"] = {"pacsai": ["PACS_AI", self.sender_address, 1]}
        return config


@dataclass
class Cluster:
    network: Network
    workdir: Path
    db: PostgresHost
    rgw: RgwCluster
    orthanc: BridgeOrthanc
    engine: Engine
    hosts: dict[str, Host]
    procs: list[RoleProcess] = field(default_factory=list)
    gateways: dict[str, RoleProcess] = field(default_factory=dict)

    def config(self, name: str) -> Path:
        """The configuration of the process ``name`` (its own spool, cache and reports)."""
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        host = self.hosts[name[:2]]
        settings = make_settings(
            home,
            self.db.url,
            dicom={"host": host.address, "port": DICOM_PORT},
            access={
                "allowed": [
                    {"ae_title": "STORESCU", "host": self.network.gateway},
                    {"ae_title": SCU_AE, "host": self.network.gateway},
                ]
            },
            http={"enabled": False},
            service={"node_name": name},  # the hosts share one host name (one UTS namespace)
            storage={
                "path": str(home / "spool"),
                "min_free_mb": 1,
                "backend": "s3",
                "s3_endpoint": self.rgw.endpoint,
                "s3_bucket": self.rgw.bucket,
                "s3_region": self.rgw.region,
                "s3_timeout_seconds": 3.0,
                "s3_cache_path": str(home / "cache"),
                "upload_poll_seconds": 0.1,
                "upload_max_backoff_seconds": 0.5,
                "local_buffer_high_watermark_mb": WATERMARK_MB,
            },
            pipeline={
                "enabled": True,
                "poll_seconds": 0.2,
                "retry_seconds": [0.5, 0.5],
                "heartbeat_seconds": 1.0,
                "stalled_seconds": 4.0,
            },
            reports={"objects": ["sr"], "path": str(home / "reports")},
            destinations=[
                {
                    "name": "orthanc",
                    "ae_title": self.orthanc.aet,
                    "host": self.network.gateway,
                    "port": self.orthanc.dicom_port,
                    "objects": ["sr"],
                    "timeout_seconds": 10,
                }
            ],
            delivery={"retry_ladder_seconds": [0.5], "poll_seconds": 0.3},
            logging={"level": "INFO"},
        )
        return write_config(settings, home / "config.toml")

    def start(self, name: str, role: str, fault: str | None = None) -> RoleProcess:
        """``pacs-ai serve --role ROLE`` on host ``name[:2]`` (g1, g2, w1, w2, sd)."""
        proc = RoleProcess(self.config(name), self.workdir / f"{name}.log")
        self.procs.append(proc)
        env = {
            "PACS_AI_S3_ACCESS_KEY_ID": self.rgw.access_key,
            "PACS_AI_S3_SECRET_ACCESS_KEY": self.rgw.secret_key,
        }
        if fault is not None:
            env[FAULT_ENV] = fault
        t0 = time.monotonic()
        proc.start_role(role, env, prefix=self.hosts[name[:2]].command([]))
        print(f"\n[multihost] {name} ({role}) started in {time.monotonic() - t0:.1f} s")
        return proc

    def stop_workers(self) -> None:
        for proc in self.procs:
            running = proc.proc is not None and proc.proc.poll() is None
            if running and proc.config.parent.name.startswith("w"):
                proc.terminate(timeout=60)

    def bucket_keys(self, prefix: str = "") -> set[str]:
        client = boto3.client(
            "s3",
            endpoint_url=self.rgw.endpoint,
            aws_access_key_id=self.rgw.access_key,
            aws_secret_access_key=self.rgw.secret_key,
            region_name=self.rgw.region,
        )
        keys: set[str] = set()
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.rgw.bucket, Prefix=prefix
        ):
            keys |= {str(o["Key"]) for o in page.get("Contents", [])}
        return keys


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tool("storescu")
    require_tool("Orthanc")
    network = Network()
    pg = None
    rgw = None
    orthanc = None
    engine = None
    procs: list[RoleProcess] = []
    try:
        t0 = time.monotonic()
        hosts = {label: network.host(label) for label in ("db", "s3", "g1", "g2", "w1", "w2", "sd")}
        pg = PostgresHost(hosts["db"])
        workdir = tmp_path_factory.mktemp("multihost")
        rgw = RgwCluster(
            workdir / "rgw",
            prefix=tuple(hosts["s3"].command([])),
            rgw_address=hosts["s3"].address,
        )
        rgw.start()
        client = boto3.client(
            "s3",
            endpoint_url=rgw.endpoint,
            aws_access_key_id=rgw.access_key,
            aws_secret_access_key=rgw.secret_key,
            region_name=rgw.region,
        )
        client.create_bucket(Bucket=rgw.bucket)
        orthanc = BridgeOrthanc(workdir / "orthanc", hosts["sd"].address)
        orthanc.start()
        engine = create_engine(pg.url)
        c = Cluster(network, workdir, pg, rgw, orthanc, engine, hosts, procs)
        done = ServerProcess(c.config("db"), workdir / "db.log").cli(
            "db", "upgrade", "--config", str(workdir / "db" / "config.toml")
        )
        assert done.returncode == 0, done.stderr
        for name in ("g1", "g2"):
            c.gateways[name] = c.start(name, "gateway")
            wait_for_port(None, hosts[name].address, DICOM_PORT, 30)
        c.start("sd", "sender")
        print(f"\n[multihost] set-up in {time.monotonic() - t0:.1f} s (rgw {rgw.startup_seconds})")
        yield c
    finally:
        for p in procs:
            p.stop()
        if engine is not None:
            engine.dispose()
        if orthanc is not None:
            orthanc.stop()
        if rgw is not None:
            rgw.stop()
        network.close()
        if pg is not None:
            pg.stop()


def _storescu(address: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("storescu"), "-aec", "PACS_AI", address, str(DICOM_PORT), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        check=False,
    )


def _send(c: Cluster, gateway: str, files: list[Path]) -> None:
    done = _storescu(c.hosts[gateway].address, files)
    assert done.returncode == 0 and "Status" not in done.stderr, done.stderr


def _instances(engine: Engine, study_uid: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(Instance.sop_instance_uid, Instance.sha256, Instance.uploaded_at)
                .join(Study, Study.id == Instance.study_id)
                .where(Study.study_uid == study_uid)
                .order_by(Instance.id)
            )
        )


def _reports(engine: Engine, study_uid: str) -> list[Any]:
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(Report.kind, Report.path, Report.uploaded_at, Report.sop_instance_uid)
                .join(Study, Study.id == Report.study_id)
                .where(Study.study_uid == study_uid)
            )
        )


def _deliveries(engine: Engine, study_uid: str) -> list[DeliveryState]:
    with engine.connect() as conn:
        return list(
            conn.scalars(
                select(Delivery.state)
                .join(Study, Study.id == Delivery.study_id)
                .where(Study.study_uid == study_uid)
            )
        )


def _one_sr_everywhere(c: Cluster, study_uid: str) -> None:
    """Exactly one SR: in the database (report, delivery delivered), in the bucket (the
    instances under their sha256, the report under reports/) and in Orthanc."""
    wait_for(
        lambda: _deliveries(c.engine, study_uid) == [DeliveryState.DELIVERED],
        timeout=60,
        what="the SR delivered",
    )
    wait_for(
        lambda: len(c.orthanc.find_instances(study_uid)) >= 1, timeout=30, what="SR in Orthanc"
    )
    [sr] = c.orthanc.find_instances(study_uid)
    [report] = _reports(c.engine, study_uid)
    assert report.kind == "sr"
    assert sr["MainDicomTags"]["SOPInstanceUID"] == report.sop_instance_uid
    wait_for(
        lambda: all(r.uploaded_at is not None for r in _reports(c.engine, study_uid)),
        timeout=30,
        what="the report uploaded",
    )
    keys = c.bucket_keys()
    assert f"reports/{report.path}" in keys
    rows = _instances(c.engine, study_uid)
    assert rows and all(r.uploaded_at is not None and r.sha256 in keys for r in rows)
    srs, outbox, findings = _counts(c.engine, study_uid)
    assert (srs, outbox) == (1, 1) and findings > 0
    wait_for(
        lambda: _state(c.engine, study_uid) == StudyState.DELIVERED, timeout=10, what="delivered"
    )


def _scored(c: Cluster, study_uid: str) -> bool:
    return _state(c.engine, study_uid) in (StudyState.REPORTED, StudyState.DELIVERED)


def _running_by(c: Cluster, study_uid: str, proc: RoleProcess) -> bool:
    jobs = _jobs(c.engine, study_uid)
    assert proc.proc is not None
    return [(a, s) for a, s, _, _ in jobs] == [(1, JobState.RUNNING)] and str(jobs[0][3]).endswith(
        f":{proc.proc.pid}"
    )


def test_a_worker_killed_mid_study_another_finishes_it(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    w1 = c.start("w1", "worker", fault="hang")  # mid-study for as long as needed
    dx = chest_dx("covid", seed=71)
    uid = str(dx.StudyInstanceUID)
    _send(c, "g1", write_all([dx], tmp_path / "a"))
    wait_for(lambda: _running_by(c, uid, w1), timeout=60, what="worker 1 mid-study")
    w2 = c.start("w2", "worker")
    assert _running_by(c, uid, w1)  # its heartbeats keep it
    killed = time.monotonic()
    w1.kill9()
    wait_for(lambda: _scored(c, uid), timeout=90, what="recovered")
    took = time.monotonic() - killed
    print(f"\n[multihost] (a) kill -9 -> reported by the other worker: {took:.1f} s")
    jobs = _jobs(c.engine, uid)
    assert [(a, s, e) for a, s, e, _ in jobs] == [
        (1, JobState.FAILED, INTERRUPTED),
        (2, JobState.SUCCEEDED, None),
    ]
    assert w2.proc is not None and str(jobs[1][3]).endswith(f":{w2.proc.pid}")
    _one_sr_everywhere(c, uid)
    print(f"[multihost] (a) kill -9 -> SR in Orthanc: {time.monotonic() - killed:.1f} s")
    c.stop_workers()


def test_a_worker_cut_off_mid_study_its_late_commit_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    c.stop_workers()
    release = tmp_path / "release"  # worker 1's scoring answers once this exists
    w1 = c.start("w1b", "worker", fault=f"until:{release}")
    dx = chest_dx("covid", seed=72)
    uid = str(dx.StudyInstanceUID)
    _send(c, "g2", write_all([dx], tmp_path / "b"))
    wait_for(lambda: _running_by(c, uid, w1), timeout=60, what="worker 1 mid-study")
    # Cut once it is scoring (its files read, nothing committed yet).
    waiting = tmp_path / "release.waiting"
    wait_for(waiting.exists, timeout=60, what="worker 1 scoring")
    w2 = c.start("w2b", "worker")
    assert _running_by(c, uid, w1)
    c.hosts["w1"].cut()
    cut = time.monotonic()
    wait_for(lambda: _scored(c, uid), timeout=90, what="recovered")
    print(f"\n[multihost] (b) cut -> reported by the other worker: {time.monotonic() - cut:.1f} s")
    jobs = _jobs(c.engine, uid)
    assert [(a, s, e) for a, s, e, _ in jobs] == [
        (1, JobState.FAILED, INTERRUPTED),
        (2, JobState.SUCCEEDED, None),
    ]
    assert w2.proc is not None and str(jobs[1][3]).endswith(f":{w2.proc.pid}")
    _one_sr_everywhere(c, uid)
    done = _counts(c.engine, uid)
    # The link comes back and worker 1's scoring answers: its commit is refused.
    c.hosts["w1"].restore()
    release.touch()
    restored = time.monotonic()
    wait_for(
        lambda: "stale attempt" in w1.log_path.read_text().lower(),
        timeout=60,
        what="worker 1's late commit refused",
    )
    print(f"[multihost] (b) restore -> late commit refused: {time.monotonic() - restored:.1f} s")
    assert w1.proc is not None and w1.proc.poll() is None  # refused, not crashed
    assert _jobs(c.engine, uid) == jobs
    assert _counts(c.engine, uid) == done
    assert _state(c.engine, uid) == StudyState.DELIVERED
    time.sleep(1.0)  # a delivery poll (0.3 s) or three: nothing new may reach Orthanc
    assert len(c.orthanc.find_instances(uid)) == 1
    assert len(_reports(c.engine, uid)) == 1


def test_the_same_study_to_both_gateways_one_study_one_sr(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    dx = chest_dx("normal", seed=73)
    uid = str(dx.StudyInstanceUID)
    files = write_all([dx], tmp_path / "d")
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def send(gateway: str) -> None:
        results[gateway] = _storescu(c.hosts[gateway].address, files)

    threads = [threading.Thread(target=send, args=(g,)) for g in ("g1", "g2")]
    sent = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert sorted(results) == ["g1", "g2"]
    assert all(r.returncode == 0 for r in results.values()), results
    wait_for(lambda: _scored(c, uid), timeout=120, what="reported")
    print(f"\n[multihost] (d) sent to both -> reported: {time.monotonic() - sent:.1f} s")
    with c.engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(Study.study_uid == uid)) == 1
    assert [(a, s, e) for a, s, e, _ in _jobs(c.engine, uid)] == [(1, JobState.SUCCEEDED, None)]
    assert [r.sop_instance_uid for r in _instances(c.engine, uid)] == [dx.SOPInstanceUID]
    # One row, of the gateway that recorded it first (the other's was a duplicate): that
    # gateway's uploader put it in the bucket.
    with c.engine.connect() as conn:
        owner, uploaded = conn.execute(
            select(Instance.gateway, Instance.uploaded_at).where(
                Instance.sop_instance_uid == str(dx.SOPInstanceUID)
            )
        ).one()
    assert owner in ("g1", "g2") and uploaded is not None
    _one_sr_everywhere(c, uid)
    c.stop_workers()


def test_rgw_killed_during_ingest_buffer_then_a700_then_nothing_lost(cluster: Cluster) -> None:
    c = cluster
    c.stop_workers()  # ingest only: nobody scores the series meanwhile
    c.rgw.stop_rgw()
    killed = time.monotonic()
    # 128x128 CT slices of about 33 kB: the 1 MB buffer takes about 32 of them.
    series = ct_datasets(80, size=128, seed=74)
    uid = str(series[0].StudyInstanceUID)
    raw = RawPeer(c.hosts["g1"].address, DICOM_PORT, timeout=30.0)
    accepted = raw.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])])
    assert isinstance(accepted, Accepted)
    cx = next(iter(accepted.contexts))
    statuses: list[int] = []
    for ds in series:
        statuses.append(raw.c_store(cx, CT, ds.SOPInstanceUID, encode_dataset(ds)))
        if statuses[-1] != 0:
            break
    raw.release()
    assert statuses[-1] == 0xA700, statuses
    assert set(statuses[:-1]) == {0}
    stored = len(statuses) - 1
    assert stored * 33_000 >= WATERMARK_MB * 1024 * 1024 * 0.9
    rows = _instances(c.engine, uid)
    assert len(rows) == stored and all(r.uploaded_at is None for r in rows)
    print(f"\n[multihost] (c) RGW away: {stored} instances buffered, then 0xA700")

    c.rgw.start_rgw()
    back = time.monotonic()
    wait_for(
        lambda: all(r.uploaded_at is not None for r in _instances(c.engine, uid)),
        timeout=90,
        what="the backlog uploaded",
    )
    print(
        f"[multihost] (c) RGW back -> {stored} uploaded: {time.monotonic() - back:.1f} s "
        f"(RGW away {back - killed:.1f} s)"
    )
    rows = _instances(c.engine, uid)
    assert [r.sop_instance_uid for r in rows] == [ds.SOPInstanceUID for ds in series[:stored]]
    keys = c.bucket_keys()
    assert {r.sha256 for r in rows} <= keys
    # The refused instance is taken now (the guard has seen the buffer drain).
    ds = series[stored]

    def takes_it() -> bool:
        raw = RawPeer(c.hosts["g1"].address, DICOM_PORT, timeout=30.0)
        result = raw.associate(SCU_AE, contexts=[(CT, [EXPLICIT_LE])])
        if not isinstance(result, Accepted):
            return False
        status = raw.c_store(next(iter(result.contexts)), CT, ds.SOPInstanceUID, encode_dataset(ds))
        raw.release()
        return status == 0

    wait_for(takes_it, timeout=30, what="the refused instance taken once the buffer drained")
    wait_for(
        lambda: (
            len(_instances(c.engine, uid)) == stored + 1
            and all(r.uploaded_at is not None for r in _instances(c.engine, uid))
        ),
        timeout=30,
        what="it uploaded too",
    )
    assert {r.sha256 for r in _instances(c.engine, uid)} <= c.bucket_keys()
