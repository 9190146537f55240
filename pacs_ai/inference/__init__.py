"""Model registry, model cards, batched runner, device selection, heatmaps.

Public surface::

    load_model(model_dir, device="auto", batch_size=16, *, precision="auto", warmup=True)
        -> LoadedModel
    LoadedModel.card / .device / .score_series(series) -> list[SeriesScore]
    bundled_model_dir("cxr" | "ct") -> Path
    resolve_model_dir("bundled:cxr" | path) -> Path
"""

from __future__ import annotations

from pathlib import Path

from pacs_ai.codes import Code
from pacs_ai.errors import ModelError
from pacs_ai.inference.card import Finding, ModelCard, load_card
from pacs_ai.inference.runner import LoadedModel, SeriesScore, load_model, select_device

BUNDLED_PREFIX = "bundled:"

__all__ = [
    "BUNDLED_PREFIX",
    "Code",
    "Finding",
    "LoadedModel",
    "ModelCard",
    "SeriesScore",
    "bundled_model_dir",
    "load_card",
    "load_model",
    "resolve_model_dir",
    "select_device",
]


def bundled_model_dir(kind: str) -> Path:
    """The directory of the bundled demo model for ``kind`` ("cxr" or "ct")."""
    if kind not in ("cxr", "ct"):
        raise ModelError(f"no bundled model for kind {kind!r}")
    return Path(__file__).resolve().parent.parent / "models" / f"{kind}-demo"


def resolve_model_dir(value: str | Path) -> Path:
    """A model directory from a config value: ``bundled:cxr``/``bundled:ct`` or a path."""
    text = str(value)
    if text.startswith(BUNDLED_PREFIX):
        return bundled_model_dir(text[len(BUNDLED_PREFIX) :])
    return Path(text)
