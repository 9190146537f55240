"""Hosts apart on one machine: Linux network namespaces joined by veth pairs to one bridge.

Each :class:`Host` is a namespace with its own loopback and one address on the bridge's
subnet; the root namespace holds the bridge (address ``.1``), so the test process itself
reaches every host and every host reaches what listens on ``.1``. Cutting a host's link
(:meth:`Host.cut`) takes its veth down on the bridge side: its packets go nowhere until
:meth:`Host.restore`, like a pulled cable, while its processes keep running.

Names carry a per-run prefix; :meth:`Network.close` kills every process left in the
namespaces and deletes them with the bridge, and a new :class:`Network` first removes what a
killed earlier run left behind. Creating namespaces needs root (CAP_NET_ADMIN): without it
the tests skip with the reason on a developer's machine and fail under ``CI``.

:class:`PostgresHost` runs a private PostgreSQL cluster (Debian's postgresql-15 binaries, as
the ``postgres`` user) inside a host, listening on that host's bridge address: the database
is reached across the bridge, never through the machine's loopback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

_IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "/sbin/ip"
_STALE_PREFIX = "pacsai"
# Which process owns each network (by its prefix): a concurrent test run's namespaces are
# left alone, only those of a run that is gone are removed.
_OWNERS = Path("/run/pacs-ai-test-netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_IP, *args], capture_output=True, text=True, timeout=20, check=check)


def require_netns() -> None:
    """Skip (developer machine) or fail (CI) where namespaces cannot be made."""
    why = None
    if os.geteuid() != 0:
        why = "network namespaces need root (CAP_NET_ADMIN)"
    elif not Path(_IP).exists():
        why = "iproute2 (`ip`) is not installed"
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI must be able to run the multi-host scenarios", pytrace=False)
    pytest.skip(f"{why}; on CI this fails instead of skipping")


def _owner_alive(name: str) -> bool:
    prefix = name[: len(_STALE_PREFIX) + 4]
    try:
        pid = int((_OWNERS / prefix).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def remove_stale() -> None:
    """Namespaces and bridges an earlier, killed test run left behind (not those of a
    test run still alive)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ", 1)[0]
        if name.startswith(_STALE_PREFIX) and not _owner_alive(name):
            _kill_all(name)
            _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@", 1)[0]
        if name.startswith(_STALE_PREFIX) and not _owner_alive(name):
            _ip("link", "del", name, check=False)


def _kill_all(netns: str) -> None:
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


class Host:
    """One namespace: ``name`` on the bridge at ``address``."""

    def __init__(self, network: Network, label: str, index: int) -> None:
        self.network = network
        self.label = label
        self.netns = f"{network.prefix}{label}"[:15]
        self.address = f"{network.subnet}.{index}"
        self._veth = f"{network.prefix}v{index}"[:15]
        peer = f"{self._veth}p"[:15]
        _ip("netns", "add", self.netns)
        _ip("link", "add", self._veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.netns)
        _ip("link", "set", self._veth, "master", network.bridge)
        _ip("link", "set", self._veth, "up")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", peer)
        _ip("-n", self.netns, "link", "set", peer, "up")
        _ip("-n", self.netns, "route", "add", "default", "via", network.gateway)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host."""
        return [_IP, "netns", "exec", self.netns, *argv]

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(argv), **kwargs)  # type: ignore[call-overload,no-any-return]

    def run(self, argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def cut(self) -> None:
        """Pull the cable: nothing in or out until :meth:`restore`."""
        _ip("link", "set", self._veth, "down")

    def restore(self) -> None:
        _ip("link", "set", self._veth, "up")


class Network:
    """A bridge with hosts on ``10.<n>.<m>.0/24`` (root namespace at ``.1``)."""

    def __init__(self) -> None:
        require_netns()
        remove_stale()
        tag = uuid.uuid4().hex[:4]
        self.prefix = f"{_STALE_PREFIX}{tag}"
        _OWNERS.mkdir(parents=True, exist_ok=True)
        (_OWNERS / self.prefix).write_text(str(os.getpid()))
        octets = int(tag, 16)
        self.subnet = f"10.{200 + octets % 50}.{octets % 250}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"{self.prefix}br"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, label: str) -> Host:
        host = Host(self, label, len(self.hosts) + 2)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            _kill_all(host.netns)
            _ip("netns", "del", host.netns, check=False)
        _ip("link", "del", self.bridge, check=False)
        (_OWNERS / self.prefix).unlink(missing_ok=True)


def wait_for_port(host: Host | None, address: str, port: int, timeout: float) -> None:
    """Poll until something accepts TCP connections at ``address:port`` as seen from
    ``host`` (None: the root namespace)."""
    probe = (
        "import socket,sys\n"
        "s=socket.socket(); s.settimeout(1)\n"
        f"sys.exit(s.connect_ex(({address!r},{port})))\n"
    )
    argv = ["python3", "-c", probe]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cmd = host.command(argv) if host is not None else argv
        if subprocess.run(cmd, capture_output=True, timeout=10, check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {address}:{port} after {timeout:.0f} s")


class PostgresHost:
    """A private PostgreSQL 15 cluster in ``host``, trusting the bridge's subnet."""

    def __init__(self, host: Host, port: int = 5432) -> None:
        self.host = host
        self.port = port
        # Not under pytest's tmp_path: its parents are private to root, and the cluster
        # runs as ``postgres``.
        workdir = self.workdir = Path(tempfile.mkdtemp(prefix="pacs-ai-pg-"))
        self.data = workdir / "pgdata"
        bindir = Path("/usr/lib/postgresql/15/bin")
        if not (bindir / "postgres").exists():
            why = "PostgreSQL 15 server binaries are missing (Debian package postgresql-15)"
            if os.environ.get("CI"):
                pytest.fail(f"{why}; CI must have them", pytrace=False)
            pytest.skip(why)
        shutil.chown(workdir, "postgres", "postgres")
        # setpriv execs (no forked parent in between): signals reach the postmaster itself
        as_pg = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups"]
        subprocess.run(
            [*as_pg, str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {host.network.subnet}.0/24 trust\n")
        self.log = workdir / "postgres.log"
        with self.log.open("ab") as log:
            self.proc = host.popen(
                [
                    *as_pg,
                    str(bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(port),
                    "-c",
                    f"listen_addresses={host.address}",
                    "-c",
                    f"unix_socket_directories={workdir}",
                    "-c",
                    "fsync=on",
                    "-c",
                    "max_connections=200",
                    # A client whose link was cut mid-transaction would hold its row locks
                    # until TCP gave up (hours): the server ends such a session instead.
                    "-c",
                    "idle_in_transaction_session_timeout=10s",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(None, host.address, port, 60)
        self.url = f"postgresql+psycopg://postgres@{host.address}:{port}/postgres"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)
