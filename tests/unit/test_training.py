"""Training on synthetic phantoms, metrics, the patient split and refusal of degenerate models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pacs_ai.cli import main
from pacs_ai.errors import ModelRefused
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.inference import load_model
from pacs_ai.training.datasets import discover, load_xray_inputs, patient_split
from pacs_ai.training.metrics import threshold_for_sensitivity, wilson
from pacs_ai.training.synth import synth
from pacs_ai.training.train import TrainOptions, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train")
    synth(root / "train", "cxr", 180, seed=11, size=128)
    synth(root / "test", "cxr", 60, seed=12, size=128)
    opts = TrainOptions(
        kind="cxr", size=64, epochs=10, batch_size=16, progress=False, test_dir=root / "test"
    )
    train(root / "train", root / "model", opts)
    return root


def test_training_reaches_high_auc_on_held_out_phantoms(trained: Path) -> None:
    card = json.loads((trained / "model" / "card.json").read_text())
    test = card["metrics"]["test"]
    assert test["n"] == 60
    assert test["macro_auc"] > 0.9
    for label in ("covid", "normal", "pneumonia"):
        assert test["per_class"][label]["auc"]["value"] > 0.85
    assert test["balanced_accuracy"] > test["majority_baseline"]["balanced_accuracy"] + 0.3


def test_model_dir_has_card_plots_and_small_weights(trained: Path) -> None:
    model_dir = trained / "model"
    card = json.loads((model_dir / "card.json").read_text())
    for name in ("roc.png", "confusion.png", "model.safetensors"):
        assert (model_dir / name).is_file()
    assert not (model_dir / "checkpoint.pt").exists()
    assert (model_dir / "model.safetensors").stat().st_size < 4_000_000
    val = card["metrics"]["validation"]
    for label in card["classes"]:
        for metric in ("sensitivity", "specificity", "ppv", "npv"):
            m = val["per_class"][label][metric]
            if m["value"] is not None:
                assert m["ci"][0] <= m["value"] <= m["ci"][1]
    assert val["majority_baseline"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert set(card["thresholds"]) == {"covid", "pneumonia"}
    assert [f["code"]["value"] for f in card["findings"]] == ["840539006", "233604007"]
    loaded = load_model(model_dir, "cpu")
    assert loaded.card.temperature == card["temperature"]
    assert all(round(t, 3) == t for t in card["thresholds"].values())  # what reports show
    ood = card["ood"]
    assert ood["method"] == "mahalanobis_shared_covariance" and ood["quantile"] == 0.9999
    assert ood["false_refusal_rate"]["test"]["n"] == 60
    assert loaded.ood is not None
    assert (model_dir / "ood.safetensors").stat().st_size < 1_000_000
    assert set(card["reference"]["positive_rate"]) == {"covid", "pneumonia"}


def test_evaluate_cli_json(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", str(trained / "model"), str(trained / "test"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 60 and report["macro_auc"] > 0.9
    assert report["confusion_matrix"]["labels"] == ["covid", "normal", "pneumonia"]
    assert sum(map(sum, report["confusion_matrix"]["matrix"])) == 60


def test_degenerate_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # every class holds the same image: nothing to learn, predictions collapse to one class
    src = tmp_path / "src"
    synth(src, "cxr", 1, seed=5, size=64)
    one = next(src.rglob("*.dcm"))
    data = tmp_path / "data"
    ds = pydicom.dcmread(one)
    for label in ("covid", "normal", "pneumonia"):
        (data / label).mkdir(parents=True)
        for i in range(10):
            ds.PatientID = f"{label}{i}"  # one patient per image: a valid split
            ds.save_as(data / label / f"{i}.dcm")
    out = tmp_path / "model"
    code = main(["train", str(data), "--out", str(out), "--size", "32", "--epochs", "1", "--quiet"])
    assert code == 1
    assert "refused" in capsys.readouterr().err
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["deployment_problems"]
    with pytest.raises(ModelRefused, match="collapse"):
        load_model(out, "cpu")
    with pytest.raises(ModelRefused):
        train(data, tmp_path / "again", TrainOptions(kind="cxr", size=32, epochs=1, progress=False))


def test_patient_split_never_straddles_patients() -> None:
    labels = np.array([0, 1] * 20)
    groups = [f"p{i // 4}" for i in range(40)]  # 4 images per patient, both classes
    train_idx, val_idx = patient_split(labels, groups, 0.2, seed=1)
    assert {groups[i] for i in train_idx}.isdisjoint({groups[i] for i in val_idx})
    assert len(train_idx) + len(val_idx) == 40 and len(val_idx) > 0


def test_png_folders_like_the_notebook(tmp_path: Path) -> None:
    synth(tmp_path, "cxr", 6, seed=3, size=96, fmt="png")
    classes, samples = discover(tmp_path, "cxr")
    assert classes == ("covid", "normal", "pneumonia") and len(samples) == 6
    inputs = load_xray_inputs(samples, InputSpec.default("cxr", 32), progress=False)
    assert inputs.shape == (6, 1, 32, 32) and float(inputs.max()) <= 1.0


def test_wilson_interval_and_threshold_by_hand() -> None:
    m = wilson(8, 10)
    assert m["value"] == 0.8
    assert m["ci"] == pytest.approx([0.4902, 0.9433], abs=1e-4)
    y = np.array([1, 1, 1, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.7, 0.5, 0.1])
    # 3 of 4 positives needed: 0.7; next lower score 0.5 -> midpoint 0.6
    assert threshold_for_sensitivity(y, s, 0.75) == pytest.approx(0.6)
    # all 4: 0.3; next lower 0.1 -> 0.2
    assert threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.2)
    # separable: 2 of 3 positives needed (0.98); the margin reaches down to the negative 0.2
    y2, s2 = np.array([1, 1, 1, 0]), np.array([0.99, 0.98, 0.97, 0.2])
    assert threshold_for_sensitivity(y2, s2, 0.6) == pytest.approx(0.59)


def test_init_weights_from_a_torchvision_checkpoint(tmp_path: Path) -> None:
    import torch
    from torchvision.models import resnet18

    from pacs_ai.inference.architectures import build_model
    from pacs_ai.training.train import load_init_weights

    torch.manual_seed(1)
    reference = resnet18(weights=None)  # 3-channel conv1, 1000-class head: ImageNet layout
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 1, 3, "per_image")
    copied = load_init_weights(model, path)
    own = model.backbone.state_dict()
    assert "fc.weight" not in copied and "conv1.weight" in copied
    assert torch.equal(
        own["layer3.0.conv1.weight"], reference.state_dict()["layer3.0.conv1.weight"]
    )
    summed = reference.state_dict()["conv1.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(own["conv1.weight"], summed, atol=1e-6)
    assert own["fc.weight"].shape == (3, 512)
    slim = build_model("resnet18_slim", 1, 3, "per_image")
    with pytest.raises(ModelRefused, match="no tensor of --init-weights"):
        load_init_weights(slim, path)


def test_step_schedule_warms_up_and_early_stopping_waits(tmp_path: Path) -> None:
    from pacs_ai.training.train import lr_factor

    factors = [lr_factor(s, 300, 0.1) for s in range(300)]
    assert factors[0] == pytest.approx(1 / 30) and factors[29] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.05, abs=0.01)
    assert max(factors) == pytest.approx(1.0)
    # a model that learns nothing (every class the same image) still runs half the steps
    src = tmp_path / "src"
    synth(src, "cxr", 1, seed=5, size=64)
    one = pydicom.dcmread(next(src.rglob("*.dcm")))
    for label in ("covid", "normal", "pneumonia"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            one.PatientID = f"{label}{i}"
            one.save_as(tmp_path / "data" / label / f"{i}.dcm")
    opts = TrainOptions(kind="cxr", size=32, steps=40, batch_size=8, patience=1, progress=False)
    with pytest.raises(ModelRefused):
        train(tmp_path / "data", tmp_path / "model", opts)
    card = json.loads((tmp_path / "model" / "card.json").read_text())
    assert card["training"]["steps"] == 40 and card["training"]["steps_run"] >= 20
