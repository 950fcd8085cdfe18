"""Does the model fire on things that are not cancer? The ``distractors`` section of the
evaluation report (issue 13), measured on phantoms that carry ``distractors.csv``.

Two questions, per distractor kind, for the skin markers together (``marker``) and for any
distractor (``any``):

- **False positives**: among cancer-free breasts, the rate scored at or above the model's
  threshold (breast score = the report's aggregation) for breasts that show the kind in any view
  versus breasts that do not; the same among cancer-free images.
- **CAM peak on a distractor**: the argmax of the CAM, taken exactly as the pointing game takes
  it (:func:`training.evaluate.content_cam`, :func:`training.metrics.cam_peak`), lands on the
  distractor's mask or within the pointing game's tolerance of it (model-grid pixels). The mask
  goes to the model grid through the same transform as the lesion masks, keeping any coverage
  (a thin wire would vanish under the lesion masks' 25% rule). Reported over cancer-free
  images (the figure the issue sets a bar for) and over all images.

A dataset without ``distractors.csv`` (real data) gets the section with null figures and the
reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from inference.geometry import original_to_grid
from training import metrics
from training.datasets.distractors import (
    DISTRACTOR_KINDS,
    DISTRACTORS_CSV,
    MARKER_KINDS,
    DistractorRow,
    load_distractors,
    read_distractor_mask,
)
from training.datasets.mammo import MammoSample
from training.evaluate import breast_table, content_cam, content_mask

GROUPS: tuple[str, ...] = ("any", "marker", *DISTRACTOR_KINDS)
"""The rows of the section: any distractor, any skin marker, then each kind."""


def _groups_of(kinds: set[str]) -> set[str]:
    """The report groups a set of kinds belongs to."""
    out = set(kinds)
    if kinds:
        out.add("any")
    if kinds & set(MARKER_KINDS):
        out.add("marker")
    return out


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _with_without(flagged: list[bool], has: list[set[str]]) -> dict[str, Any]:
    """For each group: false positives among the items with it and among those without."""
    out: dict[str, Any] = {}
    for group in GROUPS:
        with_ = [f for f, g in zip(flagged, has, strict=True) if group in g]
        without = [f for f, g in zip(flagged, has, strict=True) if group not in g]
        rate_with, rate_without = _rate(sum(with_), len(with_)), _rate(sum(without), len(without))
        ratio = rate_with / rate_without if rate_with is not None and rate_without else None
        out[group] = {
            "with": {"false_positives": sum(with_), "n": len(with_), "rate": rate_with},
            "without": {"false_positives": sum(without), "n": len(without), "rate": rate_without},
            "ratio": ratio,
        }
    return out


def _grid_masks(root: Path, sample: MammoSample, rows: Sequence[DistractorRow]) -> dict[str, np.ndarray]:
    """Each group's distractor mask of one image on the model grid (any coverage counts)."""
    labels = read_distractor_mask(root, sample.record.patient_id, sample.record.image_id)
    if labels.shape != tuple(sample.transform.original_shape):
        raise ValueError(f"distractor mask of image {sample.record.image_id} has shape {labels.shape}")
    masks: dict[str, np.ndarray] = {}
    for row in rows:
        grid = original_to_grid((labels == row.mask_value).astype(np.float32), sample.transform) > 0
        for group in _groups_of({row.kind}):
            masks[group] = masks[group] | grid if group in masks else grid
    return masks


def _cam_hits(
    root: Path,
    samples: Sequence[MammoSample],
    cams: Sequence[np.ndarray],
    rows: dict[int, list[DistractorRow]],
    tolerance_px: float,
) -> dict[str, Any]:
    """How often the CAM peak lands on each group, over cancer-free images and over all; and
    how often a peak dropped at random on the image would (the share of the image within the
    tolerance of the group), to read the rate against."""
    scopes = {"cancer_free_images": [s.label == 0 for s in samples], "all_images": [True] * len(samples)}
    hits: dict[str, dict[str, int]] = {scope: defaultdict(int) for scope in scopes}
    shown: dict[str, dict[str, int]] = {scope: defaultdict(int) for scope in scopes}
    area: dict[str, dict[str, float]] = {scope: defaultdict(float) for scope in scopes}
    for i, (sample, cam) in enumerate(zip(samples, cams, strict=True)):
        image_rows = rows.get(sample.record.image_id, [])
        if not image_rows:
            continue
        peak_map = content_cam(sample, cam)
        content = content_mask(sample)
        for group, mask in _grid_masks(root, sample, image_rows).items():
            on = metrics.lands_on(mask, metrics.cam_peak(peak_map, mask.shape), tolerance_px)
            near = _within(mask, tolerance_px)
            share = float((near & content).sum() / max(int(content.sum()), 1))
            for scope, member in scopes.items():
                if member[i]:
                    shown[scope][group] += 1
                    hits[scope][group] += on
                    area[scope][group] += share
    out: dict[str, Any] = {}
    for scope, member in scopes.items():
        n = sum(member)
        out[scope] = {
            group: {
                "peaks_on": hits[scope][group],
                "n_images": n,
                "rate": _rate(hits[scope][group], n),
                "images_with": shown[scope][group],
                "rate_among_images_with": _rate(hits[scope][group], shown[scope][group]),
                "chance_rate": area[scope][group] / n if n else None,
            }
            for group in GROUPS
        }
    return out


