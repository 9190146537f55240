"""Object store: RGW start-up, and how fast the uploader empties a backlog.

    .venv/bin/python benchmarks/s3_upload.py [--instances 300] [--kb 512]

Starts the tests' single-node Ceph + RGW (tests/integration/rgw.py; Debian's ceph-mon,
ceph-osd, radosgw), times its start-up, then puts ``--instances`` spool-style files of
``--kb`` KB (a 512x512 CT slice is ~512 KB) through :class:`pacs_ai.storage.uploader.Uploader`
(real rows in a SQLite database, conditional puts, rows marked) at several
``upload_concurrency`` values, and times a read of each through the workers' cache. Prints a
table and writes benchmarks/results/s3_upload.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert

from pacs_ai.config import settings_from_dict
from pacs_ai.db.models import Instance, Series, Study
from pacs_ai.db.session import make_engine, upgrade
from pacs_ai.ingest.spool import part10_header
from pacs_ai.storage.cache import ObjectCache
from pacs_ai.storage.objects import S3Store
from pacs_ai.storage.uploader import Uploader
from tests.integration.rgw import RgwCluster


def _spool(root: Path, n: int, kb: int, tag: int) -> list[tuple[str, str, int]]:
    header = part10_header("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "BENCH")
    out = []
    for i in range(n):
        dataset = b"\x08\x00\x16\x00" + tag.to_bytes(4, "little") + i.to_bytes(4, "little")
        dataset += os.urandom(kb * 1024 - len(dataset))
        sha = hashlib.sha256(dataset).hexdigest()
        rel = f"objects/{sha[:2]}/{sha[2:4]}/{sha}.dcm"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(header + dataset)
        out.append((sha, rel, len(dataset)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--kb", type=int, default=512)
    ap.add_argument("--concurrency", default="1,4,8")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacs-ai-s3-bench-"))
    cluster = RgwCluster(work / "ceph")
    t0 = time.monotonic()
    cluster.start()
    startup = time.monotonic() - t0
    os.environ.update(cluster.client_env())
    rows = []
    try:
        for tag, conc in enumerate(int(c) for c in args.concurrency.split(",")):
            cluster.bucket = f"bench-{tag}"
            settings = settings_from_dict(
                {
                    "storage": {
                        "path": str(work / f"spool{tag}"),
                        "backend": "s3",
                        "s3_endpoint": cluster.endpoint,
                        "s3_bucket": cluster.bucket,
                        "upload_concurrency": conc,
                        "upload_batch": 100,
                    },
                    "database": {"url": f"sqlite:///{work / f'db{tag}.sqlite'}"},
                },
                base=work,
            )
            store = S3Store(settings.storage)
            store.ensure_bucket()
            engine = make_engine(settings.database)
            upgrade(engine)
            files = _spool(settings.storage.path, args.instances, args.kb, tag)
            with engine.begin() as c:
                c.execute(insert(Study).values(id=1, study_uid=f"1.2.{tag}"))
                c.execute(insert(Series).values(id=1, study_id=1, series_uid=f"1.3.{tag}"))
                c.execute(
                    insert(Instance),
                    [
                        {"study_id": 1, "series_id": 1, "association_id": None,
                         "sop_instance_uid": f"1.4.{tag}.{i}", "sop_class_uid": "1.2",
                         "transfer_syntax_uid": "1.2.840.10008.1.2.1", "size_bytes": size,
                         "sha256": sha, "path": rel}
                        for i, (sha, rel, size) in enumerate(files)
                    ],
                )  # fmt: skip
            up = Uploader(engine, settings, store)
            start = time.perf_counter()
            for _ in range(10 * args.instances):  # bounded
                if up.run_once() == 0 and up.refresh().count == 0:
                    break
            upload_s = time.perf_counter() - start
            cache = ObjectCache(work / f"cache{tag}", 1 << 40, store)
            start = time.perf_counter()
            for sha, _rel, _size in files:
                cache.get(sha)
            read_s = time.perf_counter() - start
            up.stop()
            engine.dispose()
            mb = args.instances * args.kb / 1024
            rows.append(
                {
                    "concurrency": conc,
                    "instances": args.instances,
                    "kb": args.kb,
                    "upload_instances_per_s": round(args.instances / upload_s, 1),
                    "upload_mb_per_s": round(mb / upload_s, 1),
                    "cache_read_instances_per_s": round(args.instances / read_s, 1),
                }
            )
    finally:
        cluster.stop()
        cluster.remove()
    print(f"RGW start-up (mon + OSD on BlueStore file + radosgw): {startup:.1f} s "
          f"{cluster.startup_seconds}")  # fmt: skip
    print("| concurrency | instances | KB | upload inst/s | upload MB/s | cache read inst/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['instances']} | {r['kb']} | "
            f"{r['upload_instances_per_s']} | {r['upload_mb_per_s']} | "
            f"{r['cache_read_instances_per_s']} |"
        )
    out = Path(__file__).resolve().parent / "results" / "s3_upload.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"rgw_startup_s": round(startup, 2), "phases": cluster.startup_seconds, "runs": rows},
            indent=2,
        )
    )
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
