"""Decode processes: the CPU half of preprocessing outside the GIL of the scoring process.

pydicom parsing and the reference LUT maths hold the GIL, so threads cannot run them beside
the model; a :class:`DecodePool` of ``spawn``-ed processes can. It is created once (per
scoring process) and its processes are reused for every series; at most ``depth`` images are
in flight, so memory is bounded by ``depth`` decoded images. Each process:

- runs with one torch thread (the model keeps the cores it was given);
- inherits the scoring process's ``RLIMIT_AS`` (``pipeline.worker_memory_mb``): each decode
  process is bounded by the same limit, so the worst case is (1 + processes) x the limit;
- exits when the process that started it is gone (it watches its parent's pid).

A decode process that dies (signal, out of memory) or gives no answer within ``timeout``
seconds (plus ``STARTUP_SECONDS`` for the first answer of fresh processes) fails the whole
call with :class:`~pacs_ai.errors.DecodeProcessFailed`; the pool is then discarded (its
processes killed) and started afresh on the next call.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

from pacs_ai.errors import DecodeProcessFailed

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_R = TypeVar("_R")

DEFAULT_TIMEOUT = 300.0
# Added to the first answer of fresh processes (spawn + imports, torch included).
STARTUP_SECONDS = 60.0
_MAX_AUTO = 8
_DIED = "a decode process died while decoding (killed, crashed or out of memory)"


def auto_processes(setting: int | str = "auto", gpu: bool = True) -> int:
    """The number of decode processes for ``inference.decode_processes``; 0 means decoding
    in threads of the scoring process (no pool).

    "auto": with the model on a GPU, one per core (at most 8): the CPU only decodes, and
    threads would serialise on the GIL. With the model on the CPU, 0: the model already
    uses every core, and on the 2-core machine measured here decode processes beside it were
    slower than threads (docs/models.md, "The fast path"); set a number to override."""
    if setting == "auto":
        return max(1, min(_MAX_AUTO, os.cpu_count() or 1)) if gpu else 0
    return max(0, int(setting))


def _init_process(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the scoring process decides
    import torch

    torch.set_num_threads(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


class DecodePool:
    """A reusable pool of ``processes`` decode processes (see module doc). Thread-safe
    for one :meth:`map` at a time (the model lock serialises scoring)."""

    def __init__(self, processes: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        if processes < 1:
            raise ValueError("a decode pool needs at least one process")
        self.processes = processes
        self.timeout = timeout
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._fresh = True

    @property
    def pids(self) -> list[int]:
        """Process ids of the running decode processes (empty before the first use)."""
        ex = self._executor
        procs = getattr(ex, "_processes", None) or {}
        return sorted(p.pid for p in procs.values() if p.pid is not None)

    def _ensure(self) -> ProcessPoolExecutor:
        if self._closed:
            raise DecodeProcessFailed("the decode pool is closed")
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_process,
                initargs=(os.getpid(),),
            )
            self._fresh = True
        return self._executor

    def map(self, fn: Callable[[_T], _R], items: Iterable[_T], depth: int) -> Iterator[_R]:
        """``map(fn, items)`` in the decode processes, in order, at most ``depth`` ahead.
        ``fn`` must be a module-level function (it is pickled by name)."""
        with self._lock:
            ex = self._ensure()
            queue: deque[Future[_R]] = deque()
            source = iter(items)
            try:
                for item in source:
                    queue.append(ex.submit(fn, item))
                    if len(queue) >= max(1, depth):
                        break
                while queue:
                    result = self._result(queue.popleft())
                    nxt = next(source, None)
                    if nxt is not None:
                        queue.append(ex.submit(fn, nxt))
                    yield result
            except BrokenProcessPool:  # from submit(): the pool broke between results
                self._discard()
                raise DecodeProcessFailed(_DIED) from None
            except DecodeProcessFailed:
                self._discard()
                raise
            finally:
                for f in queue:
                    f.cancel()

    def _result(self, future: Future[_R]) -> _R:
        wait = self.timeout + (STARTUP_SECONDS if self._fresh else 0.0)
        try:
            result = future.result(timeout=wait)
            self._fresh = False
            return result
        except BrokenProcessPool:
            self._discard()
            raise DecodeProcessFailed(_DIED) from None
        except FutureTimeout:
            self._discard()
            raise DecodeProcessFailed(
                f"a decode process gave no answer within {self.timeout:.0f} s"
            ) from None

    def _discard(self) -> None:
        """Kill the processes of a broken or stuck pool; the next call starts a fresh one."""
        ex, self._executor = self._executor, None
        if ex is None:
            return
        procs = list((getattr(ex, "_processes", None) or {}).values())
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.kill()
        ex.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.join(5.0)

    def close(self) -> None:
        """Stop the processes (waits up to a few seconds, then kills)."""
        self._closed = True
        ex, self._executor = self._executor, None
        if ex is None:
            return
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + 5.0
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