def _within(mask: np.ndarray, tolerance_px: float) -> np.ndarray:
    """Pixels on ``mask`` or within ``tolerance_px`` of it (the pointing game's rule)."""
    if not mask.any():
        return mask
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.asarray(distance <= tolerance_px + 1e-9)


def absent(root: Path) -> dict[str, Any]:
    """The section for a dataset without distractor ground truth."""
    return {
        "false_positive_rate": None,
        "cam_peak_on_distractor": None,
        "reason": f"no {DISTRACTORS_CSV} in {root}: the dataset has no distractor ground truth "
        "(only `mammonode synth` phantoms carry it)",
    }


def distractor_report(
    root: Path,
    samples: Sequence[MammoSample],
    probabilities: np.ndarray,
    cams: Sequence[np.ndarray],
    *,
    threshold: float,
    aggregation: str,
    tolerance_px: float,
) -> dict[str, Any]:
    """The ``distractors`` section of the evaluation report for ``samples`` scored as given."""
    rows = load_distractors(root)
    if rows is None:
        return absent(root)
    image_groups = [_groups_of({r.kind for r in rows.get(s.record.image_id, [])}) for s in samples]
    ids, labels, scores = breast_table(samples, probabilities)
    breast_groups: dict[str, set[str]] = defaultdict(set)
    for sample, groups in zip(samples, image_groups, strict=True):
        breast_groups[sample.prediction_id] |= groups
    free = [i for i, label in enumerate(labels) if label == 0]
    breast_flagged = [bool(scores[aggregation][i] >= threshold) for i in free]
    free_images = [i for i, s in enumerate(samples) if s.label == 0]
    image_flagged = [bool(probabilities[i] >= threshold) for i in free_images]
    return {
        "threshold": float(threshold),
        "aggregation": aggregation,
        "tolerance_px": tolerance_px,
        "false_positive_rate": {
            "cancer_free_breasts": _with_without(breast_flagged, [breast_groups[ids[i]] for i in free]),
            "cancer_free_images": _with_without(image_flagged, [image_groups[i] for i in free_images]),
        },
        "cam_peak_on_distractor": _cam_hits(root, samples, cams, rows, tolerance_px),
        "reason": None,
    }


def format_distractors(section: dict[str, Any]) -> list[str]:
    """Plain-text lines of the section, for ``mammonode evaluate`` without ``--json``."""
    if section.get("false_positive_rate") is None:
        return [f"distractors: not measured ({section.get('reason')})"]
    breasts = section["false_positive_rate"]["cancer_free_breasts"]
    peaks = section["cam_peak_on_distractor"]
    lines = [
        f"distractors (threshold {section['threshold']:.3f}): false positives among cancer-free breasts "
        "with vs without it; CAM peak on it in cancer-free images, in all images"
    ]
    for group in GROUPS:
        entry = breasts[group]
        if not entry["with"]["n"]:
            continue
        free, every = peaks["cancer_free_images"][group], peaks["all_images"][group]
        lines.append(
            f"  {group:<21} {_share(entry['with'], 'false_positives', 'n')}"
            f" vs {_share(entry['without'], 'false_positives', 'n')};"
            f" peak on it {_share(free, 'peaks_on', 'n_images')} (by chance {_percent(free['chance_rate'])}),"
            f" {_share(every, 'peaks_on', 'n_images')}"
        )
    if len(lines) == 1:
        lines.append("  (no distractor in this dataset)")
    return lines


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100.0 * rate:.1f}%"


def _share(entry: dict[str, Any], hits: str, n: str) -> str:
    return f"{entry[hits]}/{entry[n]} ({_percent(entry['rate'])})"
