"""Coded concepts shared by model cards and reports: one validated ``Code`` type, and the
findings the models can report (SNOMED CT)."""

from __future__ import annotations

from dataclasses import dataclass

from pacs_ai.errors import PacsAiError

# PS3.5: CodeValue and CodingSchemeDesignator are SH (16), CodeMeaning is LO (64).
_MAX_CODE_VALUE = 16
_MAX_MEANING = 64


class InvalidCode(PacsAiError, ValueError):
    """A code that cannot be written to DICOM."""


@dataclass(frozen=True)
class Code:
    """A coded concept; ``meaning`` is at most 64 characters (the LO limit of CodeMeaning)."""

    value: str
    scheme: str
    meaning: str

    def __post_init__(self) -> None:
        if not self.value or len(self.value) > _MAX_CODE_VALUE or " " in self.value:
            raise InvalidCode(f"code value {self.value!r} must be 1-16 characters")
        if not self.scheme or len(self.scheme) > _MAX_CODE_VALUE:
            raise InvalidCode(f"coding scheme {self.scheme!r} must be 1-16 characters")
        if not self.meaning or len(self.meaning) > _MAX_MEANING or "\\" in self.meaning:
            raise InvalidCode(
                f"code meaning {self.meaning!r} must be 1-{_MAX_MEANING} characters, no '\\'"
            )


COVID19 = Code("840539006", "SCT", "COVID-19")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
