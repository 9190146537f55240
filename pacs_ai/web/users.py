"""Console users: argon2 password hashes in the ``users`` table, and the login-attempt limiter."""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from pacs_ai.db.models import User, UserRole, utcnow
from pacs_ai.errors import ConfigError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
MIN_PASSWORD = 8
_hasher = PasswordHasher()
# Verified against when the user does not exist, so both cases take the same time.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


@dataclass(frozen=True)
class ConsoleUser:
    name: str
    role: UserRole

    @property
    def is_admin(self) -> bool:
        return self.role is UserRole.ADMIN

    @property
    def actor(self) -> str:
        """How this user appears in ``audit_events.actor``."""
        return f"{self.role.value}:{self.name}"


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError("user names are 1-64 letters, digits, or . _ @ -")
    return name


def add_user(engine: Engine, name: str, role: UserRole, password: str) -> None:
    validate_name(name)
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"passwords need at least {MIN_PASSWORD} characters")
    try:
        with engine.begin() as conn:
            conn.execute(
                insert(User).values(
                    name=name, role=role, password_hash=_hasher.hash(password), created_at=utcnow()
                )
            )
    except IntegrityError as exc:
        raise ConfigError(f"user {name!r} exists already") from exc


def remove_user(engine: Engine, name: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(delete(User).where(User.name == name)).rowcount > 0


def list_users(engine: Engine) -> list[dict[str, object]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(User.name, User.role, User.created_at, User.last_login_at).order_by(User.name)
        ).all()
    return [
        {
            "name": r.name,
            "role": r.role.value,
            "created_at": r.created_at.isoformat(timespec="seconds"),
            "last_login_at": r.last_login_at.isoformat(timespec="seconds")
            if r.last_login_at
            else None,
        }
        for r in rows
    ]


def count_users(engine: Engine) -> int:
    with engine.connect() as conn:
        return len(conn.scalars(select(User.id).limit(1)).all())


def lookup(engine: Engine, name: str) -> ConsoleUser | None:
    """The user behind a session (None once removed: removing a user ends their sessions)."""
    with engine.connect() as conn:
        role = conn.scalar(select(User.role).where(User.name == name))
    return ConsoleUser(name, role) if role is not None else None


def authenticate(engine: Engine, name: str, password: str) -> ConsoleUser | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(User.id, User.role, User.password_hash).where(User.name == name)
        ).first()
    try:
        _hasher.verify(row.password_hash if row else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    with engine.begin() as conn:
        values: dict[str, object] = {"last_login_at": utcnow()}
        if _hasher.check_needs_rehash(row.password_hash):
            values["password_hash"] = _hasher.hash(password)
        conn.execute(update(User).where(User.id == row.id).values(**values))
    return ConsoleUser(name, row.role)


class LoginLimiter:
    """At most ``max_failures`` failed logins per (user name, client address) within
    ``window_seconds``; beyond that, attempts are refused without checking the password."""

    def __init__(self, max_failures: int, window_seconds: float) -> None:
        self._max = max_failures
        self._window = window_seconds
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        q = self._failures.setdefault(key, deque())
        while q and q[0] <= now - self._window:
            q.popleft()
        return q

    def blocked(self, name: str, address: str) -> bool:
        with self._lock:
            return len(self._recent((name.lower(), address), time.monotonic())) >= self._max

    def failed(self, name: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent((name.lower(), address), now).append(now)
            if len(self._failures) > 10000:  # bounded: forget keys with nothing recent
                for k in [
                    k for k, q in self._failures.items() if not q or q[-1] <= now - self._window
                ]:
                    del self._failures[k]

    def succeeded(self, name: str, address: str) -> None:
        with self._lock:
            self._failures.pop((name.lower(), address), None)
