"""DICOM files for the dicom_header and dicom_pixels tests: a synthetic mammogram in any syntax."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from inference.dicom_header import DX_MAMMO_FOR_PRESENTATION, read_dataset


def mammo_pixels(bits: int, rows: int = 128, cols: int = 96, seed: int = 0) -> np.ndarray:
    """A half-ellipse 'breast' on a noisy background, using the full ``bits`` range."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    inside = ((yy - rows / 2) / (0.4 * rows)) ** 2 + (xx / (0.6 * cols)) ** 2 <= 1
    top = 2**bits - 1
    img = rng.normal(0.05 * top, 0.01 * top, (rows, cols))
    img[inside] = rng.uniform(0.3 * top, top, int(inside.sum()))
    img[0, 0], img[-1, -1] = 0, top  # the extremes, so every bit plane is exercised
    return np.clip(np.rint(img), 0, top).astype(np.uint16)


def make_dataset(pixels: np.ndarray, bits: int = 12, **tags: Any) -> Dataset:
    """A DX Mammography For Presentation image with ``pixels`` and any extra/override ``tags``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_MAMMO_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "PAT-001"
    ds.Modality = "MG"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "L"
    ds.ViewPosition = "CC"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def roundtrip(ds: Dataset, tmp_path: Path, name: str = "img.dcm") -> Dataset:
    return read_dataset(write(ds, tmp_path / name))


def dcmtk_jpeg(src: Path, dst: Path, flag: str) -> None:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (dcmtk) is not installed")
    subprocess.run(["dcmcjpeg", flag, str(src), str(dst)], check=True, capture_output=True)


def encode_as(ds: Dataset, syntax: str, tmp_path: Path) -> Path:
    """Write ``ds`` in ``syntax`` the way a modality or another toolkit would."""
    explicit = write(ds, tmp_path / "explicit.dcm")
    if syntax == "explicit":
        return explicit
    out = tmp_path / f"{syntax}.dcm"
    if syntax in ("jpeg_sv1", "jpeg_p14"):
        dcmtk_jpeg(explicit, out, "+e1" if syntax == "jpeg_sv1" else "+el")
        return out
    ds = pydicom.dcmread(explicit)
    if syntax == "implicit":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif syntax == "j2k":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    elif syntax == "jpegls":
        ds.compress(JPEGLSLossless)
    elif syntax == "rle":
        ds.compress(RLELossless)
    return write(ds, out)
