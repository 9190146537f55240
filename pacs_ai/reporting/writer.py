"""Write a built object to disk atomically, under a name that is not the raw UID."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset

from pacs_ai.logs import uid_ref

_log = logging.getLogger(__name__)


def object_filename(sop_instance_uid: str) -> str:
    """``<sha256 of the UID, 32 hex>.dcm``: stable, path-safe, and no UID on disk names."""
    digest = hashlib.sha256(sop_instance_uid.encode("ascii", "replace")).hexdigest()
    return f"{digest[:32]}.dcm"


def write_object(ds: Dataset, directory: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write ``ds`` in the DICOM file format to ``directory`` (as ``name``, default a hash of
    its SOP Instance UID); return the final path.

    Temp file in the same directory, fsync, rename over the final name, fsync the directory:
    a crash leaves either the complete old file, the complete new one, or a stray temp file,
    never a half-written object under the final name.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / (name or object_filename(str(ds.SOPInstanceUID)))
    write_atomically(final, lambda fh: ds.save_as(fh, enforce_file_format=True))
    _log.debug("wrote report object %s", uid_ref(str(ds.SOPInstanceUID)))
    return final


def write_atomically(final: Path, write: Callable[[BinaryIO], object]) -> None:
    """Temp file beside ``final``, ``write`` into it, fsync, rename, fsync the directory."""
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=final.suffix, dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
