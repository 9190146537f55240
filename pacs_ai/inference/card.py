"""The model card (``card.json`` beside the weights, DESIGN.md §5) and the deployment check.

A card names the classes, the input spec, the preprocessing, the training data, the
calibration, the operating thresholds and how they were chosen, and the validation metrics
(per class sensitivity, specificity, PPV, NPV with 95% CIs, ROC AUC, confusion matrix,
majority-class baseline). :func:`deployment_problems` is the one rule set that both
``pacs-ai train`` and :func:`pacs_ai.inference.load_model` apply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pacs_ai.codes import COVID19, PNEUMONIA, Code
from pacs_ai.errors import ModelError, ModelRefused
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.inference.card_schema import validate_card
from pacs_ai.inference.ood_spec import OodSpec

CARD_FILE = "card.json"
SAFETENSORS_FILE = "model.safetensors"
STATE_DICT_FILE = "model.pt"


@dataclass(frozen=True)
class Finding:
    """A reportable finding: the class ``label`` it is scored by and its code."""

    label: str
    code: Code


# Class labels that are reportable findings, with their SNOMED CT codes.
KNOWN_FINDINGS: dict[str, Code] = {
    "covid": COVID19,
    "pneumonia": PNEUMONIA,
}
# Class labels that mean "no finding": never reported as present.
NON_FINDINGS = frozenset({"normal", "other", "non-covid", "not-covid", "negative"})


def findings_for(classes: tuple[str, ...]) -> tuple[Finding, ...]:
    return tuple(Finding(c, KNOWN_FINDINGS[c]) for c in classes if c in KNOWN_FINDINGS)


@dataclass(frozen=True)
class ModelCard:
    """Everything a deployment needs to know about a trained model (see module doc)."""

    name: str
    version: str
    kind: Literal["cxr", "ct"]
    arch: str
    classes: tuple[str, ...]
    input: InputSpec
    thresholds: dict[str, float]
    findings: tuple[Finding, ...]
    demo: bool
    temperature: float = 1.0
    aggregation: str = "none"
    threshold_policy: str = ""
    intended_use: str = ""
    weights_file: str = SAFETENSORS_FILE
    weights_sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    ood: OodSpec | None = None
    # validation reference for monitoring: n, positive_rate and score_deciles per finding
    reference: dict[str, Any] = field(default_factory=dict)
    # bring-your-own programs (docs/models.md): "builtin", "torchscript" or "torch_export"
    format: str = "builtin"
    program: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "kind": self.kind,
            "arch": self.arch,
            "demo": self.demo,
            "intended_use": self.intended_use,
            "classes": list(self.classes),
            "findings": [
                {
                    "label": f.label,
                    "code": {
                        "scheme": f.code.scheme,
                        "value": f.code.value,
                        "meaning": f.code.meaning,
                    },
                }
                for f in self.findings
            ],
            "input": self.input.to_dict(),
            "temperature": self.temperature,
            "aggregation": self.aggregation,
            "thresholds": self.thresholds,
            "threshold_policy": self.threshold_policy,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "training": self.training,
            "metrics": self.metrics,
            **({"ood": self.ood.to_dict()} if self.ood else {}),
            **({"reference": self.reference} if self.reference else {}),
            **({"format": self.format, "program": self.program} if self.program else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        try:
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                kind=data["kind"],
                arch=str(data["arch"]),
                classes=tuple(data["classes"]),
                input=InputSpec.from_dict(data["input"]),
                thresholds={k: float(v) for k, v in data["thresholds"].items()},
                findings=tuple(
                    Finding(f["label"], Code(**f["code"])) for f in data.get("findings", [])
                ),
                demo=bool(data.get("demo", False)),
                temperature=float(data.get("temperature", 1.0)),
                aggregation=str(data.get("aggregation", "none")),
                threshold_policy=str(data.get("threshold_policy", "")),
                intended_use=str(data.get("intended_use", "")),
                weights_file=str(data.get("weights_file", SAFETENSORS_FILE)),
                weights_sha256=str(data.get("weights_sha256", "")),
                metrics=dict(data.get("metrics", {})),
                training=dict(data.get("training", {})),
                ood=OodSpec.from_dict(data["ood"]) if data.get("ood") else None,
                reference=dict(data.get("reference", {})),
                format=str(data.get("format", "builtin")),
                program=dict(data.get("program", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model card is invalid: {type(exc).__name__}: {exc}") from exc

    def save(self, model_dir: Path) -> Path:
        path = model_dir / CARD_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


def load_card(model_dir: Path) -> ModelCard:
    path = model_dir / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"no {CARD_FILE} in {model_dir}") from exc
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    validate_card(data)
    return ModelCard.from_dict(data)


def deployment_problems(metrics: dict[str, Any], classes: tuple[str, ...]) -> list[str]:
    """Why a model with these validation metrics must not be deployed (empty: fine).

    Refused when: no validation metrics; the predicted classes collapse to one; a class's
    one-vs-rest ROC AUC is not above the constant-score baseline (0.5); balanced accuracy
    is not above the majority-class baseline's (1 / number of classes).
    """
    if not metrics or "per_class" not in metrics:
        return ["the model card has no validation metrics"]
    problems: list[str] = []
    predicted = {k: v for k, v in metrics.get("predicted_class_counts", {}).items() if v}
    if len(predicted) < 2:
        only = next(iter(predicted), "?")
        problems.append(f"predictions collapse to one class ({only!r}) on the validation set")
    for label in classes:
        auc = metrics["per_class"].get(label, {}).get("auc", {}).get("value")
        if auc is None or not auc > 0.5:
            problems.append(f"ROC AUC for {label!r} is {auc}, not above the baseline 0.5")
    baseline = metrics.get("majority_baseline", {}).get("balanced_accuracy", 1 / len(classes))
    bacc = metrics.get("balanced_accuracy")
    if bacc is None or not bacc > baseline:
        problems.append(
            f"balanced accuracy {bacc} is not above the majority-class baseline {baseline:.3f}"
        )
    return problems


def check_deployable(card: ModelCard) -> None:
    """Raise :class:`ModelRefused` when :func:`deployment_problems` finds anything."""
    problems = deployment_problems(card.metrics.get("validation", {}), card.classes)
    if problems:
        raise ModelRefused(f"model {card.name!r} refused: " + "; ".join(problems))
