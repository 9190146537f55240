"""A real Orthanc PACS for tests: foreground process, temp storage, loopback ports, REST."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.tools import require_file, require_tool

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin's shared library (Debian package orthanc-dicomweb)."""
    return require_file(DICOMWEB_PLUGIN, "orthanc-dicomweb")


class Orthanc:
    def __init__(
        self,
        workdir: Path,
        known_aes: dict[str, tuple[str, int]],
        aet: str = "ORTHANC",
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
    ):
        """``dicomweb``: load the DICOMweb plugin (STOW-RS at :attr:`dicomweb_url`);
        ``users``: HTTP basic authentication with these users (REST calls use the first)."""
        self.workdir = workdir
        self.aet = aet
        self.known_aes = known_aes
        self.dicomweb = dicomweb
        self.users = users or {}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        (workdir / "storage").mkdir(parents=True, exist_ok=True)

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "pacs-ai-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowEcho": False,
            "DicomCheckCalledAet": True,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                name.lower(): [ae, "127.0.0.1", port] for name, (ae, port) in self.known_aes.items()
            },
            "Plugins": [str(dicomweb_plugin())] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 1,
        }

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self, timeout: float = 30.0) -> None:
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(self._config()))
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [require_tool("Orthanc"), str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.workdir / "orthanc.log").read_text()[-3000:])
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def _request(self, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=10) as rsp:  # noqa: S310 - loopback only
            return bytes(rsp.read())

    def get(self, path: str) -> Any:
        return json.loads(self._request(path))

    def find_instances(self, study_uid: str) -> list[dict[str, Any]]:
        body = json.dumps(
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        ).encode()
        return list(json.loads(self._request("/tools/find", body)))

    def instance_file(self, orthanc_id: str) -> bytes:
        return self._request(f"/instances/{orthanc_id}/file")
