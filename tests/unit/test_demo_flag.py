"""The card's demo flag, not the model's name, decides the demo labelling of every object."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pacs_ai.inference import load_card
from pacs_ai.jobs import Claim
from pacs_ai.pipeline import Pipeline
from pacs_ai.reporting import build_sr, build_summary_image, build_text_sr
from pacs_ai.reporting._common import DEMO_STATEMENT
from pacs_ai.scoring import Score, SeriesOutcome, StudyAnalysis, _model_info
from pacs_ai.training import dicomwriter

BUNDLED = Path(__file__).resolve().parents[2] / "pacs_ai" / "models" / "cxr-demo"


@pytest.mark.parametrize(("name", "demo"), [("site-model", True), ("acme-demo-net", False)])
def test_demo_labelling_follows_the_card_flag(name: str, demo: bool) -> None:
    card = replace(load_card(BUNDLED), name=name, demo=demo)
    header = dicomwriter.xray_image(np.full((64, 64), 1000.0), modality="DX")
    score = Score(
        probabilities={"covid": 0.9, "normal": 0.05, "pneumonia": 0.05},
        present={"covid": True, "pneumonia": False},
        thresholds={"covid": 0.499, "pneumonia": 0.502},
        used_instances=[str(header.SOPInstanceUID)],
        heatmap=None,
        display_image=None,
    )
    series = SeriesOutcome(1, model="cxr", score=score, sources=[header])
    claim = Claim(1, str(header.StudyInstanceUID), 0, 1, 1, dt.datetime.now(dt.UTC))
    model = SimpleNamespace(card=card, device="cpu")
    analysis = StudyAnalysis([series], {"cxr": _model_info(model)}, 1.0)  # type: ignore[arg-type]
    req = Pipeline._report_request(None, claim, analysis, "cxr", [series])  # type: ignore[arg-type]
    assert req.algorithm.demo is demo and req.algorithm.name == name
    sr, text, summary = build_sr(req), build_text_sr(req), build_summary_image(req)
    first = sr.ContentSequence[0]
    has_statement = "ContentSequence" in first and any(
        getattr(i, "TextValue", "") == DEMO_STATEMENT for i in first.ContentSequence
    )
    assert has_statement is demo
    for ds in (sr, text, summary):
        assert ("DEMO NOT FOR CLINICAL USE" in ds.SeriesDescription) is demo
    assert (DEMO_STATEMENT in summary.ImageComments) is demo
    assert "slice aggregation" not in " ".join(req.algorithm.parameters)  # X-ray: none
    assert req.algorithm.parameters["threshold covid"] == "0.499"
