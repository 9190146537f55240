"""Training folders like the seed notebook: one sub-folder per class.

X-ray: ``DATA/<class>/**/*.{png,jpg,jpeg,dcm}`` (any file that parses as DICOM counts too).
CT: ``DATA/<class>/<series folder>/*`` (each folder holding DICOM files is one series).
``groups`` merges folders into one class, e.g. ``{"other": ["normal", "pneumonia"]}``.
Patient-level split: images sharing a Patient ID never straddle training and validation;
images without one (PNG/JPEG) are their own group.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from pacs_ai.errors import ImagingError, PacsAiError
from pacs_ai.imaging.decode import read_dataset, read_header
from pacs_ai.imaging.prepare import (
    PICTURE_SUFFIXES,
    ct_input,
    ct_scored_slices,
    picture_input,
    xray_input,
)
from pacs_ai.imaging.spec import InputSpec


@dataclass(frozen=True)
class Sample:
    """One training unit: an image file (X-ray) or a series folder (CT)."""

    path: Path
    label: int
    group: str


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def discover(
    data_dir: Path,
    kind: Literal["cxr", "ct"],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> tuple[tuple[str, ...], list[Sample]]:
    """Classes (sorted) and samples under ``data_dir``; see module doc."""
    folders = sorted(p for p in Path(data_dir).iterdir() if p.is_dir() and p.name[0] != ".")
    if not folders:
        raise PacsAiError(f"{data_dir} has no class folders")
    folder_to_class = {f.name: f.name for f in folders}
    for target, members in (groups or {}).items():
        for member in members:
            if member not in folder_to_class:
                raise PacsAiError(f"--group {target}: no folder {member!r} in {data_dir}")
            folder_to_class[member] = target
    classes = tuple(sorted(set(folder_to_class.values())))
    samples: list[Sample] = []
    for folder in folders:
        label = classes.index(folder_to_class[folder.name])
        if kind == "cxr":
            files = sorted(
                p
                for p in folder.rglob("*")
                if p.is_file() and (p.suffix.lower() in PICTURE_SUFFIXES or _is_dicom(p))
            )
            samples += [Sample(p, label, _patient_group(p)) for p in files]
        else:
            dirs = sorted({p.parent for p in folder.rglob("*") if p.is_file() and _is_dicom(p)})
            samples += [Sample(d, label, _patient_group(d)) for d in dirs]
    if len(classes) < 2:
        raise PacsAiError(f"{data_dir}: need at least two classes, found {list(classes)}")
    return classes, samples


def _patient_group(path: Path) -> str:
    """'patient:<ID>' from the DICOM header when known, else the path itself."""
    probe = path
    if path.is_dir():
        probe = next((p for p in sorted(path.iterdir()) if p.is_file()), path)
    if probe.is_file() and _is_dicom(probe):
        try:
            pid = str(read_header(probe).get("PatientID", "") or "").strip()
        except ImagingError:
            pid = ""
        if pid:
            return f"patient:{pid}"
    return f"path:{path}"


def patient_split(
    labels: np.ndarray, groups: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): stratified by class, grouped by patient."""
    n_splits = max(2, round(1 / val_fraction))
    _, group_ids = np.unique(np.asarray(groups), return_inverse=True)
    if group_ids.max(initial=-1) + 1 < n_splits:
        raise PacsAiError(
            f"only {group_ids.max(initial=-1) + 1} patients: a patient-level split with "
            f"validation fraction {val_fraction:g} needs at least {n_splits}"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(splitter.split(np.zeros(len(labels)), labels, group_ids))
    return np.sort(train_idx), np.sort(val_idx)


def load_xray_inputs(samples: Sequence[Sample], spec: InputSpec, progress: bool) -> np.ndarray:
    """(N, 1, S, S) float16 model inputs, preprocessed exactly as in inference."""
    out = np.zeros((len(samples), 1, spec.size, spec.size), dtype=np.float16)
    for i, s in enumerate(tqdm(samples, desc="preprocess", disable=not progress, leave=False)):
        if s.path.suffix.lower() in PICTURE_SUFFIXES:
            out[i] = picture_input(s.path, spec)
        else:
            out[i] = xray_input(read_dataset(s.path), spec)
    return out


def ct_series_inputs(series_dir: Path, spec: InputSpec) -> np.ndarray:
    """(K, C, S, S) inputs of the slices a CT series is scored on (as in inference)."""
    files = sorted(p for p in series_dir.iterdir() if p.is_file() and _is_dicom(p))
    slices = ct_scored_slices(files, [read_header(p) for p in files], spec)
    if not slices:
        raise ImagingError(f"no axial CT slices in {series_dir.name}")
    arrays = []
    last: tuple[Path, Dataset] | None = None
    for s in slices:
        if last is None or last[0] != s.path:
            last = (s.path, read_dataset(s.path))
        arrays.append(ct_input(last[1], spec, s.frame))
    return np.stack(arrays).astype(np.float16)


def load_ct_inputs(samples: Sequence[Sample], spec: InputSpec, progress: bool) -> list[np.ndarray]:
    return [
        ct_series_inputs(s.path, spec)
        for s in tqdm(samples, desc="preprocess", disable=not progress, leave=False)
    ]
