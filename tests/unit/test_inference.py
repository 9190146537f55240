"""Model loading, batched scoring, heatmaps, refusal, bundled models and the config section."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from pacs_ai.config import load_settings
from pacs_ai.errors import ConfigError, ImagingError, ModelError, ModelRefused, NotApplicable
from pacs_ai.inference import bundled_model_dir, load_model, resolve_model_dir
from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import KINDS, ct_phantom, cxr_phantom

ModelDirFactory = Callable[..., Path]


def _write_cxr(folder: Path, kind: str, seed: int, **kw: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    img = cxr_phantom(kind, np.random.default_rng(seed), 192)  # type: ignore[arg-type]
    ds = dw.xray_image(img * 4000 + 50, pixel_spacing_mm=2.0, **kw)  # type: ignore[arg-type]
    path = folder / f"{kind}-{seed}.dcm"
    dw.write(ds, path)
    return path


def _write_ct(
    folder: Path, kind: str, seed: int, shuffle: bool = True, like_synth: bool = False
) -> list[Path]:
    """A small phantom series; ``like_synth``: the geometry `pacs-ai synth` trains the
    bundled model on (40 x 128², 7.5 mm slices), i.e. inside its out-of-distribution bound."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (40, 128, 128) if like_synth else (30, 96, 96)
    vol = ct_phantom(kind, np.random.default_rng(seed), shape)  # type: ignore[arg-type]
    thickness, spacing = (7.5, 2.8) if like_synth else (10.0, 3.6)
    datasets = dw.ct_series(vol, slice_thickness_mm=thickness, pixel_spacing_mm=spacing)
    order = (
        np.random.default_rng(seed).permutation(len(datasets)) if shuffle else range(len(datasets))
    )
    paths = []
    for j, z in enumerate(order):
        path = folder / f"im{j:03d}.dcm"
        dw.write(datasets[int(z)], path)
        paths.append(path)
    return paths


def test_batched_and_one_by_one_scores_agree(
    tmp_path: Path, make_model_dir: ModelDirFactory
) -> None:
    model_dir = make_model_dir("cxr", 64)
    series = [[_write_cxr(tmp_path / "x", KINDS[i % 3], i)] for i in range(5)]
    series.append([_write_cxr(tmp_path / "y", "covid", 7), _write_cxr(tmp_path / "y", "normal", 8)])
    one = load_model(model_dir, "cpu", batch_size=1).score_series(series)
    many = load_model(model_dir, "cpu", batch_size=7).score_series(series)
    for a, b in zip(one, many, strict=True):
        for label in a.probabilities:
            assert a.probabilities[label] == pytest.approx(b.probabilities[label], abs=1e-5)
        assert a.used_instances == b.used_instances
    assert len(many[-1].used_instances) == 2


def test_ct_batched_and_one_by_one_agree(tmp_path: Path, make_model_dir: ModelDirFactory) -> None:
    model_dir = make_model_dir("ct", 48)
    series = [_write_ct(tmp_path / f"s{i}", KINDS[i], i) for i in range(2)]
    one = load_model(model_dir, "cpu", batch_size=1).score_series(series)
    many = load_model(model_dir, "cpu", batch_size=16).score_series(series)
    for a, b in zip(one, many, strict=True):
        assert a.probabilities["covid"] == pytest.approx(b.probabilities["covid"], abs=1e-5)
        assert len(a.used_instances) == 6  # ct_slices of the test card
        assert sum(a.probabilities.values()) == pytest.approx(1.0, abs=2e-3)


def test_series_score_fields(tmp_path: Path, make_model_dir: ModelDirFactory) -> None:
    model = load_model(make_model_dir("cxr", 64), "cpu")
    path = _write_cxr(tmp_path, "pneumonia", 3)
    (score,) = model.score_series([[path]])
    assert set(score.probabilities) == {"covid", "normal", "pneumonia"}
    assert sum(score.probabilities.values()) == pytest.approx(1.0, abs=2e-3)
    assert set(score.present) == set(score.thresholds) == {"covid", "pneumonia"}
    assert score.display_image is not None and score.heatmap is not None
    assert score.heatmap.shape == score.display_image.shape == (64, 64)
    assert score.heatmap.dtype == np.float32
    assert score.heatmap.min() >= 0.0 and score.heatmap.max() <= 1.0
    assert score.used_instances == [str(pydicom.dcmread(path).SOPInstanceUID)]


def test_lateral_only_series_and_corrupt_files(
    tmp_path: Path, make_model_dir: ModelDirFactory
) -> None:
    model = load_model(make_model_dir("cxr", 64), "cpu")
    lateral = _write_cxr(tmp_path, "normal", 1, view="LATERAL")
    with pytest.raises(NotApplicable):
        model.score_series([[lateral]])
    good = _write_cxr(tmp_path, "normal", 2)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(good.read_bytes()[:-5000])  # pixel data cut short
    with pytest.raises(ImagingError):
        model.score_series([[broken]])


