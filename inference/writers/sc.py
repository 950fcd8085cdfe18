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
import re

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_encoder
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, RLELossless
from pydicom.valuerep import DSdecimal, DSfloat

from inference.types import AlgorithmInfo, InputError
from inference.uids import derive_uid, is_valid_uid
from inference.writers.common import algorithm_key, copyable_header, fit
from inference.writers.source_attributes import copy_patient_and_study, view_code_sequence

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


_CALIBRATION_TYPES = ("GEOMETRY", "FIDUCIAL")
_MODALITY = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def _source_laterality(source: Dataset) -> str | None:
    """``L`` or ``R`` from ImageLaterality or Laterality; ``B``/``U``/garbage give ``None``."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            return value
    return None


def _source_patient_orientation(source: Dataset) -> list[str] | None:
    """The source's PatientOrientation when it is a plausible 2-valued CS, else ``None``.

    The overlay has the source's pixel grid (at most shrunk by an integer factor), so its
    orientation is the source's. Values such as ``FR`` are legal in mammography, hence no
    enumeration check here.
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
    display_factor: int | None,
    laterality: str | None = None,
    view: str | None = None,
    content_description: str = DEFAULT_CONTENT_DESCRIPTION,
) -> highdicom.sc.SCImage:
    """Wrap a rendered CAM overlay (:func:`inference.overlay.render_cam_overlay`) as an SC image.

    The capture joins the source's patient and study in a new series with every attribute of the
    Patient and Study modules copied (:data:`PATIENT_AND_STUDY_KEYWORDS`, from the source's
    :func:`~inference.writers.common.copyable_header`), references the source in
    SourceImageSequence, and describes itself like the source so hanging protocols place it next
    to it: the source's Modality (``MG``), ImageLaterality, ViewCodeSequence (CID 4014) and
    PatientOrientation. ``laterality`` and ``view`` are the caller's reading of the source (its
    :class:`~inference.types.ImageMeta`, which also understands free text); the source's coded
    attributes are used where the caller has none.

    ``display_factor`` says the overlay is the source's pixel grid shrunk by exactly that integer
    factor (``Rows // f`` x ``Columns // f``, checked; 1 = the source's own size), so the capture
    gets the source's spacing times the factor (:func:`_set_geometry`); ``None`` claims no
    geometry. ``probability`` is the image's P(malignancy), recorded in ImageComments next to the
    threshold and the notice. The capture is RLE Lossless so the burned-in text and colours
    arrive in PACS exactly as rendered.

    highdicom cannot be told which RLE encoder to use, so the capture is built uncompressed and
    then compressed with an explicitly chosen plugin (:func:`rle_encoder_plugin`); any size,
    odd or even, encodes.
    """
    _check_source(source)
    header, _ = copyable_header(source)
    rgb = np.asarray(overlay_rgb)
    _check_arguments(header, rgb, series_instance_uid, sop_instance_uid, probability)
    _check_geometry(header, rgb, display_factor)

    sc = _new_sc(
        header, rgb, algorithm, series_instance_uid, sop_instance_uid, series_number, instance_number
    )
    # The UIDs are derived (invariant 6): compressing must not replace the SOP Instance UID.
    sc.compress(
        RLELossless,
        np.ascontiguousarray(rgb),
        encoding_plugin=rle_encoder_plugin(),
        generate_instance_uid=False,
    )
    copy_patient_and_study(sc, header)
    _describe_capture(sc, header, laterality, view)
    spacing_note = _set_geometry(sc, header, display_factor)
    _record_provenance(sc, header, algorithm, probability, content_description, spacing_note)

    logger.debug(
        "built CAM SC %s for source %s (%dx%d, model %s %s)",
        sop_instance_uid,
        header.SOPInstanceUID,
        rgb.shape[1],
        rgb.shape[0],
        algorithm.name,
        algorithm.version,
    )
    return sc


def _new_sc(
    header: Dataset,
    rgb: np.ndarray,
    algorithm: AlgorithmInfo,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
) -> highdicom.sc.SCImage:
    """The uncompressed highdicom SC of ``rgb`` in the source's study."""
    software_versions = [
        fit(f"{algorithm.name} {algorithm.version}", _LO_MAX),
        fit(f"sha256:{algorithm.weights_sha256}", _LO_MAX - 1),  # odd total length is padded to 65
    ]
    return highdicom.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
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
        # Uncompressed here; RLE with a chosen encoder afterwards (see RLE_ENCODER_PLUGINS).
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=fit(algorithm.name, _LO_MAX),
        software_versions=software_versions,
    )


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


