"""CT: slice ordering, duplicates, acquisitions, HU, padding, Enhanced CT, windows."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pacs_ai.imaging.ct import hu_window, plan_volume, rescale_of, select_evenly, to_hu
from pacs_ai.imaging.decode import read_dataset, stored_values
from pacs_ai.imaging.prepare import ct_input
from pacs_ai.imaging.spec import InputSpec
from pacs_ai.training import dicomwriter as dw


def _series(n: int = 12, **kw: object) -> list[Dataset]:
    vol = np.zeros((n, 8, 8), dtype=np.float32) - 500
    for z in range(n):
        vol[z] += z  # slice z has HU -500 + z
    return dw.ct_series(vol, slice_thickness_mm=2.5, **kw)  # type: ignore[arg-type]


def test_order_follows_position_not_instance_number() -> None:
    series = _series()
    shuffled = series[:]
    random.Random(3).shuffle(shuffled)
    for i, ds in enumerate(shuffled):
        ds.InstanceNumber = i + 1  # instance numbers now unrelated to anatomy
    plan = plan_volume(shuffled)
    uids = [r.sop_uid for r in plan]
    assert uids == [ds.SOPInstanceUID for ds in series]
    assert [r.position for r in plan] == pytest.approx([2.5 * z for z in range(12)])


def test_order_along_an_oblique_normal() -> None:
    series = _series(6)
    # tilted gantry: rows along x, columns along y rotated about x by 20 degrees
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    for k, ds in enumerate(series):
        ds.ImageOrientationPatient = [1, 0, 0, 0, f"{c:.6f}", f"{s:.6f}"]
        # positions advance along the normal (0, -s, c), with a y drift that would
        # mislead sorting by z alone if it were reversed
        ds.ImagePositionPatient = [0, f"{-s * 3 * k:.4f}", f"{c * 3 * k:.4f}"]
    shuffled = list(reversed(series))
    assert [r.sop_uid for r in plan_volume(shuffled)] == [ds.SOPInstanceUID for ds in series]


def test_duplicate_positions_keep_lowest_instance_number() -> None:
    series = _series(10)
    dup = copy.deepcopy(series[4])
    dup.SOPInstanceUID = dw.generate_uid(dw.UID_PREFIX)
    dup.InstanceNumber = 99
    plan = plan_volume([*series, dup])
    assert len(plan) == 10
    assert series[4].SOPInstanceUID in [r.sop_uid for r in plan]
    assert dup.SOPInstanceUID not in [r.sop_uid for r in plan]


def test_overlapping_acquisitions_keep_the_larger() -> None:
    first = _series(12)
    repeat = _series(6, origin_z_mm=5.0)  # overlaps the first scan
    for ds in repeat:
        ds.AcquisitionNumber = 2
    plan = plan_volume(repeat + first)
    assert {r.acquisition for r in plan} == {1}
    assert len(plan) == 12


def test_non_overlapping_acquisitions_form_one_volume() -> None:
    lower = _series(6)
    upper = _series(6, origin_z_mm=100.0)
    for ds in upper:
        ds.AcquisitionNumber = 2
    plan = plan_volume(upper + lower)
    assert len(plan) == 12
    assert [r.position for r in plan] == sorted(r.position for r in plan)


def test_localizer_is_left_out() -> None:
    scout = _series(1, localizer=True)
    assert len(plan_volume(scout + _series(4))) == 4


def test_select_evenly_by_position() -> None:
    plan = plan_volume(_series(12))
    chosen = select_evenly(plan, 4)
    assert [round(r.position, 3) for r in chosen] == [0.0, 10.0, 17.5, 27.5]
    assert select_evenly(plan, 50) == plan


def test_hounsfield_units_and_padding() -> None:
    ds = _series(1)[0]
    stored = stored_values(ds)
    assert to_hu(stored, ds) == pytest.approx(np.full((8, 8), -500.0))
    ds.PixelPaddingValue = int(stored[0, 0])
    stored2 = stored.copy()
    stored2[0, 0] = 0  # padding stored value 0 here
    ds.PixelPaddingValue = 0
    hu = to_hu(stored2, ds)
    assert hu[0, 0] == -1024.0 and hu[1, 1] == pytest.approx(-500.0)


def test_enhanced_ct_functional_groups() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None
    ds = read_dataset(Path(path))
    assert rescale_of(ds, 0) == (1.0, -1024.0)
    plan = plan_volume([ds])
    # rows run along -x, so the normal is -z: frame 1 (z=-149) comes first
    assert [r.frame for r in plan] == [1, 0]
    assert plan[0].position < plan[1].position
    x = ct_input(ds, InputSpec.default("ct", 64), plan[0].frame)
    assert x.shape == (2, 64, 64) and x.min() >= 0 and x.max() <= 1


def test_hu_windows_by_hand() -> None:
    hu = np.array([-1350.0, -600.0, 150.0, 40.0, 240.0])
    assert hu_window(hu, -600, 1500) == pytest.approx([0.0, 0.5, 1.0, 1390 / 1500, 1.0])
    assert hu_window(hu, 40, 400)[3] == pytest.approx(0.5)
