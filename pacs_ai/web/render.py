"""Report objects for the browser: a Secondary Capture summary image as PNG, an SR's content
tree as nested (concept, value) items. Reads only files pacs-ai wrote itself."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

MAX_TREE_ITEMS = 500


def summary_png(path: Path, max_side: int = 1024) -> bytes:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 4:  # multi-frame: the first frame
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB" if pixels.ndim == 3 else "L")
    img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return out.getvalue()


@dataclass
class TreeItem:
    relationship: str
    value_type: str
    concept: str
    value: str
    children: list[TreeItem] = field(default_factory=list)


def sr_tree(path: Path) -> list[TreeItem]:
    ds = pydicom.dcmread(path)
    budget = [MAX_TREE_ITEMS]
    root = TreeItem("", str(ds.get("ValueType", "CONTAINER")), _concept(ds), "")
    root.children = _items(ds.get("ContentSequence", []), budget)
    return [root]


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeMeaning) if seq else ""


def _value(item: Dataset) -> str:
    vt = str(item.get("ValueType", ""))
    if vt == "TEXT":
        return str(item.get("TextValue", ""))
    if vt == "CODE" and item.get("ConceptCodeSequence"):
        return str(item.ConceptCodeSequence[0].CodeMeaning)
    if vt == "NUM" and item.get("MeasuredValueSequence"):
        mv = item.MeasuredValueSequence[0]
        unit = (
            mv.MeasurementUnitsCodeSequence[0].CodeValue
            if "MeasurementUnitsCodeSequence" in mv
            else ""
        )
        return f"{mv.NumericValue} {unit}".strip()
    if vt == "UIDREF":
        return str(item.get("UID", ""))
    if vt in ("DATETIME", "DATE", "TIME"):
        return str(item.get(vt.title().replace("time", "Time"), "") or item.get("DateTime", ""))
    if vt in ("IMAGE", "COMPOSITE") and item.get("ReferencedSOPSequence"):
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    if vt == "PNAME":
        return str(item.get("PersonName", ""))
    return ""


def _items(seq: object, budget: list[int]) -> list[TreeItem]:
    out: list[TreeItem] = []
    for item in seq:  # type: ignore[attr-defined]
        if budget[0] <= 0:
            out.append(TreeItem("", "", "…", "(truncated)"))
            break
        budget[0] -= 1
        node = TreeItem(
            str(item.get("RelationshipType", "")),
            str(item.get("ValueType", "")),
            _concept(item),
            _value(item),
        )
        if "ContentSequence" in item:
            node.children = _items(item.ContentSequence, budget)
        out.append(node)
    return out
