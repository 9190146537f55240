"""A file a model card names (OOD density, exported program): read it and check its sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pacs_ai.errors import ModelError


def read_card_file(model_dir: Path, file: str, sha256: str | None) -> bytes:
    """The bytes of ``model_dir/file``; :class:`ModelError` when it cannot be read or does not
    match the sha256 the card gives."""
    try:
        data = (model_dir / file).read_bytes()
    except OSError as exc:
        raise ModelError(f"the model card names {file} but it cannot be read") from exc
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise ModelError(f"{file} does not match the sha256 in the model card")
    return data
