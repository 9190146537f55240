"""Bring your own model: a TorchScript / torch.export program plus a card, validated by the
card schema, used by predict, evaluate, fit-ood and the runner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pacs_ai.cli import main
from pacs_ai.errors import ModelError
from pacs_ai.inference import load_card, load_model
from pacs_ai.inference.card_schema import json_schema
from pacs_ai.training.synth import synth

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "docs" / "model-card.schema.json"


class _Tiny(nn.Module):
    """3-channel input (ImageNet-like), returns (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.head(feats), feats


def _card(file: str, fmt: str, sha: str) -> dict[str, object]:
    return {
        "name": "site-cnn",
        "version": "2",
        "kind": "cxr",
        "arch": "program",
        "demo": False,
        "classes": ["covid", "normal", "pneumonia"],
        "findings": [
            {
                "label": "covid",
                "code": {"scheme": "SCT", "value": "840539006", "meaning": "COVID-19"},
            },
            {
                "label": "pneumonia",
                "code": {"scheme": "SCT", "value": "233604007", "meaning": "Pneumonia"},
            },
        ],
        "input": {"kind": "cxr", "size": 64, "channels": 1},
        "thresholds": {"covid": 0.5, "pneumonia": 0.5},
        "metrics": {
            "validation": {
                "per_class": {c: {"auc": {"value": 0.9}} for c in ("covid", "normal", "pneumonia")},
                "predicted_class_counts": {"covid": 3, "normal": 3, "pneumonia": 3},
                "balanced_accuracy": 0.9,
                "majority_baseline": {"balanced_accuracy": 1 / 3},
            }
        },
        "format": fmt,
        "program": {
            "file": file,
            "sha256": sha,
            "outputs": ["logits", "features"],
            "feature_output": "features",
            "channels": 3,
            "normalization": {
                "mode": "mean_std",
                "mean": [0.485, 0.456, 0.406],
                "std": [0.229, 0.224, 0.225],
            },
        },
    }


def _export(tmp: Path, fmt: str) -> Path:
    torch.manual_seed(0)
    net = _Tiny().eval()
    model_dir = tmp / f"byom-{fmt}"
    model_dir.mkdir()
    example = torch.rand(2, 3, 64, 64)
    if fmt == "torchscript":
        file = "model.ts"
        torch.jit.save(torch.jit.trace(net, example), str(model_dir / file))
    else:
        file = "model.pt2"
        batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
        program = torch.export.export(net, (example,), dynamic_shapes=batch)
        torch.export.save(program, str(model_dir / file))
    sha = hashlib.sha256((model_dir / file).read_bytes()).hexdigest()
    (model_dir / "card.json").write_text(json.dumps(_card(file, fmt, sha)))
    return model_dir


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("byom-data")
    synth(root, "cxr", 30, seed=21, size=96)
    return root


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_program_model_predicts_evaluates_and_fits_ood(
    fmt: str, tmp_path: Path, phantoms: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = _export(tmp_path, fmt)
    model = load_model(model_dir, "cpu")
    one = sorted(phantoms.rglob("*.dcm"))[0]
    (score,) = model.score_series([[one]])
    assert set(score.probabilities) == {"covid", "normal", "pneumonia"}
    assert score.heatmap is None and score.ood_score is None  # no hookable layer, no OOD yet

    assert main(["evaluate", str(model_dir), str(phantoms), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 30 and report["model"]["name"] == "site-cnn"

    assert main(["fit-ood", str(model_dir), str(phantoms), "--quantile", "0.99"]) == 0
    ood = json.loads(capsys.readouterr().out)
    assert ood["method"] == "mahalanobis_shared_covariance" and ood["threshold"] > 0
    card = load_card(model_dir)
    assert card.ood is not None and card.reference["n"] == 6  # the 20% validation split

    assert main(["predict", str(model_dir), str(one), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["model"]["name"] == "site-cnn" and entry["ood"]["threshold"] == ood["threshold"]


def test_card_schema_rejects_inconsistent_cards(tmp_path: Path) -> None:
    model_dir = _export(tmp_path, "torchscript")
    card = json.loads((model_dir / "card.json").read_text())
    for change, message in (
        ({"thresholds": {"covid": 0.5}}, "thresholds must name exactly the findings' labels"),
        ({"format": "onnx"}, "format: Input should be"),
        ({"program": None}, '"program" is required for, and only for, a non-builtin format'),
        ({"input": {"kind": "cxr", "size": 64, "channels": 3}}, "input.channels must be 1"),
    ):
        (model_dir / "card.json").write_text(json.dumps({**card, **change}))
        with pytest.raises(ModelError, match="model card is invalid") as info:
            load_model(model_dir, "cpu", warmup=False)
        assert message in str(info.value)
    bad = {**card, "program": {**card["program"], "feature_output": "pooled"}}  # type: ignore[dict-item]
    (model_dir / "card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="feature_output 'pooled' is not among outputs"):
        load_model(model_dir, "cpu", warmup=False)


def test_published_schema_matches_the_code() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()


def test_bundled_cards_are_valid() -> None:
    for kind in ("cxr", "ct"):
        card = load_card(
            Path(__file__).resolve().parents[2] / "pacs_ai" / "models" / f"{kind}-demo"
        )
        assert card.demo is True and card.format == "builtin"
