"""Workers' reads: an instance's file, from the local spool or through a bounded cache.

:func:`instance_reader` gives the pipeline one callable, ``read(sha256, relpath) -> Path``:

* ``backend = "local"``: the spool file (today's behaviour);
* ``backend = "s3"``: the spool file when this host has it (the gateway itself, before its
  local copy is evicted), else the object downloaded into ``s3_cache_path`` — written to a
  temporary name, checked against its sha256 key, renamed into place — while the cache is
  kept under ``s3_cache_mb`` by deleting the least recently used files.

A file handed out is not evicted by the same process within ``_PROTECT_SECONDS``, so a study
being scored keeps its files while it is read (keep the cache larger than the largest study).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from pacs_ai.config import StorageSettings
from pacs_ai.storage.objects import ObjectMissing, ObjectStore, check_sha256, open_store

log = logging.getLogger(__name__)

_PROTECT_SECONDS = 120.0

InstanceReader = Callable[[str, str], Path]


class ObjectCache:
    """Downloaded objects under ``root/ab/<sha256>.dcm``, at most ``max_bytes`` in all."""

    def __init__(
        self, root: Path, max_bytes: int, store: ObjectStore, wait_seconds: float = 0.0
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.wait_seconds = wait_seconds
        self._store = store
        self._lock = threading.Lock()
        # sha256 -> (size, last use, monotonic); least recently used first.
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._scan()

    def _scan(self) -> None:
        """Index what an earlier process left, oldest access first; drop partial downloads."""
        self.root.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, str, int]] = []
        for p in self.root.glob("*/*"):
            if not p.is_file() or (len(p.stem) != 64 and not p.name.startswith(".")):
                continue  # not ours (the reports cache's folder beside the instances')
            if p.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                found.append((st.st_mtime, p.stem, st.st_size))
        for _mtime, sha, size in sorted(found):
            self._entries[sha] = (size, 0.0)
            self.bytes += size
        self._evict(0)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / sha256[:2] / f"{sha256}.dcm"

    def get(self, sha256: str, fetch: Callable[[Path], None] | None = None) -> Path:
        """The cached file of ``sha256``, downloaded first when absent (by ``fetch(dest)``
        when given: a named object such as a report, cached under the hash of its name)."""
        dest = self.path(sha256)
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is not None and dest.exists():
                self._entries.move_to_end(sha256)
                self._entries[sha256] = (entry[0], time.monotonic())
                self.hits += 1
                return dest
        if fetch is not None:
            fetch(dest)
        else:
            self._fetch(sha256, dest)
        size = dest.stat().st_size
        with self._lock:
            self.misses += 1
            old = self._entries.pop(sha256, None)
            if old is not None:
                self.bytes -= old[0]
            self._entries[sha256] = (size, time.monotonic())
            self.bytes += size
            self._evict(sha256)
        return dest

    def _fetch(self, sha256: str, dest: Path) -> None:
        """Download (atomic: a temporary name, verified, renamed). An object not there yet
        (the gateway's uploader is a moment behind assembly) is waited for, polling, up to
        ``wait_seconds``; then :class:`ObjectMissing` fails the job, which is retried."""
        deadline = time.monotonic() + self.wait_seconds
        pause = 0.1
        while True:
            try:
                self._store.fetch(sha256, dest)
                return
            except ObjectMissing:
                if time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)  # bounded by wait_seconds
            pause = min(2.0, pause * 2)

    def _evict(self, keep: object) -> None:
        """Delete least recently used files until the cache fits (caller holds the lock)."""
        now = time.monotonic()
        for sha in list(self._entries):
            if self.bytes <= self.max_bytes:
                return
            size, used = self._entries[sha]
            if sha == keep or (used and now - used < _PROTECT_SECONDS):
                continue
            del self._entries[sha]
            self.bytes -= size
            with contextlib.suppress(FileNotFoundError):
                self.path(sha).unlink()
        if self.bytes > self.max_bytes:
            log.warning(
                "object cache over storage.s3_cache_mb: every file is in use (%d bytes)",
                self.bytes,
            )


def instance_reader(settings: StorageSettings) -> InstanceReader:
    """``read(sha256, relpath) -> Path`` for the configured backend."""
    root = settings.path.resolve()

    def local(relpath: str) -> Path:
        p = (root / relpath).resolve()
        if not p.is_relative_to(root):
            raise ValueError("path escapes the spool")
        return p

    if settings.backend != "s3":
        return lambda _sha, relpath: local(relpath)
    cache: ObjectCache | None = None
    cache_lock = threading.Lock()

    def read(sha256: str, relpath: str) -> Path:
        nonlocal cache
        p = local(relpath)
        if p.exists():
            return p
        with cache_lock:
            if cache is None:  # first use: credentials are read here, not at import
                cache = ObjectCache(
                    settings.s3_cache_path,
                    settings.s3_cache_mb * 1024 * 1024,
                    open_store(settings),
                    settings.s3_read_wait_seconds,
                )
        return cache.get(sha256)

    return read
