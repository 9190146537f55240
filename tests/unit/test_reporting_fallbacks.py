"""Fallback objects: the Secondary Capture summary image and the Basic Text SR."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, SecondaryCaptureImageStorage

from pacs_ai.reporting import (
    AlgorithmInfo,
    FindingResult,
    PriorReport,
    ReportRequest,
    build_sr,
    build_summary_image,
    build_text_sr,
    report_uid,
    write_object,
)
from pacs_ai.reporting import codes as rcodes
from pacs_ai.training import dicomwriter
from tests.tools import dciodvfy_errors, dsrdump

DEMO = AlgorithmInfo("pacs-ai chest demo", "1.2.0", "pacs-ai project", True, {"input": "224"})
REAL = AlgorithmInfo("site model", "7", "Site", False)
FINDINGS = (
    FindingResult("covid19", rcodes.COVID19, probability=0.87, threshold=0.42, present=True),
    FindingResult("pneumonia", rcodes.PNEUMONIA, probability=0.1, threshold=0.5, present=False),
)
PATIENT = dicomwriter.Patient(name="Doe^Jane", patient_id="PID-4711")
_DEMO_RED = (150, 0, 0)  # the band behind the demo warning


def _dx() -> list[Dataset]:
    return [dicomwriter.xray_image(np.full((64, 64), 1000.0), patient=PATIENT)]


def _ct(slices: int = 20) -> list[Dataset]:
    return dicomwriter.ct_series(np.zeros((slices, 32, 32)), patient=PATIENT)


def _display(rows: int = 300, cols: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """A vertical grey ramp and a heatmap peaking at 1/3 height, 1/4 width."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    image = yy / (rows - 1)
    heat = np.exp(-(((yy - rows / 3) / 20) ** 2 + ((xx - cols / 4) / 20) ** 2))
    return image.astype(np.float32), heat.astype(np.float32)


def _items(node: Dataset) -> Iterator[Dataset]:
    for item in node.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _texts(ds: Dataset, value: str) -> list[str]:
    return [
        str(i.TextValue)
        for i in _items(ds)
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == value
    ]


def _device_uids(ds: Dataset) -> set[str]:
    return {
        str(i.UID)
        for i in _items(ds)
        if i.ValueType == "UIDREF" and i.ConceptNameCodeSequence[0].CodeValue == "121012"
    }


# --- Secondary Capture ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["DX", "CT"])
def test_summary_image_valid_and_same_study(kind: str, tmp_path: Path) -> None:
    sources = _dx() if kind == "DX" else _ct()
    image, heat = _display()
    req = ReportRequest(sources, FINDINGS, DEMO, display_image=image, heatmap=heat)
    path = write_object(build_summary_image(req), tmp_path)
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.SOPInstanceUID == report_uid(req, "summary")
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert ds[keyword].value == sources[0][keyword].value
    own_series = {ds.SeriesInstanceUID}
    assert own_series.isdisjoint({s.SeriesInstanceUID for s in sources})
    assert own_series.isdisjoint({build_sr(req).SeriesInstanceUID})
    assert ds.BurnedInAnnotation == "YES"
    assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
    assert {str(i.ReferencedSOPInstanceUID) for i in ds.SourceImageSequence} == {
        str(s.SOPInstanceUID) for s in sources
    }
    assert "COVID-19: PRESENT (probability 0.870, threshold 0.420)" in ds.ImageComments
    assert "Pneumonia: ABSENT (probability 0.100, threshold 0.500)" in ds.ImageComments
    assert "pacs-ai chest demo 1.2.0" in ds.ImageComments
    assert "NOT FOR CLINICAL USE" in ds.ImageComments
    assert "NOT FOR CLINICAL USE" in ds.SeriesDescription
    if kind == "CT":  # orientation of a CT display image is not known: left empty
        assert ds.PatientOrientation == ""
    else:
        assert list(ds.PatientOrientation) == list(sources[0].PatientOrientation)


