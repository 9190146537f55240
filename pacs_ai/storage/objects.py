"""Where received instances live for good: the local spool, or an S3 bucket behind it.

``[storage] backend = "local"`` keeps today's behaviour: the spool (``objects/``) is the store.
With ``backend = "s3"`` the spool stays the write-ahead buffer (Success still means a local
fsync and a committed row); :mod:`pacs_ai.storage.uploader` then puts each instance under its
sha256 key with a conditional write, and workers on other hosts read through
:mod:`pacs_ai.storage.cache`.

An object is the instance's Part 10 file as the spool holds it; its key is
``s3_prefix + sha256`` where the sha256 is that of the dataset bytes (the instance row's
``sha256``), never a UID. Credentials come from the environment only
(``PACS_AI_S3_ACCESS_KEY_ID``/``PACS_AI_S3_SECRET_ACCESS_KEY``, else ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``); they are never in the config file and never logged.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pacs_ai.config import StorageSettings
from pacs_ai.errors import ConfigError, PacsAiError
from pacs_ai.ingest.spool import dataset_sha256

log = logging.getLogger(__name__)

_HEX = frozenset("0123456789abcdef")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")
_CHUNK = 1 << 20


NO_BUCKET = "the bucket storage.s3_bucket does not exist at storage.s3_endpoint: create it"


class ObjectStoreError(PacsAiError):
    """The object store could not do what was asked."""


class ObjectStoreUnavailable(ObjectStoreError):
    """Unreachable, timing out or answering 5xx: try again later."""


class ObjectMissing(ObjectStoreError):
    """No object under that key."""


class ObjectConflict(ObjectStoreError):
    """An object exists under the key with other content (never overwritten)."""


class PutOutcome(enum.Enum):
    CREATED = "created"
    EXISTED = "existed"  # the same content was already there (a retry after a crash)


def check_sha256(sha256: str) -> str:
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise ValueError("not a sha256 hex digest")
    return sha256


def key_ref(sha256: str) -> str:
    """A short reference to a key for logs (the key is a content hash, not PHI)."""
    return sha256[:12]


class ObjectStore(Protocol):
    """What ingest's uploader, the workers' cache and retention need of a store."""

    def put_if_absent(self, sha256: str, source: Path) -> PutOutcome:
        """Store ``source`` under ``sha256`` unless an object is there; an existing object
        counts as stored only when its dataset hashes to the same key."""
        ...

    def fetch(self, sha256: str, dest: Path) -> None:
        """Write the object to ``dest`` (verified against its key)."""
        ...

    def delete(self, sha256: str) -> None: ...

    def exists(self, sha256: str) -> bool: ...


class LocalStore:
    """The spool as the store (``backend = "local"``): ``objects/ab/cd/<sha256>.dcm``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "objects" / sha256[:2] / sha256[2:4] / f"{sha256}.dcm"

    def put_if_absent(self, sha256: str, source: Path) -> PutOutcome:
        dest = self.path(sha256)
        if dest.exists():
            if dataset_sha256(dest) != sha256:
                raise ObjectConflict(f"object {key_ref(sha256)} differs from its key")
            return PutOutcome.EXISTED
        _copy_atomic(source, dest)
        return PutOutcome.CREATED

    def fetch(self, sha256: str, dest: Path) -> None:
        src = self.path(sha256)
        if not src.exists():
            raise ObjectMissing(f"no object {key_ref(sha256)}")
        _copy_atomic(src, dest)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).exists()


