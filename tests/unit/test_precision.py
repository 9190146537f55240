"""``inference.precision = "auto"`` on the CPU: native bf16 detection, the bf16 vs fp32 check
at load, the tolerance, and the start-up summary's reason."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pacs_ai.config import InferenceSettings
from pacs_ai.inference import bundled_model_dir, load_model
from pacs_ai.inference import precision as prec
from pacs_ai.training.phantoms import KINDS, ct_phantom, cxr_phantom

ModelDirFactory = Callable[..., Path]


def _caps(monkeypatch: pytest.MonkeyPatch, caps: Mapping[str, Any]) -> None:
    monkeypatch.setattr(prec, "cpu_capabilities", lambda: caps)


def test_bf16_capability_detection_both_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    _caps(monkeypatch, {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": True})
    assert prec.cpu_bf16_feature() == "avx512_bf16"
    _caps(monkeypatch, {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": True})
    assert prec.cpu_bf16_feature() == "amx_bf16"
    _caps(monkeypatch, {"architecture": "aarch64", "neon": True, "bf16": True})
    assert prec.cpu_bf16_feature() == "bf16"
    _caps(monkeypatch, {"architecture": "x86_64", "avx512_f": True, "avx512_bf16": False})
    assert prec.cpu_bf16_feature() is None
    _caps(monkeypatch, {"architecture": "x86_64", "avx2": True})
    assert prec.cpu_bf16_feature() is None


def test_real_capability_query_matches_cpuinfo() -> None:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})
    assert (prec.cpu_bf16_feature() is not None) is native


def test_auto_picks_bf16_on_a_capable_cpu_within_tolerance(
    monkeypatch: pytest.MonkeyPatch, make_model_dir: ModelDirFactory
) -> None:
    _caps(monkeypatch, {"avx512_bf16": True})
    model = load_model(make_model_dir("cxr", 64), "cpu")
    assert model.precision == "bf16"
    assert model.precision_reason.startswith("auto: CPU has avx512_bf16; bf16 max |dp| 0.0")
    assert model.precision_reason.endswith("on 6 reference phantoms <= tolerance 0.01")


def test_auto_is_fp32_on_a_cpu_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch, make_model_dir: ModelDirFactory
) -> None:
    _caps(monkeypatch, {"avx512_f": True, "avx2": True})
    model = load_model(make_model_dir("cxr", 64), "cpu")
    assert (model.precision, model.precision_reason) == (
        "fp32",
        "auto: the CPU has no native bf16",
    )


def test_auto_falls_back_to_fp32_when_the_difference_exceeds_the_tolerance(
    monkeypatch: pytest.MonkeyPatch, make_model_dir: ModelDirFactory
) -> None:
    _caps(monkeypatch, {"avx512_bf16": True})
    model = load_model(make_model_dir("cxr", 64), "cpu", bf16_tolerance=1e-9)
    assert model.precision == "fp32"
    assert model.precision_reason.startswith("auto: CPU has avx512_bf16, but bf16 max |dp| ")
    assert model.precision_reason.endswith("on 6 reference phantoms exceeds the tolerance 1e-09")


def test_auto_falls_back_to_fp32_when_the_card_check_exceeds_the_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _caps(monkeypatch, {"avx512_bf16": True})
    model = load_model(bundled_model_dir("ct"), "cpu")
    check = {"bf16_max_abs_diff": 0.02, "tolerance": 0.01, "n": 90}
    choice = prec.auto_cpu_precision(model.predict_as, model.card.input, 2, 0.01, check)
    assert choice == prec.PrecisionChoice(
        None,
        "auto: CPU has avx512_bf16, but the model card's bf16 max |dp| 0.0200 on 90 test "
        "images exceeds the tolerance 0.01",
    )


def test_explicit_precision_and_no_warmup_are_not_measured(
    monkeypatch: pytest.MonkeyPatch, make_model_dir: ModelDirFactory
) -> None:
    _caps(monkeypatch, {"avx512_bf16": True})
    model_dir = make_model_dir("cxr", 64)
    fp32 = load_model(model_dir, "cpu", precision="fp32")
    bf16 = load_model(model_dir, "cpu", precision="bf16")
    cold = load_model(model_dir, "cpu", warmup=False)
    assert [(m.precision, m.precision_reason) for m in (fp32, bf16, cold)] == [
        ("fp32", ""),
        ("bf16", ""),
        ("fp32", "auto: bf16 not measured (no warm-up)"),
    ]


@pytest.mark.parametrize("key", ["cxr", "ct"])
def test_bundled_models_under_bf16_stay_within_the_tolerance(key: str) -> None:
    model = load_model(bundled_model_dir(key), "cpu", precision="fp32")
    spec = model.card.input
    rng = np.random.default_rng(4242)
    if key == "cxr":
        inputs = np.stack([cxr_phantom(k, rng, spec.size)[None] for k in KINDS])
    else:  # the lung and mediastinal windows of three slices per phantom volume
        vols = [ct_phantom(k, rng, (3, spec.size, spec.size)) for k in KINDS]
        inputs = np.stack(
            [
                np.stack([np.clip((v[z] - (c - w / 2)) / w, 0, 1) for c, w in spec.windows])
                for v in vols
                for z in range(3)
            ]
        )
    inputs = inputs.astype(np.float32)
    fp32 = model.predict_as(inputs, None)
    bf16 = model.predict_as(inputs, torch.bfloat16)
    assert fp32.shape == (len(inputs), len(model.card.classes))
    assert float(np.max(np.abs(bf16 - fp32))) <= InferenceSettings().bf16_tolerance


def test_precision_check_record() -> None:
    def predict(inputs: np.ndarray, autocast: torch.dtype | None) -> np.ndarray:
        p = np.full((len(inputs), 2), 0.5)
        if autocast is not None:
            p[:, 0] += 0.003
        return p

    check = prec.precision_check(predict, np.zeros((5, 1, 4, 4), np.float32), 0.01)
    assert check == {"bf16_max_abs_diff": 0.003, "tolerance": 0.01, "n": 5}