def _check_geometry(source: Dataset, rgb: np.ndarray, display_factor: int | None) -> None:
    """With a ``display_factor`` the overlay must be exactly the source's grid shrunk by it."""
    if display_factor is None:
        return
    if isinstance(display_factor, bool) or not isinstance(display_factor, int) or display_factor < 1:
        raise ValueError(f"display_factor must be an integer >= 1 or None, got {display_factor!r}")
    rows, columns = int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0)
    expected = (rows // display_factor, columns // display_factor)
    if min(expected) < 1 or rgb.shape[:2] != expected:
        raise ValueError(
            f"overlay {rgb.shape[0]}x{rgb.shape[1]} is not the {rows}x{columns} source shrunk by "
            f"{display_factor} ({expected[0]}x{expected[1]}); pass display_factor=None"
        )


def _describe_capture(
    sc: highdicom.sc.SCImage, header: Dataset, laterality: str | None, view: str | None
) -> None:
    """Modality, orientation, laterality, view, anatomy, conversion type and the source reference."""
    # The source's modality (MG), so hanging protocols place the capture by modality, laterality
    # and view like the source; the SC Equipment module allows any modality here.
    modality = str(header.get("Modality", "") or "").strip().upper()
    if _MODALITY.match(modality):
        sc.Modality = modality
    # Type 2C: the source orientation when known, else present but empty.
    sc.PatientOrientation = _source_patient_orientation(header) or []
    # Image-level laterality only: one CAM series holds the captures of both breasts, so the
    # series-level Laterality would be wrong for half of them (and must be absent with it).
    given = (laterality or "").strip().upper()
    side = given if given in ("L", "R") else _source_laterality(header)
    if side is not None:
        sc.ImageLaterality = side
    codes_ = view_code_sequence(header, view)
    if codes_ is not None:
        sc.ViewCodeSequence = codes_
    sc.BodyPartExamined = "BREAST"
    sc.AnatomicRegionSequence = [highdicom.sr.CodedConcept.from_code(codes.SCT.Breast)]
    # Workstation: the picture was computed, not digitised from film or video.
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"

    source_item = Dataset()
    source_item.ReferencedSOPClassUID = header.SOPClassUID
    source_item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    source_item.PurposeOfReferenceCodeSequence = [
        highdicom.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [source_item]


def _spacing(source: Dataset, keyword: str) -> tuple[float, float] | None:
    """A two-valued positive finite spacing of the source, or ``None``."""
    try:
        values = [float(v) for v in source.get(keyword) or []]
    except (TypeError, ValueError):
        return None
    if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values):
        return values[0], values[1]
    return None


def _scaled(values: tuple[float, float], factor: int) -> list[str | DSfloat | DSdecimal | None]:
    # Ten significant digits: 0.1 x 3 is written 0.3, not 0.30000000000000.
    return [DSfloat(float(f"{v * factor:.10g}"), auto_format=True) for v in values]


def _set_geometry(sc: highdicom.sc.SCImage, header: Dataset, display_factor: int | None) -> str:
    """Pixel spacing of the capture: the source's, times ``display_factor``; returns a note for
    DerivationDescription saying what the numbers are.

    * Source PixelSpacing (already what the source's viewer measures with) -> PixelSpacing x
      factor, with the source's PixelSpacingCalibrationType/Description when it has a valid pair.
    * Else source ImagerPixelSpacing (DX/MG: at the detector plane, not corrected for the
      geometric magnification of the breast) -> PixelSpacing x factor *with the same
      detector-plane meaning* and no calibration type (none was done), so a distance measured on
      the capture equals the one a viewer measures on the source from its ImagerPixelSpacing.
    * Source NominalScannedPixelSpacing (digitised film) -> NominalScannedPixelSpacing x factor.

    Without a factor (the picture is not the source's grid) or a source spacing, none is written.
    """
    if display_factor is None:
        return "not on the source's pixel grid"
    note = f"source pixel grid shrunk {display_factor}x (block average)"
    nominal = _spacing(header, "NominalScannedPixelSpacing")
    if nominal is not None:
        sc.NominalScannedPixelSpacing = _scaled(nominal, display_factor)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _spacing(header, keyword)
        if spacing is None:
            continue
        sc.PixelSpacing = _scaled(spacing, display_factor)
        calibration = str(header.get("PixelSpacingCalibrationType", "") or "").strip().upper()
        description = str(header.get("PixelSpacingCalibrationDescription", "") or "").strip()
        if keyword == "PixelSpacing" and calibration in _CALIBRATION_TYPES and description:
            sc.PixelSpacingCalibrationType = calibration
            sc.PixelSpacingCalibrationDescription = fit(f"{description} (x {display_factor})", _LO_MAX)
        plane = " (detector plane)" if keyword == "ImagerPixelSpacing" else ""
        return f"{note}; PixelSpacing = source {keyword}{plane} x {display_factor}"
    return note


def _record_provenance(
    sc: highdicom.sc.SCImage,
    source: Dataset,
    algorithm: AlgorithmInfo,
    probability: float,
    content_description: str,
    geometry_note: str,
) -> None:
    """What computed the capture (derivation, comments) and the source's lossy-compression flag."""
    sc.DerivationDescription = fit(
        f"Class activation map (seed 003 CAM: logit = mean(M) + b) of model {algorithm.name} "
        f"version {algorithm.version}, weights SHA-256 {algorithm.weights_sha256}, "
        f"from source SOP Instance {source.SOPInstanceUID}; {geometry_note}; blended for display "
        f"with burned-in notice, caption and colour scale in one corner",
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
