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

from inference.types import SCREENING_SIDE_VIEWS
from inference.uids import derive_uid
from training.synth.anatomy import DENSITIES, BreastAnatomy
from training.synth.encoding import FILM_MIXED_SYNTAXES, MIXED, MIXED_SYNTAXES
from training.synth.film import view_text
from training.synth.lesions import Lesion, random_lesion
from training.synth.machines import FILM_MACHINES, MACHINES, VOI_CYCLE, Machine
from training.synth.phantom import MIN_SIZE

DIGITAL = "digital"
FILM = "film"
STYLES: tuple[str, ...] = (DIGITAL, FILM)
"""``digital``: 4-view FFDM exams (MG For Presentation, some SC). ``film``: digitised film."""

BASE_VIEWS: tuple[tuple[str, str], ...] = SCREENING_SIDE_VIEWS
"""The views of a digital exam, in series order (tissue seeds index into it)."""
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
    return _plan_digital(
        patients=patients, seed=seed, cancer_rate=cancer_rate, size=size, transfer_syntax=transfer_syntax
    )


def _draw_patients(
    rng: np.random.Generator, patients: int, n_image_ids: int, cancer_rate: float
) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Sorted patient IDs, distinct image IDs and the indices of the cancer patients."""
    id_space = max(90_000, 20 * patients)
    patient_ids = np.sort(rng.choice(id_space, size=patients, replace=False) + 10_000)
    image_ids = rng.choice(2**31 - 100_000, size=n_image_ids, replace=False) + 100_000
    n_cancer = round(cancer_rate * patients)
    cancer_patients = {int(i) for i in rng.choice(patients, size=n_cancer, replace=False)}
    return patient_ids, image_ids, cancer_patients


def _random_age(rng: np.random.Generator) -> int:
    return int(np.clip(round(rng.normal(58.0, 10.0)), 38, 89))


def _random_time(rng: np.random.Generator) -> str:
    """A study time HHMMSS during the working day."""
    return f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"


def _random_border(rng: np.random.Generator, machine: Machine) -> str | None:
    """Where a bright collimator strip shows, if this machine leaves one on this image."""
    return str(rng.choice(["top", "bottom", "far"])) if rng.random() < machine.border_rate else None


def _plan_breasts(
    rng: np.random.Generator, density: str, implant: bool, cancer_sides: set[str], site_id: int
) -> tuple[BreastPlan, BreastPlan]:
    """The left and right breast of one patient: mirrored anatomy, lesions where there is cancer."""
    anatomy_r = BreastAnatomy.random(rng, density, implant=implant)
    anatomy_l = anatomy_r.mirrored_twin(rng)
    return (
        _plan_breast(rng, "L", anatomy_l, "L" in cancer_sides, site_id),
        _plan_breast(rng, "R", anatomy_r, "R" in cancer_sides, site_id),
    )


_TS_NAMES = sorted(MIXED_SYNTAXES)
"""The transfer syntaxes ``mixed`` cycles through in a digital dataset (not every syntax: see
MIXED_SYNTAXES, which keeps old seeds' datasets identical)."""


@dataclass(frozen=True)
class _DigitalStorage:
    """How a digital dataset's images are stored: VOI and (``mixed``) transfer syntax cycle over
    the images of the whole dataset, from offsets drawn from the seed."""

    voi_offset: int
    transfer_syntax: str
    ts_offset: int

    def voi(self, image_number: int) -> str:
        return VOI_CYCLE[(self.voi_offset + image_number) % len(VOI_CYCLE)]

    def syntax(self, image_number: int) -> str:
        if self.transfer_syntax != MIXED:
            return self.transfer_syntax
        return _TS_NAMES[(self.ts_offset + image_number) % len(_TS_NAMES)]


def _plan_digital(
    *, patients: int, seed: int, cancer_rate: float, size: tuple[int, int], transfer_syntax: str
) -> list[PatientPlan]:
    """Plan ``patients`` digital 4-view exams (now and then a view repeated or missing)."""
    rng = np.random.default_rng([seed, 0])
    patient_ids, image_ids, cancer_patients = _draw_patients(
        rng, patients, patients * IMAGE_IDS_PER_PATIENT, cancer_rate
    )
    machine_offset = int(rng.integers(len(MACHINES)))
    voi_offset = int(rng.integers(len(VOI_CYCLE)))
    storage = _DigitalStorage(voi_offset, transfer_syntax, int(rng.integers(len(_TS_NAMES))))

    plans: list[PatientPlan] = []
    image_counter = 0
    for index in range(patients):
        first_id = index * IMAGE_IDS_PER_PATIENT
        plan = _plan_digital_patient(
            np.random.default_rng([seed, 1, index]),
            seed=seed,
            index=index,
            size=size,
            patient_id=int(patient_ids[index]),
            image_ids=[int(i) for i in image_ids[first_id : first_id + IMAGE_IDS_PER_PATIENT]],
            cancer=index in cancer_patients,
            machine=MACHINES[(machine_offset + index) % len(MACHINES)],
            storage=storage,
            first_image=image_counter,
        )
        image_counter += len(plan.images)
        plans.append(plan)
    return plans


def _plan_digital_patient(
    prng: np.random.Generator,
    *,
    seed: int,
    index: int,
    size: tuple[int, int],
    patient_id: int,
    image_ids: list[int],
    cancer: bool,
    machine: Machine,
    storage: _DigitalStorage,
    first_image: int,
) -> PatientPlan:
    """One digital exam; ``first_image`` counts the dataset's images planned before it."""
    density = str(prng.choice(DENSITIES, p=DENSITY_WEIGHTS))
    implant = bool(prng.random() < IMPLANT_RATE)
    age = _random_age(prng)
    date = dt.date(2014, 1, 1) + dt.timedelta(days=int(prng.integers(0, 8 * 365)))
    time = _random_time(prng)
    study_uid = derive_uid("mammonode-synth", f"seed={seed}", f"size={size[0]}x{size[1]}", str(patient_id))

    cancer_sides: set[str] = set()
    if cancer:
        cancer_sides.add(str(prng.choice(["L", "R"])))
        if prng.random() < BILATERAL_RATE:
            cancer_sides = {"L", "R"}
    breasts = _plan_breasts(prng, density, implant, cancer_sides, machine.site_id)

    images = []
    for k, (lat, view) in enumerate(_plan_views(prng)):
        voi = storage.voi(first_image + k)
        border = _random_border(prng, machine)  # drawn before the label, as always
        images.append(
            ImagePlan(
                image_id=image_ids[k],
                laterality=lat,
                view=view,
                series_number=k + 1,
                voi=voi,
                secondary_capture=voi == "none",
                transfer_syntax=storage.syntax(first_image + k),
                border=border,
                label=bool(prng.random() < machine.label_rate),
                label_corner=int(prng.integers(2)),
                tissue_seed=(seed, 2, index, BASE_VIEWS.index((lat, view))),
                detector_seed=(seed, 3, index, k),
                size=size,
            )
        )
    return PatientPlan(
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


def _plan_views(prng: np.random.Generator) -> list[tuple[str, str]]:
    """The four screening views, now and then with one repeated (a re-take) or one missing."""
    views = list(BASE_VIEWS)
    u = prng.random()
    if u < EXTRA_VIEW_RATE:
        views.append(views[int(prng.integers(len(views)))])  # a repeated acquisition
    elif u < EXTRA_VIEW_RATE + MISSING_VIEW_RATE:
        del views[int(prng.integers(len(views)))]
    return views


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
    patient_ids, image_ids, cancer_patients = _draw_patients(rng, patients, patients, cancer_rate)
    machine_offset = int(rng.integers(len(FILM_MACHINES)))
    view_offset = int(rng.integers(len(BASE_VIEWS)))
    ts_offset = int(rng.integers(len(FILM_MIXED_SYNTAXES)))

    plans: list[PatientPlan] = []
    for index in range(patients):
        if transfer_syntax == MIXED:
            ts = FILM_MIXED_SYNTAXES[(ts_offset + index) % len(FILM_MIXED_SYNTAXES)]
        else:
            ts = transfer_syntax
        plans.append(
            _plan_film_patient(
                np.random.default_rng([seed, 11, index]),
                seed=seed,
                index=index,
                size=size,
                patient_id=int(patient_ids[index]),
                image_id=int(image_ids[index]),
                cancer=index in cancer_patients,
                machine=FILM_MACHINES[(machine_offset + index) % len(FILM_MACHINES)],
                side_view=BASE_VIEWS[(view_offset + index) % len(BASE_VIEWS)],
                transfer_syntax=ts,
            )
        )
    return plans


def _plan_film_patient(
    prng: np.random.Generator,
    *,
    seed: int,
    index: int,
    size: tuple[int, int],
    patient_id: int,
    image_id: int,
    cancer: bool,
    machine: Machine,
    side_view: tuple[str, str],
    transfer_syntax: str,
) -> PatientPlan:
    """One digitised film and its patient; a cancer is in the imaged breast."""
    density = str(prng.choice(DENSITIES, p=DENSITY_WEIGHTS))
    age = _random_age(prng)
    date = dt.date(1988, 1, 1) + dt.timedelta(days=int(prng.integers(0, 12 * 365)))
    time = _random_time(prng)
    study_uid = derive_uid(
        "mammonode-synth", f"style={FILM}", f"seed={seed}", f"size={size[0]}x{size[1]}", str(patient_id)
    )
    lat, view = side_view
    breasts = _plan_breasts(prng, density, False, {lat} if cancer else set(), machine.site_id)
    image_size = _film_size(prng, size, index)
    border = _random_border(prng, machine)  # drawn before the label, as always
    image = ImagePlan(
        image_id=image_id,
        laterality=lat,
        view=view,
        series_number=1,
        voi="none",
        secondary_capture=True,
        transfer_syntax=transfer_syntax,
        border=border,
        label=bool(prng.random() < machine.label_rate),
        label_corner=int(prng.integers(2)),
        tissue_seed=(seed, 12, index),
        detector_seed=(seed, 13, index),
        size=image_size,
        film=True,
        view_text=view_text(lat, view, index),
        laterality_keyword="Laterality" if index % 2 == 0 else "ImageLaterality",
    )
    return PatientPlan(
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


def _film_size(prng: np.random.Generator, size: tuple[int, int], index: int) -> tuple[int, int]:
    """The film's (rows, columns): ``size`` for the first image, jittered for the others; the
    width always odd, the rows odd for every other image."""
    if index == 0:
        rows, cols = size
    else:
        rows = round(size[0] * prng.uniform(*FILM_ROW_JITTER))
        cols = round(size[1] * prng.uniform(*FILM_COLUMN_JITTER))
        rows = rows | 1 if index % 2 == 0 else rows & ~1
    return (max(rows, MIN_SIZE), max(cols | 1, MIN_SIZE + 1))


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
