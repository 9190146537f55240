"""DICOMweb STOW-RS sender: POST report objects to ``<url>/studies`` and read the answer
per instance (PS3.18 10.5), in the same terms as a C-STORE-RSP.

- an instance in ReferencedSOPSequence (0008,1199) without a WarningReason -> status 0x0000;
  with one -> that warning status (never "delivered", as for DIMSE);
- an instance in FailedSOPSequence (0008,1198) -> its FailureReason (0008,1197), e.g. 0xA700
  (retried) or 0xC000 (dead);
- HTTP 4xx (bad request, unauthorised, not found, unsupported type) -> permanent;
  408/429, 5xx, connection errors and timeouts -> transient (retried on the ladder);
- a TLS certificate that fails verification -> permanent.

Credentials are read from the environment variables the destination names, at send time.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pydicom

from pacs_ai.config import DestinationSettings
from pacs_ai.delivery.scu import Outgoing, SendResult, tls_failure

log = logging.getLogger(__name__)

_REFERENCED = "00081199"
_FAILED = "00081198"
_SOP_INSTANCE = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"
_TRANSIENT_HTTP = frozenset({408, 425, 429})
# Objects are read into memory for the multipart body; a batch is split beyond this.
_MAX_REQUEST_BYTES = 64 * 1024 * 1024
_HTTP_HINTS = {
    401: "check the destination's credentials",
    403: "the account may not store",
    404: "check the destination's url",
    413: "reduce delivery.batch_size",
    415: "the server does not accept application/dicom",
}


_STATUS_MEANING = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}


def _describe(code: int) -> str:
    meaning = _STATUS_MEANING.get(code)
    return f"0x{code:04X} ({meaning})" if meaning else f"0x{code:04X}"


@dataclass(frozen=True)
class _Outcome:
    """One instance's answer: status (0 success, 0xBxxx warning, failure reason) or None."""

    status: int | None
    error: str | None = None


class CredentialsMissing(Exception):
    pass


def _auth(
    dest: DestinationSettings, env: Mapping[str, str]
) -> tuple[httpx.BasicAuth | None, dict[str, str]]:
    """(basic auth, extra headers) from the environment variables the destination names."""
    if dest.token_env is not None:
        token = env.get(dest.token_env)
        if not token:
            raise CredentialsMissing(f"environment variable {dest.token_env} is not set")
        return None, {"Authorization": f"Bearer {token}"}
    if dest.username is not None and dest.password_env is not None:
        password = env.get(dest.password_env)
        if password is None:
            raise CredentialsMissing(f"environment variable {dest.password_env} is not set")
        return httpx.BasicAuth(dest.username, password), {}
    return None, {}


