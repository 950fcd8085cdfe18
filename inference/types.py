"""Plain data types shared by preprocessing, model, writers, training and the node.

They live in one module so that training and serving cannot drift apart (design invariant 4):
``training`` builds its samples from these very types and from :mod:`inference.preprocessing`.
Only numpy is imported here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

Laterality = Literal["L", "R", "unknown"]
"""Breast side. ``unknown`` when neither ImageLaterality, Laterality nor text says it."""

UNKNOWN = "unknown"

RESEARCH_NOTICE = "RESEARCH USE ONLY - demo model trained on synthetic data"
"""Burned into every CAM image and written into every SR made with a model whose manifest says
``synthetic_training_data: true`` (the bundled demo model)."""


class MammoNodeError(Exception):
    """Base of the errors the product raises on purpose; the CLI prints them as one line."""


class InputError(MammoNodeError):
    """An input file cannot be used: not DICOM, no pixel data, undecodable, not a mammogram..."""


@dataclass(frozen=True)
class ImageMeta:
    """The identifying and geometric tags of one source image, read without decoding pixels.

    Strings are validated UIDs or normalised codes; never raw tag text used as a path.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    laterality: str = UNKNOWN  # "L", "R" or "unknown"
    view: str = UNKNOWN  # "CC", "MLO", "ML", "LM", "XCCL", ... or "unknown"
    modality: str = UNKNOWN
    rows: int = 0
    columns: int = 0
    photometric: str = "MONOCHROME2"
    transfer_syntax_uid: str = ""
    presentation_intent: str = UNKNOWN  # "FOR PRESENTATION", "FOR PROCESSING" or "unknown"

    @property
    def breast_key(self) -> tuple[str, str, str]:
        """The prediction unit: patient, study and laterality."""
        return (self.patient_id, self.study_instance_uid, self.laterality)


@dataclass(frozen=True)
class PreprocessConfig:
    """Parameters of :func:`inference.preprocessing.preprocess`; stored in the model manifest.

    ``input_height``/``input_width`` is the model grid. Seed 003 used 955x500; the production
    default is 1024x512 and the bundled demo model uses 512x256.
    """

    input_height: int = 1024
    input_width: int = 512
    # Seed-003 fallback window when a file carries none: centre/width as fractions of the
    # stored-value range, applied before min-max normalisation.
    fallback_window: Literal["minmax", "percentile"] = "percentile"
    # Background crop: a row/column belongs to the breast when more than `crop_min_fraction`
    # of its pixels exceed `crop_threshold` (after normalisation), computed on a denoised mask.
    crop_threshold: float = 0.1
    crop_min_fraction: float = 0.02
    # Orientation: every breast is flipped so that the chest wall is on this side.
    chest_wall_side: Literal["left", "right"] = "left"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass(frozen=True)
class GeometricTransform:
    """How the model grid relates to the original pixels, so maps can be drawn back.

    Forward order: crop the original to ``crop_box`` (y0, y1, x0, x1, half-open), flip
    horizontally if ``flipped``, scale by ``scale`` (model pixels per original pixel, same on both
    axes), then paste at (``pad_top``, ``pad_left``) into a zero grid of ``input_shape``.
    """

    original_shape: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    flipped: bool
    scale: float
    pad_top: int
    pad_left: int
    input_shape: tuple[int, int]

    @property
    def resized_shape(self) -> tuple[int, int]:
        """Height and width of the crop after scaling (the unpadded content on the model grid)."""
        y0, y1, x0, x1 = self.crop_box
        h = max(1, round((y1 - y0) * self.scale))
        w = max(1, round((x1 - x0) * self.scale))
        return (min(h, self.input_shape[0]), min(w, self.input_shape[1]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PreprocessedImage:
    """One image ready for the model: float32 pixels in [0, 1] on the model grid."""

    pixels: np.ndarray  # (input_height, input_width) float32
    transform: GeometricTransform
    meta: ImageMeta


@dataclass
class ImageScore:
    """The model's output for one image."""

    meta: ImageMeta
    logit: float
    probability: float
    cam: np.ndarray  # class-activation matrix on the feature grid (h, w), float32
    transform: GeometricTransform


@dataclass
class BreastScore:
    """Aggregated result for one prediction unit (patient, study, laterality)."""

    patient_id: str
    study_instance_uid: str
    laterality: str
    probability: float  # the selected aggregation
    method: str
    image_probabilities: dict[str, float] = field(default_factory=dict)  # SOPInstanceUID -> p
    aggregates: dict[str, float] = field(default_factory=dict)  # method name -> value


@dataclass
class StudyScore:
    """Per-study result: the exam score is the maximum over its breasts."""

    patient_id: str
    study_instance_uid: str
    exam_probability: float
    breasts: list[BreastScore]
    images: list[ImageScore]
    threshold: float
    recall_recommended: bool


@dataclass(frozen=True)
class AlgorithmInfo:
    """What every output object says about the model that made it (design invariant 5)."""

    name: str
    version: str
    weights_sha256: str
    threshold: float
    notice: str | None = None  # RESEARCH_NOTICE for models trained on synthetic data


SCREENING_SIDE_VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
"""The (laterality, view) pairs of a standard screening exam, in this order."""

SCREENING_VIEWS: tuple[str, ...] = tuple(f"{side}-{view}" for side, view in SCREENING_SIDE_VIEWS)
"""The views of a standard screening exam, in the ``L-CC`` form of :func:`view_key`."""


def view_key(laterality: str, view: str) -> str:
    """``L-CC`` for an image's side and view (the form of the expected-views setting)."""
    return f"{laterality.strip().upper()}-{view.strip().upper()}"


@dataclass(frozen=True)
class ImageFailure:
    """An image of a study that could not be analysed (or whose CAM capture could not be made),
    and why: the report names it, so a reader knows what the study's scores leave out. ``reason``
    is scrubbed of DICOM values (:func:`inference.phi.scrub`)."""

    sop_instance_uid: str
    sop_class_uid: str
    laterality: str
    view: str
    reason: str
