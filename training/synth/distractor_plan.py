"""How often each distractor appears, and which images of a planned patient get which.

Default frequencies (multiplied by ``distractor_rate``, capped at 1; 0 = none):

=======================  ========  =======  ==================================================
kind                     per       default  source
=======================  ========  =======  ==================================================
vessel_calcification     patient   0.123    published: 12.3% of 17,237 women screened had
                                            breast arterial calcification (Annals of
                                            Epidemiology; reported by Diagnostic Imaging,
                                            "Screening Mammography and Breast Arterial
                                            Calcification: What a New Study Reveals").
                                            Drawn in both breasts: our assumption.
chest_device             patient   0.0033   published: a pacemaker in 0.33% of mammography
                                            examinations, 79% left-sided, projected on 96% of
                                            MLO and 10% of CC views (Nissan et al., "Pacemaker
                                            in patients undergoing mammography: a limitation
                                            for breast cancer diagnosis?", Sheba Medical
                                            Center, 2011-2021). One device in four drawn as a
                                            port instead: our assumption.
bb_marker                breast    0.15     assumption ("markers on many images"); 1-3 per
                                            breast. Shapes follow the makers' convention
                                            (nipple: small pellet; mole: circle; scar: broken
                                            line), as summarised by Verywell Health,
                                            "Mammogram Markers"; sizes are our assumption.
nipple_marker            breast    0.10     assumption (some sites mark every nipple, most none)
scar_marker              breast    0.03     assumption
clip                     breast    0.05     assumption; one biopsy clip, or 3-6 around a cavity
metal_label              image     0.10     assumption
paddle_edge              image     0.04     assumption
digitiser_border (film)  image     0.50     assumption; 1-2 edges
scratch (film)           image     0.30     assumption; 1-4 scratches
=======================  ========  =======  ==================================================

Breast- and patient-level distractors show in every view of the breast (their place is drawn
per view, not projected consistently between CC and MLO); a chest device shows on the views of
its side with the published per-view visibility.

Every choice comes from its own generator seeded by ``(seed, STREAM, patient index, ...)``, one
per decision: raising the rate only adds distractors (a breast that had a marker keeps it), and
the plan of the tissue, lesions and detector never sees these draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.datasets.distractors import DISTRACTOR_KINDS
from training.synth.distractors import DistractorItem, ImageDistractors, image_height_mm
from training.synth.plan import PatientPlan

STREAM = 7013
"""Tag of the distractor random streams (the plan uses tags 0-13)."""


@dataclass(frozen=True)
class KindDefault:
    per: str  # "patient", "breast" or "image"
    rate: float
    film_only: bool = False


DEFAULTS: dict[str, KindDefault] = {
    "bb_marker": KindDefault("breast", 0.15),
    "nipple_marker": KindDefault("breast", 0.10),
    "scar_marker": KindDefault("breast", 0.03),
    "clip": KindDefault("breast", 0.05),
    "vessel_calcification": KindDefault("patient", 0.123),
    "chest_device": KindDefault("patient", 0.0033),
    "metal_label": KindDefault("image", 0.10),
    "paddle_edge": KindDefault("image", 0.04),
    "digitiser_border": KindDefault("image", 0.50, film_only=True),
    "scratch": KindDefault("image", 0.30, film_only=True),
}
PUBLISHED = ("vessel_calcification", "chest_device")
"""Kinds whose default follows a published prevalence; the others are our assumptions."""
DEVICE_LEFT = 0.79
DEVICE_VISIBLE = {"MLO": 0.96, "CC": 0.10}
PORT_SHARE = 0.25


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([*key])


def _count(kind: str, rng: np.random.Generator) -> int:
    """How many of ``kind`` (or, for clips, how many clips in the one cluster)."""
    if kind == "bb_marker":
        return int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    if kind == "clip":
        return 1 if rng.random() < 0.6 else int(rng.integers(3, 7))
    if kind == "vessel_calcification":
        return int(rng.integers(1, 4))
    if kind == "digitiser_border":
        return int(rng.integers(1, 3))
    if kind == "scratch":
        return int(rng.integers(1, 5))
    return 1


def plan_distractors(plan: PatientPlan, *, seed: int, rate: float, film: bool) -> list[ImageDistractors]:
    """The distractors of each image of ``plan`` (same order as ``plan.images``)."""
    if rate < 0:
        raise ValueError(f"distractor rate must be >= 0, got {rate}")
    base = (seed, STREAM, plan.index)
    present: dict[tuple[str, str], tuple[int, bool]] = {}  # (laterality, kind) -> (count, port)
    for k, kind in enumerate(DISTRACTOR_KINDS):
        spec = DEFAULTS[kind]
        if spec.per == "patient":
            rng = _rng(*base, 0, k)
            hit = rng.random() < min(1.0, spec.rate * rate)
            count = _count(kind, rng)
            sides: tuple[str, ...]
            if kind == "chest_device":
                sides = ("L",) if rng.random() < DEVICE_LEFT else ("R",)
                port = bool(rng.random() < PORT_SHARE)
            else:
                sides, port = ("L", "R"), False
            for lat in sides if hit else ():
                present[(lat, kind)] = (count, port)
        elif spec.per == "breast":
            for b, lat in enumerate(("L", "R")):
                rng = _rng(*base, 1, b, k)
                if rng.random() < min(1.0, spec.rate * rate):
                    present[(lat, kind)] = (_count(kind, rng), False)
    return [_image_items(plan, i, base, present, rate, film) for i in range(len(plan.images))]


def _image_items(
    plan: PatientPlan,
    i: int,
    base: tuple[int, ...],
    present: dict[tuple[str, str], tuple[int, bool]],
    rate: float,
    film: bool,
) -> ImageDistractors:
    image = plan.images[i]
    items: list[DistractorItem] = []
    for k, kind in enumerate(DISTRACTOR_KINDS):
        spec = DEFAULTS[kind]
        seed = (*base, 4, i, k)
        if spec.per == "image":
            if spec.film_only and not film:
                continue
            rng = _rng(*base, 2, i, k)
            if rng.random() < min(1.0, spec.rate * rate):
                items.append(DistractorItem(kind, seed, _count(kind, rng)))
            continue
        found = present.get((image.laterality, kind))
        if found is None:
            continue
        count, port = found
        if kind == "chest_device" and not _rng(*base, 3, i).random() < DEVICE_VISIBLE[image.view]:
            continue
        items.append(DistractorItem(kind, seed, count, port))
    return ImageDistractors(tuple(items), image_height_mm(film), image.laterality)
