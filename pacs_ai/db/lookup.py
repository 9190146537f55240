"""Find a study the way an admin names it: database id, full Study Instance UID, or a unique
prefix of one. Shared by every command that takes a study (``studies``, ``audit study``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from pacs_ai.db.models import Study, StudyState
from pacs_ai.errors import AmbiguousStudy, StudyNotFound

_UID_CHARS = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class StudyRef:
    id: int
    study_uid: str
    state: StudyState
    revision: int


def find_study(conn: Connection, ref: str) -> StudyRef:
    """The one study ``ref`` names.

    An exact Study Instance UID wins; then, for digits only, the database id; else the single
    study whose UID starts with ``ref``. Raises :class:`StudyNotFound` or
    :class:`AmbiguousStudy` (messages carry no UIDs beyond what the caller typed).
    """
    ref = ref.strip()
    cols = (Study.id, Study.study_uid, Study.state, Study.revision)
    if not _UID_CHARS.match(ref):
        raise StudyNotFound(f"{ref!r} is neither a study id nor a Study Instance UID (prefix)")
    row = conn.execute(select(*cols).where(Study.study_uid == ref)).first()
    if row is not None:
        return StudyRef(*row)
    if ref.isdigit():
        row = conn.execute(select(*cols).where(Study.id == int(ref))).first()
        if row is None:
            raise StudyNotFound(f"no study with id {ref}")
        return StudyRef(*row)
    # Only digits and dots reach here, so LIKE has no wildcard to escape.
    matching = Study.study_uid.like(f"{ref}%")
    count = int(conn.scalar(select(func.count()).select_from(Study).where(matching)) or 0)
    if count == 0:
        raise StudyNotFound(f"no study with a Study Instance UID starting with {ref}")
    if count > 1:
        raise AmbiguousStudy(
            f"{count} studies have a Study Instance UID starting with {ref}; "
            "give more digits or the study id",
            count,
        )
    return StudyRef(*conn.execute(select(*cols).where(matching)).one())
