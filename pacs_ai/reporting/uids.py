"""Deterministic UIDs for the objects we build, so a rebuild or a resend never duplicates one.

A UID is ``2.25.<decimal of a 128-bit UUID>`` (PS3.5 B.2). The UUID is RFC 9562 version 8
(custom): 122 bits of SHA-256 over a canonical encoding of what identifies the object, plus the
version and variant bits, so the result is a well-formed UUID and therefore a valid 2.25 UID.

* Instance UID: (study UID, model name, model version, sorted source SOP Instance UIDs,
  study revision, object kind). A late instance changes the sources and the revision, so the
  re-run gets a new UID; rebuilding the same result gives the same one.
* Series UID: (study UID, model name, model version, object kind). Every revision of one
  model's result lands in the same series (instance number = revision + 1).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Literal

from pacs_ai.reporting.inputs import ReportRequest

ReportKind = Literal["sr", "summary", "text_sr"]
REPORT_KINDS: tuple[ReportKind, ...] = ("sr", "summary", "text_sr")
# Changing the encoding changes every UID; the tag makes that an explicit decision.
_SCHEME = "pacs-ai/report-uid/1"


def _uid_from(parts: list[object]) -> str:
    blob = json.dumps([_SCHEME, *parts], separators=(",", ":"), ensure_ascii=True).encode()
    digest = bytearray(hashlib.sha256(blob).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 9562 variant
    return f"2.25.{uuid.UUID(bytes=bytes(digest)).int}"


def _check_kind(kind: str) -> None:
    if kind not in REPORT_KINDS:
        raise ValueError(f"unknown report kind {kind!r}; expected one of {REPORT_KINDS}")


def report_uid(req: ReportRequest, kind: ReportKind) -> str:
    """The SOP Instance UID of the ``kind`` object built from ``req``."""
    _check_kind(kind)
    sources = sorted(str(ds.SOPInstanceUID) for ds in req.sources)
    return _uid_from(
        [
            "instance",
            req.study_uid,
            req.algorithm.name,
            req.algorithm.version,
            sources,
            req.study_revision,
            kind,
        ]
    )


def report_series_uid(req: ReportRequest, kind: ReportKind) -> str:
    """The Series Instance UID of the ``kind`` object built from ``req``."""
    _check_kind(kind)
    return _uid_from(["series", req.study_uid, req.algorithm.name, req.algorithm.version, kind])


def derived_uid(base_uid: str, *parts: str) -> str:
    """A UID for a part of an object (e.g. a tracking UID per finding), stable with its base."""
    return _uid_from(["derived", base_uid, *parts])


def device_observer_uid(name: str, manufacturer: str, version: str) -> str:
    """A stable UID for the algorithm acting as device observer (one per model version)."""
    return _uid_from(["device", manufacturer, name, version])
