"""Out-of-distribution refusal: the density, the threshold, the runner, the bundled demos."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pacs_ai.cli import main
from pacs_ai.inference import load_model
from pacs_ai.inference.ood import OodDensity, fit_density, refusal_reason, threshold_at
from pacs_ai.inference.runner import LoadedModel
from pacs_ai.training.ood_fit import fit_ood
from pacs_ai.training.synth import synth

ModelDirFactory = Callable[..., Path]

RG1 = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def _clusters(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 3, n)
    centres = np.array([[4.0] * 8, [9.0] * 8, [16.0] * 8])
    return np.abs(centres[labels] + rng.normal(0, 1, (n, 8))), labels


def test_density_scores_near_class_means_low_and_far_points_high() -> None:
    rng = np.random.default_rng(0)
    feats, labels = _clusters(rng, 600)
    density = fit_density(feats, labels)
    held, _ = _clusters(rng, 200)
    held_scores = density.unit_scores(held)
    threshold = threshold_at(held_scores, 0.999)
    fresh, _ = _clusters(rng, 1000)
    assert (density.unit_scores(fresh) > threshold).mean() < 0.01
    far = np.full((1, 8), 60.0)
    assert density.unit_scores(far)[0] > 10 * threshold


def test_threshold_is_the_stated_quantile_of_a_lognormal_fit() -> None:
    rng = np.random.default_rng(1)
    scores = np.exp(rng.normal(3.0, 0.5, 2000))
    expected = float(np.exp(3.0 + 0.5 * 2.5758))  # z(0.995)
    assert threshold_at(scores, 0.995) == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError):
        threshold_at(scores, 1.0)


def test_refusal_reason_states_score_and_threshold() -> None:
    assert refusal_reason(2783.71, 312.5) == (
        "unlike the images this model was trained on (score 2783.710 > 312.500)"
    )


def _fit_on_noise(model: LoadedModel, tmp: Path) -> None:
    """Fit an OOD density for a random model on noise-free phantoms-like inputs."""
    rng = np.random.default_rng(2)
    size = model.card.input.size
    base = np.linspace(0.2, 0.6, size, dtype=np.float32)[None, None, None, :]
    units = (base + rng.normal(0, 0.02, (40, 1, size, size))).astype(np.float32)
    labels = np.arange(40) % 3
    spec, density = fit_ood(
        model.predict_with_features, units[:30], labels[:30], units[30:], None, 0.99
    )
    density.save(tmp)
    card = json.loads((tmp / "card.json").read_text())
    card["ood"] = spec.to_dict()
    (tmp / "card.json").write_text(json.dumps(card))


def test_runner_refuses_series_beyond_the_threshold(
    tmp_path: Path, make_model_dir: ModelDirFactory
) -> None:
    model_dir = make_model_dir("cxr", 64)
    _fit_on_noise(load_model(model_dir, "cpu", warmup=False), model_dir)
    model = load_model(model_dir, "cpu", warmup=False)
    assert isinstance(model.ood, OodDensity)
    (score,) = model.score_series([[Path(get_testdata_file("RG1_UNCR.dcm"))]])
    assert score.ood_score is not None and score.ood_threshold is not None
    assert score.ood_score > score.ood_threshold
    assert score.refusal == refusal_reason(score.ood_score, score.ood_threshold)


def test_bundled_cxr_refuses_real_chest_cr_and_accepts_phantoms(tmp_path: Path) -> None:
    model = load_model(Path("pacs_ai/models/cxr-demo"), "cpu")
    assert model.card.ood is not None and model.ood is not None
    real = [[Path(get_testdata_file(name))] for name in RG1]
    for score in model.score_series(real, heatmaps=False):
        assert score.refusal is not None
        assert score.ood_score is not None and score.ood_score > 3 * model.card.ood.threshold
    synth(tmp_path, "cxr", 60, seed=101)
    phantoms = [[p] for p in sorted(tmp_path.rglob("*.dcm"))]
    scores = model.score_series(phantoms, heatmaps=False)
    refused = [s for s in scores if s.refusal is not None]
    assert len(scores) == 60 and refused == []


def test_predict_cli_says_not_applicable_for_rg1(capsys: pytest.CaptureFixture[str]) -> None:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert main(["predict", "bundled:cxr", str(path), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["applicable"] is False
    assert entry["reason"].startswith("unlike the images this model was trained on (score ")
    assert "probabilities" not in entry and "present" not in entry
    assert entry["ood"]["score"] > entry["ood"]["threshold"]
