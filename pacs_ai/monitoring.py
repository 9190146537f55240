"""Model monitoring: what each model says in service, against what validation said.

The seed notebook's model called every image one class and nobody noticed. Here every scored
or refused series adds rows to ``model_observations`` (per finding: probability and decision;
per series: refused as out of distribution or not). After each study, per model and finding,
the last ``monitoring.window`` rows are compared with the model card's validation reference
(``card.reference``: positive rate at the operating threshold and score deciles):

- ``collapse``: every decision in the window is the same although validation's positive rate
  ``r`` makes that improbable (``r^n`` or ``(1-r)^n`` below 1e-3 for ``n`` decisions);
- ``positive_rate``: the window's positive rate differs from ``r`` by more than
  ``monitoring.positive_rate_tolerance`` (absolute);
- ``score_shift``: the population stability index (PSI) of the window's probabilities over
  the validation deciles exceeds ``monitoring.psi_max`` (PSI = sum (o - e) ln(o / e) over the
  decile bins, half a count added per bin; 0.1-0.25 is usually read as a moderate shift,
  above 0.25 a major one; judged from 100 series on, where the sampling noise is about 0.1);
- ``ood_spike``: more than ``monitoring.ood_refusal_max`` of the window's series were refused.

No check runs before the window holds ``monitoring.min_scored`` rows. An alert is raised once
(a ``model_alerts`` row, an audit event ``model_alert``, a log warning) and cleared when its
condition no longer holds (``cleared_at``, audit event ``model_alert_cleared``); open alerts
are what a metric reads (:func:`open_alerts`).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, func, insert, select, update

from pacs_ai.config import MonitoringSettings
from pacs_ai.db.events import write_audit
from pacs_ai.db.models import ModelAlert, ModelObservation, utcnow
from pacs_ai.inference.card import ModelCard

log = logging.getLogger(__name__)

SERIES_LABEL = ""  # the per-series row (refused or not)
COLLAPSE_P = 1e-3
PSI_MIN_N = 100  # 10 bins: below ~10 per bin the PSI is mostly sampling noise


@dataclass(frozen=True)
class Scored:
    """One scored series: per finding label its probability and decision."""

    probabilities: dict[str, float]
    present: dict[str, bool]
    ood_score: float | None = None


def observe(
    conn: Connection,
    settings: MonitoringSettings,
    card: ModelCard,
    mode: str,
    study_id: int | None,
    scored: Sequence[Scored],
    refused: Sequence[float | None],
    now: dt.datetime | None = None,
) -> list[str]:
    """Record one study's observations for ``card`` and re-check its window. Returns the
    kinds of alerts newly raised."""
    if not settings.enabled or not (scored or refused):
        return []
    now = now or utcnow()
    base = {
        "at": now,
        "model_name": card.name,
        "model_version": card.version,
        "mode": mode,
        "study_id": study_id,
        "probability": None,
        "present": None,
        "ood_score": None,
    }
    rows: list[dict[str, Any]] = []
    for s in scored:
        rows.append({**base, "label": SERIES_LABEL, "refused": False, "ood_score": s.ood_score})
        for f in card.findings:
            rows.append(
                {
                    **base,
                    "label": f.label,
                    "probability": s.probabilities[f.label],
                    "present": s.present[f.label],
                    "refused": False,
                    "ood_score": None,
                }
            )
    for ood_score in refused:
        rows.append({**base, "label": SERIES_LABEL, "refused": True, "ood_score": ood_score})
    conn.execute(insert(ModelObservation), rows)
    return check(conn, settings, card, now)


def _window(conn: Connection, card: ModelCard, label: str, size: int) -> list[Any]:
    return list(
        conn.execute(
            select(ModelObservation.probability, ModelObservation.present, ModelObservation.refused)
            .where(
                ModelObservation.model_name == card.name,
                ModelObservation.model_version == card.version,
                ModelObservation.label == label,
            )
            .order_by(ModelObservation.id.desc())
            .limit(size)
        ).all()
    )


def psi(scores: np.ndarray, deciles: Sequence[float]) -> float:
    """Population stability index of ``scores`` against a reference given by its deciles
    (11 values, 0% to 100%). Tied deciles (many identical scores) merge their bins."""
    ref = np.asarray(deciles, dtype=np.float64)
    cuts = np.unique(ref[1:-1])
    levels = np.linspace(0, 1, len(ref))
    # reference CDF at each cut: the highest level whose decile is <= the cut
    cdf = np.array([levels[ref <= c].max() for c in cuts])
    expected = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    bins = np.searchsorted(cuts, scores, side="left")  # right-closed: x <= cut -> that bin
    counts = np.bincount(bins, minlength=len(cuts) + 1)
    # half a count per bin (Jeffreys): an empty bin of a small window is not infinite evidence
    observed = (counts + 0.5) / (len(scores) + 0.5 * len(counts))
    e = np.clip(expected, 1e-4, None)
    o = observed
    return float(np.sum((o - e) * np.log(o / e)))


def _conditions(
    settings: MonitoringSettings, card: ModelCard, label: str, window: list[Any]
) -> dict[str, tuple[bool, float, float | None, str]]:
    """kind -> (firing, value, reference, detail) for one finding's window."""
    out: dict[str, tuple[bool, float, float | None, str]] = {}
    n = len(window)
    rate = sum(1 for w in window if w.present) / n
    ref_rate = card.reference.get("positive_rate", {}).get(label)
    if ref_rate is not None:
        r = float(ref_rate)
        collapsed = rate in (0.0, 1.0)
        p_same = (r**n) if rate == 1.0 else ((1 - r) ** n)
        out["collapse"] = (
            collapsed and p_same < COLLAPSE_P,
            rate,
            r,
            f"all {n} decisions {'present' if rate == 1.0 else 'absent'}; validation "
            f"positive rate {r:.3f}",
        )
        out["positive_rate"] = (
            abs(rate - r) > settings.positive_rate_tolerance,
            rate,
            r,
            f"positive rate {rate:.3f} over {n} series; validation {r:.3f} "
            f"+- {settings.positive_rate_tolerance:.3f}",
        )
    deciles = card.reference.get("score_deciles", {}).get(label)
    if deciles and n >= PSI_MIN_N:
        value = psi(np.array([w.probability for w in window], dtype=np.float64), deciles)
        out["score_shift"] = (
            value > settings.psi_max,
            value,
            None,
            f"PSI {value:.3f} over {n} series vs validation deciles (limit {settings.psi_max:.3f})",
        )
    return out