def _copy_atomic(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with src.open("rb") as fin, tmp.open("wb") as fout:
            while chunk := fin.read(_CHUNK):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def s3_credentials(env: Mapping[str, str]) -> tuple[str, str]:
    """The access key pair from the environment (never from the config file)."""
    for prefix in ("PACS_AI_S3_", "AWS_"):
        key, secret = env.get(f"{prefix}ACCESS_KEY_ID"), env.get(f"{prefix}SECRET_ACCESS_KEY")
        if key and secret:
            return key, secret
    raise ConfigError(
        'storage.backend = "s3" needs credentials in the environment: '
        "PACS_AI_S3_ACCESS_KEY_ID and PACS_AI_S3_SECRET_ACCESS_KEY "
        "(or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    )


def _md5_b64(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


class S3Store:
    """An S3 bucket (AWS, Ceph RGW, MinIO, ...) through boto3, path-style addressing."""

    def __init__(self, settings: StorageSettings, env: Mapping[str, str] | None = None) -> None:
        import boto3
        from botocore.config import Config

        # botocore's DEBUG lines carry the signed headers and the client's parameters
        # (credentials included): never below WARNING, whatever logging.level says.
        for name in ("boto3", "botocore", "s3transfer"):
            logging.getLogger(name).setLevel(logging.WARNING)
        access_key, secret_key = s3_credentials(os.environ if env is None else env)
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix
        timeout = settings.s3_timeout_seconds
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint,
            region_name=settings.s3_region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=timeout,
                read_timeout=timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                # Checksums only where an API requires them: the default trailing CRC32
                # (aws-chunked uploads) is not understood by older gateways (RGW 16.2).
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                max_pool_connections=32,
            ),
        )

    def key(self, sha256: str) -> str:
        return f"{self.prefix}{check_sha256(sha256)}"

    def _call(self, what: str, sha256: str, **kwargs: Any) -> Any:
        return self._request(what, self.key(sha256), f"object {key_ref(sha256)}", **kwargs)

    def _request(self, what: str, key: str, ref: str, **kwargs: Any) -> Any:
        """``what`` on ``key``, its errors mapped to ours; ``ref`` names the object in them
        (never the whole key)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, what)(Bucket=self.bucket, Key=key, **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in ("PreconditionFailed", "412") or status == 412:
                raise ObjectConflict(f"{ref} exists") from exc
            if code == "NoSuchBucket":
                raise ObjectStoreUnavailable(NO_BUCKET) from exc
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise ObjectMissing(f"no {ref}") from exc
            if status >= 500 or status in (0, 408, 429):
                raise ObjectStoreUnavailable(f"S3 {what}: HTTP {status} {code}") from exc
            raise ObjectStoreError(f"S3 {what}: HTTP {status} {code}") from exc
        except BotoCoreError as exc:  # connection refused, timeout, ...
            raise ObjectStoreUnavailable(f"S3 {what}: {exc.__class__.__name__}") from exc

    @staticmethod
    def _download(resp: Any, dest: Path) -> None:
        """A ``get_object`` answer's body into ``dest``."""
        body = resp["Body"]
        try:
            with dest.open("wb") as f:
                while chunk := body.read(_CHUNK):
                    f.write(chunk)
        except OSError:
            raise
        except Exception as exc:  # a connection dropped mid-body
            raise ObjectStoreUnavailable(f"S3 get_object: {exc.__class__.__name__}") from exc
        finally:
            body.close()

    # --- files under a name (reports): reports/<relative path> ---------------------------

    def _named(self, name: str) -> str:
        if not _NAME_RE.match(name) or ".." in name.split("/"):
            raise ValueError("not a safe object name")
        return f"{self.prefix}{name}"

    def _call_named(self, what: str, name: str, **kwargs: Any) -> Any:
        return self._request(what, self._named(name), "object", **kwargs)

    def put_named(self, name: str, source: Path) -> PutOutcome:
        """Put an immutable file (a report) under ``name`` unless it is there; an existing
        object counts only when its ETag is this file's MD5 (a single-part put)."""
        md5 = _md5_b64(source)
        try:
            with source.open("rb") as body:
                self._call_named("put_object", name, Body=body, IfNoneMatch="*", ContentMD5=md5)
        except ObjectConflict:
            head = self._call_named("head_object", name)
            etag = str(head.get("ETag", "")).strip('"')
            if etag != base64.b64decode(md5).hex():
                raise ObjectConflict("a different object exists under that name") from None
            return PutOutcome.EXISTED
        return PutOutcome.CREATED

    def fetch_named(self, name: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self._download(self._call_named("get_object", name), tmp)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete_named(self, name: str) -> None:
        with contextlib.suppress(ObjectMissing):
            self._call_named("delete_object", name)

    def exists_named(self, name: str) -> bool:
        try:
            self._call_named("head_object", name)
        except ObjectMissing:
            return False
        return True

    # --- instances: under their sha256 ------------------------------------------------------

    def put_if_absent(self, sha256: str, source: Path) -> PutOutcome:
        md5 = _md5_b64(source)
        try:
            with source.open("rb") as body:
                self._call(
                    "put_object",
                    sha256,
                    Body=body,
                    IfNoneMatch="*",
                    ContentMD5=md5,
                    ContentType="application/dicom",
                    Metadata={"dataset-sha256": sha256},
                )
        except ObjectConflict:
            # 412: the key is taken. Ours only when its dataset hashes to the key (an
            # upload whose row was not marked before a crash); otherwise never overwritten.
            if self._stored_sha256(sha256) != sha256:
                raise ObjectConflict(
                    f"object {key_ref(sha256)} exists with other content"
                ) from None
            return PutOutcome.EXISTED
        return PutOutcome.CREATED

    def _stored_sha256(self, sha256: str) -> str:
        fd, name = tempfile.mkstemp(prefix="pacs-ai-s3-", suffix=".dcm")
        os.close(fd)
        tmp = Path(name)
        try:
            self._download(self._call("get_object", sha256), tmp)
            return dataset_sha256(tmp)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def fetch(self, sha256: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            self._download(self._call("get_object", sha256), tmp)
            if dataset_sha256(tmp) != sha256:
                raise ObjectConflict(f"object {key_ref(sha256)} differs from its key")
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(ObjectMissing):
            self._call("delete_object", sha256)

    def exists(self, sha256: str) -> bool:
        try:
            self._call("head_object", sha256)
        except ObjectMissing:
            return False
        return True

    def check_bucket(self) -> None:
        """The bucket exists and these credentials may use it: :class:`ObjectStoreError`
        with the reason when not, :class:`ObjectStoreUnavailable` when the store does not
        answer (a gateway still starts then: its local buffer holds what arrives)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if status == 404:
                raise ObjectStoreError(NO_BUCKET) from exc
            if status in (401, 403):
                raise ObjectStoreError(
                    f"S3 refused these credentials for the bucket (HTTP {status}): check "
                    "PACS_AI_S3_ACCESS_KEY_ID / PACS_AI_S3_SECRET_ACCESS_KEY"
                ) from exc
            raise ObjectStoreUnavailable(f"S3 head_bucket: HTTP {status}") from exc
        except BotoCoreError as exc:
            raise ObjectStoreUnavailable(f"S3 head_bucket: {exc.__class__.__name__}") from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (tests, first start)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError:
            pass
        except BotoCoreError as exc:
            raise ObjectStoreUnavailable(f"S3 head_bucket: {exc.__class__.__name__}") from exc
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ObjectStoreError(f"S3 create_bucket: {exc.__class__.__name__}") from exc


def open_store(settings: StorageSettings, env: Mapping[str, str] | None = None) -> ObjectStore:
    if settings.backend == "s3":
        return S3Store(settings, env)
    return LocalStore(settings.path)
