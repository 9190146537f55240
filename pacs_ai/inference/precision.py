"""Which arithmetic a model runs in: ``inference.precision`` resolved for the device.

Explicit ``fp32`` / ``bf16`` / ``fp16`` are used as configured. ``auto``:

- CUDA: bf16 autocast where the GPU supports it, else fp16 (unchanged);
- CPU: bf16 autocast only when the CPU has native bf16 arithmetic
  (:func:`cpu_bf16_feature`: x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16`` /
  ``sve_bf16``, as torch's ``torch.cpu.get_capabilities()`` reports them) AND the model's
  probabilities under bf16 stay within ``inference.bf16_tolerance`` of fp32: measured at
  load time on a few synthetic phantoms at the model's input size
  (:func:`reference_inputs`), and, when the model card carries a ``precision_check`` from
  ``pacs-ai evaluate`` on its test set, that one too. Otherwise fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pacs_ai.imaging.ct import hu_window
from pacs_ai.imaging.spec import InputSpec

# Native bf16 CPU features, in the order they are named in the reason.
BF16_CPU_FEATURES = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
DEFAULT_BF16_TOLERANCE = 0.01
REFERENCE_IMAGES = 6  # 2 normal, 2 covid, 2 pneumonia phantoms
_REFERENCE_SEED = 20260

Predict = Callable[[np.ndarray, torch.dtype | None], np.ndarray]


@dataclass(frozen=True)
class PrecisionChoice:
    """The autocast type (None: fp32) and why (empty for an explicit configuration)."""

    autocast: torch.dtype | None
    reason: str = ""


def cpu_capabilities() -> Mapping[str, Any]:
    """The CPU features torch detected (a seam for tests)."""
    return torch.cpu.get_capabilities()


def cpu_bf16_feature() -> str | None:
    """The CPU feature that gives native bf16 arithmetic, or None (bf16 would be emulated)."""
    caps = cpu_capabilities()
    return next((f for f in BF16_CPU_FEATURES if caps.get(f) is True), None)


def reference_inputs(spec: InputSpec, channels: int, n: int = REFERENCE_IMAGES) -> np.ndarray:
    """``n`` deterministic phantom model inputs (n, channels, size, size) in [0, 1]."""
    from pacs_ai.training.phantoms import KINDS, ct_phantom, cxr_phantom

    rng = np.random.default_rng(_REFERENCE_SEED)
    out = np.empty((n, channels, spec.size, spec.size), dtype=np.float32)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if spec.kind == "cxr":
            planes = cxr_phantom(kind, rng, spec.size)[None]
        else:
            volume = ct_phantom(kind, rng, (3, spec.size, spec.size))
            windows = spec.windows or ((-600.0, 1500.0),)
            planes = np.stack([hu_window(volume[1], c, w) for c, w in windows])
        out[i] = np.resize(planes, (channels, spec.size, spec.size))
    return out


def bf16_max_abs_diff(predict: Predict, inputs: np.ndarray) -> float:
    """The largest |p_bf16 - p_fp32| over all inputs and classes."""
    fp32 = predict(inputs, None)
    bf16 = predict(inputs, torch.bfloat16)
    return float(np.max(np.abs(bf16 - fp32))) if fp32.size else 0.0


def precision_check(predict: Predict, inputs: np.ndarray, tolerance: float) -> dict[str, Any]:
    """What a model card records: ``{"bf16_max_abs_diff", "tolerance", "n"}``."""
    diff = bf16_max_abs_diff(predict, inputs)
    return {"bf16_max_abs_diff": round(diff, 6), "tolerance": tolerance, "n": len(inputs)}


def auto_cpu_precision(
    predict: Predict,
    spec: InputSpec,
    channels: int,
    tolerance: float,
    card_check: Mapping[str, Any] | None = None,
) -> PrecisionChoice:
    """``auto`` on the CPU (see module doc)."""
    feature = cpu_bf16_feature()
    if feature is None:
        return PrecisionChoice(None, "auto: the CPU has no native bf16")
    if card_check and float(card_check.get("bf16_max_abs_diff", 0.0)) > tolerance:
        card_diff = float(card_check["bf16_max_abs_diff"])
        return PrecisionChoice(
            None,
            f"auto: CPU has {feature}, but the model card's bf16 max |dp| {card_diff:.4f} "
            f"on {card_check.get('n', '?')} test images exceeds the tolerance {tolerance:g}",
        )
    inputs = reference_inputs(spec, channels)
    diff = bf16_max_abs_diff(predict, inputs)
    measured = f"bf16 max |dp| {diff:.4f} on {len(inputs)} reference phantoms"
    if diff > tolerance:
        return PrecisionChoice(
            None, f"auto: CPU has {feature}, but {measured} exceeds the tolerance {tolerance:g}"
        )
    return PrecisionChoice(
        torch.bfloat16, f"auto: CPU has {feature}; {measured} <= tolerance {tolerance:g}"
    )
