"""Small synthetic mammography source images for the writer tests.

The writers only need headers that look like what a modality sends (identifiers, laterality,
view, orientation) plus plausible 16-bit pixels; nothing here resembles a real patient.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from inference.uids import derive_uid

DX_MG_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.2")
ROWS, COLUMNS = 256, 192
PATIENT_ID = "SYNTH-0001"
STUDY_UID = derive_uid("tests", "mg-study")


def breast_pixels(laterality: str, rows: int = ROWS, columns: int = COLUMNS, bits: int = 14) -> np.ndarray:
    """A half-ellipse 'breast' against the chest wall (left edge for R, right edge for L)."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float32)
    dist_from_wall = xx if laterality == "R" else (columns - 1 - xx)
    r = (dist_from_wall / (0.8 * columns)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2
    tissue = np.clip(1.0 - r, 0.0, 1.0) ** 0.5
    texture = 0.1 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
    pixels = np.clip(tissue * (0.8 + texture), 0.0, 1.0) * (2**bits - 1)
    return pixels.astype(np.uint16)


def _patient_and_study(ds: Dataset, patient_id: str, study_uid: str) -> None:
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""


def make_dx_mg(
    laterality: str,
    view: str,
    *,
    patient_id: str = PATIENT_ID,
    study_uid: str = STUDY_UID,
    index: int = 1,
) -> Dataset:
    """A Digital Mammography X-Ray Image (For Presentation), 16-bit MONOCHROME2."""
    sop_uid = derive_uid("tests", "dx-mg", study_uid, laterality, view, str(index))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_MG_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_MG_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    _patient_and_study(ds, patient_id, study_uid)
    ds.Modality = "MG"
    ds.SeriesInstanceUID = derive_uid("tests", "dx-mg-series", study_uid)
    ds.SeriesNumber = 1
    ds.InstanceNumber = index
    ds.Manufacturer = "SyntheticVendor"
    ds.ManufacturerModelName = "SynthMammo"
    ds.DeviceSerialNumber = "SN-1"
    ds.SoftwareVersions = "1.0"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = laterality
    ds.Laterality = laterality
    ds.ViewPosition = view
    ds.PatientOrientation = ["P", "L"] if laterality == "R" else ["A", "R"]
    if view == "MLO":
        ds.PatientOrientation = ["P", "FL"] if laterality == "R" else ["A", "FR"]
    ds.ImagerPixelSpacing = [0.1, 0.1]
    ds.BodyPartExamined = "BREAST"
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 14
    ds.HighBit = 13
    ds.PixelRepresentation = 0
    ds.WindowCenter = 8192
    ds.WindowWidth = 16384
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = breast_pixels(laterality).tobytes()
    return ds


def make_sc_mg(laterality: str, *, patient_id: str = PATIENT_ID, study_uid: str = STUDY_UID) -> Dataset:
    """A Secondary Capture with Modality MG, as some PACS exports and film digitisers produce."""
    sop_uid = derive_uid("tests", "sc-mg", study_uid, laterality)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    _patient_and_study(ds, patient_id, study_uid)
    ds.Modality = "MG"
    ds.SeriesInstanceUID = derive_uid("tests", "sc-mg-series", study_uid)
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.ConversionType = "DF"
    ds.Laterality = laterality
    ds.PatientOrientation = ""
    ds.Rows = ROWS
    ds.Columns = COLUMNS
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = breast_pixels(laterality, bits=12).tobytes()
    return ds


def dciodvfy_errors(path: Path) -> list[str]:
    """Run dicom3tools' strict IOD validator and return its "Error" lines (empty = valid)."""
    exe = shutil.which("dciodvfy")
    assert exe is not None, "callers skip when dciodvfy is missing"
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if "Error" in line]


def dciodvfy_output(path: Path) -> str:
    exe = shutil.which("dciodvfy")
    assert exe is not None
    proc = subprocess.run([exe, "-new", str(path)], capture_output=True, text=True, timeout=60)
    return proc.stdout + proc.stderr
