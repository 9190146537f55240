"""Model registry, model cards, batched runner, device selection, heatmaps.

Public surface::

    load_model(model_dir, device="auto", batch_size=16, *, precision="auto", warmup=True)
        -> LoadedModel
    LoadedModel.card / .device / .score_series(series) -> list[SeriesScore]
    bundled_model_dir("cxr" | "ct") -> Path
    resolve_model_dir("bundled:cxr" | path) -> Path

Importing this package does not import torch: the card, the bundled-model paths and the
other pure-data names are plain imports, while the torch-backed names of
:mod:`pacs_ai.inference.runner` (``load_model``, ``LoadedModel``, ``SeriesScore``,
``select_device``) resolve on first use (PEP 562 module ``__getattr__``). The ``pacs-ai
serve`` parent process (listener, assembly, outbox, console) relies on this; only the
scoring child (:mod:`pacs_ai.scoring_worker`) loads models. ``tests/unit/test_imports.py``
checks it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacs_ai.codes import Code
from pacs_ai.errors import ModelError
from pacs_ai.inference.card import Finding, ModelCard, load_card

if TYPE_CHECKING:
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

# name -> module that defines it; imported on first attribute access (torch-backed)
_LAZY: dict[str, str] = {
    "LoadedModel": "pacs_ai.inference.runner",
    "SeriesScore": "pacs_ai.inference.runner",
    "load_model": "pacs_ai.inference.runner",
    "select_device": "pacs_ai.inference.runner",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
