"""Decode processes: used, reused, shut down; a dying or stuck one fails the call cleanly."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pacs_ai.errors import DecodeProcessFailed
from pacs_ai.inference import load_model
from pacs_ai.inference.decodepool import DecodePool, auto_processes
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import cxr_phantom

ModelDirFactory = Callable[..., Path]


def _pid(_: int) -> int:
    return os.getpid()


def _die_on_three(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _slow(x: int) -> int:
    time.sleep(30)
    return x


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pids: list[int], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all(_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def test_auto_processes() -> None:
    assert auto_processes(0) == 0
    assert auto_processes(3) == 3
    assert auto_processes("auto") == max(1, min(8, os.cpu_count() or 1))
    assert auto_processes("auto", gpu=False) == 0  # a CPU model: threads


def test_a_killed_decode_process_fails_the_call_and_the_pool_recovers() -> None:
    pool = DecodePool(2, timeout=60)
    try:
        with pytest.raises(DecodeProcessFailed, match="died"):
            list(pool.map(_die_on_three, range(6), depth=4))
        assert list(pool.map(_die_on_three, [0, 1, 2], depth=2)) == [0, 1, 2]
    finally:
        pool.close()


def test_a_stuck_decode_process_times_out_and_is_killed() -> None:
    pool = DecodePool(1, timeout=1.0)
    try:
        assert len(set(pool.map(_pid, range(2), depth=2))) == 1
        pids = pool.pids
        t0 = time.monotonic()
        with pytest.raises(DecodeProcessFailed, match="no answer within 1 s"):
            list(pool.map(_slow, [1], depth=1))
        assert time.monotonic() - t0 < 20  # bounded, not the task's 30 s
        assert _wait_gone(pids)
    finally:
        pool.close()


def _write_cxr(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        img = cxr_phantom("normal", np.random.default_rng(i), 256)
        ds = dw.xray_image(img * 3000 + 200, modality="DX", bits_stored=12)
        paths.append(folder / f"x{i}.dcm")
        dw.write(ds, paths[-1])
    return paths


def test_series_are_decoded_in_the_pool_with_the_same_scores(
    tmp_path: Path, make_model_dir: ModelDirFactory
) -> None:
    model_dir = make_model_dir("cxr", 64)
    paths = _write_cxr(tmp_path, 5)
    threads = load_model(model_dir, "cpu", batch_size=2).score_series([paths], heatmaps=False)
    pool = DecodePool(2, timeout=120)
    try:
        model = load_model(model_dir, "cpu", batch_size=2, decode_pool=pool)
        first = model.score_series([paths], heatmaps=False)
        pids = pool.pids
        assert len(pids) == 2 and os.getpid() not in pids
        second = model.score_series([paths[:2], paths[2:]], heatmaps=False)
        assert pool.pids == pids  # the same processes, reused across calls
        assert first[0].probabilities == threads[0].probabilities
        assert first[0].display_image is not None and threads[0].display_image is not None
        assert np.array_equal(first[0].display_image, threads[0].display_image)
        assert len(second) == 2
    finally:
        pool.close()
    assert _wait_gone(pids)
    with pytest.raises(DecodeProcessFailed, match="closed"):
        list(pool.map(_pid, [1], depth=1))


def test_the_scoring_models_share_one_pool_that_close_stops(tmp_path: Path) -> None:
    from pacs_ai.config import InferenceSettings, Settings
    from pacs_ai.scoring import ModelProvider

    settings = Settings(inference=InferenceSettings(device="cpu", decode_processes=1))
    models = ModelProvider(settings)
    cxr, ct = models.get("cxr"), models.get("ct")
    assert cxr.decode_pool is not None and cxr.decode_pool is ct.decode_pool
    pool = cxr.decode_pool
    assert pool.processes == 1
    cxr.score_series([_write_cxr(tmp_path, 2)], heatmaps=False)
    pids = pool.pids
    assert len(pids) == 1
    models.close()
    assert cxr.decode_pool is None and ct.decode_pool is None
    assert _wait_gone(pids)
    threads = ModelProvider(Settings(inference=InferenceSettings(device="cpu", decode_processes=0)))
    assert threads.get("cxr").decode_pool is None
    auto = ModelProvider(Settings(inference=InferenceSettings(device="cpu")))
    assert auto.get("cxr").decode_pool is None  # "auto" with a CPU model: threads
