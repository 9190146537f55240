"""A real S3 server for the tests: a single-node Ceph cluster with the RADOS Gateway.

Debian's packages (``ceph-mon``, ``ceph-osd``, ``radosgw``, ``ceph-common``) run in the
foreground as child processes of the test session, in a temporary directory, on loopback,
without systemd, in the way Ceph's own ``vstart.sh`` builds a development cluster:

1. a fresh fsid and a minimal ``ceph.conf`` (one monitor on 127.0.0.1, cephx keys in one keyring,
   pools of size 1, logs and sockets inside the directory);
2. ``monmaptool --create`` and ``ceph-mon --mkfs``, then ``ceph-mon -f``;
3. ``ceph osd new`` and ``ceph-osd --mkfs``, then ``ceph-osd -f`` on one OSD. Its object
   store is BlueStore on a sparse file (``bluestore_block_path``) by default; set
   ``PACS_AI_TEST_RGW_OBJECTSTORE=memstore`` for the in-memory store;
4. ``radosgw -f`` with a Beast frontend on a free loopback port; it creates its own pools;
5. ``radosgw-admin user create`` with generated keys, and a bucket.

Authentication is cephx with keys generated into the directory (with ``auth ... = none``
radosgw 16.2 never gets past its monitor handshake: ``get_initial_auth_request returned
-13``). No manager daemon is needed for what RGW does. Every wait polls with a deadline; every
daemon's log stays in the directory and is quoted in the failure message. ``stop_rgw`` and
``start_rgw`` kill and restart only the gateway (a test of "S3 went away during ingest").

Measured here (2 shared cores): start-up 15-18 s (monitor ~1 s, OSD mkfs + boot ~6 s,
radosgw creating its pools ~9 s), once per test session; a radosgw restart well under 1 s.
``python -m tests.integration.rgw`` starts one, prints the timings and stops it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.tools import require_tool

# Every key lives in one keyring in the directory; ``ceph-mon --mkfs`` imports them all.
_KEYS = {
    "mon.": ("--cap", "mon", "allow *"),
    "client.admin": (
        "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
    ),
    "osd.0": ("--cap", "mon", "allow profile osd", "--cap", "osd", "allow *"),
    "client.rgw": ("--cap", "mon", "allow rw", "--cap", "osd", "allow rwx"),
}  # fmt: skip
_TOOLS = ("ceph-authtool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies (``PR_SET_PDEATHSIG``), so even a
    test run killed with -9 leaves no Ceph daemon behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class RgwError(RuntimeError):
    pass


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class RgwCluster:
    """One throw-away Ceph cluster with an RGW endpoint; :meth:`start`, then :meth:`stop`."""

    root: Path
    objectstore: str = "bluestore"
    bucket: str = "pacs-ai-test"
    access_key: str = field(default_factory=lambda: secrets.token_hex(10).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_hex(20))
    region: str = "default"
    # A storage host of its own (tests/integration/netns.py): every command runs behind
    # ``prefix`` (``ip netns exec NAME``) and radosgw listens on ``rgw_address``.
    prefix: tuple[str, ...] = ()
    rgw_address: str = "127.0.0.1"
    mon_port: int = 0
    rgw_port: int = 0
    startup_seconds: dict[str, float] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def endpoint(self) -> str:
        return f"http://{self.rgw_address}:{self.rgw_port}"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    # --- set-up --------------------------------------------------------------------------

    def _write_conf(self, fsid: str) -> None:
        r = self.root
        store = (
            f"osd objectstore = bluestore\n"
            f"bluestore block path = {r}/osd.$id/block.file\n"
            "bluestore block create = true\n"
            "bluestore block size = 4294967296\n"
            "bluestore block db create = false\n"
            "bluestore block wal create = false\n"
            "bluestore fsck on mkfs = false\n"
            "bluestore cache size = 67108864\n"
            "bdev enable discard = false\n"
            if self.objectstore == "bluestore"
            else "osd objectstore = memstore\nmemstore device bytes = 1073741824\n"
        )
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{self.mon_port}
mon initial members = a
public addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
ms bind ipv6 = false
run dir = {r}/run
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
keyring = {r}/keyring
erasure code dir = /usr/lib/x86_64-linux-gnu/ceph/erasure-code
plugin dir = /usr/lib/x86_64-linux-gnu/ceph
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
mon osd full ratio = 0.99
mon osd backfillfull ratio = 0.99
mon osd nearfull ratio = 0.99
debug ms = 0
# A killed radosgw leaves watches behind; a restarted one notifying them would stall
# until they time out (30 s by default).
osd client watch timeout = 5
[mon]
mon data = {r}/mon.$id
mon cluster log file = {r}/log/cluster.log
[osd]
osd data = {r}/osd.$id
osd class dir = /usr/lib/x86_64-linux-gnu/rados-classes
osd memory target = 536870912
osd op num shards = 1
osd op num threads per shard = 1
osd max object name len = 460
osd max object namespace len = 64
{store}[client.rgw]
rgw data = {r}/rgw
rgw frontends = beast endpoint={self.rgw_address}:{self.rgw_port}
rgw dns name = localhost
rgw thread pool size = 32
rgw enable usage log = false
rgw max concurrent requests = 256
rgw cache enabled = false
"""
        )

    def _run(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(
            [*self.prefix, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )
        if proc.returncode != 0:
            raise RgwError(
                f"{' '.join(args[:3])} ... exited {proc.returncode}: "
                f"{(proc.stdout + proc.stderr).strip()[-2000:]}"
            )
        return proc.stdout

    def ceph(self, *args: str, timeout: float = 30) -> str:
        return self._run(
            "ceph", "-c", str(self.conf), "--connect-timeout", "15", *args, timeout=timeout
        )

    def _spawn(self, name: str, *args: str) -> None:
        out = (self.log_dir / f"{name}.stdout").open("ab")
        self._procs[name] = subprocess.Popen(
            [*self.prefix, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,  # its own process group: killed as a whole
            preexec_fn=_die_with_parent,  # a killed test run leaves no daemon behind
        )
        out.close()

    def _wait(self, what: str, timeout: float, check: object, daemon: str) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._procs.get(daemon)
            if proc is not None and proc.poll() is not None:
                raise RgwError(
                    f"{daemon} exited {proc.returncode} while waiting for {what}:\n"
                    f"{_tail(self.log_dir / f'{daemon}.stdout')}\n{self._daemon_log(daemon)}"
                )
            with contextlib.suppress(RgwError, subprocess.TimeoutExpired, OSError):
                if check():
                    return
            time.sleep(0.2)
        raise RgwError(
            f"{what} not within {timeout} s:\n{_tail(self.log_dir / f'{daemon}.stdout')}\n"
            f"{self._daemon_log(daemon)}"
        )

    def _daemon_log(self, daemon: str) -> str:
        name = {"mon": "mon.a", "osd": "osd.0", "rgw": "client.rgw"}[daemon]
        return _tail(self.log_dir / f"{name}.log")

    def start(self) -> RgwCluster:
        for tool in _TOOLS:
            require_tool(tool)
        for d in ("run", "log", "mon.a", "osd.0", "rgw"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self.mon_port = self.mon_port or _free_port()
        self.rgw_port = self.rgw_port or _free_port()
        fsid = str(uuid.uuid4())
        self._write_conf(fsid)
        t0 = time.monotonic()
        c = str(self.conf)
        keyring = str(self.root / "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring)
        for name, caps in _KEYS.items():
            self._run("ceph-authtool", keyring, "--gen-key", "-n", name, *caps)
        self._run(
            "monmaptool", "--create", "--fsid", fsid,
            "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", str(self.root / "monmap"),
        )  # fmt: skip
        self._run(
            "ceph-mon", "-c", c, "--mkfs", "-i", "a",
            "--monmap", str(self.root / "monmap"), "--keyring", str(self.root / "keyring"),
        )  # fmt: skip
        self._spawn("mon", "ceph-mon", "-f", "-c", c, "-i", "a")
        self._wait("the monitor", 60, lambda: self.ceph("mon", "stat", timeout=20), "mon")
        t1 = time.monotonic()
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise RgwError(f"unexpected OSD id {osd_id!r}")
        self._run("ceph-osd", "-c", c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=120)
        self._spawn("osd", "ceph-osd", "-f", "-c", c, "-i", "0")
        self._wait("the OSD to be up", 120, self._osd_up, "osd")
        t2 = time.monotonic()
        self.start_rgw()
        t3 = time.monotonic()
        self._run(
            "radosgw-admin", "-c", c, "user", "create", "--uid", "pacs-ai-test",
            "--display-name", "pacs-ai test", "--access-key", self.access_key,
            "--secret", self.secret_key,
        )  # fmt: skip
        self.startup_seconds = {
            "mon": round(t1 - t0, 2),
            "osd": round(t2 - t1, 2),
            "rgw": round(t3 - t2, 2),
            "total": round(time.monotonic() - t0, 2),
        }
        return self

    def _osd_up(self) -> bool:
        stat = json.loads(self.ceph("osd", "stat", "-f", "json", timeout=20))
        return int(stat.get("num_up_osds", 0)) >= 1

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2) as resp:  # noqa: S310 (http)
                return int(resp.status) == 200
        except urllib.error.HTTPError as exc:  # anonymous may be refused: still serving
            return exc.code in (403, 404)
        except (urllib.error.URLError, OSError):
            return False

    # --- the gateway alone ---------------------------------------------------------------

    def start_rgw(self, timeout: float = 120) -> None:
        """Start radosgw (again) on the same port and wait until it answers HTTP."""
        self._spawn("rgw", "radosgw", "-f", "-c", str(self.conf), "-n", "client.rgw")
        self._wait("radosgw to answer", timeout, self._rgw_answers, "rgw")

    def stop_rgw(self) -> None:
        """Kill radosgw (SIGKILL) and wait until its port is closed."""
        self._kill("rgw")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self._rgw_answers():
            time.sleep(0.1)

    def rgw_running(self) -> bool:
        proc = self._procs.get("rgw")
        return proc is not None and proc.poll() is None

    def _kill(self, name: str) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)

    def stop(self) -> None:
        for name in ("rgw", "osd", "mon"):
            self._kill(name)

    def client_env(self) -> dict[str, str]:
        """The environment variables the S3 backend reads its credentials from."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def main() -> None:  # pragma: no cover - manual check: python -m tests.integration.rgw
    import tempfile

    store = os.environ.get("PACS_AI_TEST_RGW_OBJECTSTORE", "bluestore")
    root = Path(tempfile.mkdtemp(prefix="pacs-ai-rgw-"))
    cluster = RgwCluster(root, objectstore=store)
    try:
        cluster.start()
        print(json.dumps({"endpoint": cluster.endpoint, "startup_s": cluster.startup_seconds}))
        t = time.monotonic()
        cluster.stop_rgw()
        cluster.start_rgw()
        print(json.dumps({"rgw_restart_s": round(time.monotonic() - t, 2)}))
    finally:
        cluster.stop()
        if not os.environ.get("KEEP"):
            cluster.remove()
        else:
            print(root)


if __name__ == "__main__":  # pragma: no cover
    main()
