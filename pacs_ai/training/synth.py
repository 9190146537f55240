"""``pacs-ai synth``: a synthetic phantom dataset in the seed notebook's folder-per-class
layout (``normal/``, ``covid/``, ``pneumonia/``), as DICOM (or PNG for X-ray).

Classes are balanced (image i has class i mod 3). Image i is drawn from
``numpy.random.default_rng([seed, i])``, so a dataset is reproducible and two seeds give
disjoint data. X-ray acquisitions vary: CR or DX, MONOCHROME1 or 2, Bits Stored 10/12/14/15,
pixel spacing, VOI window (full range or a tight one), exposure. CT series are written one
folder per series with per-slice files named in random order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from pacs_ai.training import dicomwriter as dw
from pacs_ai.training.phantoms import KINDS, ct_phantom, cxr_phantom


def _xray_stored(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, object]]:
    bits = int(rng.choice([10, 12, 14, 15]))
    top = 2**bits - 1
    lo = rng.uniform(0.02, 0.15) * top
    hi = rng.uniform(0.75, 0.98) * top
    stored = lo + img * (hi - lo)
    mono1 = bool(rng.random() < 0.35)
    if mono1:
        stored = top - stored
    if rng.random() < 0.5:
        window = (top / 2 + 0.5, float(top + 1))  # the full range
    else:
        p1, p99 = np.percentile(stored, [1, 99])
        window = (float((p1 + p99) / 2), float(max(p99 - p1, 2.0)))
    return stored, {"bits_stored": bits, "monochrome1": mono1, "window": window}


def synth_cxr(out_dir: Path, n: int, seed: int, size: int = 320, fmt: str = "dicom") -> int:
    """Write ``n`` frontal chest radiographs under ``out_dir/<class>/``; returns n."""
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        rng = np.random.default_rng([seed, i])
        img = cxr_phantom(kind, rng, size)
        folder = out_dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            Image.fromarray(np.rint(img * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
            continue
        stored, params = _xray_stored(img, rng)
        ds = dw.xray_image(
            stored,
            modality="CR" if rng.random() < 0.5 else "DX",
            patient=dw.Patient(name=f"Phantom^{i:05d}", patient_id=f"SYN{seed}-{i:05d}"),
            study=dw.StudyInfo(accession_number=f"S{seed}{i:05d}"),
            pixel_spacing_mm=round(float(rng.uniform(1.1, 1.4)) * 320 / size, 4),
            bits_stored=int(params["bits_stored"]),  # type: ignore[call-overload]
            monochrome1=bool(params["monochrome1"]),
            window=params["window"],  # type: ignore[arg-type]
        )
        dw.write(ds, folder / f"{i:05d}.dcm")
    return n


def synth_ct(out_dir: Path, n: int, seed: int, shape: tuple[int, int, int] = (40, 128, 128)) -> int:
    """Write ``n`` chest CT series under ``out_dir/<class>/<series>/``; returns n."""
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        rng = np.random.default_rng([seed, i])
        vol = ct_phantom(kind, rng, shape)
        folder = out_dir / kind / f"series{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        fov = rng.uniform(330, 400)
        datasets = dw.ct_series(
            vol,
            patient=dw.Patient(name=f"Phantom^{i:05d}", patient_id=f"SYN{seed}-{i:05d}"),
            study=dw.StudyInfo(accession_number=f"S{seed}{i:05d}"),
            slice_thickness_mm=round(300.0 / shape[0], 3),
            pixel_spacing_mm=round(fov / shape[1], 4),
            origin_z_mm=float(rng.uniform(-200, -100)),
        )
        for j, z in enumerate(rng.permutation(len(datasets))):
            dw.write(datasets[int(z)], folder / f"im{j:04d}.dcm")
    return n


def synth(
    out_dir: Path,
    kind: Literal["cxr", "ct"],
    n: int,
    seed: int,
    *,
    size: int | None = None,
    fmt: str = "dicom",
    slices: int = 40,
) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "cxr":
        return synth_cxr(out_dir, n, seed, size or 320, fmt)
    side = size or 128
    return synth_ct(out_dir, n, seed, (slices, side, side))
