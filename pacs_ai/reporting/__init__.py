"""Turn a scored study into DICOM objects a radiologist sees in the PACS viewer.

* :func:`build_sr`: Comprehensive 3D SR, TID 1500 Measurement Report (the result of record)
* :func:`build_summary_image`: Secondary Capture with heatmap and burned-in text (fallback)
* :func:`build_text_sr`: Basic Text SR with the same content as text (fallback)
* :func:`report_uid` / :func:`report_series_uid`: the deterministic UIDs they get
* :func:`write_object`: atomic write of any of them, named by a hash of the SOP Instance UID
* :mod:`pacs_ai.reporting.output`: the output folder's layout and which kinds it keeps

See docs/reporting.md.
"""

from pacs_ai.reporting.inputs import (
    AlgorithmInfo,
    Code,
    FindingResult,
    InvalidReportRequest,
    PriorReport,
    ReportRequest,
)
from pacs_ai.reporting.sr import build_sr
from pacs_ai.reporting.summary_image import build_summary_image
from pacs_ai.reporting.text_sr import build_text_sr
from pacs_ai.reporting.uids import ReportKind, report_series_uid, report_uid
from pacs_ai.reporting.writer import write_object

__all__ = [
    "AlgorithmInfo",
    "Code",
    "FindingResult",
    "InvalidReportRequest",
    "PriorReport",
    "ReportKind",
    "ReportRequest",
    "build_sr",
    "build_summary_image",
    "build_text_sr",
    "report_series_uid",
    "report_uid",
    "write_object",
]