def test_summary_image_pixels_show_text_heatmap_and_demo_band() -> None:
    image, heat = _display(rows=300, cols=240)
    req = ReportRequest(_dx(), FINDINGS, DEMO, display_image=image, heatmap=heat)
    pixels = build_summary_image(req).pixel_array
    # Fitted to 1024 rows (819 columns); the text band above it is as wide.
    assert pixels.shape[1] == 819 and pixels.shape[2] == 3
    band_rows = pixels.shape[0] - 1024
    assert 100 < band_rows < 400
    band, panel = pixels[:band_rows], pixels[band_rows:]
    assert (band.reshape(-1, 3) == _DEMO_RED).all(axis=1).sum() > 10_000  # red warning band
    assert (band.max(axis=2) > 200).sum() > 1_000  # bright text glyphs burned in
    # Heatmap: coloured at its peak, untouched grey where it is ~0.
    peak = panel[round(1024 / 3), round(819 / 4)].astype(int)
    far = panel[1000, 800].astype(int)
    assert peak[0] - peak[2] > 40  # red over blue: "hot"
    assert far[0] == far[1] == far[2]

    no_demo = build_summary_image(
        ReportRequest(_dx(), FINDINGS, REAL, display_image=image, heatmap=heat)
    ).pixel_array
    assert not (no_demo[:band_rows].reshape(-1, 3) == _DEMO_RED).all(axis=1).any()


def test_summary_without_display_image_is_a_text_card(tmp_path: Path) -> None:
    req = ReportRequest(_ct(3), FINDINGS, DEMO)
    ds = build_summary_image(req)
    assert ds.Columns == 1024 and ds.Rows < 400
    assert dciodvfy_errors(write_object(ds, tmp_path)) == []


def test_summary_image_is_deterministic() -> None:
    image, heat = _display()
    sources = _dx()
    a = build_summary_image(
        ReportRequest(sources, FINDINGS, DEMO, display_image=image, heatmap=heat)
    )
    b = build_summary_image(
        ReportRequest(sources, FINDINGS, DEMO, display_image=image, heatmap=heat)
    )
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.PixelData == b.PixelData


# --- Basic Text SR ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["DX", "CT"])
def test_text_sr_valid_and_complete(kind: str, tmp_path: Path) -> None:
    sources = _dx() if kind == "DX" else _ct()
    req = ReportRequest(sources, FINDINGS, DEMO)
    path = write_object(build_text_sr(req), tmp_path)
    assert dciodvfy_errors(path) == []
    run = dsrdump(path, "+Pl")
    assert run.returncode == 0 and run.stderr == "", run.output
    assert "Basic Text SR Document" in run.stdout
    assert "COVID-19: PRESENT (probability 0.870, threshold 0.420)" in run.stdout

    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == BasicTextSRStorage
    assert ds.SOPInstanceUID == report_uid(req, "text_sr")
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.PatientID == PATIENT.patient_id
    assert (ds.VerificationFlag, ds.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert _texts(ds, "121071") == [
        "COVID-19: PRESENT (probability 0.870, threshold 0.420)",
        "Pneumonia: ABSENT (probability 0.100, threshold 0.500)",
    ]
    assert _texts(ds, "111001") == [DEMO.name]
    assert _texts(ds, "111003") == [DEMO.version]
    assert "threshold covid19=0.420" in _texts(ds, "111002")
    assert any("NOT FOR CLINICAL USE" in t for t in _texts(ds, "121106"))
    assert _device_uids(ds) == _device_uids(build_sr(req))  # the same device observer as the SR
    assert len(_device_uids(ds)) == 1
    assert any(
        e.get("ManufacturerModelName") == DEMO.name for e in ds.ContributingEquipmentSequence
    )
    refs = {
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in _items(ds)
        if i.ValueType == "IMAGE"
    }
    assert refs == {str(s.SOPInstanceUID) for s in sources}
    assert {i.ValueType for i in _items(ds)} <= {"CONTAINER", "TEXT", "CODE", "UIDREF", "IMAGE"}


def test_text_sr_without_demo_and_with_predecessor(tmp_path: Path) -> None:
    sources = _dx()
    prior = build_text_sr(ReportRequest(sources, FINDINGS, REAL))
    req = ReportRequest(
        sources,
        FINDINGS,
        REAL,
        study_revision=1,
        predecessor=PriorReport(
            prior.StudyInstanceUID, prior.SeriesInstanceUID, prior.SOPClassUID, prior.SOPInstanceUID
        ),
    )
    ds = build_text_sr(req)
    assert _texts(ds, "121106") == []
    assert "DEMO" not in ds.SeriesDescription
    ref = ds.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == prior.SOPInstanceUID
    assert ds.SOPInstanceUID != prior.SOPInstanceUID
    assert dciodvfy_errors(write_object(ds, tmp_path)) == []
