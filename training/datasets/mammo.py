"""Mammography samples for training and evaluation, made by the serving preprocessing.

Every image goes through :func:`inference.preprocessing.preprocess` exactly as the node would
run it (design invariant 4). Decoding a mammogram costs far more than a training step on the
small demo grid, so each image is preprocessed once, in parallel, and kept in memory as float16.
Lesion masks, where the dataset has them, are carried through the same geometric transform.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inference.dicom_header import read_dataset
from inference.geometry import original_to_grid
from inference.preprocessing import preprocess
from inference.types import GeometricTransform, InputError, PreprocessConfig
from training.datasets.rsna import RsnaRecord

log = logging.getLogger(__name__)


@dataclass
class MammoSample:
    """One preprocessed image with its breast label and, if known, its lesion mask on the grid."""

    record: RsnaRecord
    pixels: np.ndarray  # (H, W) float16 in [0, 1]
    transform: GeometricTransform
    mask: np.ndarray | None  # (H, W) bool on the model grid, None without a lesion mask
    distractors: np.ndarray | None = None  # (H, W) bool, any coverage by a distractor (phantoms)

    @property
    def label(self) -> int:
        return int(self.record.cancer)

    @property
    def prediction_id(self) -> str:
        return self.record.prediction_id


def _load_one(args: tuple[RsnaRecord, PreprocessConfig, Path | None, Path | None]) -> MammoSample | str:
    record, config, mask_path, distractor_path = args
    try:
        image = preprocess(read_dataset(record.path), config)
    except InputError as exc:
        return f"{record.path}: {exc}"
    mask = _grid_mask(mask_path, image.transform, 0.25)
    # Any coverage: a tram-track vessel or a wire is thinner than a grid pixel.
    distractors = _grid_mask(distractor_path, image.transform, 0.0)
    return MammoSample(record, image.pixels.astype(np.float16), image.transform, mask, distractors)


def _grid_mask(path: Path | None, transform: GeometricTransform, coverage: float) -> np.ndarray | None:
    """A mask PNG in original pixels on the model grid: grid pixels covered more than ``coverage``."""
    if path is None or not path.exists():
        return None
    raw = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if raw is None or raw.shape != transform.original_shape:
        return None
    return np.asarray(original_to_grid((raw > 0).astype(np.float32), transform) > coverage)


def load_samples(
    records: Sequence[RsnaRecord],
    config: PreprocessConfig,
    *,
    mask_paths: Sequence[Path | None] | None = None,
    distractor_paths: Sequence[Path | None] | None = None,
    workers: int = 1,
) -> tuple[list[MammoSample], list[str]]:
    """Preprocess ``records``; returns the samples and one line per image that could not be used."""
    masks = list(mask_paths) if mask_paths is not None else [None] * len(records)
    others = list(distractor_paths) if distractor_paths is not None else [None] * len(records)
    jobs = [(r, config, m, d) for r, m, d in zip(records, masks, others, strict=True)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_load_one, jobs, chunksize=8))
    else:
        results = [_load_one(job) for job in jobs]
    samples = [r for r in results if isinstance(r, MammoSample)]
    errors = [r for r in results if isinstance(r, str)]
    for line in errors:
        log.warning("skipped %s", line)
    return samples, errors
