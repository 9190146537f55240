"""``pacs-ai evaluate``: the DESIGN.md §5 metrics of a model directory on a data folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.errors import ModelError
from pacs_ai.inference.aggregate import aggregate
from pacs_ai.inference.precision import DEFAULT_BF16_TOLERANCE, precision_check
from pacs_ai.inference.runner import LoadedModel
from pacs_ai.training.datasets import discover, load_ct_inputs, load_xray_inputs
from pacs_ai.training.metrics import classification_report


def evaluate(
    model: LoadedModel,
    data_dir: Path,
    groups: Mapping[str, Sequence[str]] | None = None,
    progress: bool = False,
    bf16_tolerance: float = DEFAULT_BF16_TOLERANCE,
) -> dict[str, Any]:
    """Score every sample under ``data_dir`` with the model's own thresholds and report,
    with the bf16 vs fp32 ``precision_check`` over all its model inputs."""
    card = model.card
    classes, samples = discover(data_dir, card.kind, groups)
    if classes != card.classes:
        raise ModelError(
            f"{data_dir} has classes {list(classes)}, the model {list(card.classes)} "
            "(use --group to merge folders)"
        )
    labels = np.array([s.label for s in samples], dtype=np.int64)
    finding_idx = [card.classes.index(f.label) for f in card.findings]
    if card.kind == "cxr":
        inputs = load_xray_inputs(samples, card.input, progress).astype(np.float32)
        probs = model.predict(inputs)
    else:
        series = [s.astype(np.float32) for s in load_ct_inputs(samples, card.input, progress)]
        probs = np.stack(
            [aggregate(model.predict(s), finding_idx, card.aggregation) for s in series]
        )
        inputs = np.concatenate(series)
    report = classification_report(labels, probs, classes, card.thresholds)
    report["model"] = {"name": card.name, "version": card.version, "demo": card.demo}
    report["precision"] = model.precision
    report["precision_check"] = precision_check(model.predict_as, inputs, bf16_tolerance)
    return report
