"""Coded concepts the reports use, in one place (every meaning is at most 64 characters).

Sources: PS3.16 (DCM codes and context groups), SNOMED CT (SCT), UCUM, LOINC (LN).
"""

from __future__ import annotations

from pydicom.sr.coding import Code

from pacs_ai import codes

# CID 241 "Present-Absent". DESIGN.md and older lists say SCT 2667000 for "Absent"; SNOMED CT
# inactivated that concept and PS3.16 CID 241 now lists SCT 272519000 (what pydicom's code
# dictionary, generated from PS3.16, has too). We write the current one.
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")

# Numeric measurement names and unit.
PROBABILITY = Code("122157", "DCM", "Probability")
THRESHOLD = Code("122411", "DCM", "Threshold Value")
UNITLESS = Code("1", "UCUM", "no units")
# A probability is dimensionless (UCUM "1"); the UCUM annotation "{probability}" has the same
# dimension and magnitude and tells a reader what the number is, where "1" reads as a count.
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
MILLIMETRE = Code("mm", "UCUM", "millimeter")
IMAGE_POSITION_Z = Code("110903", "DCM", "Image Position (Patient) Z")
INSTANCE_NUMBER = Code("113609", "DCM", "Instance Number")

# Our own coding scheme (declared in CodingSchemeIdentificationSequence) for concepts that no
# standard terminology has: "Probability of <finding>", so that the number is labelled by
# what it is in every viewer, not by a generic "Probability" under a group heading.
PRIVATE_SCHEME = "99PACSAI"
PRIVATE_SCHEME_NAME = "pacs-ai result concepts"


def probability_of(finding: Code) -> Code:
    """The NUM concept "Probability of <finding>" (64 characters at most)."""
    return Code(f"P{finding.value}"[:16], PRIVATE_SCHEME, f"Probability of {finding.meaning}"[:64])


# Observation context, titles, sections.
DEVICE = Code("121007", "DCM", "Device")
FINDING = Code("121071", "DCM", "Finding")
COMMENT = Code("121106", "DCM", "Comment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")
FINDINGS_SECTION = Code("59776-5", "LN", "Findings")
IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")  # CID 7005

# Procedure reported (CID 100 is extensible; these are SNOMED CT procedures).
CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
CHEST_CT = Code("169069000", "SCT", "CT of chest")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")

# Findings the bundled models report (as input codes, for FindingResult).
COVID19 = codes.COVID19
PNEUMONIA = codes.PNEUMONIA


def procedure_for_modality(modality: str) -> Code:
    """The "Procedure reported" concept for a source modality."""
    if modality in ("CR", "DX"):
        return CHEST_XRAY
    if modality == "CT":
        return CHEST_CT
    return IMAGING_PROCEDURE
