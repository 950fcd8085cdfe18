"""CAM overlay as a DICOM Secondary Capture Image (one object type per module, highdicom style).

Why a secondary capture at all: PACS viewers often ignore CAD SR from unknown vendors, but every
viewer shows an RGB secondary capture in the same study next to the original views. The object
therefore carries everything a reader needs in its pixels (burned-in notice and scores, hence
``BurnedInAnnotation YES``) and everything an auditor needs in its header (design invariant 5):
model name and version, the SHA-256 of the weights and a reference to the source instance.

UIDs are derived, not random (design invariant 6): re-scoring the same image with the same model
yields the same Series and SOP Instance UIDs, so a resend replaces rather than duplicates.
"""

from __future__ import annotations

import logging

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from inference.types import AlgorithmInfo, InputError
from inference.uids import derive_uid, is_valid_uid
from inference.writers.common import algorithm_key, fit

logger = logging.getLogger(__name__)

MANUFACTURER = "MammoNode"
SERIES_DESCRIPTION = "MammoNode CAM (RESEARCH USE)"
DEFAULT_CONTENT_DESCRIPTION = (
    "Class activation map of the malignancy classifier, thresholded at mean + 1 SD and blended "
    "over the windowed source image; not a detection or diagnosis"
)

# Maximum value lengths (PS3.5 Table 6.2-1) of the text attributes written here.
_LO_MAX = 64
_ST_MAX = 1024
_LT_MAX = 10240

_UID_NAMESPACE = "mammonode/cam-sc/v1"

RLE_ENCODER_PLUGINS: tuple[str, ...] = ("pylibjpeg", "pydicom")
"""RLE encoder plugins allowed, in order of preference (design invariant 8).

Never "whatever pydicom finds first": with python-gdcm installed that is GDCM, whose RLE encoder
throws an uncaught C++ exception (``image_len % MaxNumSegments == 0``) on any odd Rows x Columns
and aborts the whole process. pylibjpeg-rle is about ten times faster than pydicom's own encoder,
which is the always-installed fallback; both give the same bytes.
"""


def rle_encoder_plugin() -> str:
    """The first installed plugin of :data:`RLE_ENCODER_PLUGINS`."""
    available = set(get_encoder(RLELossless).available_plugins)
    for plugin in RLE_ENCODER_PLUGINS:
        if plugin in available:
            return plugin
    raise RuntimeError(f"no safe RLE encoder installed (need one of {RLE_ENCODER_PLUGINS})")


def cam_sc_uids(
    source_sop_uid: str, algorithm: AlgorithmInfo, study_uid: str, result_version: int = 1
) -> tuple[str, str]:
    """Series and SOP Instance UID of the CAM capture of ``source_sop_uid``.

    All CAM captures of one study, model and result version share a series; each source image
    gets its own instance. Same inputs and same weights give the same UIDs; different weights (or
    version, threshold, notice, result version) give different ones, so a PACS never holds two
    different pictures under one UID.
    """
    if not is_valid_uid(source_sop_uid):
        raise ValueError(f"invalid source SOP Instance UID {source_sop_uid!r}")
    if not is_valid_uid(study_uid):
        raise ValueError(f"invalid Study Instance UID {study_uid!r}")
    if result_version < 1:
        raise ValueError(f"result_version must be >= 1, got {result_version}")
    key = algorithm_key(algorithm)
    series_uid = derive_uid(_UID_NAMESPACE, "series", study_uid, *key, str(result_version))
    sop_uid = derive_uid(_UID_NAMESPACE, "instance", study_uid, source_sop_uid, *key, str(result_version))
    return series_uid, sop_uid


