"""Fallback for viewers that show images only: a Secondary Capture summary.

The display image (fitted to 1024 px on its long side), the heatmap blended over it in colour,
and a black band on top with burned-in text: the demo warning (demo models), one line per
finding (decision, probability, threshold) and the model name/version. RGB, 8 bit, same study
as the input, own series, BurnedInAnnotation YES. Without a display image the band alone is
the image (a text card), so the fallback never fails for want of pixels.
"""

from __future__ import annotations

import functools

import numpy as np
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from pacs_ai.reporting import _common
from pacs_ai.reporting.inputs import ReportRequest
from pacs_ai.reporting.uids import report_series_uid, report_uid

_LONG_SIDE = 1024
_HEAT_ALPHA = 0.5  # overlay opacity at heatmap value 1; value 0 leaves the image untouched
_WHITE = (255, 255, 255)
_YELLOW = (255, 220, 0)
_RED_BG = (150, 0, 0)
_PRESENT = (255, 120, 100)
_ABSENT = (140, 230, 140)


def _fit(image: np.ndarray, long_side: int) -> Image.Image:
    """A [0, 1] float image as an 8-bit PIL image whose long side is ``long_side``."""
    h, w = image.shape
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pil = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    return pil.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR)


@functools.cache
def _heat_tables() -> tuple[list[int], list[int]]:
    """Lookup tables for ``Image.point``: a jet-like RGB colour map (blue 0 -> cyan -> yellow
    -> red 1), as 3 x 256 entries, and the overlay alpha (0 .. _HEAT_ALPHA) per heat value."""
    x = np.linspace(0, 1, 256)[None, :]
    centres = np.array([[3.0], [2.0], [1.0]])  # R, G, B peak at 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4 * x - centres), 0, 1)
    colour = [round(v) for v in (rgb * 255).ravel()]
    alpha = [round(v) for v in (x[0] * _HEAT_ALPHA * 255)]
    return colour, alpha


def _panel(req: ReportRequest) -> Image.Image | None:
    """The display image in RGB with the heatmap blended in (all in PIL's C code)."""
    if req.display_image is None:
        return None
    grey = _fit(req.display_image, _LONG_SIDE).convert("RGB")
    if req.heatmap is None:
        return grey
    heat = _fit(req.heatmap, _LONG_SIDE)
    colour_table, alpha_table = _heat_tables()
    colour = heat.convert("RGB").point(colour_table)
    return Image.composite(colour, grey, heat.point(alpha_table))


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and font.getlength(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines


def _text_lines(req: ReportRequest) -> list[tuple[str, tuple[int, int, int]]]:
    lines: list[tuple[str, tuple[int, int, int]]] = []
    if req.algorithm.demo:
        lines.append((_common.DEMO_STATEMENT, _YELLOW))
    for finding in req.findings:
        lines.append(
            ("AI: " + _common.finding_line(finding), _PRESENT if finding.present else _ABSENT)
        )
    lines.append((_common.model_line(req), _WHITE))
    if req.heatmap is not None:
        what = f" for {req.heatmap_label}" if req.heatmap_label else ""
        lines.append(
            (f"Overlay: model heatmap{what}, inside the body only (blue low, red high)", _WHITE)
        )
    return lines


def _band(req: ReportRequest, width: int) -> Image.Image:
    font_px = max(14, width // 42)
    font = ImageFont.load_default(size=font_px)
    margin = font_px // 2
    line_h = round(font_px * 1.3)
    rows: list[tuple[str, tuple[int, int, int]]] = [
        (part, colour)
        for text, colour in _text_lines(req)
        for part in _wrap(text, font, width - 2 * margin)
    ]
    band = Image.new("RGB", (width, 2 * margin + line_h * len(rows)), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    demo_rows = len(_wrap(_common.DEMO_STATEMENT, font, width - 2 * margin))
    if req.algorithm.demo:
        draw.rectangle((0, 0, width, margin + line_h * demo_rows), fill=_RED_BG)
    for i, (text, colour) in enumerate(rows):
        draw.text((margin, margin + i * line_h), text, fill=colour, font=font)
    return band


def _source_item(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def render_summary(req: ReportRequest) -> np.ndarray:
    """The summary picture as uint8 RGB (rows, columns, 3): text band above the image."""
    panel = _panel(req)
    width = _LONG_SIDE if panel is None else max(panel.width, 512)
    band = _band(req, width)
    if panel is None:
        return np.asarray(band)
    canvas = Image.new("RGB", (width, band.height + panel.height), (0, 0, 0))
    canvas.paste(band, (0, 0))
    canvas.paste(panel, ((width - panel.width) // 2, band.height))  # narrow images centred
    return np.asarray(canvas)


def build_summary_image(req: ReportRequest) -> Dataset:
    """The Secondary Capture summary image for ``req`` (deterministic UIDs)."""
    algo = req.algorithm
    first = req.sources[0]
    orientation = first.get("PatientOrientation")
    # Orientation holds only for one projection image shown as it was acquired.
    known = len(req.sources) == 1 and req.display_image is not None and orientation
    sc = SCImage.from_ref_dataset(
        ref_dataset=_common.evidence(req)[0],
        pixel_array=render_summary(req),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=tuple(orientation) if known else ("L", "F"),
        series_instance_uid=report_series_uid(req, "summary"),
        series_number=_common.SERIES_NUMBER["summary"],
        sop_instance_uid=report_uid(req, "summary"),
        instance_number=req.study_revision + 1,
        manufacturer=algo.manufacturer,
        contributing_equipment=_common.contributing_equipment(req),
        series_description=_common.series_description(req, "summary image"),
        manufacturer_model_name=algo.name,
        software_versions=algo.version,
        specific_character_set=_common.character_set(req),
    )
    if not known:
        sc.PatientOrientation = []  # Type 2: unknown rather than guessed
    # With it, validators know the body part is unpaired and Laterality is not needed; every
    # model we run is a chest model.
    sc.BodyPartExamined = first.get("BodyPartExamined") or "CHEST"
    sc.BurnedInAnnotation = "YES"
    _common.series_date_time(sc)
    sc.DerivationDescription = (
        "AI result summary: source image resized, heatmap overlay, burned-in result text"
    )
    sc.ImageComments = "\n".join(text for text, _ in _text_lines(req))
    sc.SourceImageSequence = [_source_item(ds) for ds in req.sources]
    return sc
