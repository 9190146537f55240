"""Model monitoring: the seed's failure (every answer one class) raises an alert in the window;
a stream like validation raises none; OOD spikes; alerts clear; ``audit models``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, select

from pacs_ai.cli import main
from pacs_ai.config import MonitoringSettings
from pacs_ai.db.models import AuditEvent, ModelAlert, ModelObservation
from pacs_ai.db.session import upgrade
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.inference.card import ModelCard, findings_for
from pacs_ai.monitoring import Scored, observe, open_alerts, psi, summary

CLASSES = ("covid", "normal", "pneumonia")
VALIDATION_RATE = {"covid": 0.35, "pneumonia": 0.3}
# validation probabilities: positives spread high, negatives low (roughly what training stores)
rng0 = np.random.default_rng(0)
_VAL = {
    label: np.concatenate(
        [rng0.uniform(0.6, 1.0, int(100 * rate)), rng0.uniform(0.0, 0.3, 100 - int(100 * rate))]
    )
    for label, rate in VALIDATION_RATE.items()
}
CARD = ModelCard(
    name="monitored",
    version="1",
    kind="cxr",
    arch="resnet18_slim",
    classes=CLASSES,
    input=InputSpec.default("cxr", 64),
    thresholds={"covid": 0.5, "pneumonia": 0.5},
    findings=findings_for(CLASSES),
    demo=False,
    reference={
        "n": 100,
        "positive_rate": VALIDATION_RATE,
        "score_deciles": {
            k: np.quantile(v, np.linspace(0, 1, 11)).tolist() for k, v in _VAL.items()
        },
    },
)
SETTINGS = MonitoringSettings(window=100, min_scored=30)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = create_engine(f"sqlite:///{tmp_path / 'm.db'}")
    upgrade(eng)  # migrated, as `audit models` requires
    return eng


def _like_validation(rng: np.random.Generator) -> Scored:
    probs, present = {}, {}
    for label, values in _VAL.items():
        p = float(rng.choice(values))
        probs[label], present[label] = p, p >= 0.5
    return Scored(probs, present, 10.0)


def _stream(engine: Engine, items: list[Scored], refused: int = 0) -> list[list[str]]:
    raised = []
    with engine.begin() as conn:
        for s in items:
            raised.append(observe(conn, SETTINGS, CARD, "active", None, [s], []))
        for _ in range(refused):
            raised.append(observe(conn, SETTINGS, CARD, "active", None, [], [999.0]))
    return raised


def test_model_forced_to_one_class_raises_collapse_within_the_window(engine: Engine) -> None:
    always_normal = Scored({"covid": 0.01, "pneumonia": 0.02}, {"covid": False, "pneumonia": False})
    raised = _stream(engine, [always_normal] * SETTINGS.window)
    first = next(i for i, r in enumerate(raised) if r)
    assert first == SETTINGS.min_scored - 1  # as soon as the window may be judged
    assert set(raised[first]) == {"collapse", "positive_rate"}
    assert [r for r in raised[first + 1 :] if r] == [["score_shift"] * 2]  # PSI from 100 on
    with engine.connect() as conn:
        alerts = conn.execute(select(ModelAlert.label, ModelAlert.kind, ModelAlert.value)).all()
        events = conn.execute(select(AuditEvent.action, AuditEvent.detail)).all()
    assert sorted((a.label, a.kind) for a in alerts) == sorted(
        (label, kind)
        for label in ("covid", "pneumonia")
        for kind in ("collapse", "positive_rate", "score_shift")
    )
    assert {a.value for a in alerts if a.kind == "collapse"} == {0.0}
    assert [e.action for e in events] == ["model_alert"] * 6  # raised once, not per study
    assert "all 30 decisions absent; validation positive rate 0.350" in {
        json.loads(e.detail)["detail"] for e in events
    }
    assert open_alerts(engine) == 6


def test_stream_like_validation_raises_nothing(engine: Engine) -> None:
    rng = np.random.default_rng(7)
    raised = _stream(engine, [_like_validation(rng) for _ in range(3 * SETTINGS.window)])
    assert not any(raised)
    assert open_alerts(engine) == 0
    with engine.connect() as conn:
        assert conn.scalar(select(ModelObservation.id).order_by(ModelObservation.id.desc())) == (
            3 * SETTINGS.window * 3
        )


def test_collapse_alert_clears_when_answers_recover(engine: Engine) -> None:
    always_normal = Scored({"covid": 0.01, "pneumonia": 0.02}, {"covid": False, "pneumonia": False})
    _stream(engine, [always_normal] * SETTINGS.min_scored)
    assert open_alerts(engine) == 4
    rng = np.random.default_rng(3)
    _stream(engine, [_like_validation(rng) for _ in range(SETTINGS.window)])
    assert open_alerts(engine) == 0
    with engine.connect() as conn:
        actions = conn.scalars(select(AuditEvent.action)).all()
    # the 30 collapsed series shift the PSI once the window reaches 100, then age out
    assert actions.count("model_alert") == actions.count("model_alert_cleared") == 6


def test_ood_refusal_spike_raises_alert(engine: Engine) -> None:
    rng = np.random.default_rng(5)
    _stream(engine, [_like_validation(rng) for _ in range(40)])
    assert open_alerts(engine) == 0
    raised = _stream(engine, [], refused=20)  # 20 of 60 series refused (limit 0.2)
    assert [r for r in raised if r] == [["ood_spike"]]
    with engine.connect() as conn:
        alert = conn.execute(select(ModelAlert.label, ModelAlert.kind, ModelAlert.detail)).one()
    assert (alert.label, alert.kind) == ("", "ood_spike")
    # raised at the 11th refusal: 11 of 51 series > 0.2
    assert alert.detail == ("0.216 of 51 series refused as out of distribution (limit 0.200)")


def test_psi_is_zero_for_the_reference_and_large_for_a_shift() -> None:
    ref = _VAL["covid"]
    deciles = np.quantile(ref, np.linspace(0, 1, 11)).tolist()
    assert psi(ref, deciles) == pytest.approx(0.0, abs=0.02)
    assert psi(np.full(200, 0.01), deciles) > 2.0
    tied = [0.0] * 8 + [0.5, 0.9, 1.0]  # most validation scores identical
    same = np.array([0.0] * 70 + [0.3] * 10 + [0.7] * 10 + [0.95] * 10)
    assert psi(same, tied) == pytest.approx(0, abs=0.01)


def test_summary_and_audit_models_cli(
    engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    always_normal = Scored({"covid": 0.01, "pneumonia": 0.02}, {"covid": False, "pneumonia": False})
    _stream(engine, [always_normal] * 40, refused=2)
    rows = summary(engine, [CARD], window=100)
    covid = next(r for r in rows if r["finding"] == "covid")
    assert covid == {
        "model": "monitored",
        "version": "1",
        "mode": "active",
        "finding": "covid",
        "scored": 40,
        "refused": 2,
        "window": 40,
        "positive_rate": 0.0,
        "validation_rate": 0.35,
        "open_alerts": "collapse,positive_rate",
        "alerts_total": 2,
    }
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\nurl = "{engine.url}"\n')
    assert main(["audit", "models", "-c", str(cfg), "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["finding"], r["scored"], r["refused"]) for r in listed] == [
        ("monitored", "covid", 40, 2),
        ("monitored", "pneumonia", 40, 2),
    ]


def test_monitoring_settings_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="min_scored must not exceed"):
        MonitoringSettings(window=20, min_scored=50)
    with pytest.raises(ValidationError):
        MonitoringSettings(positive_rate_tolerance=0)
