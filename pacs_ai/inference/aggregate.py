"""From per-image probabilities to one series (study-level) score.

CT (slice model, ``aggregation = "topk_mean:0.25"``): for each reportable finding class, the
mean of its probability over the top 25% most suspicious scored slices (at least one slice):
a focal finding on a few slices is not averaged away, one noisy slice does not decide alone.
The remaining probability mass (1 - sum of the findings, clipped at 0) is shared among the
non-finding classes in proportion to their mean slice probability. When the findings sum
above 1 they are scaled to sum 1. The "most suspicious slice" (shown in reports) is the slice
with the highest finding probability.

X-ray (``aggregation = "max_image"``): a series with several frontal images takes the scores
of its most suspicious image (highest finding probability).
"""

from __future__ import annotations

import math

import numpy as np


def parse_topk(aggregation: str) -> float:
    """The fraction of ``topk_mean:F`` (default 0.25)."""
    _, _, value = aggregation.partition(":")
    fraction = float(value) if value else 0.25
    if not 0 < fraction <= 1:
        raise ValueError(f"top-k fraction {fraction} outside (0, 1]")
    return fraction


def suspicion(probs: np.ndarray, finding_idx: list[int]) -> np.ndarray:
    """Per image: the highest reportable-finding probability (N,)."""
    if not finding_idx:
        return np.zeros(len(probs), dtype=np.float64)
    return np.asarray(probs[:, finding_idx].max(axis=1), dtype=np.float64)


def aggregate(probs: np.ndarray, finding_idx: list[int], aggregation: str) -> np.ndarray:
    """Series probabilities (K,) from image probabilities (N, K); see module doc."""
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError("need at least one image's probabilities")
    if aggregation == "max_image" or (len(probs) == 1 and not aggregation.startswith("topk")):
        return np.asarray(probs[int(suspicion(probs, finding_idx).argmax())], dtype=np.float64)
    fraction = parse_topk(aggregation)
    k = max(1, math.ceil(fraction * len(probs)))
    out = np.zeros(probs.shape[1], dtype=np.float64)
    for j in finding_idx:
        out[j] = float(np.sort(probs[:, j])[-k:].mean())
    total = out.sum()
    if total > 1.0:
        out /= total
        return out
    rest = [j for j in range(probs.shape[1]) if j not in finding_idx]
    if rest:
        means = probs[:, rest].mean(axis=0).astype(np.float64)
        share = means / means.sum() if means.sum() > 0 else np.full(len(rest), 1 / len(rest))
        out[rest] = (1.0 - total) * share
    return out
