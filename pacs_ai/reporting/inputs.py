"""What the reporting builders take: a scored study, described without the database.

The pipeline fills a :class:`ReportRequest` from its rows and the model output; the builders
never read anything else. Every value is validated here, once, so a bad request fails before
any DICOM is built (and with a message that carries no PHI).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from pacs_ai.codes import Code
from pacs_ai.errors import PacsAiError

_MAX_LO = 64
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class InvalidReportRequest(PacsAiError, ValueError):
    """A :class:`ReportRequest` (or one of its parts) cannot be turned into a report."""


__all__ = ["AlgorithmInfo", "Code", "FindingResult", "PriorReport", "ReportRequest"]


def _check_lo(what: str, value: str) -> None:
    if not value or len(value) > _MAX_LO or "\\" in value or not value.isprintable():
        raise InvalidReportRequest(f"{what} must be 1-{_MAX_LO} printable characters, no '\\'")


def _check_uid(what: str, value: str) -> None:
    if not (0 < len(value) <= 64 and _UID_RE.match(value)):
        raise InvalidReportRequest(f"{what} is not a valid DICOM UID")


@dataclass(frozen=True)
class FindingResult:
    """One class of the model: its score, the operating threshold and the decision."""

    label: str  # model class label, e.g. "covid19"
    code: Code  # e.g. Code("840539006", "SCT", "COVID-19")
    probability: float  # 0..1
    threshold: float  # operating threshold
    present: bool  # probability >= threshold

    def __post_init__(self) -> None:
        _check_lo("finding label", self.label)
        for name in ("probability", "threshold"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and 0 <= float(value) <= 1):  # NaN fails too
                raise InvalidReportRequest(f"{self.label}: {name} must be a number in [0, 1]")
        if self.present != (self.probability >= self.threshold):
            raise InvalidReportRequest(
                f"{self.label}: present={self.present} contradicts "
                f"probability {self.probability:.4f} vs threshold {self.threshold:.4f}"
            )


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model as it appears in the report (TID 4019, device observer, equipment)."""

    name: str
    version: str
    manufacturer: str
    demo: bool
    # e.g. {"threshold covid19": "0.42", "input": "224x224 lung window"}
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_lo("algorithm name", self.name)
        _check_lo("algorithm version", self.version)
        _check_lo("algorithm manufacturer", self.manufacturer)
        for key, value in self.parameters.items():
            if not key or not isinstance(value, str) or not (key + value).isprintable():
                raise InvalidReportRequest("algorithm parameters must be printable str: str")


@dataclass(frozen=True)
class PriorReport:
    """A report already sent for the same study; the new one names it as predecessor."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    def __post_init__(self) -> None:
        for name in ("study_uid", "series_uid", "sop_class_uid", "sop_instance_uid"):
            _check_uid(f"prior report {name}", getattr(self, name))


_REQUIRED_SOURCE_ATTRS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class ReportRequest:
    """Everything one report is built from.

    ``sources`` are the headers of the scored images (no pixel data needed), all of one study.
    ``display_image``/``heatmap`` (float32 HxW in [0, 1]) are only used by the summary image.
    """

    sources: Sequence[Dataset]
    findings: Sequence[FindingResult]
    algorithm: AlgorithmInfo
    study_revision: int = 0
    predecessor: PriorReport | None = None
    display_image: np.ndarray | None = None
    heatmap: np.ndarray | None = None
    heatmap_label: str | None = None  # the finding the heatmap is for (summary image legend)

    def __post_init__(self) -> None:
        if not self.sources:
            raise InvalidReportRequest("a report needs at least one source image")
        if not self.findings:
            raise InvalidReportRequest("a report needs at least one finding")
        seen: set[str] = set()
        for ds in self.sources:
            for attr in _REQUIRED_SOURCE_ATTRS:
                if not ds.get(attr):
                    raise InvalidReportRequest(f"source image lacks {attr}")
            _check_uid("source SOPInstanceUID", str(ds.SOPInstanceUID))
            if str(ds.SOPInstanceUID) in seen:
                raise InvalidReportRequest("the same source SOP instance is listed twice")
            seen.add(str(ds.SOPInstanceUID))
        study_uid = str(self.sources[0].StudyInstanceUID)
        _check_uid("StudyInstanceUID", study_uid)
        if any(str(ds.StudyInstanceUID) != study_uid for ds in self.sources):
            raise InvalidReportRequest("source images belong to more than one study")
        labels = [f.label for f in self.findings]
        if len(set(labels)) != len(labels):
            raise InvalidReportRequest("finding labels must be unique")
        for finding in self.findings:
            stated = self.algorithm.parameters.get(f"threshold {finding.label}")
            if stated is not None and not _same_number(stated, finding.threshold):
                raise InvalidReportRequest(
                    f"{finding.label}: threshold {finding.threshold} differs from the algorithm "
                    f"parameter {stated!r}"
                )
        if self.study_revision < 0:
            raise InvalidReportRequest("study_revision must be >= 0")
        if self.predecessor is not None and self.predecessor.study_uid != study_uid:
            raise InvalidReportRequest("the predecessor report belongs to another study")
        _check_image("display_image", self.display_image)
        _check_image("heatmap", self.heatmap)
        if self.heatmap is not None and (
            self.display_image is None or self.heatmap.shape != self.display_image.shape
        ):
            raise InvalidReportRequest("heatmap needs a display_image of the same shape")

    @property
    def study_uid(self) -> str:
        return str(self.sources[0].StudyInstanceUID)


def _same_number(text: str, value: float) -> bool:
    try:
        return abs(float(text) - float(value)) <= 1e-9
    except ValueError:
        return False


def _check_image(what: str, image: np.ndarray | None) -> None:
    if image is None:
        return
    if image.ndim != 2 or min(image.shape) < 1:
        raise InvalidReportRequest(f"{what} must be a non-empty 2-D array")
    if not np.isfinite(image).all():
        raise InvalidReportRequest(f"{what} contains NaN or infinity")
