"""The SR as a radiologist sees it: rendered by dcmtk's dsr2html, loaded in Debian's headless
Chromium, read back as rendered text and as a screenshot. Also the SR's header details a
viewer's series list shows (descriptions, dates) and the CT slice references."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pacs_ai.reporting import (
    AlgorithmInfo,
    FindingResult,
    ReportRequest,
    build_sr,
    build_summary_image,
    build_text_sr,
    write_object,
)
from pacs_ai.reporting import codes as rcodes
from pacs_ai.reporting._common import DEMO_STATEMENT
from pacs_ai.training import dicomwriter
from tests.tools import dciodvfy_errors, require_tool

DEMO = AlgorithmInfo(
    "pacs-ai-cxr-demo", "1.0", "pacs-ai project", True, {"threshold covid": "0.499"}
)
FINDINGS = (
    FindingResult("covid", rcodes.COVID19, probability=0.872, threshold=0.499, present=True),
    FindingResult("pneumonia", rcodes.PNEUMONIA, probability=0.031, threshold=0.502, present=False),
)
# Set to a path (e.g. docs/sr-dsr2html.png) to keep the screenshot.
SCREENSHOT_ENV = "PACS_AI_SR_SCREENSHOT"


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    exe = require_tool("chromium")
    return subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_dsr2html_in_chromium_labels_finding_decision_probability_threshold(
    tmp_path: Path,
) -> None:
    sources = [dicomwriter.xray_image(np.full((64, 64), 1000.0), modality="CR")]
    sr = write_object(build_sr(ReportRequest(sources, FINDINGS, DEMO)), tmp_path)
    html = tmp_path / "sr.html"
    run = subprocess.run(
        [require_tool("dsr2html"), str(sr), str(html)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    dom = _chromium("--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr
    text = " ".join(
        " ".join(line.split()) for line in _visible_text(dom.stdout).splitlines() if line.strip()
    )
    assert "COVID-19: PRESENT (probability 0.872, threshold 0.499)" in text
    assert "Pneumonia: ABSENT (probability 0.031, threshold 0.502)" in text
    assert "0.872 {probability}" in text and "0.499 {probability}" in text
    assert "0.87199" not in text and "0.4990000" not in text  # no float noise
    # the demo statement is the first thing in the content, before the observation context
    assert text.index(DEMO_STATEMENT) < text.index("Observer Type")
    assert text.index(DEMO_STATEMENT) < text.index("COVID-19: PRESENT")

    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "sr.png").resolve()
    png = _chromium(f"--screenshot={shot}", "--window-size=1000,1300", html.as_uri())
    assert png.returncode == 0, png.stderr
    with Image.open(shot) as img:
        assert img.size == (1000, 1300)
        assert len(set(np.asarray(img.convert("L")).ravel().tolist())) > 16  # text was drawn


def _visible_text(dom: str) -> str:
    import html as html_lib
    import re

    body = re.sub(r"(?is)<(script|style|head)\b.*?</\1>", " ", dom)
    return html_lib.unescape(re.sub(r"(?s)<[^>]+>", "\n", body))


def test_ai_series_are_told_apart_dated_and_ct_slices_named(tmp_path: Path) -> None:
    ct = dicomwriter.ct_series(np.zeros((5, 32, 32)))
    req = ReportRequest(ct, FINDINGS, DEMO)
    objects = [build_sr(req), build_text_sr(req), build_summary_image(req)]
    heads = [str(ds.SeriesDescription)[:20] for ds in objects]
    assert heads == ["AI result SR - DEMO ", "AI text SR - DEMO NO", "AI summary image - D"]
    for ds in objects:
        assert "DEMO NOT FOR CLINICAL USE" in ds.SeriesDescription
        assert len(str(ds.SeriesDate)) == 8 and len(str(ds.SeriesTime)) >= 6
        assert (str(ds.SeriesDate), str(ds.SeriesTime)) == (
            str(ds.ContentDate),
            str(ds.ContentTime),
        )
        assert dciodvfy_errors(write_object(ds, tmp_path)) == []
    sr = pydicom.dcmread(write_object(objects[0], tmp_path))
    library = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    entries = [i for i in library.ContentSequence[0].ContentSequence if i.ValueType == "IMAGE"]
    described = [
        {
            c.ConceptNameCodeSequence[0].CodeMeaning: float(c.MeasuredValueSequence[0].NumericValue)
            for c in e.ContentSequence
        }
        for e in entries
    ]
    expected_z = [float(s.ImagePositionPatient[2]) for s in ct]
    assert described == [
        {"Instance Number": float(s.InstanceNumber), "Image Position (Patient) Z": z}
        for s, z in zip(ct, expected_z, strict=True)
    ]
    # slice aggregation is stated only where slices were aggregated (the pipeline adds it)
    assert not any("aggregation" in str(p) for p in DEMO.parameters)


@pytest.mark.parametrize("present_label", ["COVID-19"])
def test_summary_heatmap_is_labelled_and_inside_the_body(present_label: str) -> None:
    from pacs_ai.inference.cam import body_mask
    from pacs_ai.reporting.summary_image import render_summary

    # a bright "body" disc on black air, two dark "lungs" inside it
    yy, xx = np.mgrid[:128, :128]
    image = np.where((yy - 64) ** 2 + (xx - 64) ** 2 < 50**2, 0.7, 0.02).astype(np.float32)
    for cx in (44, 84):
        image[(yy - 64) ** 2 + (xx - cx) ** 2 < 14**2] = 0.15
    mask = body_mask(image)
    assert mask[64, 44] and mask[64, 84] and mask[64, 64]  # lungs are inside the body
    assert not mask[2, 2] and not mask[125, 5]  # air outside is not
    heat = np.ones_like(image) * mask
    req = ReportRequest(
        [dicomwriter.xray_image(np.full((64, 64), 1000.0), modality="DX")],
        FINDINGS,
        DEMO,
        display_image=image,
        heatmap=heat,
        heatmap_label=present_label,
    )
    ds = build_summary_image(req)
    assert f"Overlay: model heatmap for {present_label}, inside the body only" in ds.ImageComments
    rgb = render_summary(req)
    corner = rgb[-5:, :5].reshape(-1, 3)
    assert (corner == corner[0]).all() and corner[0][0] == corner[0][1] == corner[0][2]  # grey
