"""Regenerate the sample studies in this folder (deterministic: same bytes every run).

    .venv/bin/python dicom_samples/make_samples.py          # or: make samples

Three small studies of one synthetic patient, made from the same phantoms the demo models
were trained on (``pacs_ai.training.phantoms``) and written by ``pacs_ai.training.dicomwriter``
with realistic headers; each passes dciodvfy without errors (tested):

- ``cr_chest_pa/``: CR chest PA, 512x512, 12 bits, MONOCHROME1 (an inverted-display CR),
  bilateral peripheral ground-glass pattern ("covid" phantom);
- ``dx_chest_pa/``: DX (for presentation) chest PA, 1024x1024, 12 bits, MONOCHROME2,
  focal lobar consolidation ("pneumonia" phantom);
- ``ct_chest/``: axial chest CT, 24 slices of 128x128, 12.5 mm, HU with rescale intercept
  -1024, subpleural ground glass ("covid" phantom).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import ct_phantom, cxr_phantom

HERE = Path(__file__).resolve().parent
PATIENT = dw.Patient(name="Sample^Chest", patient_id="SAMPLE-0001", birth_date="19650412", sex="F")


def _uid(*parts: str) -> str:
    return generate_uid(dw.UID_PREFIX, entropy_srcs=["pacs-ai dicom_samples", *parts])


def _study(name: str, description: str, when: dt.datetime, accession: str) -> dw.StudyInfo:
    return dw.StudyInfo(
        study_uid=_uid(name, "study"),
        accession_number=accession,
        study_id=accession[-4:],
        description=description,
        date=when,
        referring_physician="Referrer^Sample",
    )


def _fresh(root: Path, folder: str) -> Path:
    out = root / folder
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def make_cr(root: Path) -> None:
    img = cxr_phantom("covid", np.random.default_rng(101), 512)
    stored = 4095 - (150 + img * 3600)  # MONOCHROME1: dense (bright on display) = low value
    ds = dw.xray_image(
        stored,
        modality="CR",
        patient=PATIENT,
        monochrome1=True,
        study=_study("cr", "XR CHEST PA", dt.datetime(2026, 3, 2, 8, 15), "ACC-CR-0001"),
        series_uid=_uid("cr", "series"),
        sop_uid=_uid("cr", "image"),
        pixel_spacing_mm=0.7,
        window=(2048, 4096),
    )
    dw.write(ds, _fresh(root, "cr_chest_pa") / "IM0001.dcm")


def make_dx(root: Path) -> None:
    img = cxr_phantom("pneumonia", np.random.default_rng(202), 1024)
    ds = dw.xray_image(
        200 + img * 3700,
        modality="DX",
        patient=PATIENT,
        study=_study("dx", "XR CHEST PA", dt.datetime(2026, 3, 9, 10, 40), "ACC-DX-0001"),
        series_uid=_uid("dx", "series"),
        sop_uid=_uid("dx", "image"),
        pixel_spacing_mm=0.35,
    )
    dw.write(ds, _fresh(root, "dx_chest_pa") / "IM0001.dcm")


def make_ct(root: Path) -> None:
    volume = ct_phantom("covid", np.random.default_rng(303), (24, 128, 128))
    series = dw.ct_series(
        volume,
        patient=PATIENT,
        study=_study("ct", "CT CHEST", dt.datetime(2026, 3, 16, 14, 5), "ACC-CT-0001"),
        series_uid=_uid("ct", "series"),
        frame_of_reference_uid=_uid("ct", "frame"),
        slice_thickness_mm=12.5,
        pixel_spacing_mm=2.8,
        origin_z_mm=-150.0,
    )
    out = _fresh(root, "ct_chest")
    for i, ds in enumerate(series):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid("ct", "image", str(i))
        dw.write(ds, out / f"IM{i + 1:04d}.dcm")


def main() -> None:
    ap = argparse.ArgumentParser(description="Regenerate the sample studies.")
    ap.add_argument("--out", type=Path, default=HERE, help="where to write (default: here)")
    root = ap.parse_args().out
    make_cr(root)
    make_dx(root)
    make_ct(root)
    total = sum(f.stat().st_size for f in root.rglob("*.dcm"))
    print(f"samples written to {root} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
