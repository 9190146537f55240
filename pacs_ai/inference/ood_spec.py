"""The card's ``ood`` section (:class:`OodSpec`) and its defaults: pure data, torch-free.

The density itself (fitting, scoring, ``ood.safetensors``) is :mod:`pacs_ai.inference.ood`,
which needs torch; model cards and the CLI need only this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OOD_FILE = "ood.safetensors"
METHOD = "mahalanobis_shared_covariance"
DEFAULT_QUANTILE = 0.9999


@dataclass(frozen=True)
class OodSpec:
    """The card's ``ood`` section."""

    threshold: float
    quantile: float
    method: str = METHOD
    file: str = OOD_FILE
    sha256: str = ""
    feature: str = "penultimate"
    series_score: str = "mean over the scored images / slices"
    heldout_units: int = 0
    false_refusal_rate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "feature": self.feature,
            "file": self.file,
            "sha256": self.sha256,
            "series_score": self.series_score,
            "threshold": round(self.threshold, 3),
            "quantile": self.quantile,
            "heldout_units": self.heldout_units,
            "false_refusal_rate": self.false_refusal_rate or {},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OodSpec:
        return cls(
            threshold=float(data["threshold"]),
            quantile=float(data["quantile"]),
            method=str(data.get("method", METHOD)),
            file=str(data.get("file", OOD_FILE)),
            sha256=str(data.get("sha256", "")),
            feature=str(data.get("feature", "penultimate")),
            series_score=str(data.get("series_score", "")),
            heldout_units=int(data.get("heldout_units", 0)),
            false_refusal_rate=dict(data.get("false_refusal_rate") or {}),
        )
