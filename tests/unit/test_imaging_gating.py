"""Each gating reason, and the applicable cases."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from pacs_ai.imaging.gating import assess_series
from pacs_ai.training import dicomwriter as dw


def _cxr(**kw: object) -> Dataset:
    return dw.xray_image(np.zeros((16, 16)), **kw)  # type: ignore[arg-type]


def _ct(n: int = 12, **kw: object) -> list[Dataset]:
    return dw.ct_series(np.zeros((n, 8, 8)), **kw)  # type: ignore[arg-type]


def test_frontal_chest_xray_is_applicable() -> None:
    for modality in ("CR", "DX"):
        app = assess_series([_cxr(modality=modality)])
        assert (app.applicable, app.kind) == (True, "cxr")


def test_lateral_view() -> None:
    app = assess_series([_cxr(view="LATERAL")])
    assert (app.applicable, app.reason) == (False, "lateral view")
    # PA + lateral in one series: applicable (the lateral is not scored)
    assert assess_series([_cxr(view="LATERAL"), _cxr(view="PA")]).applicable
    # no View Position: row direction A/P in Patient Orientation means lateral
    ds = _cxr(modality="CR")
    del ds.ViewPosition
    ds.PatientOrientation = ["P", "F"]
    assert assess_series([ds]).reason == "lateral view"


def test_non_chest_body_part_when_stated() -> None:
    assert assess_series([_cxr(body_part="HAND")]).reason == "not a chest image"
    ds = _cxr(modality="CR")
    del ds.BodyPartExamined  # not stated: applicable
    assert assess_series([ds]).applicable
    ct = _ct(body_part="HEAD")
    assert assess_series(ct).reason == "not a chest CT"


def test_unsupported_modality_and_sop_class() -> None:
    mr = _cxr()
    mr.Modality = "MR"
    assert assess_series([mr]).reason == "MR not supported"
    sc = _cxr()
    sc.SOPClassUID = SecondaryCaptureImageStorage
    assert assess_series([sc]).reason == "SOP class not supported"
    assert assess_series([]).reason == "no images in series"


def test_colour_and_multiframe_xray() -> None:
    colour = _cxr()
    colour.SamplesPerPixel = 3
    colour.PhotometricInterpretation = "RGB"
    assert assess_series([colour]).reason == "colour image"
    multi = _cxr()
    multi.NumberOfFrames = 2
    assert assess_series([multi]).reason == "multi-frame X-ray"


def test_ct_localizer_and_too_few_slices() -> None:
    scout = _ct(1, localizer=True)
    assert assess_series(scout).reason == "CT localizer"
    app = assess_series(_ct(9))
    assert (app.applicable, app.reason) == (False, "too few CT slices (9 < 10)")
    assert assess_series(_ct(9), min_ct_slices=5).applicable
    # duplicates do not count twice
    series = _ct(6)
    assert not assess_series(series + series, min_ct_slices=10).applicable


def test_non_axial_ct() -> None:
    sagittal = _ct(12)
    for k, ds in enumerate(sagittal):
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [k * 2.0, 0, 0]
    assert assess_series(sagittal).reason == "non-axial CT"


def test_axial_chest_ct_applicable() -> None:
    app = assess_series(_ct(12))
    assert (app.applicable, app.kind, app.reason) == (True, "ct", "chest CT, 12 slices")
