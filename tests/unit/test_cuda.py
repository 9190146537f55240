"""CUDA-only paths: tensor preprocessing on the GPU (pinned memory, non-blocking copies),
model placement, mixed precision, the decode pool feeding a GPU model.

Skipped, with the reason, when torch sees no CUDA device — also under CI=1, because the CI
machines have no GPU; these paths are proven by ``benchmarks/gpu_check.sh`` on a GPU machine
(it runs this file and fails when it is skipped there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from pacs_ai.imaging.ct import LUNG_WINDOW, MEDIASTINAL_WINDOW
from pacs_ai.imaging.tensorprep import _to_device, decode_file, finish
from pacs_ai.inference import bundled_model_dir, load_model
from pacs_ai.inference.decodepool import DecodePool
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import cxr_phantom

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (CI has none; benchmarks/gpu_check.sh runs these on a GPU machine)",
)
CUDA = torch.device("cuda:0")
# GPU and CPU resize kernels may sum in another order: float32 rounding, far below 1/255
GPU_TOLERANCE = 1e-4


def _data(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def test_pinned_non_blocking_copy_lands_on_the_gpu() -> None:
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4)
    t = _to_device(arr, CUDA)
    torch.cuda.synchronize()
    assert t.device.type == "cuda"
    assert torch.from_numpy(arr).pin_memory().is_pinned()
    assert np.array_equal(t.cpu().numpy(), arr)


def test_gpu_preprocessing_matches_the_cpu() -> None:
    xray = [decode_file(_data(n), "cxr") for n in ("RG1_UNCR.dcm", "MR_small.dcm")]
    gpu = finish(xray, 224, CUDA)
    assert gpu.device.type == "cuda" and gpu.shape == (2, 1, 224, 224)
    cpu = finish(xray, 224, "cpu")
    assert float((gpu.cpu() - cpu).abs().max()) <= GPU_TOLERANCE
    windows = (LUNG_WINDOW, MEDIASTINAL_WINDOW)
    ct = [decode_file(_data("CT_small.dcm"), "ct", windows)]
    diff = (finish(ct, 64, CUDA).cpu() - finish(ct, 64, "cpu")).abs().max()
    assert float(diff) <= GPU_TOLERANCE


def test_model_is_placed_on_the_gpu_with_mixed_precision() -> None:
    gpu = load_model(bundled_model_dir("cxr"), "cuda")
    cpu = load_model(bundled_model_dir("cxr"), "cpu", precision="fp32")
    assert gpu.device == "cuda:0"
    assert gpu.precision in ("bf16", "fp16")  # "auto" on CUDA: mixed precision
    assert all(p.device.type == "cuda" for p in gpu.module.parameters())
    x = np.random.default_rng(0).random((4, 1, 224, 224), dtype=np.float32)
    assert float(np.abs(gpu.predict(x) - cpu.predict(x)).max()) <= 0.02


def test_series_scored_on_the_gpu_through_decode_processes(tmp_path: Path) -> None:
    paths = []
    for i in range(6):
        img = cxr_phantom("normal", np.random.default_rng(i), 512)
        paths.append(tmp_path / f"x{i}.dcm")
        dw.write(dw.xray_image(img * 3000 + 200, modality="DX", bits_stored=12), paths[-1])
    pool = DecodePool(2, timeout=120)
    try:
        gpu = load_model(bundled_model_dir("cxr"), "cuda", batch_size=4, decode_pool=pool)
        got = gpu.score_series([paths], heatmaps=False)[0]
    finally:
        pool.close()
    ref = load_model(bundled_model_dir("cxr"), "cpu", precision="fp32").score_series(
        [paths], heatmaps=False
    )[0]
    assert got.display_image is not None and ref.display_image is not None
    assert float(np.abs(got.display_image - ref.display_image).max()) <= GPU_TOLERANCE
    for label, p in ref.probabilities.items():
        assert abs(got.probabilities[label] - p) <= 0.02
