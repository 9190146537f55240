"""The model input spec (:class:`InputSpec`): pure data, torch-free.

It lives apart from :mod:`pacs_ai.imaging.prepare` (which does the pixel work with torch) so
that model cards, the CLI and the listener process can read a spec without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pacs_ai.imaging.ct import LUNG_WINDOW, MEDIASTINAL_WINDOW


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: ``kind``, square ``size``, CT ``windows`` (center, width) one per
    channel, and how many CT slices are scored per series (``ct_slices``)."""

    kind: Literal["cxr", "ct"]
    size: int
    windows: tuple[tuple[float, float], ...] = field(default=())
    ct_slices: int = 24

    @property
    def channels(self) -> int:
        return 1 if self.kind == "cxr" else len(self.windows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "size": self.size,
            "channels": self.channels,
            "windows": [list(w) for w in self.windows],
            "ct_slices": self.ct_slices,
            "range": "[0, 1]; the model normalises (cxr: per image mean/std; ct: fixed)",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        return cls(
            kind=data["kind"],
            size=int(data["size"]),
            windows=tuple((float(c), float(w)) for c, w in data.get("windows", [])),
            ct_slices=int(data.get("ct_slices", 24)),
        )

    @classmethod
    def default(cls, kind: Literal["cxr", "ct"], size: int | None = None) -> InputSpec:
        if kind == "cxr":
            return cls("cxr", size or 224)
        return cls("ct", size or 128, (LUNG_WINDOW, MEDIASTINAL_WINDOW))
