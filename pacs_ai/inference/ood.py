"""Out-of-distribution refusal: is this series like the images the model was trained on?

Method (docs/models.md, "Out-of-distribution refusal"): class-conditional Gaussians with one
shared covariance on the model's penultimate features (Lee et al. 2018, "A simple unified
framework for detecting out-of-distribution samples"), on the square root of the features
(signed; post-ReLU pooled activations are skewed, the root makes them closer to Gaussian). Fitted on
the training units without augmentation: one mean per class and a Ledoit-Wolf shrunk
covariance of the class-centred features (a few hundred samples in 100-1000 dimensions: the
plain estimate is singular). A unit's score is its squared Mahalanobis distance to the
nearest class mean; a series' score is the mean over its scored units (images, CT slices).
The threshold is the stated quantile of the held-out in-distribution series scores (the
validation split), estimated from a log-normal fitted to them: with ~100 held-out series an
empirical 99.9% quantile is just the maximum. The card records the false-refusal rate
measured on the independent test set.

The parameters live in ``ood.safetensors`` beside the weights; the card's ``ood`` section
holds the method, threshold, quantile and rates (:class:`OodSpec`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pacs_ai.errors import ModelError
from pacs_ai.inference.card_files import read_card_file
from pacs_ai.inference.ood_spec import DEFAULT_QUANTILE, METHOD, OOD_FILE, OodSpec

# The pure-data names live in ood_spec (torch-free); re-exported here for callers that fit.
__all__ = [
    "DEFAULT_QUANTILE",
    "METHOD",
    "OOD_FILE",
    "OodDensity",
    "OodSpec",
    "fit_density",
    "refusal_reason",
    "threshold_at",
]


@dataclass(frozen=True)
class OodDensity:
    """Class means (K, D) and the shared precision matrix (D, D)."""

    means: np.ndarray
    precision: np.ndarray

    def unit_scores(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row of ``features`` (N, D) to the nearest
        class mean."""
        f = _transform(features)
        best = np.full(len(f), np.inf)
        for mu in self.means:
            d = f - mu
            best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
        return best

    def series_score(self, features: np.ndarray) -> float:
        return float(self.unit_scores(features).mean())

    def save(self, model_dir: Path) -> str:
        path = model_dir / OOD_FILE
        save_file(
            {
                "means": torch.from_numpy(self.means.astype(np.float32)),
                "precision": torch.from_numpy(self.precision.astype(np.float32)),
            },
            str(path),
        )
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, model_dir: Path, spec: OodSpec) -> OodDensity:
        path = model_dir / spec.file
        read_card_file(model_dir, spec.file, spec.sha256)
        try:
            tensors = load_file(str(path))
            return cls(tensors["means"].double().numpy(), tensors["precision"].double().numpy())
        except Exception as exc:  # corrupt files raise many types
            raise ModelError(f"cannot read {spec.file}: {type(exc).__name__}") from exc


def fit_density(features: np.ndarray, labels: np.ndarray) -> OodDensity:
    """Class means and a Ledoit-Wolf shrunk shared covariance of ``features`` (N, D)."""
    from sklearn.covariance import LedoitWolf

    f = _transform(features)
    classes = sorted(set(labels.tolist()))
    means = np.stack([f[labels == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    return OodDensity(means, np.linalg.pinv(cov, hermitian=True))


def _transform(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    return np.sign(f) * np.sqrt(np.abs(f))  # signed: a program's features may be negative


def threshold_at(heldout_series_scores: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of held-out in-distribution series scores, from a log-normal fitted
    to them (never below their empirical quantile)."""
    from scipy.stats import norm

    if not 0.5 <= quantile < 1:
        raise ValueError("the OOD quantile must be in [0.5, 1)")
    scores = np.asarray(heldout_series_scores, dtype=np.float64)
    if len(scores) < 2:
        raise ValueError("the OOD threshold needs at least two held-out series")
    logs = np.log(np.maximum(scores, 1e-12))
    fitted = float(np.exp(logs.mean() + float(norm.ppf(quantile)) * logs.std(ddof=1)))
    return max(fitted, float(np.quantile(scores, quantile)))


def refusal_reason(score: float, threshold: float) -> str:
    """The not-applicable reason recorded for a refused series."""
    return f"unlike the images this model was trained on (score {score:.3f} > {threshold:.3f})"
