"""The output folder (``reports.path``): what is written for each scored study, and where.

Layout, with no PHI in any name and findable by a person:
``<report date, UTC, YYYY-MM-DD>/study-<internal study id>/<kind>-rev<revision>-<hash>.<ext>``,
e.g. ``2026-12-02/study-17/sr-rev0-3f2a9c0d1e4b.dcm`` and ``summary-rev0-....png`` (the hash
of the SOP Instance UID tells two models' objects of one revision apart).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from PIL import Image
from pydicom.dataset import Dataset

from pacs_ai.config import Settings
from pacs_ai.reporting.writer import write_atomically, write_object

_DICOM_KINDS = ("sr", "summary", "text_sr")


def built_kinds(settings: Settings) -> list[str]:
    """Report objects to build: the SR always, what reports.objects and every destination
    want, and the summary image when only its PNG is wanted."""
    wanted = {"sr", *settings.reports.objects}
    for dest in settings.destinations:
        wanted.update(dest.objects)
    if "png" in wanted:
        wanted.add("summary")
    return [k for k in _DICOM_KINDS if k in wanted]


def recorded_kinds(settings: Settings) -> set[str]:
    """DICOM kinds written to the folder (and recorded as reports); a summary built only for
    its PNG is not."""
    kinds: set[str] = {"sr", *settings.reports.objects}
    kinds.discard("png")
    for dest in settings.destinations:
        kinds.update(dest.objects)
    return kinds


def study_folder(root: Path, when: dt.datetime, study_id: int) -> Path:
    return root / when.astimezone(dt.UTC).strftime("%Y-%m-%d") / f"study-{study_id}"


def _stem(kind: str, revision: int, sop_instance_uid: str) -> str:
    digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
    return f"{kind}-rev{revision}-{digest[:12]}"


def write_outputs(
    settings: Settings, folder: Path, kind: str, revision: int, ds: Dataset
) -> Path | None:
    """Write one built object (and the summary's PNG when configured); the DICOM file's
    path, or None when this kind is not kept."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = _stem(kind, revision, str(ds.SOPInstanceUID))
    if kind == "summary" and "png" in settings.reports.objects:
        image = Image.fromarray(ds.pixel_array)
        write_atomically(folder / f"{stem}.png", lambda fh: image.save(fh, format="PNG"))
    if kind not in recorded_kinds(settings):
        return None
    return write_object(ds, folder, f"{stem}.dcm")