def check(
    conn: Connection, settings: MonitoringSettings, card: ModelCard, now: dt.datetime
) -> list[str]:
    """Evaluate every condition of ``card``'s windows; raise and clear alerts."""
    raised: list[str] = []
    states: dict[tuple[str, str], tuple[bool, float, float | None, str]] = {}
    for f in card.findings:
        window = _window(conn, card, f.label, settings.window)
        if len(window) >= settings.min_scored:
            for kind, state in _conditions(settings, card, f.label, window).items():
                states[(f.label, kind)] = state
    series = _window(conn, card, SERIES_LABEL, settings.window)
    if len(series) >= settings.min_scored:
        frac = sum(1 for w in series if w.refused) / len(series)
        states[(SERIES_LABEL, "ood_spike")] = (
            frac > settings.ood_refusal_max,
            frac,
            float(card.ood.quantile) if card.ood else None,
            f"{frac:.3f} of {len(series)} series refused as out of distribution "
            f"(limit {settings.ood_refusal_max:.3f})",
        )
    open_rows = {
        (a.label, a.kind): a.id
        for a in conn.execute(
            select(ModelAlert.id, ModelAlert.label, ModelAlert.kind).where(
                ModelAlert.model_name == card.name,
                ModelAlert.model_version == card.version,
                ModelAlert.cleared_at.is_(None),
            )
        )
    }
    for (label, kind), (firing, value, reference, detail) in states.items():
        open_id = open_rows.get((label, kind))
        audit = {"model": card.name, "version": card.version, "label": label, "kind": kind}
        if firing and open_id is None:
            conn.execute(
                insert(ModelAlert).values(
                    model_name=card.name,
                    model_version=card.version,
                    label=label,
                    kind=kind,
                    value=round(value, 3),
                    reference=None if reference is None else round(reference, 3),
                    detail=detail[:300],
                    raised_at=now,
                )
            )
            audit["detail"] = detail
            write_audit(conn, "system", "model_alert", "warning", "model", None, audit)
            log.warning("model alert %s for %s %s: %s", kind, card.name, label, detail)
            raised.append(kind)
        elif not firing and open_id is not None:
            conn.execute(update(ModelAlert).where(ModelAlert.id == open_id).values(cleared_at=now))
            write_audit(conn, "system", "model_alert_cleared", "ok", "model", None, audit)
            log.info("model alert %s for %s %s %s cleared", kind, card.name, card.version, label)
    return raised


