"""Which model applies to a series: the routing rules of the configuration, then the gating
checks of :mod:`pacs_ai.imaging.gating` (chest? frontal? localizer? enough CT slices?).

Pure functions on headers; the scoring worker calls them before any pixel is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from pacs_ai.config import RoutingRule
from pacs_ai.imaging.gating import assess_series


def route(rules: Sequence[RoutingRule], headers: Sequence[Dataset]) -> RoutingRule | None:
    """The first rule whose filters all match the series (judged on its first image)."""
    first = headers[0]
    modality = str(first.get("Modality", "")).upper()
    sop_class = str(first.get("SOPClassUID", ""))
    body_part = str(first.get("BodyPartExamined", "") or "").upper()
    image_type = {str(v).upper() for v in (first.get("ImageType") or [])}
    for rule in rules:
        if rule.modalities and modality not in rule.modalities:
            continue
        if rule.sop_classes and sop_class not in rule.sop_classes:
            continue
        if rule.body_parts and body_part not in {b.upper() for b in rule.body_parts}:
            continue
        if image_type & {t.upper() for t in rule.exclude_image_types}:
            continue
        return rule
    return None


@dataclass(frozen=True)
class RoutingDecision:
    """``model`` ("cxr"/"ct") to score the series with, or None and the ``reason`` why it is
    not applicable."""

    model: str | None
    reason: str = ""


def decide(
    rules: Sequence[RoutingRule], headers: Sequence[Dataset], *, min_ct_slices: int, modality: str
) -> RoutingDecision:
    """Routing, then gating; ``modality`` (from the database) names the series in reasons."""
    if not headers:
        return RoutingDecision(None, "no images")
    rule = route(rules, headers)
    if rule is None:
        return RoutingDecision(None, f"no routing rule for {modality or 'unknown modality'}")
    gate = assess_series(headers, min_ct_slices=min_ct_slices)
    if not gate.applicable:
        return RoutingDecision(None, gate.reason)
    if gate.kind != rule.model:
        return RoutingDecision(None, f"not a {rule.model} series")
    return RoutingDecision(rule.model)
