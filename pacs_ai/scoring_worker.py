"""The scoring worker: a long-lived child process that decodes, preprocesses and scores.

Decoding hostile input and running a model are the two things that can exhaust memory or
crash a process, so neither runs in the listener's process. The child is started with the
``spawn`` method (torch and ``fork`` do not mix), under an address-space limit
(``RLIMIT_AS`` = ``pipeline.worker_memory_mb``), loads the models once and then answers one
:class:`~pacs_ai.scoring.StudyRequest` at a time over a pipe. A decompression bomb or an
out-of-memory therefore fails an allocation in the child (which reports ``MemoryError`` and
exits) or kills it; the parent turns that, a crash, or no answer within
``pipeline.worker_timeout_seconds`` into :class:`~pacs_ai.errors.WorkerFailed` for the job,
and starts a fresh child at once (the models load while the next study waits).

The child exits when its parent is gone (it watches its parent's pid), so a ``kill -9`` of
the service leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pacs_ai.config import Settings
from pacs_ai.errors import StartupError, WorkerFailed, safe_reason
from pacs_ai.scoring import ModelProvider, ModelSummary, StudyAnalysis, StudyRequest

log = logging.getLogger(__name__)

# Test-only fault injection, read in the child at each job: "exit" (the child dies with
# os._exit), "kill" (SIGKILL to itself), "hang" (never answers), "until:PATH" (creates PATH.waiting,
# answers once PATH exists: a late result). Never set in production.
FAULT_ENV = "PACS_AI_TEST_WORKER_FAULT"
_MEMORY_EXIT = 3
_STOP_WAIT = 10.0
_STARTUP_SECONDS = 600.0


class ScoringWorker:
    """Parent side of the worker child. Thread-safe: calls are serialised (several pipeline
    threads may share one worker)."""

    def __init__(self, settings: Settings, env: dict[str, str] | None = None) -> None:
        self._settings = settings
        # Set in the child before any model loads, e.g. CUDA_VISIBLE_DEVICES: one GPU per slot.
        self._env = dict(env or {})
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._models: list[ModelSummary] = []
        self._closed = False
        self._starts = 0
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ready(self) -> bool:
        """The child is running with its models loaded (for /readyz)."""
        proc = self._proc
        return self._ready and proc is not None and proc.is_alive()

    def start(self) -> None:
        """Start the child now (it loads the models while the service starts)."""
        with self._lock:
            self._ensure_started()

    def wait_ready(self) -> list[ModelSummary]:
        """Start the child and wait until its models are loaded; raises
        :class:`StartupError` with one line when one cannot load (or the child dies)."""
        with self._lock:
            self._ensure_started()
            try:
                self._await_ready()
            except WorkerFailed as exc:
                self._discard()
                raise StartupError(str(exc)) from None
            return self._models

    def analyse(self, request: StudyRequest) -> StudyAnalysis:
        """Score one study in the child; raises :class:`WorkerFailed` when the child fails."""
        timeout = self._settings.pipeline.worker_timeout_seconds
        with self._lock:
            self._ensure_started()
            assert self._conn is not None
            self._await_ready()  # the models may still be loading
            deadline = time.monotonic() + timeout
            with contextlib.suppress(OSError):  # the child died: _receive says how
                self._conn.send(request)
            reply = self._receive(deadline, timeout)
            if reply[0] == "ok":
                result: StudyAnalysis = reply[1]
                return result
            self._expect("error", reply)
            if reply[1] == "MemoryError":
                self._reap()  # it exits after a MemoryError; start a fresh one
            raise WorkerFailed(reply[1], reply[2])

    def stop(self) -> None:
        """Stop the child: politely when idle; a job still running is cut short (it counts
        as an interrupted attempt) rather than holding up the shutdown."""
        self._closed = True
        if not self._lock.acquire(timeout=_STOP_WAIT):
            proc = self._proc
            if proc is not None:
                proc.kill()
            self._lock.acquire()
        try:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send(None)
            if self._proc is not None:
                self._proc.join(_STOP_WAIT)
            self._discard()
        finally:
            self._lock.release()

    # --- internals ---------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        if self._closed:
            raise WorkerFailed("WorkerStopped", "the scoring worker is shutting down")
        self._discard()
        parent_end, child_end = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(child_end, self._settings, os.getpid(), self._env),
            name="pacs-ai-scoring",
            daemon=True,
        )
        proc.start()
        child_end.close()
        self._proc, self._conn, self._ready = proc, parent_end, False
        # The first start is part of the start-up summary; a restart is news.
        log.log(
            logging.INFO if self._starts else logging.DEBUG,
            "scoring worker started (pid %s)",
            proc.pid,
        )
        self._starts += 1

    def _receive(self, deadline: float, timeout: float) -> tuple[Any, ...]:
        assert self._conn is not None and self._proc is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill()
                raise WorkerFailed(
                    "WorkerTimeout", f"no answer from the scoring worker within {timeout:.0f} s"
                )
            try:
                if self._conn.poll(min(remaining, 0.5)):
                    reply: tuple[Any, ...] = self._conn.recv()
                    return reply
            except (EOFError, OSError):
                pass  # the pipe closed: the child is gone
            else:
                if self._proc.is_alive():
                    continue
            break
        self._proc.join(_STOP_WAIT)
        code = self._proc.exitcode
        self._discard()
        self._ensure_started()  # a fresh child loads the models while the job is recorded
        raise WorkerFailed("WorkerDied", _death(code, self._settings))

    def _await_ready(self) -> None:
        if self._ready:
            return
        wait = max(self._settings.pipeline.worker_timeout_seconds, _STARTUP_SECONDS)
        reply = self._receive(time.monotonic() + wait, wait)
        if reply[0] == "load_failed":
            self._discard()
            raise WorkerFailed("ModelError", reply[1])
        self._expect("ready", reply)
        self._models = reply[2]
        self._ready = True

    @staticmethod
    def _expect(kind: str, reply: tuple[Any, ...]) -> None:
        if reply[0] != kind:
            raise WorkerFailed("WorkerError", f"unexpected answer from the scoring worker: {kind}")

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.join(_STOP_WAIT)
        self._discard()
        self._ensure_started()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(_STOP_WAIT)
        self._discard()
        self._ensure_started()

    def _discard(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(_STOP_WAIT)
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn, self._ready = None, None, False


def _death(code: int | None, settings: Settings) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the scoring worker died from {name}{hint}"
    if code == _MEMORY_EXIT:
        limit = settings.pipeline.worker_memory_mb
        return f"the scoring worker ran out of memory (limit {limit} MB)"
    return f"the scoring worker exited with code {code}"


# --- the child ---------------------------------------------------------------------------------


def _child_main(
    conn: Connection, settings: Settings, parent_pid: int, env: dict[str, str] | None = None
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    os.environ.update(env or {})  # before CUDA initialises (it reads CUDA_VISIBLE_DEVICES then)
    _limit_memory(settings)
    # The parent keeps us daemonic (terminated with it); here we may start decode processes
    # (pacs_ai.inference.decodepool), which a daemonic process may not. They watch our pid.
    multiprocessing.current_process().daemon = False
    from pacs_ai.logs import configure_logging
    from pacs_ai.startup import model_keys, model_problem

    configure_logging(settings.logging)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    models = ModelProvider(settings)
    loaded = []
    for key in model_keys(settings):  # every model the routing rules use, or no start
        try:
            loaded.append(models.summary(key))
        except Exception as exc:  # a model's load fails in many ways (torch, files, card)
            _send(conn, ("load_failed", model_problem(settings, key, exc)))
            return
    conn.send(("ready", os.getpid(), loaded))
    try:
        _serve(conn, settings, models)
    finally:
        models.close()  # the decode processes


def _serve(conn: Connection, settings: Settings, models: ModelProvider) -> None:
    from pacs_ai.scoring import analyse_study

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        _inject_fault()
        try:
            conn.send(("ok", analyse_study(models, settings, request)))
        except MemoryError as exc:
            limit = settings.pipeline.worker_memory_mb
            _send(conn, ("error", "MemoryError", f"out of memory (limit {limit} MB)"))
            del exc
            os._exit(_MEMORY_EXIT)
        except Exception as exc:
            reason = safe_reason(exc)
            kind, _, message = reason.partition(": ")
            log.info("scoring failed (%s)", kind, exc_info=log.isEnabledFor(logging.DEBUG))
            _send(conn, ("error", kind, message or kind))


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    try:
        conn.send(message)
    except OSError:
        os._exit(0)  # the parent is gone


def _limit_memory(settings: Settings) -> None:
    """RLIMIT_AS for the child, unless 0 or CUDA is in play (the CUDA driver reserves address
    space far beyond real use, so the limit would break it; decode limits still apply)."""
    limit_mb = settings.pipeline.worker_memory_mb
    if limit_mb <= 0:
        return
    if settings.inference.device != "cpu" and Path("/dev/nvidiactl").exists():
        logging.getLogger(__name__).warning(
            "pipeline.worker_memory_mb not applied: a CUDA device may be used"
        )
        return
    import resource

    limit = limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _inject_fault() -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == "exit":
        os._exit(70)
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "hang":
        time.sleep(3600)
    if fault.startswith("until:"):  # a late answer: "until:PATH" answers once PATH exists
        release = Path(fault.removeprefix("until:"))
        release.with_name(release.name + ".waiting").touch()  # the test sees it is scoring
        for _ in range(36000):  # at most an hour
            if release.exists():
                return
            time.sleep(0.1)