def open_alerts(engine: Engine) -> int:
    """The number of open monitoring alerts (what a metric reads)."""
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).where(ModelAlert.cleared_at.is_(None))) or 0)


def summary(engine: Engine, cards: Sequence[ModelCard], window: int) -> list[dict[str, Any]]:
    """``pacs-ai audit models``: per model (and finding), from the database: series scored
    and refused in total, the last ``window``'s positive rate against validation's, and the
    alerts (open ones first)."""
    rows: list[dict[str, Any]] = []
    with engine.connect() as conn:
        models = conn.execute(
            select(ModelObservation.model_name, ModelObservation.model_version)
            .group_by(ModelObservation.model_name, ModelObservation.model_version)
            .order_by(ModelObservation.model_name, ModelObservation.model_version)
        ).all()
        by_name = {(c.name, c.version): c for c in cards}
        for name, version in models:
            card = by_name.get((name, version))
            counts = dict(
                conn.execute(
                    select(ModelObservation.refused, func.count())
                    .where(
                        ModelObservation.model_name == name,
                        ModelObservation.model_version == version,
                        ModelObservation.label == SERIES_LABEL,
                    )
                    .group_by(ModelObservation.refused)
                ).all()
            )
            modes = sorted(
                m
                for (m,) in conn.execute(
                    select(ModelObservation.mode)
                    .where(
                        ModelObservation.model_name == name,
                        ModelObservation.model_version == version,
                    )
                    .distinct()
                )
            )
            alerts = conn.execute(
                select(ModelAlert.label, ModelAlert.kind, ModelAlert.cleared_at)
                .where(ModelAlert.model_name == name, ModelAlert.model_version == version)
                .order_by(ModelAlert.id)
            ).all()
            labels = sorted(
                lbl
                for (lbl,) in conn.execute(
                    select(ModelObservation.label)
                    .where(
                        ModelObservation.model_name == name,
                        ModelObservation.model_version == version,
                        ModelObservation.label != SERIES_LABEL,
                    )
                    .distinct()
                )
            )
            for label in labels or [SERIES_LABEL]:
                recent = [
                    bool(p)
                    for (p,) in conn.execute(
                        select(ModelObservation.present)
                        .where(
                            ModelObservation.model_name == name,
                            ModelObservation.model_version == version,
                            ModelObservation.label == label,
                        )
                        .order_by(ModelObservation.id.desc())
                        .limit(window)
                    )
                ]
                ref = card.reference.get("positive_rate", {}).get(label) if card else None
                mine = [a for a in alerts if a.label in (label, SERIES_LABEL)]
                rows.append(
                    {
                        "model": name,
                        "version": version,
                        "mode": ",".join(modes),
                        "finding": label,
                        "scored": int(counts.get(False, 0)),
                        "refused": int(counts.get(True, 0)),
                        "window": len(recent),
                        "positive_rate": round(sum(recent) / len(recent), 3) if recent else None,
                        "validation_rate": None if ref is None else round(float(ref), 3),
                        "open_alerts": ",".join(a.kind for a in mine if a.cleared_at is None),
                        "alerts_total": len(mine),
                    }
                )
    return rows
