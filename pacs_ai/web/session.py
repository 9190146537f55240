"""Signed session cookies (itsdangerous) and CSRF tokens.

The cookie holds the user name and a CSRF token, signed and time-stamped; it is HttpOnly,
SameSite=Strict, and Secure under TLS. Anonymous visitors get a cookie too (with only a CSRF
token), so the login form is CSRF-protected as well. The signing key comes from the environment
variable named by ``http.secret_key_env``, or is generated once into ``http.secret_key_file``.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

from pacs_ai.config import HttpSettings
from pacs_ai.errors import ConfigError

COOKIE = "pacs_ai_session"


def load_secret(http: HttpSettings) -> bytes:
    if http.secret_key_env:
        value = os.environ.get(http.secret_key_env, "")
        if len(value) < 32:
            raise ConfigError(
                f"http.secret_key_env: ${http.secret_key_env} must hold at least 32 characters"
            )
        return value.encode()
    return _key_file(http.secret_key_file)


def _key_file(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
            f.flush()
            os.fsync(f.fileno())
    value = path.read_text().strip()
    if len(value) < 32:
        raise ConfigError(f"{path}: the console's secret key is too short; delete the file")
    return value.encode()


@dataclass(frozen=True)
class SessionData:
    csrf: str
    user: str | None = None


class SessionCodec:
    def __init__(self, secret: bytes, max_age_seconds: int) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="pacs-ai-console-session")
        self.max_age = max_age_seconds

    def dumps(self, data: SessionData) -> str:
        return self._s.dumps({"c": data.csrf, "u": data.user})

    def loads(self, value: str | None) -> SessionData | None:
        if not value:
            return None
        try:
            raw = self._s.loads(value, max_age=self.max_age)
        except BadSignature:
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("c"), str):
            return None
        user = raw.get("u")
        return SessionData(raw["c"], user if isinstance(user, str) else None)


def new_session(user: str | None = None) -> SessionData:
    return SessionData(secrets.token_urlsafe(32), user)


def csrf_ok(session: SessionData | None, token: str | None) -> bool:
    return bool(session and token and hmac.compare_digest(session.csrf, token))
