"""DICOM objects for the phantoms: Digital Mammography X-Ray Image (For Presentation) or
Secondary Capture.

The files look like what a mammography unit or a PACS sends, including the variations the node
must cope with (MONOCHROME1, 12/14 bits, VOI variants, compressed transfer syntaxes, mammograms
wrapped as Secondary Capture with the view only in free text, digitised films). They pass
``dciodvfy`` without errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DigitalMammographyXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)

from inference.uids import derive_uid, is_valid_uid
from training.synth.encoding import TRANSFER_SYNTAXES, encode_pixels
from training.synth.windows import VOI_STYLES, apply_voi_tags, window_for

MANUFACTURER = "MammoNode synthetic phantom"
PHOTOMETRICS: tuple[str, ...] = ("MONOCHROME2", "MONOCHROME1")
LATERALITY_KEYWORDS: tuple[str, ...] = ("Laterality", "ImageLaterality")
FILM_COMMENT = "Digitised screen-film mammogram (synthetic phantom)"

# SNOMED CT codes of the Mammography Image module (CID 4014 view, CID 4031 region).
VIEW_CODES: dict[str, tuple[str, str]] = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
BREAST_CODE = ("76752008", "Breast")

# Patient Orientation (row direction, column direction) for the displayed orientation: right
# breasts have the chest wall on the left, so rows run towards the nipple (A).
PATIENT_ORIENTATION: dict[tuple[str, str], tuple[str, str]] = {
    ("R", "CC"): ("A", "L"),
    ("L", "CC"): ("P", "R"),
    ("R", "MLO"): ("A", "FR"),
    ("L", "MLO"): ("P", "FL"),
}


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def make_dicom(
    pixels: np.ndarray,
    *,
    patient_id: str,
    study_uid: str,
    laterality: str,
    view: str,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    voi: str = "linear",
    transfer_syntax: str = "explicit",
    secondary_capture: bool = False,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    patient_age: int | None = 60,
    study_date: str = "20200101",
    study_time: str = "090000",
    burned_in_annotation: bool = False,
    implant: bool = False,
    model_name: str = "Phantom",
    pixel_spacing_mm: float | None = None,
    window: tuple[float, float] | None = None,
    breast_mask: np.ndarray | None = None,
    film: bool = False,
    view_text: str | None = None,
    laterality_keyword: str | None = None,
) -> Dataset:
    """A complete DICOM dataset (with File Meta) holding ``pixels``.

    ``pixels`` are uint16 in the MONOCHROME2 sense (dense tissue bright), as
    :func:`training.synth.phantom.render_view` makes them; for ``photometric="MONOCHROME1"`` they
    are inverted before storing. ``voi`` is one of VOI_STYLES; the window is computed from the
    pixels (restricted to ``breast_mask`` when given, so a collimator strip does not widen it)
    unless ``window`` (center, width on stored values) is given; ``voi="none"`` on a
    mammogram makes a file that dciodvfy flags (the IOD requires a VOI), as some units send.
    Secondary captures carry
    no VOI, no ViewPosition and say the view only in SeriesDescription ("L MLO"), with
    ``Laterality`` instead of ``ImageLaterality``. UIDs not given are derived from ``study_uid``.
    Write the result with :func:`write_dicom`.

    ``film`` makes a digitised screen-film mammogram (CBIS-DDSM-like): a Secondary Capture (so
    ``secondary_capture`` is implied) with Conversion Type ``DF``. ``view_text`` replaces the
    SeriesDescription (e.g. ``LEFT_CC``); ``laterality_keyword`` (``Laterality`` or
    ``ImageLaterality``) chooses the tag that carries the side, by default the one of the class.
    """
    secondary_capture = secondary_capture or film
    _check(pixels, patient_id, study_uid, laterality, view, bits_stored, photometric, voi, transfer_syntax)
    if laterality_keyword is not None and laterality_keyword not in LATERALITY_KEYWORDS:
        raise ValueError(
            f"laterality_keyword must be one of {LATERALITY_KEYWORDS}, got {laterality_keyword!r}"
        )
    maxval = (1 << bits_stored) - 1
    monochrome1 = photometric == "MONOCHROME1"
    stored = (maxval - pixels).astype(np.uint16) if monochrome1 else pixels.astype(np.uint16)
    series_uid, sop_uid = _instance_uids(
        study_uid, series_uid, sop_instance_uid, series_number, instance_number
    )
    rows, cols = pixels.shape

    ds = _sop_dataset(sop_uid, secondary_capture, film)
    _set_study_series(ds, study_uid, series_uid, series_number, instance_number, study_date, study_time)
    ds.SeriesDescription = view_text if view_text is not None else f"{laterality} {view}"
    _set_equipment(ds, model_name)
    _set_patient(ds, patient_id, patient_age, study_date)
    _set_side(ds, laterality, view, laterality_keyword, secondary_capture)
    _set_image_pixel(ds, photometric, rows, cols, bits_stored)
    ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    if film:
        ds.ImageComments = FILM_COMMENT
    if not secondary_capture:
        spacing = pixel_spacing_mm if pixel_spacing_mm is not None else round(290.0 / rows, 4)
        _set_mammography(ds, view, spacing, monochrome1, implant)
        window = window or window_for(pixels, bits_stored, monochrome1, breast_mask=breast_mask)
        apply_voi_tags(ds, voi, window, bits_stored)
    encode_pixels(ds, stored, transfer_syntax)
    return ds


def _instance_uids(
    study_uid: str,
    series_uid: str | None,
    sop_instance_uid: str | None,
    series_number: int,
    instance_number: int,
) -> tuple[str, str]:
    """The series and SOP Instance UIDs: those given, or derived from ``study_uid``; checked."""
    series_uid = series_uid or derive_uid(study_uid, "series", str(series_number))
    sop_uid = sop_instance_uid or derive_uid(series_uid, "instance", str(instance_number))
    for name, uid in (("series_uid", series_uid), ("sop_instance_uid", sop_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"{name} is not a valid UID: {uid!r}")
    return series_uid, sop_uid


def _sop_dataset(sop_uid: str, secondary_capture: bool, film: bool) -> Dataset:
    """A dataset with its File Meta, SOP Common and the image type of its class (MG or SC)."""
    sop_class = DigitalMammographyXRayImageStorageForPresentation
    if secondary_capture:
        sop_class = SecondaryCaptureImageStorage
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"] if secondary_capture else ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MG"
    if secondary_capture:
        # Digitised film (DF) or a workstation re-export (WSD) of a digital image.
        ds.ConversionType = "DF" if film else "WSD"
    return ds


def _set_side(
    ds: Dataset, laterality: str, view: str, laterality_keyword: str | None, secondary_capture: bool
) -> None:
    """Patient Orientation of the displayed view, and the side in the class's laterality tag."""
    ds.PatientOrientation = list(PATIENT_ORIENTATION[(laterality, view)])
    if laterality_keyword is None:
        laterality_keyword = "Laterality" if secondary_capture else "ImageLaterality"
    setattr(ds, laterality_keyword, laterality)