def _source_laterality(source: Dataset) -> str | None:
    """``L`` or ``R`` from ImageLaterality or Laterality; ``B``/``U``/garbage give ``None``."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _source_patient_orientation(source: Dataset) -> list[str] | None:
    """The source's PatientOrientation when it is a plausible 2-valued CS, else ``None``.

    The overlay keeps the source geometry (only scaled), so its orientation is the source's.
    Values such as ``FR`` are legal in mammography, hence no enumeration check here.
    """
    value = source.get("PatientOrientation")
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    items = [str(v).strip().upper() for v in values]
    allowed = set("APRLHF")
    if len(items) == 2 and all(item and len(item) <= 16 and set(item) <= allowed for item in items):
        return items
    return None


def _check_source(source: Dataset) -> None:
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID"):
        if not is_valid_uid(str(source.get(keyword, ""))):
            raise InputError(f"source {keyword} is missing or invalid: {source.get(keyword)!r}")


def build_cam_sc(
    source: pydicom.Dataset,
    overlay_rgb: np.ndarray,
    *,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    probability: float,
    content_description: str = DEFAULT_CONTENT_DESCRIPTION,
) -> highdicom.sc.SCImage:
    """Wrap a rendered CAM overlay (:func:`inference.overlay.render_cam_overlay`) as an SC image.

    The capture joins the source's patient and study in a new series, references the source in
    SourceImageSequence, copies its laterality and patient orientation, and is RLE Lossless so the
    burned-in text and colours arrive in PACS exactly as rendered. ``probability`` is the image's
    P(malignancy); it is recorded in ImageComments next to the threshold and the notice.

    highdicom cannot be told which RLE encoder to use, so the capture is built uncompressed and
    then compressed with an explicitly chosen plugin (:func:`rle_encoder_plugin`); any size,
    odd or even, encodes.
    """
    _check_source(source)
    rgb = np.asarray(overlay_rgb)
    _check_arguments(source, rgb, series_instance_uid, sop_instance_uid, probability)

    laterality = _source_laterality(source)
    orientation = _source_patient_orientation(source)
    software_versions = [
        fit(f"{algorithm.name} {algorithm.version}", _LO_MAX),
        fit(f"sha256:{algorithm.weights_sha256}", _LO_MAX - 1),  # odd total length is padded to 65
    ]
    sc = highdicom.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom requires an orientation for PATIENT images but only accepts single letters;
        # the source's real value (which may be e.g. "FR") is written by _describe_capture.
        patient_orientation=("A", "F"),
        # Uncompressed here; RLE with a chosen encoder below (see RLE_ENCODER_PLUGINS).
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=fit(algorithm.name, _LO_MAX),
        software_versions=software_versions,
    )
    # The UIDs are derived (invariant 6): compressing must not replace the SOP Instance UID.
    sc.compress(
        RLELossless,
        np.ascontiguousarray(rgb),
        encoding_plugin=rle_encoder_plugin(),
        generate_instance_uid=False,
    )
    _describe_capture(sc, source, laterality, orientation)
    _record_provenance(sc, source, algorithm, probability, content_description)

    logger.debug(
        "built CAM SC %s for source %s (%dx%d, model %s %s)",
        sop_instance_uid,
        source.SOPInstanceUID,
        rgb.shape[1],
        rgb.shape[0],
        algorithm.name,
        algorithm.version,
    )
    return sc


def _check_arguments(
    source: Dataset, rgb: np.ndarray, series_instance_uid: str, sop_instance_uid: str, probability: float
) -> None:
    """The overlay is RGB, the new UIDs are valid and new, the probability is one."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"overlay must be (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
    for name, uid in (("series_instance_uid", series_instance_uid), ("sop_instance_uid", sop_instance_uid)):
        if not is_valid_uid(uid):
            raise ValueError(f"invalid {name} {uid!r}")
    if series_instance_uid == str(source.get("SeriesInstanceUID", "")):
        raise ValueError("the CAM capture must be in a new series, not the source's series")
    if sop_instance_uid == str(source.SOPInstanceUID):
        raise ValueError("the CAM capture must not reuse the source's SOP Instance UID")
    if not (np.isfinite(probability) and 0.0 <= probability <= 1.0):
        raise ValueError(f"probability must be in [0, 1], got {probability}")


def _describe_capture(
    sc: highdicom.sc.SCImage, source: Dataset, laterality: str | None, orientation: list[str] | None
) -> None:
    """Orientation, laterality, anatomy, conversion type and the reference to the source image."""
    # Type 2C: the source orientation when known, else present but empty.
    sc.PatientOrientation = orientation or []
    # Image-level laterality, not the series-level Laterality: one CAM series holds the captures
    # of both breasts. (With ImageLaterality present, General Series Laterality must be absent.)
    if laterality is not None:
        sc.ImageLaterality = laterality
    sc.BodyPartExamined = "BREAST"
    sc.AnatomicRegionSequence = [highdicom.sr.CodedConcept.from_code(codes.SCT.Breast)]
    # Workstation: the picture was computed, not digitised from film or video.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"

    source_item = Dataset()
    source_item.ReferencedSOPClassUID = source.SOPClassUID
    source_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    source_item.PurposeOfReferenceCodeSequence = [
        highdicom.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [source_item]


def _record_provenance(
    sc: highdicom.sc.SCImage,
    source: Dataset,
    algorithm: AlgorithmInfo,
    probability: float,
    content_description: str,
) -> None:
    """What computed the capture (derivation, comments) and the source's lossy-compression flag."""
    sc.DerivationDescription = fit(
        f"Class activation map (seed 003 CAM: logit = mean(M) + b) of model {algorithm.name} "
        f"version {algorithm.version}, weights SHA-256 {algorithm.weights_sha256}, "
        f"from source SOP Instance {source.SOPInstanceUID}; downscaled and blended for display",
        _ST_MAX,
    )
    comments = [
        content_description.rstrip("."),
        f"P(malignancy) {probability:.4f}, decision threshold {algorithm.threshold:g}",
    ]
    if algorithm.notice:
        comments.append(algorithm.notice)
    sc.ImageComments = fit(". ".join(comments), _LT_MAX)

    # Once lossy, always lossy (PS3.3 C.7.6.1.1.5): a capture of a lossy source says so.
    if str(source.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in source:
                setattr(sc, keyword, source.get(keyword))
