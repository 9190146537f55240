"""Build standard-conformant CR, DX and CT datasets from pixel arrays.

Used for the synthetic phantom datasets, ``dicom_samples/`` and tests. Every object written
here passes ``dciodvfy`` without errors (tested): realistic headers matter because routing and
gating read them, and because a PACS receiving our test data must accept it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from pacs_ai import __version__

# Our UID root for generated objects (pydicom's registered prefix, as pydicom recommends for
# tools without their own root).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class Patient:
    name: str = "Phantom^Chest"
    patient_id: str = "PHANTOM001"
    birth_date: str = "19700101"
    sex: Literal["M", "F", "O"] = "O"


@dataclass(frozen=True)
class StudyInfo:
    study_uid: str = field(default_factory=lambda: generate_uid(UID_PREFIX))
    accession_number: str = "ACC0001"
    study_id: str = "1"
    description: str = "CHEST"
    date: dt.datetime = field(default_factory=lambda: dt.datetime(2026, 1, 15, 9, 30, 0))
    referring_physician: str = ""
    institution: str = "pacs-ai synthetic"


def _base(
    sop_class: str,
    patient: Patient,
    study: StudyInfo,
    modality: str,
    series_uid: str,
    series_number: int,
    series_description: str,
    sop_uid: str | None,
    manufacturer: str,
) -> Dataset:
    ds = Dataset()
    sop_uid = sop_uid or generate_uid(UID_PREFIX)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    date = study.date.strftime("%Y%m%d")
    time = study.date.strftime("%H%M%S")
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    # General Study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = study.referring_physician
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.description
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.SeriesDescription = series_description
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.InstitutionName = study.institution
    ds.ManufacturerModelName = "pacs-ai phantom"
    ds.SoftwareVersions = __version__
    # General Image / Acquisition
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    return ds


def _pixels(ds: Dataset, pixels: np.ndarray, bits_stored: int, signed: bool) -> None:
    if pixels.ndim != 2:
        raise ValueError("expected a 2-D image")
    dtype = np.int16 if signed else np.uint16
    lo, hi = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
        if signed
        else (
            0,
            2**bits_stored - 1,
        )
    )
    arr = np.clip(np.rint(pixels), lo, hi).astype(dtype)
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = (int(n) for n in arr.shape)
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()


# SNOMED CT codes (CID 4010 X-Ray Projections, CID 4031 Common Anatomic Regions).
_VIEW_CODES = {
    "PA": ("399348003", "postero-anterior"),
    "AP": ("399182006", "antero-posterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
}
_REGION_CODES = {
    "CHEST": ("51185008", "Thoracic structure"),
    "ABDOMEN": ("818981001", "Abdomen"),
    "SKULL": ("89546000", "Bone structure of cranium"),
    "HAND": ("85562004", "Hand"),
}


def _code(value: str, meaning: str, scheme: str = "SCT") -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


XRayView = Literal["PA", "AP", "LL", "RL", "LATERAL"]


def xray_image(
    pixels: np.ndarray,
    *,
    modality: Literal["CR", "DX"] = "DX",
    patient: Patient | None = None,
    study: StudyInfo | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    view: XRayView = "PA",
    body_part: str = "CHEST",
    pixel_spacing_mm: float = 0.15,
    bits_stored: int = 12,
    monochrome1: bool = False,
    window: tuple[float, float] | None = None,
    manufacturer: str = "pacs-ai",
) -> Dataset:
    """A CR or DX (for presentation) chest radiograph from stored pixel values."""
    patient = patient or Patient()
    study = study or StudyInfo()
    series_uid = series_uid or generate_uid(UID_PREFIX)
    sop_class = (
        ComputedRadiographyImageStorage
        if modality == "CR"
        else (DigitalXRayImageStorageForPresentation)
    )
    view_pos = "LL" if view == "LATERAL" else view
    ds = _base(
        sop_class,
        patient,
        study,
        modality,
        series_uid,
        series_number,
        f"{body_part} {view_pos}",
        sop_uid,
        manufacturer,
    )
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_pos
    ds.PatientOrientation = ["A", "F"] if view_pos in ("LL", "RL") else ["L", "F"]
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    _pixels(ds, pixels, bits_stored, signed=False)
    center, width = window or (2 ** (bits_stored - 1), 2**bits_stored)
    ds.WindowCenter = f"{center:g}"
    ds.WindowWidth = f"{width:g}"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    ds.KVP = "120"
    ds.ExposureTime = 10
    ds.XRayTubeCurrent = 250
    ds.DistanceSourceToDetector = "1800"
    spacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
    if modality == "CR":
        ds.PixelSpacing = spacing
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        return ds
    # DX Series / Image / Detector / Anatomy / Positioning modules
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    ds.DetectorType = "SCINTILLATOR"
    ds.ImageLaterality = "U"
    ds.PatientOrientation = ds.PatientOrientation
    region = _code(*_REGION_CODES.get(body_part, _REGION_CODES["CHEST"]))
    ds.AnatomicRegionSequence = DicomSequence([region])
    view_code = _code(*_VIEW_CODES[view_pos])
    view_code.ViewModifierCodeSequence = DicomSequence()
    ds.ViewCodeSequence = DicomSequence([view_code])
    ds.AcquisitionContextSequence = DicomSequence()
    ds.PositionerType = "NONE"
    return ds


def ct_series(
    hu_volume: np.ndarray,
    *,
    patient: Patient | None = None,
    study: StudyInfo | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    slice_thickness_mm: float = 5.0,
    pixel_spacing_mm: float = 0.7,
    origin_z_mm: float = 0.0,
    body_part: str = "CHEST",
    localizer: bool = False,
    frame_of_reference_uid: str | None = None,
    rescale_intercept: float = -1024.0,
    manufacturer: str = "pacs-ai",
) -> list[Dataset]:
    """An axial CT series, one dataset per slice, from a (z, y, x) volume in Hounsfield units.

    Slice z=0 is the most inferior; positions step by ``slice_thickness_mm`` upward.
    """
    if hu_volume.ndim != 3:
        raise ValueError("expected a (slices, rows, cols) volume")
    patient = patient or Patient()
    study = study or StudyInfo()
    series_uid = series_uid or generate_uid(UID_PREFIX)
    frame_uid = frame_of_reference_uid or generate_uid(UID_PREFIX)
    nz, ny, nx = hu_volume.shape
    out: list[Dataset] = []
    for z in range(nz):
        ds = _base(
            CTImageStorage,
            patient,
            study,
            "CT",
            series_uid,
            series_number,
            "SCOUT" if localizer else f"{body_part} AXIAL",
            None,
            manufacturer,
        )
        ds.BodyPartExamined = body_part
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", "LOCALIZER"] if localizer else ["ORIGINAL", "PRIMARY", "AXIAL"]
        )
        ds.InstanceNumber = z + 1
        ds.AcquisitionNumber = 1
        ds.PixelSpacing = [f"{pixel_spacing_mm:g}", f"{pixel_spacing_mm:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        x0 = -pixel_spacing_mm * nx / 2
        y0 = -pixel_spacing_mm * ny / 2
        zpos = origin_z_mm + z * slice_thickness_mm
        ds.ImagePositionPatient = [f"{x0:g}", f"{y0:g}", f"{zpos:g}"]
        ds.SliceLocation = f"{zpos:g}"
        ds.SliceThickness = f"{slice_thickness_mm:g}"
        ds.KVP = "120"
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleSlope = "1"
        if not localizer:  # dciodvfy: HU is wrong for an ORIGINAL LOCALIZER
            ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        _pixels(ds, hu_volume[z] - rescale_intercept, 12, signed=False)
        ds.BurnedInAnnotation = "NO"
        out.append(ds)
    return out


def write(ds: Dataset, path: str | bytes | object) -> None:
    """Write ``ds`` in the DICOM file format (preamble + File Meta)."""
    ds.save_as(path, enforce_file_format=True)  # type: ignore[arg-type]