def test_load_refuses_degenerate_and_tampered_models(make_model_dir: ModelDirFactory) -> None:
    collapsed = {
        "per_class": {c: {"auc": {"value": 0.5}} for c in ("covid", "normal", "pneumonia")},
        "predicted_class_counts": {"covid": 0, "normal": 30, "pneumonia": 0},
        "balanced_accuracy": 1 / 3,
        "majority_baseline": {"balanced_accuracy": 1 / 3},
    }
    with pytest.raises(ModelRefused, match="collapse to one class"):
        load_model(make_model_dir("cxr", 32, metrics=collapsed), "cpu")
    with pytest.raises(ModelRefused, match="no validation metrics"):
        load_model(make_model_dir("ct", 40, metrics={}), "cpu")
    ok = make_model_dir("ct", 32)
    card = json.loads((ok / "card.json").read_text())
    card["weights_sha256"] = "0" * 64
    (ok / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="sha256"):
        load_model(ok, "cpu")


def test_bundled_cxr_model_scores_phantoms_and_the_real_cr(tmp_path: Path) -> None:
    model = load_model(bundled_model_dir("cxr"), "cpu")
    assert model.card.demo and model.card.kind == "cxr"
    assert {f.code.meaning for f in model.card.findings} == {"COVID-19", "Pneumonia"}
    series = [[_write_cxr(tmp_path, kind, 1000 + i)] for i in range(4) for kind in KINDS]
    scores = model.score_series(series)
    truth = [kind for _ in range(4) for kind in KINDS]
    predicted = [max(s.probabilities, key=s.probabilities.__getitem__) for s in scores]
    assert sum(p == t for p, t in zip(predicted, truth, strict=True)) >= 9
    assert [s.refusal for s in scores] == [None] * 12  # phantoms are in distribution
    real = get_testdata_file("RG1_UNCR.dcm")
    assert real is not None
    (score,) = model.score_series([[Path(real)]])
    assert sum(score.probabilities.values()) == pytest.approx(1.0, abs=2e-3)  # 3 decimals
    assert score.heatmap is not None and score.heatmap.shape == (224, 224)
    assert score.refusal is not None and score.refusal.startswith("unlike the images")


def test_bundled_ct_model_separates_covid(tmp_path: Path) -> None:
    model = load_model(bundled_model_dir("ct"), "cpu")
    assert model.card.classes == ("covid", "other") and model.card.demo
    covid = model.score_series([_write_ct(tmp_path / "c", "covid", 2001, like_synth=True)])[0]
    normal = model.score_series([_write_ct(tmp_path / "n", "normal", 2002, like_synth=True)])[0]
    assert covid.probabilities["covid"] > normal.probabilities["covid"]
    assert covid.present["covid"] and not normal.present["covid"]
    assert covid.refusal is None and normal.refusal is None
    assert covid.display_image is not None and covid.display_image.shape == (128, 128)


def test_auto_device_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from pacs_ai.inference import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert str(select_device("auto")) == "cpu"
    with pytest.raises(ModelError, match="CUDA is not available"):
        select_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(select_device("auto")) == "cuda:0"
    assert str(select_device("cuda:1")) == "cuda:1"
    assert str(select_device("cpu")) == "cpu"


def test_inference_settings(tmp_path: Path) -> None:
    settings = load_settings(env={})
    inf = settings.inference
    assert (inf.device, inf.cxr_model, inf.ct_model, inf.min_ct_slices) == (
        "auto",
        "bundled:cxr",
        "bundled:ct",
        10,
    )
    assert (resolve_model_dir(inf.cxr_model) / "card.json").is_file()
    env = {"PACS_AI_INFERENCE__BATCH_SIZE": "4", "PACS_AI_INFERENCE__CT_MODEL": "models/ct"}
    cfg = tmp_path / "config.toml"
    cfg.write_text("[inference]\ndevice = 'cpu'\n")
    s2 = load_settings(cfg, env=env)
    assert s2.inference.batch_size == 4 and s2.inference.device == "cpu"
    assert s2.inference.ct_model == str((tmp_path / "models/ct").resolve())
    with pytest.raises(ConfigError):
        load_settings(cfg, env={"PACS_AI_INFERENCE__DEVICE": "tpu"})


def test_state_dict_checkpoint_loads_offline(
    tmp_path: Path, make_model_dir: ModelDirFactory
) -> None:
    import torch
    from safetensors.torch import load_file

    model_dir = make_model_dir("cxr", 32)
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "model.pt")
    card = json.loads((model_dir / "card.json").read_text())
    card.update(weights_file="model.pt", weights_sha256="")
    (model_dir / "card.json").write_text(json.dumps(card))
    settings_file = tmp_path / "config.toml"
    settings_file.write_text(f"[inference]\ncxr_model = '{model_dir.name}'\n")
    settings = load_settings(settings_file, env={})
    model = load_model(resolve_model_dir(settings.inference.cxr_model), "cpu")
    assert model.card.name == "test-cxr"
