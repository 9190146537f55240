"""Fit the out-of-distribution density and the monitoring reference of a model.

Used at the end of ``pacs-ai train`` and by ``pacs-ai fit-ood`` (an already trained model,
e.g. a bring-your-own program or the bundled demos: the same split is re-derived from the
card's seed). See :mod:`pacs_ai.inference.ood` for the method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pacs_ai.errors import ModelRefused
from pacs_ai.inference.aggregate import aggregate
from pacs_ai.inference.card import ModelCard
from pacs_ai.inference.ood import OodDensity, fit_density, threshold_at
from pacs_ai.inference.ood_spec import DEFAULT_QUANTILE, OodSpec

# (N, C, S, S) float32 -> probabilities (N, K), features (N, D)
Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Units = np.ndarray | list[np.ndarray]  # cxr: (N, 1, S, S); ct: per series (K, C, S, S)


def _per_series(units: Units) -> list[np.ndarray]:
    if isinstance(units, np.ndarray):
        return [units[i : i + 1] for i in range(len(units))]
    return list(units)


def series_outputs(forward: Forward, units: Units) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probabilities, features) per series (one image, or the slices of one CT series)."""
    series = _per_series(units)
    if not series:
        return []
    flat = np.concatenate(series).astype(np.float32)
    probs, feats = [], []
    for i in range(0, len(flat), 64):
        p, f = forward(flat[i : i + 64])
        probs.append(p)
        feats.append(f)
    all_p, all_f = np.concatenate(probs), np.concatenate(feats)
    cuts = np.cumsum([len(s) for s in series])[:-1]
    return list(zip(np.split(all_p, cuts), np.split(all_f, cuts), strict=True))


def fit_ood(
    forward: Forward,
    train_units: Units,
    train_labels: np.ndarray,
    heldout_units: Units,
    test_units: Units | None,
    quantile: float = DEFAULT_QUANTILE,
) -> tuple[OodSpec, OodDensity]:
    """Fit on the training units, threshold on the held-out series, measure on the test."""
    train = series_outputs(forward, train_units)
    feats = np.concatenate([f for _, f in train])
    sizes = [len(f) for _, f in train]
    labels = np.repeat(np.asarray(train_labels), sizes)
    density = fit_density(feats, labels)
    heldout = np.array([density.series_score(f) for _, f in series_outputs(forward, heldout_units)])
    threshold = threshold_at(heldout, quantile)
    rates: dict[str, Any] = {
        "validation": {"refused": int((heldout > threshold).sum()), "n": len(heldout)},
    }
    if test_units is not None:
        test = np.array([density.series_score(f) for _, f in series_outputs(forward, test_units)])
        refused = int((test > threshold).sum())
        rates["test"] = {
            "value": round(refused / max(len(test), 1), 4),
            "refused": refused,
            "n": len(test),
        }
    spec = OodSpec(
        threshold=threshold,
        quantile=quantile,
        heldout_units=len(heldout),
        false_refusal_rate=rates,
    )
    return spec, density


def reference(card: ModelCard, val_probs: np.ndarray) -> dict[str, Any]:
    """The validation reference monitoring compares against: per finding, the positive rate
    at the operating threshold and the score deciles (for PSI)."""
    out: dict[str, Any] = {"n": len(val_probs), "positive_rate": {}, "score_deciles": {}}
    for f in card.findings:
        scores = val_probs[:, card.classes.index(f.label)]
        rate = float((scores >= card.thresholds[f.label]).mean())
        out["positive_rate"][f.label] = round(rate, 4)
        deciles = np.quantile(scores, np.linspace(0, 1, 11))
        out["score_deciles"][f.label] = [round(float(q), 6) for q in deciles]
    return out


def unit_probs(card: ModelCard, outputs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    finding_idx = [card.classes.index(f.label) for f in card.findings]
    return np.stack([aggregate(p, finding_idx, card.aggregation) for p, _ in outputs])


def fit_model_dir(
    model_dir: Path,
    data_dir: Path,
    *,
    test_dir: Path | None,
    groups: Mapping[str, Sequence[str]] | None,
    quantile: float,
    val_fraction: float,
    device: str = "auto",
    progress: bool = False,
) -> ModelCard:
    """``pacs-ai fit-ood``: fit and store the OOD density and reference of a trained model
    directory, re-deriving the training/validation split from the card's seed."""
    from pacs_ai.inference.runner import load_model
    from pacs_ai.training.datasets import discover, load_ct_inputs, load_xray_inputs, patient_split

    model = load_model(model_dir, device, 32, require_deployable=False)
    card = model.card
    seed = int(card.training.get("seed", 0))

    def load(folder: Path) -> tuple[Units, np.ndarray, list[str]]:
        classes, samples = discover(folder, card.kind, groups)
        if classes != card.classes:
            raise ModelRefused(
                f"{folder} has classes {list(classes)}, the model {list(card.classes)}"
            )
        labels = np.array([s.label for s in samples], dtype=np.int64)
        units: Units = (
            load_xray_inputs(samples, card.input, progress)
            if card.kind == "cxr"
            else load_ct_inputs(samples, card.input, progress)
        )
        return units, labels, [s.group for s in samples]

    units, labels, patient = load(data_dir)
    train_idx, val_idx = patient_split(labels, patient, val_fraction, seed)

    def pick(idx: np.ndarray) -> Units:
        return units[idx] if isinstance(units, np.ndarray) else [units[i] for i in idx]

    test_units = load(test_dir)[0] if test_dir is not None else None
    spec, density = fit_ood(
        model.predict_with_features,
        pick(train_idx),
        labels[train_idx],
        pick(val_idx),
        test_units,
        quantile,
    )
    spec = replace(spec, sha256=density.save(model_dir))
    val_probs = unit_probs(card, series_outputs(model.predict_with_features, pick(val_idx)))
    card = replace(card, ood=spec, reference=reference(card, val_probs))
    card.save(model_dir)
    return card
