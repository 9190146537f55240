"""Classification metrics with confidence intervals, the majority-class baseline, thresholds
for a target sensitivity and temperature scaling.

Proportions (sensitivity, specificity, PPV, NPV) carry 95% Wilson score intervals; ROC AUC
carries a 95% interval from the Hanley & McNeil (1982) standard error. Per class metrics are
one-vs-rest; for a class with an operating threshold the decision is ``p >= threshold``, for
the others it is "the class has the highest probability". The confusion matrix uses the
highest probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

Z95 = 1.959963984540054


def wilson(successes: int, total: int, z: float = Z95) -> dict[str, Any]:
    """Proportion with its Wilson score interval; value None when ``total`` is 0."""
    if total == 0:
        return {"value": None, "ci": [None, None], "n": 0}
    p = successes / total
    denom = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denom
    return {"value": p, "ci": [max(0.0, centre - half), min(1.0, centre + half)], "n": total}


def auc_with_ci(y: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    """ROC AUC of ``score`` for binary ``y`` with the Hanley-McNeil 95% interval."""
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return {"value": None, "ci": [None, None]}
    auc = float(roc_auc_score(y, score))
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    se = math.sqrt(max(var, 0.0))
    return {"value": auc, "ci": [max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se)]}


def threshold_for_sensitivity(y: np.ndarray, score: np.ndarray, target: float) -> float:
    """The operating threshold (decision ``score >= t``) for a target sensitivity.

    Among thresholds whose sensitivity is at least ``target``, specificity is highest for
    every t in (n, s], where s is the score of the last positive needed and n the highest
    negative score below s; the midpoint of that interval is returned, so the threshold keeps
    a margin on both sides instead of sitting on a validation score. 0.5 without positives.
    """
    pos = np.sort(score[y == 1])[::-1]
    if len(pos) == 0:
        return 0.5
    need = max(1, math.ceil(target * len(pos)))
    high = float(pos[need - 1])
    neg = score[(y != 1) & (score < high)]
    low = float(neg.max()) if len(neg) else 0.0
    return (high + low) / 2


def classification_report(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    thresholds: dict[str, float],
) -> dict[str, Any]:
    """All metrics of DESIGN.md §5 for labels ``y_true`` (N,) and probabilities (N, K)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    k = len(classes)
    predicted = probs.argmax(axis=1)
    counts = np.bincount(y_true, minlength=k)
    majority = int(counts.argmax())
    confusion = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(y_true, predicted, strict=True):
        confusion[t, p] += 1
    per_class: dict[str, Any] = {}
    recalls = []
    for j, label in enumerate(classes):
        truth = y_true == j
        decision = probs[:, j] >= thresholds[label] if label in thresholds else predicted == j
        tp = int((decision & truth).sum())
        fp = int((decision & ~truth).sum())
        fn = int((~decision & truth).sum())
        tn = int((~decision & ~truth).sum())
        per_class[label] = {
            "decision": (
                f"p >= {thresholds[label]:.4f}" if label in thresholds else "highest probability"
            ),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "sensitivity": wilson(tp, tp + fn),
            "specificity": wilson(tn, tn + fp),
            "ppv": wilson(tp, tp + fp),
            "npv": wilson(tn, tn + fn),
            "auc": auc_with_ci(truth.astype(np.int64), probs[:, j]),
        }
        if counts[j]:
            recalls.append(confusion[j, j] / counts[j])
    aucs = [v["auc"]["value"] for v in per_class.values() if v["auc"]["value"] is not None]
    return {
        "n": len(y_true),
        "class_counts": {c: int(counts[j]) for j, c in enumerate(classes)},
        "predicted_class_counts": {c: int((predicted == j).sum()) for j, c in enumerate(classes)},
        "accuracy": float((predicted == y_true).mean()) if len(y_true) else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "majority_baseline": {
            "class": classes[majority],
            "accuracy": float(counts[majority] / max(len(y_true), 1)),
            "balanced_accuracy": 1.0 / k,
            "auc": 0.5,
        },
        "confusion_matrix": {
            "rows": "true class",
            "columns": "predicted class (highest probability)",
            "labels": list(classes),
            "matrix": confusion.tolist(),
        },
        "per_class": per_class,
    }


def fit_temperature(nll_at: Callable[[float], float], grid: np.ndarray | None = None) -> float:
    """The temperature minimising ``nll_at(T)`` over a log grid 1..8 (then refined).

    T >= 1 only softens: calibration never makes the model more confident than it was
    trained to be (a separable validation set would otherwise drive T towards 0).
    """
    grid = np.exp(np.linspace(0.0, np.log(8.0), 31)) if grid is None else grid
    losses = [nll_at(float(t)) for t in grid]
    best = int(np.argmin(losses))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    fine = np.exp(np.linspace(np.log(lo), np.log(hi), 11))
    losses_f = [nll_at(float(t)) for t in fine]
    return float(fine[int(np.argmin(losses_f))])


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A short human-readable table of a :func:`classification_report`."""

    def fmt(m: dict[str, Any]) -> str:
        if m["value"] is None:
            return "   n/a            "
        return f"{m['value']:.3f} [{m['ci'][0]:.3f}-{m['ci'][1]:.3f}]"

    lines = [
        f"n={report['n']}  accuracy={report['accuracy']:.3f}  "
        f"balanced accuracy={report['balanced_accuracy']:.3f}  macro AUC="
        + (f"{report['macro_auc']:.3f}" if report["macro_auc"] is not None else "n/a"),
        f"majority-class baseline: always {report['majority_baseline']['class']!r}: "
        f"accuracy={report['majority_baseline']['accuracy']:.3f}  balanced accuracy="
        f"{report['majority_baseline']['balanced_accuracy']:.3f}  AUC=0.5",
        f"{'class':<12}{'sensitivity':<24}{'specificity':<24}{'PPV':<24}{'NPV':<24}AUC",
    ]
    for label, m in report["per_class"].items():
        lines.append(
            f"{label:<12}{fmt(m['sensitivity']):<24}{fmt(m['specificity']):<24}"
            f"{fmt(m['ppv']):<24}{fmt(m['npv']):<24}{fmt(m['auc'])}"
        )
    labels = report["confusion_matrix"]["labels"]
    lines.append("confusion matrix (rows true, columns predicted): " + " ".join(labels))
    for label, row in zip(labels, report["confusion_matrix"]["matrix"], strict=True):
        lines.append(f"  {label:<12}" + " ".join(f"{v:>6}" for v in row))
    return lines