def _ssl_context(dest: DestinationSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(dest.ca_file) if dest.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _multipart(datasets: Sequence[bytes], boundary: str) -> bytes:
    parts = []
    for data in datasets:
        parts.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        parts.append(data)
        parts.append(b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def stow(
    dest: DestinationSettings,
    items: Sequence[Outgoing],
    env: Mapping[str, str] | None = None,
) -> list[SendResult]:
    """POST ``items`` (one request per ~64 MiB); one result per item, in order."""
    assert dest.url is not None
    environ = os.environ if env is None else env
    results: dict[int, SendResult] = {}
    pending: list[tuple[int, str, bytes]] = []  # index, SOP Instance UID, file bytes

    def flush() -> None:
        if not pending:
            return
        outcomes = _post(dest, [p[2] for p in pending], [p[1] for p in pending], environ)
        for (idx, uid, _), (status, error, permanent) in zip(pending, outcomes, strict=True):
            results[idx] = SendResult(items[idx].label, uid, status, error, permanent)
        pending.clear()

    for idx, item in enumerate(items):
        try:
            assert item.path is not None
            uid = str(pydicom.dcmread(item.path, stop_before_pixels=True).SOPInstanceUID)
            data = item.path.read_bytes()
        except Exception as exc:  # a report file we cannot read: nothing to retry
            why = f"not readable as DICOM: {exc.__class__.__name__}"
            results[idx] = SendResult(item.label, None, None, why, permanent=True)
            continue
        if pending and sum(len(p[2]) for p in pending) + len(data) > _MAX_REQUEST_BYTES:
            flush()
        pending.append((idx, uid, data))
    flush()
    return [results[i] for i in range(len(items))]


def _post(
    dest: DestinationSettings, payloads: list[bytes], uids: list[str], env: Mapping[str, str]
) -> list[tuple[int | None, str | None, bool]]:
    """(status, error, permanent) per instance."""
    assert dest.url is not None

    def every(error: str, permanent: bool) -> list[tuple[int | None, str | None, bool]]:
        return [(None, error, permanent)] * len(uids)

    try:
        auth, auth_headers = _auth(dest, env)
    except CredentialsMissing as exc:
        return every(f"{exc} (credentials of destination {dest.name})", True)
    boundary = uuid.uuid4().hex
    headers = {
        **auth_headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json, application/dicom+xml;q=0.5, application/json;q=0.4",
    }
    url = dest.url.rstrip("/") + "/studies"
    try:
        with httpx.Client(
            verify=_ssl_context(dest), timeout=dest.timeout_seconds, auth=auth
        ) as client:
            body = _multipart(payloads, boundary)
            rsp = client.post(url, content=body, headers=headers)
    except httpx.TimeoutException as exc:
        return every(f"STOW-RS: no answer within the timeout ({exc.__class__.__name__})", False)
    except httpx.TransportError as exc:
        cause = exc.__context__ or exc.__cause__
        if isinstance(cause, ssl.SSLError):
            return every(*tls_failure(cause))
        return every(f"STOW-RS: cannot connect ({exc.__class__.__name__})", False)
    except httpx.HTTPError as exc:
        return every(f"STOW-RS: {exc.__class__.__name__}", False)
    answer = _parse(rsp)
    per_instance = _per_instance(answer) if answer is not None else {}
    code = rsp.status_code
    if code in (200, 202) or (code == 409 and per_instance):
        out: list[tuple[int | None, str | None, bool]] = []
        for uid in uids:
            o = per_instance.get(uid)
            if o is None:
                out.append((None, f"STOW-RS HTTP {code}: instance not in the response", False))
            else:
                out.append((o.status, o.error, False))
        return out
    reason = f"STOW-RS HTTP {code} {rsp.reason_phrase}".rstrip()
    if code >= 500 or code in _TRANSIENT_HTTP:
        return every(reason, False)
    hint = _HTTP_HINTS.get(code)
    return every(f"{reason}; {hint}" if hint else reason, True)


def _parse(rsp: httpx.Response) -> dict[str, Any] | None:
    """The response dataset as DICOM JSON (XML converted), or None."""
    ctype = rsp.headers.get("content-type", "").split(";")[0].strip().lower()
    if not rsp.content:
        return None
    try:
        if ctype.endswith("xml"):
            return _xml_to_json(rsp.content)
        data = json.loads(rsp.content)
    except (ValueError, ET.ParseError):
        log.warning("STOW-RS response not readable (%s)", ctype or "no content type")
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    return data if isinstance(data, dict) else None


def _xml_to_json(content: bytes) -> dict[str, Any]:
    """PS3.19 Native DICOM Model -> the DICOM JSON shape (only what we read)."""
    # Answers come from a configured server; expat refuses entity expansion attacks.
    root = ET.fromstring(content)  # noqa: S314

    def attrs(node: ET.Element) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in node.findall("DicomAttribute"):
            tag = (a.get("tag") or "").upper()
            if a.get("vr") == "SQ":
                out[tag] = {"vr": "SQ", "Value": [attrs(i) for i in a.findall("Item")]}
            else:
                out[tag] = {"vr": a.get("vr"), "Value": [v.text for v in a.findall("Value")]}
        return out

    return attrs(root)


def _first(item: Mapping[str, Any], tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _per_instance(body: Mapping[str, Any]) -> dict[str, _Outcome]:
    out: dict[str, _Outcome] = {}
    for item in (body.get(_REFERENCED) or {}).get("Value") or []:
        uid = _first(item, _SOP_INSTANCE)
        if uid is None:
            continue
        warning = _first(item, _WARNING_REASON)
        if warning is None:
            out[str(uid)] = _Outcome(0x0000)
        else:
            code = int(warning)
            out[str(uid)] = _Outcome(code, f"STOW-RS warning {_describe(code)}")
    for item in (body.get(_FAILED) or {}).get("Value") or []:
        uid = _first(item, _SOP_INSTANCE)
        if uid is None:
            continue
        reason = _first(item, _FAILURE_REASON)
        code = int(reason) if reason is not None else 0xC000
        out[str(uid)] = _Outcome(code, f"STOW-RS failure {_describe(code)}")
    return out
