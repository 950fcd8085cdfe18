"""The plan of a synthetic dataset: who the patients are, which breasts have cancer, which images
exist and how each is stored, decided up front from the seed.

Planning is cheap and sequential; rendering is expensive and parallel. Because every random
choice of rendering is seeded from the plan (never from a shared generator), the output is
byte-for-byte the same for any number of worker processes.

Two styles: ``digital`` (today's full-field digital screening exams, 4 views per study) and
``film`` (digitised screen-film, CBIS-DDSM-like: one image per patient and study, real sizes with
odd widths, the view only in free text; see :mod:`training.synth.film`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace

import numpy as np

from inference.uids import derive_uid
from training.synth.anatomy import DENSITIES, BreastAnatomy
from training.synth.encoding import FILM_MIXED_SYNTAXES, MIXED, TRANSFER_SYNTAXES
from training.synth.film import view_text
from training.synth.lesions import Lesion, random_lesion
from training.synth.machines import FILM_MACHINES, MACHINES, VOI_CYCLE, Machine
from training.synth.phantom import MIN_SIZE

DIGITAL = "digital"
FILM = "film"
STYLES: tuple[str, ...] = (DIGITAL, FILM)
"""``digital``: 4-view FFDM exams (MG For Presentation, some SC). ``film``: digitised film."""

BASE_VIEWS: tuple[tuple[str, str], ...] = (("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO"))
DENSITY_WEIGHTS = (0.10, 0.43, 0.40, 0.07)  # roughly the RSNA site-1 distribution
EXTRA_VIEW_RATE = 0.04
MISSING_VIEW_RATE = 0.03
BILATERAL_RATE = 0.03
BENIGN_RATE = 0.05
IMPLANT_RATE = 0.015
IMAGE_IDS_PER_PATIENT = 5
FILM_ROW_JITTER = (0.93, 1.05)
FILM_COLUMN_JITTER = (0.95, 1.07)
"""Per-image size spread of the film style around the nominal size: 4500x2700 gives about
4200-4700 x 2560-2890, the range of CBIS-DDSM."""


@dataclass(frozen=True)
class BreastPlan:
    """One breast: its anatomy, lesions and RSNA labels."""

    laterality: str
    anatomy: BreastAnatomy
    lesions: tuple[Lesion, ...]
    cancer: bool
    biopsy: bool
    invasive: bool
    birads: int | None
    difficult_negative: bool


@dataclass(frozen=True)
class ImagePlan:
    """One image file and every choice that decides its bytes."""

    image_id: int
    laterality: str
    view: str
    series_number: int
    voi: str
    secondary_capture: bool
    transfer_syntax: str
    label: bool
    label_corner: int
    border: str | None
    tissue_seed: tuple[int, ...]
    detector_seed: tuple[int, ...]
    size: tuple[int, int]  # rows, columns
    film: bool = False
    view_text: str = ""  # SeriesDescription; "" = the digital default "L CC"
    laterality_keyword: str = ""  # "Laterality" or "ImageLaterality"; "" = by SOP class


@dataclass(frozen=True)
class PatientPlan:
    """One patient with a single screening exam."""

    index: int
    patient_id: int
    age: int
    machine: Machine
    density: str
    implant: bool
    study_uid: str
    study_date: str
    study_time: str
    breasts: tuple[BreastPlan, BreastPlan]  # L, R
    images: tuple[ImagePlan, ...]

    def breast(self, laterality: str) -> BreastPlan:
        return self.breasts[0] if laterality == "L" else self.breasts[1]


def plan_dataset(
    *,
    patients: int,
    seed: int,
    cancer_rate: float,
    size: tuple[int, int],
    transfer_syntax: str,
    style: str = DIGITAL,
) -> list[PatientPlan]:
    """Plan ``patients`` exams. Exactly ``round(cancer_rate * patients)`` patients have cancer.

    ``style`` ``film`` plans one image per patient (see :func:`_plan_film`).
    """
    if style == FILM:
        return _plan_film(
            patients=patients, seed=seed, cancer_rate=cancer_rate, size=size, transfer_syntax=transfer_syntax
        )
    if style != DIGITAL:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = np.random.default_rng([seed, 0])
    id_space = max(90_000, 20 * patients)
    patient_ids = np.sort(rng.choice(id_space, size=patients, replace=False) + 10_000)
    image_ids = rng.choice(2**31 - 100_000, size=patients * IMAGE_IDS_PER_PATIENT, replace=False) + 100_000
    n_cancer = round(cancer_rate * patients)
    cancer_patients = {int(i) for i in rng.choice(patients, size=n_cancer, replace=False)}
    machine_offset = int(rng.integers(len(MACHINES)))
    voi_offset = int(rng.integers(len(VOI_CYCLE)))
    ts_names = sorted(TRANSFER_SYNTAXES)
    ts_offset = int(rng.integers(len(ts_names)))

    plans: list[PatientPlan] = []
    image_counter = 0
    for index in range(patients):
        prng = np.random.default_rng([seed, 1, index])
        patient_id = int(patient_ids[index])
        machine = MACHINES[(machine_offset + index) % len(MACHINES)]
        density = str(prng.choice(DENSITIES, p=DENSITY_WEIGHTS))
        implant = bool(prng.random() < IMPLANT_RATE)
        age = int(np.clip(round(prng.normal(58.0, 10.0)), 38, 89))
        date = dt.date(2014, 1, 1) + dt.timedelta(days=int(prng.integers(0, 8 * 365)))
        time = (
            f"{int(prng.integers(7, 19)):02d}{int(prng.integers(0, 60)):02d}{int(prng.integers(0, 60)):02d}"
        )
        study_uid = derive_uid(
            "mammonode-synth", f"seed={seed}", f"size={size[0]}x{size[1]}", str(patient_id)
        )

        cancer_sides: set[str] = set()
        if index in cancer_patients:
            cancer_sides.add(str(prng.choice(["L", "R"])))
            if prng.random() < BILATERAL_RATE:
                cancer_sides = {"L", "R"}
        anatomy_r = BreastAnatomy.random(prng, density, implant=implant)
        anatomy_l = anatomy_r.mirrored_twin(prng)
        breasts = (
            _plan_breast(prng, "L", anatomy_l, "L" in cancer_sides, machine.site_id),
            _plan_breast(prng, "R", anatomy_r, "R" in cancer_sides, machine.site_id),
        )

        views = list(BASE_VIEWS)
        u = prng.random()
        if u < EXTRA_VIEW_RATE:
            views.append(views[int(prng.integers(len(views)))])  # a repeated acquisition
        elif u < EXTRA_VIEW_RATE + MISSING_VIEW_RATE:
            del views[int(prng.integers(len(views)))]

        images = []
        for k, (lat, view) in enumerate(views):
            voi = VOI_CYCLE[(voi_offset + image_counter) % len(VOI_CYCLE)]
            if transfer_syntax == MIXED:
                ts = ts_names[(ts_offset + image_counter) % len(ts_names)]
            else:
                ts = transfer_syntax
            border = (
                str(prng.choice(["top", "bottom", "far"])) if prng.random() < machine.border_rate else None
            )
            images.append(
                ImagePlan(
                    image_id=int(image_ids[index * IMAGE_IDS_PER_PATIENT + k]),
                    laterality=lat,
                    view=view,
                    series_number=k + 1,
                    voi=voi,
                    secondary_capture=voi == "none",
                    transfer_syntax=ts,
                    label=bool(prng.random() < machine.label_rate),
                    label_corner=int(prng.integers(2)),
                    border=border,
                    tissue_seed=(seed, 2, index, BASE_VIEWS.index((lat, view))),
                    detector_seed=(seed, 3, index, k),
                    size=size,
                )
            )
            image_counter += 1
        plans.append(
            PatientPlan(
                index=index,
                patient_id=patient_id,
                age=age,
                machine=machine,
                density=density,
                implant=implant,
                study_uid=study_uid,
                study_date=date.strftime("%Y%m%d"),
                study_time=time,
                breasts=breasts,
                images=tuple(images),
            )
        )
    return plans


def _plan_film(
    *, patients: int, seed: int, cancer_rate: float, size: tuple[int, int], transfer_syntax: str
) -> list[PatientPlan]:
    """Plan ``patients`` digitised films, one image per patient and study (as in CBIS-DDSM).

    Views cycle through L/R x CC/MLO; a cancer patient's cancer is in the imaged breast, so
    ``cancer_rate`` is the fraction of images showing a cancer. Each image gets its own size
    around ``size``, always with an odd width and, for every other image, odd rows; the first
    image has exactly ``size`` (width made odd), so a corpus always holds the size asked for.
    ``mixed`` alternates RLE and JPEG 2000, the syntaxes such archives use.
    """
    rng = np.random.default_rng([seed, 10])
    id_space = max(90_000, 20 * patients)
    patient_ids = np.sort(rng.choice(id_space, size=patients, replace=False) + 10_000)
    image_ids = rng.choice(2**31 - 100_000, size=patients, replace=False) + 100_000
    n_cancer = round(cancer_rate * patients)
    cancer_patients = {int(i) for i in rng.choice(patients, size=n_cancer, replace=False)}
    machine_offset = int(rng.integers(len(FILM_MACHINES)))
    view_offset = int(rng.integers(len(BASE_VIEWS)))
    ts_offset = int(rng.integers(len(FILM_MIXED_SYNTAXES)))

    plans: list[PatientPlan] = []
    for index in range(patients):
        prng = np.random.default_rng([seed, 11, index])
        patient_id = int(patient_ids[index])
        machine = FILM_MACHINES[(machine_offset + index) % len(FILM_MACHINES)]
        density = str(prng.choice(DENSITIES, p=DENSITY_WEIGHTS))
        age = int(np.clip(round(prng.normal(58.0, 10.0)), 38, 89))
        date = dt.date(1988, 1, 1) + dt.timedelta(days=int(prng.integers(0, 12 * 365)))
        time = (
            f"{int(prng.integers(7, 19)):02d}{int(prng.integers(0, 60)):02d}{int(prng.integers(0, 60)):02d}"
        )
        study_uid = derive_uid(
            "mammonode-synth", f"style={FILM}", f"seed={seed}", f"size={size[0]}x{size[1]}", str(patient_id)
        )
        lat, view = BASE_VIEWS[(view_offset + index) % len(BASE_VIEWS)]
        cancer_sides = {lat} if index in cancer_patients else set()
        anatomy_r = BreastAnatomy.random(prng, density, implant=False)
        anatomy_l = anatomy_r.mirrored_twin(prng)
        breasts = (
            _plan_breast(prng, "L", anatomy_l, "L" in cancer_sides, machine.site_id),
            _plan_breast(prng, "R", anatomy_r, "R" in cancer_sides, machine.site_id),
        )
        if index == 0:
            rows, cols = size
        else:
            rows = round(size[0] * prng.uniform(*FILM_ROW_JITTER))
            cols = round(size[1] * prng.uniform(*FILM_COLUMN_JITTER))
            rows = rows | 1 if index % 2 == 0 else rows & ~1
        image_size = (max(rows, MIN_SIZE), max(cols | 1, MIN_SIZE + 1))
        if transfer_syntax == MIXED:
            ts = FILM_MIXED_SYNTAXES[(ts_offset + index) % len(FILM_MIXED_SYNTAXES)]
        else:
            ts = transfer_syntax
        border = str(prng.choice(["top", "bottom", "far"])) if prng.random() < machine.border_rate else None
        image = ImagePlan(
            image_id=int(image_ids[index]),
            laterality=lat,
            view=view,
            series_number=1,
            voi="none",
            secondary_capture=True,
            transfer_syntax=ts,
            label=bool(prng.random() < machine.label_rate),
            label_corner=int(prng.integers(2)),
            border=border,
            tissue_seed=(seed, 12, index),
            detector_seed=(seed, 13, index),
            size=image_size,
            film=True,
            view_text=view_text(lat, view, index),
            laterality_keyword="Laterality" if index % 2 == 0 else "ImageLaterality",
        )
        plans.append(
            PatientPlan(
                index=index,
                patient_id=patient_id,
                age=age,
                machine=machine,
                density=density,
                implant=False,
                study_uid=study_uid,
                study_date=date.strftime("%Y%m%d"),
                study_time=time,
                breasts=breasts,
                images=(image,),
            )
        )
    return plans


def _plan_breast(
    rng: np.random.Generator, laterality: str, anatomy: BreastAnatomy, cancer: bool, site_id: int
) -> BreastPlan:
    """Lesions and RSNA labels of one breast. Site 2 leaves BIRADS empty, as in RSNA."""
    lesions: list[Lesion] = []
    difficult = False
    if cancer:
        u = rng.random()
        kinds = ["mass"] if u < 0.5 else ["calcification"] if u < 0.85 else ["mass", "calcification"]
        lesions = [random_lesion(rng, kind) for kind in kinds]
        if anatomy.implant:
            # Keep cancers in front of the implant, where a mammogram can still show them.
            lesions = [
                replace(lesion, nipple_distance=min(lesion.nipple_distance, 0.3)) for lesion in lesions
            ]
        biopsy, invasive, birads = True, bool(rng.random() < 0.7), 0
    else:
        difficult = bool(rng.random() < BENIGN_RATE)
        if difficult:
            lesions = [random_lesion(rng, "benign")]
            biopsy, invasive, birads = True, False, 0
        else:
            u = rng.random()
            birads = 1 if u < 0.7 else 2 if u < 0.96 else 0
            biopsy, invasive = bool(rng.random() < 0.01), False
    return BreastPlan(
        laterality=laterality,
        anatomy=anatomy,
        lesions=tuple(lesions),
        cancer=cancer,
        biopsy=biopsy,
        invasive=invasive,
        birads=birads if site_id == 1 else None,
        difficult_negative=difficult,
    )
