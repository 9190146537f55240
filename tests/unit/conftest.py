"""Shared fixtures for the imaging/inference/training tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pacs_ai.imaging.spec import InputSpec
from pacs_ai.inference.card import ModelCard, findings_for
from pacs_ai.inference.runner import build_from_card, save_weights


def _passing_metrics(classes: tuple[str, ...]) -> dict[str, object]:
    """Validation metrics that pass the deployment check (for untrained test models)."""
    return {
        "per_class": {c: {"auc": {"value": 0.9}} for c in classes},
        "predicted_class_counts": {c: 1 for c in classes},
        "balanced_accuracy": 0.9,
        "majority_baseline": {"balanced_accuracy": 1 / len(classes)},
    }


@pytest.fixture
def make_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write a randomly initialised model directory: (kind, size, metrics=None) -> path."""

    def make(kind: str, size: int, metrics: dict[str, object] | None = None) -> Path:
        classes = ("covid", "normal", "pneumonia") if kind == "cxr" else ("covid", "other")
        spec = InputSpec.default(kind, size)  # type: ignore[arg-type]
        if kind == "ct":
            spec = InputSpec("ct", size, spec.windows, 6)
        card = ModelCard(
            name=f"test-{kind}",
            version="0",
            kind=kind,  # type: ignore[arg-type]
            arch="resnet18_slim",
            classes=classes,
            input=spec,
            thresholds={f.label: 0.5 for f in findings_for(classes)},
            findings=findings_for(classes),
            demo=True,
            aggregation="max_image" if kind == "cxr" else "topk_mean:0.25",
            metrics={"validation": _passing_metrics(classes) if metrics is None else metrics},
        )
        out = tmp_path / f"model-{kind}-{size}"
        out.mkdir()
        model = build_from_card(card)
        name, sha = save_weights(model, out, half=False)
        card = ModelCard(**{**card.__dict__, "weights_file": name, "weights_sha256": sha})
        card.save(out)
        return out

    return make