def _set_equipment(ds: Dataset, model_name: str) -> None:
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model_name
    ds.BodyPartExamined = "BREAST"
    ds.DeviceSerialNumber = "SYN0001"
    ds.SoftwareVersions = "mammonode-synth 1"


def _set_study_series(
    ds: Dataset,
    study_uid: str,
    series_uid: str,
    series_number: int,
    instance_number: int,
    study_date: str,
    study_time: str,
) -> None:
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study_time
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Screening mammography (synthetic phantom)"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(TRANSFER_SYNTAXES["explicit"])
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MAMMONODE_SYN"
    return meta


def _set_patient(ds: Dataset, patient_id: str, patient_age: int | None, study_date: str) -> None:
    ds.PatientName = f"SYNTHETIC^PATIENT{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = f"{int(study_date[:4]) - patient_age:04d}0101" if patient_age is not None else ""
    ds.PatientSex = "F"
    if patient_age is not None:
        ds.PatientAge = f"{patient_age:03d}Y"


def _set_image_pixel(ds: Dataset, photometric: str, rows: int, cols: int, bits_stored: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0


def _set_mammography(ds: Dataset, view: str, spacing: float, monochrome1: bool, implant: bool) -> None:
    """The DX and Mammography Image modules of a For Presentation mammogram (not of an SC)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.DetectorType = "DIRECT"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.ViewPosition = view
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if monochrome1 else 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.BreastImplantPresent = "YES" if implant else "NO"
    ds.OrganExposed = "BREAST"
    ds.AnatomicRegionSequence = Sequence([_code(*BREAST_CODE)])
    view_item = _code(*VIEW_CODES[view])
    view_item.ViewModifierCodeSequence = Sequence()
    ds.ViewCodeSequence = Sequence([view_item])
    ds.AcquisitionContextSequence = Sequence()


def _check(
    pixels: np.ndarray,
    patient_id: str,
    study_uid: str,
    laterality: str,
    view: str,
    bits_stored: int,
    photometric: str,
    voi: str,
    transfer_syntax: str,
) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.ndim != 2 or pixels.dtype.kind not in "ui":
        raise ValueError("pixels must be a 2-D integer array")
    if bits_stored not in (12, 14, 16):
        raise ValueError(f"bits_stored must be 12, 14 or 16, got {bits_stored}")
    if pixels.size and (int(pixels.min()) < 0 or int(pixels.max()) >= 1 << bits_stored):
        raise ValueError(
            f"pixel values must be in [0, {(1 << bits_stored) - 1}] for bits_stored={bits_stored}"
        )
    if not patient_id or len(patient_id) > 64:
        raise ValueError(f"patient_id must be 1-64 characters, got {patient_id!r}")
    if not is_valid_uid(study_uid):
        raise ValueError(f"study_uid is not a valid UID: {study_uid!r}")
    if (laterality, view) not in PATIENT_ORIENTATION:
        raise ValueError(f"laterality/view must be L|R and CC|MLO, got {laterality!r}/{view!r}")
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    if voi not in VOI_STYLES:
        raise ValueError(f"voi must be one of {VOI_STYLES}, got {voi!r}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"transfer_syntax must be one of {list(TRANSFER_SYNTAXES)}, got {transfer_syntax!r}")


def write_dicom(ds: Dataset, path: Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file (preamble + File Meta), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
