"""Write a synthetic screening dataset in the RSNA Screening Mammography (Kaggle 2023) layout.

The bundled demo model is trained on these phantoms because no real data may ship with the
product; writing them in the exact RSNA layout means the same loader, preprocessing and training
loop run on a real RSNA download. Ground truth RSNA lacks (lesion boxes and masks) goes beside it.
"""

from __future__ import annotations

import csv
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inference.rsna_layout import CSV_NAME, IMAGES_DIR, RSNA_COLUMNS
from training.datasets.distractors import DISTRACTOR_COLUMNS, DISTRACTOR_MASKS_DIR, DISTRACTORS_CSV
from training.datasets.rsna import LESION_COLUMNS, LESIONS_CSV, MASKS_DIR
from training.synth.dicom_writer import make_dicom, write_dicom
from training.synth.distractor_plan import plan_distractors
from training.synth.distractors import ImageDistractors, label_boxes
from training.synth.encoding import MIXED, check_transfer_syntax
from training.synth.film import render_film_view
from training.synth.phantom import MIN_SIZE, RenderedView, render_view
from training.synth.plan import DIGITAL, FILM, STYLES, ImagePlan, PatientPlan, plan_dataset

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
DEFAULT_SIZES: dict[str, tuple[int, int]] = {DIGITAL: (1024, 768), FILM: (4500, 2700)}
"""Nominal (rows, columns) of each style when no size is given."""
DEFAULT_TRANSFER_SYNTAXES: dict[str, str] = {DIGITAL: "explicit", FILM: "rle"}
"""Transfer syntax of each style when none is given: digitised-film archives are RLE."""
DEFAULT_DISTRACTOR_RATE = 1.0
"""The ``mammonode synth`` default: the documented frequencies of
:mod:`training.synth.distractor_plan`. :func:`generate_dataset` itself defaults to 0 (none), so
callers that predate distractors get the same images."""


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_dataset` wrote."""

    out: Path
    n_patients: int
    n_images: int
    n_cancer_breasts: int
    transfer_syntaxes: tuple[str, ...]  # names actually used, sorted


@dataclass(frozen=True)
class _PatientOutput:
    rows: list[list[str]]
    lesion_rows: list[list[str]]
    distractor_rows: list[list[str]]
    transfer_syntaxes: set[str]
    n_cancer_breasts: int


@dataclass(frozen=True)
class _RenderOptions:
    """What every patient of a run is rendered with (picklable for the process pool)."""

    seed: int
    lesion_contrast: float
    distractor_rate: float
    film: bool


def generate_dataset(
    out: Path,
    *,
    patients: int,
    seed: int,
    cancer_rate: float = 0.3,
    size: tuple[int, int] | None = None,
    transfer_syntax: str | None = None,
    workers: int = 1,
    lesion_contrast: float = 1.0,
    style: str = DIGITAL,
    distractor_rate: float = 0.0,
) -> SynthSummary:
    """Generate ``patients`` synthetic 4-view screening exams under ``out`` (RSNA layout).

    ``cancer_rate`` is the fraction of patients with cancer (in one breast, rarely both);
    ``size`` is (rows, columns), by default :data:`DEFAULT_SIZES` of the style;
    ``transfer_syntax`` a key of TRANSFER_SYNTAXES or ``mixed`` (by default
    :data:`DEFAULT_TRANSFER_SYNTAXES` of the style);
    ``lesion_contrast`` scales every lesion's amplitude (1.0 = clearly visible). The output is
    byte-for-byte identical for the same arguments, whatever ``workers``. ``out`` must not exist
    or be empty, so a stale file from another run can never mix in.

    ``style`` ``film`` writes digitised screen-film mammograms shaped like CBIS-DDSM instead of
    digital exams: one image per patient and study, Secondary Capture class with Modality MG,
    16-bit MONOCHROME2 without VOI or ViewPosition (the view only in SeriesDescription, e.g.
    ``LEFT_CC``), each image its own size around ``size`` with an odd width; ``mixed`` then
    alternates RLE and JPEG 2000. ``patients`` is then the number of images.

    ``distractor_rate`` multiplies the documented frequencies of skin markers, clips, calcified
    vessels, devices, lead letters, paddle edges and film defects
    (:mod:`training.synth.distractor_plan`; 1.0 = those frequencies, 0 = none, which leaves every
    image exactly as without them). Their boxes go to ``distractors.csv`` and their pixels to
    ``distractor_masks/`` (written whenever the rate is above 0).

    ``workers`` > 1 uses a "spawn" process pool (safe next to torch and OpenCV threads), so a
    calling script needs the usual ``if __name__ == "__main__":`` guard.
    """
    out = Path(out)
    size, transfer_syntax = _checked_arguments(
        out,
        patients=patients,
        cancer_rate=cancer_rate,
        size=size,
        transfer_syntax=transfer_syntax,
        workers=workers,
        lesion_contrast=lesion_contrast,
        style=style,
        distractor_rate=distractor_rate,
    )
    plans = plan_dataset(
        patients=patients,
        seed=seed,
        cancer_rate=cancer_rate,
        size=size,
        transfer_syntax=transfer_syntax,
        style=style,
    )
    out.mkdir(parents=True, exist_ok=True)
    logger.info("generating %d synthetic %s patients into %s (%d workers)", patients, style, out, workers)
    options = _RenderOptions(seed, lesion_contrast, distractor_rate, style == FILM)
    results = _render_patients(plans, out, options, workers)

    rows = _write_tables(out, results, distractor_rate > 0)
    used = tuple(sorted(set().union(*(r.transfer_syntaxes for r in results))))
    summary = SynthSummary(
        out=out,
        n_patients=patients,
        n_images=len(rows),
        n_cancer_breasts=sum(r.n_cancer_breasts for r in results),
        transfer_syntaxes=used,
    )
    _write_readme(
        out, summary, seed, cancer_rate, size, transfer_syntax, lesion_contrast, style, distractor_rate
    )
    logger.info("wrote %d images, %d cancer breasts", summary.n_images, summary.n_cancer_breasts)
    return summary


def _write_tables(out: Path, results: list[_PatientOutput], distractors: bool) -> list[list[str]]:
    """Write train.csv, lesions.csv and (``distractors``) distractors.csv; returns train.csv's rows."""
    rows = [row for r in results for row in r.rows]
    _write_csv(out / CSV_NAME, RSNA_COLUMNS, rows)
    _write_csv(out / LESIONS_CSV, LESION_COLUMNS, [row for r in results for row in r.lesion_rows])
    if distractors:
        _write_csv(
            out / DISTRACTORS_CSV, DISTRACTOR_COLUMNS, [row for r in results for row in r.distractor_rows]
        )
    return rows


def _checked_arguments(
    out: Path,
    *,
    patients: int,
    cancer_rate: float,
    size: tuple[int, int] | None,
    transfer_syntax: str | None,
    workers: int,
    lesion_contrast: float,
    style: str,
    distractor_rate: float = 0.0,
) -> tuple[tuple[int, int], str]:
    """Refuse bad arguments (ValueError) before anything is written; returns the size and
    transfer syntax, the style's defaults where none was given."""
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if not 0.0 <= cancer_rate <= 1.0:
        raise ValueError(f"cancer_rate must be in [0, 1], got {cancer_rate}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if size is None:
        size = DEFAULT_SIZES[style]
    if transfer_syntax is None:
        transfer_syntax = DEFAULT_TRANSFER_SYNTAXES[style]
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ValueError(f"size must be (rows, columns) with both >= {MIN_SIZE}, got {size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if lesion_contrast < 0:
        raise ValueError(f"lesion_contrast must be >= 0, got {lesion_contrast}")
    if distractor_rate < 0:
        raise ValueError(f"distractor_rate must be >= 0, got {distractor_rate}")
    check_transfer_syntax(transfer_syntax)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} exists and is not empty")
    return (int(size[0]), int(size[1])), transfer_syntax


def _render_patients(
    plans: list[PatientPlan], out: Path, options: _RenderOptions, workers: int
) -> list[_PatientOutput]:
    """Render every planned patient, in plan order; ``workers`` > 1 in a "spawn" process pool."""
    if workers == 1:
        return [_render_patient(plan, out, options) for plan in plans]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        n = len(plans)
        return list(pool.map(_render_patient, plans, [out] * n, [options] * n))


def render_planned_image(
    plan: PatientPlan, image: ImagePlan, lesion_contrast: float, distractors: ImageDistractors | None
) -> RenderedView:
    """The pixels and ground truth of one planned image, in its style."""
    breast = plan.breast(image.laterality)
    render = render_film_view if image.film else render_view
    return render(
        np.random.default_rng(list(image.tissue_seed)),
        laterality=image.laterality,
        view=image.view,
        size=image.size,
        density=plan.density,
        lesions=breast.lesions,
        anatomy=breast.anatomy,
        bits_stored=plan.machine.bits_stored,
        lesion_contrast=lesion_contrast,
        label=f"{image.laterality} {image.view}" if image.label else None,
        label_corner=image.label_corner,
        border=image.border,
        detector_rng=np.random.default_rng(list(image.detector_seed)),
        distractors=distractors,
    )


def _render_patient(plan: PatientPlan, out: Path, options: _RenderOptions) -> _PatientOutput:
    """Render and write every image of one patient; return its csv rows."""
    rows: list[list[str]] = []
    lesion_rows: list[list[str]] = []
    distractor_rows: list[list[str]] = []
    used: set[str] = set()
    machine = plan.machine
    distractors: list[ImageDistractors | None] = [None] * len(plan.images)
    if options.distractor_rate > 0:
        distractors = list(
            plan_distractors(plan, seed=options.seed, rate=options.distractor_rate, film=options.film)
        )
    for image, image_distractors in zip(plan.images, distractors, strict=True):
        breast = plan.breast(image.laterality)
        view = render_planned_image(plan, image, options.lesion_contrast, image_distractors)
        distractor_rows += _write_distractors(out, plan, image, view)
        ds = make_dicom(
            view.pixels,
            patient_id=str(plan.patient_id),
            study_uid=plan.study_uid,
            laterality=image.laterality,
            view=image.view,
            bits_stored=view.bits_stored,
            photometric=machine.photometric,
            voi=image.voi,
            transfer_syntax=image.transfer_syntax,
            secondary_capture=image.secondary_capture,
            sop_instance_uid=None,
            series_number=image.series_number,
            instance_number=image.series_number,
            patient_age=plan.age,
            study_date=plan.study_date,
            study_time=plan.study_time,
            burned_in_annotation=view.label_box is not None,
            implant=plan.implant,
            model_name=machine.model_name,
            breast_mask=_window_mask(view),
            film=image.film,
            view_text=image.view_text or None,
            laterality_keyword=image.laterality_keyword or None,
        )
        write_dicom(ds, out / IMAGES_DIR / str(plan.patient_id) / f"{image.image_id}.dcm")
        used.add(image.transfer_syntax)
        if breast.cancer:
            lesion_rows += _write_lesions(out, plan, image, view)
        rows.append(
            [
                str(machine.site_id),
                str(plan.patient_id),
                str(image.image_id),
                image.laterality,
                image.view,
                str(plan.age),
                str(int(breast.cancer)),
                str(int(breast.biopsy)),
                str(int(breast.invasive)),
                "" if breast.birads is None else str(breast.birads),
                str(int(plan.implant)),
                plan.density if machine.site_id == 1 else "",
                str(machine.machine_id),
                str(breast.difficult_negative),
            ]
        )
    return _PatientOutput(
        rows=rows,
        lesion_rows=lesion_rows,
        distractor_rows=distractor_rows,
        transfer_syntaxes=used,
        n_cancer_breasts=sum(b.cancer for b in plan.breasts),
    )


def _write_lesions(out: Path, plan: PatientPlan, image: ImagePlan, view: RenderedView) -> list[list[str]]:
    """Write the image's lesion mask PNG and return its lesions.csv rows."""
    mask_path = out / MASKS_DIR / str(plan.patient_id) / f"{image.image_id}.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(mask_path), view.lesion_mask):
        raise OSError(f"could not write {mask_path}")
    ids = [str(plan.patient_id), str(image.image_id), image.laterality, image.view]
    return [
        [*ids, box.kind, *(str(v) for v in (box.y0, box.x0, box.y1, box.x1))] for box in view.lesion_boxes
    ]


def _window_mask(view: RenderedView) -> np.ndarray:
    """The pixels the VOI window is computed from: the breast without its distractors, as a
    unit leaves metal out of its automatic window."""
    if view.distractor_labels is None:
        return view.breast_mask
    return view.breast_mask & (view.distractor_labels == 0)


def _write_distractors(out: Path, plan: PatientPlan, image: ImagePlan, view: RenderedView) -> list[list[str]]:
    """Write the image's distractor mask PNG (if it has any) and return its distractors.csv rows."""
    if view.distractor_labels is None:
        return []
    boxes = label_boxes(view.distractor_labels, view.distractor_kinds)
    if not boxes:
        return []
    path = out / DISTRACTOR_MASKS_DIR / str(plan.patient_id) / f"{image.image_id}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), view.distractor_labels):
        raise OSError(f"could not write {path}")
    ids = [str(plan.patient_id), str(image.image_id), image.laterality, image.view]
    return [[*ids, kind, *(str(v) for v in (y0, x0, y1, x1, value))] for kind, y0, x0, y1, x1, value in boxes]


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _write_readme(
    out: Path,
    summary: SynthSummary,
    seed: int,
    cancer_rate: float,
    size: tuple[int, int],
    transfer_syntax: str,
    lesion_contrast: float,
    style: str,
    distractor_rate: float = 0.0,
) -> None:
    mixed = " (one of the others per image)" if transfer_syntax == MIXED else ""
    style_arg = f" style={style}" if style != DIGITAL else ""
    if distractor_rate > 0:
        style_arg += f" distractor_rate={distractor_rate}"
    text = f"""MammoNode synthetic screening mammography phantoms
==================================================

NOT PATIENT DATA. Every image is a computer-generated phantom made by MammoNode's generator
(training.synth, version {GENERATOR_VERSION}); it exists to train and test the demo model and the
DICOM node without shipping real mammograms. Models trained on it are research demos only.

Arguments: patients={summary.n_patients} seed={seed} cancer_rate={cancer_rate} size={size[0]}x{size[1]}
transfer_syntax={transfer_syntax}{mixed} lesion_contrast={lesion_contrast}{style_arg}
Result: {summary.n_images} images, {summary.n_cancer_breasts} cancer breasts,
transfer syntaxes used: {", ".join(summary.transfer_syntaxes)}.
The same arguments always give byte-identical files.

Layout (RSNA Screening Mammography, Kaggle 2023):
  train.csv                                 one row per image, the 14 RSNA columns; cancer is
                                            per breast; site 2 rows leave BIRADS and density
                                            empty, as in RSNA; difficult_negative_case=True
                                            marks breasts with a benign circumscribed mass
  train_images/<patient_id>/<image_id>.dcm  Digital Mammography X-Ray (For Presentation), or
                                            Secondary Capture for the images without a VOI
Beyond RSNA:
  lesions.csv       patient_id,image_id,laterality,view,kind,y0,x0,y1,x1: one box per malignant
                    lesion per image, kind mass|calcification, original pixel coordinates,
                    half-open (y1, x1 exclusive)
  train_masks/<patient_id>/<image_id>.png   uint8 0/255 lesion mask, image size, cancer
                    breasts only (benign masses are not in it)

Orientation: right breasts have the chest wall on the left of the image, left breasts on the
right. Some images carry burned-in labels or a bright collimator strip away from the breast.
"""
    if style == FILM:
        text += """
Style film (digitised screen-film, shaped like CBIS-DDSM): every image is its own patient and
study, a Secondary Capture (Conversion Type DF) with Modality MG, 16-bit MONOCHROME2, no VOI
and no ViewPosition; the view is only in SeriesDescription (LEFT_CC, L CC, L-MLO, ...), the
side in Laterality or ImageLaterality. Sizes vary around the nominal size, widths are odd;
"mixed" alternates RLE and JPEG 2000.
"""
    if distractor_rate > 0:
        text += DISTRACTOR_README
    (out / "README.txt").write_text(text, encoding="utf-8")


DISTRACTOR_README = """
Distractors (bright things that are not cancer), drawn at distractor_rate times the default
frequencies of training.synth.distractor_plan (its docstring names the published sources and
the assumptions):
  distractors.csv   patient_id,image_id,laterality,view,kind,y0,x0,y1,x1,mask_value: one row per
                    distractor per image; kind bb_marker|nipple_marker|scar_marker|clip|
                    vessel_calcification|chest_device|metal_label|paddle_edge|digitiser_border|
                    scratch; box half-open in original pixels, like lesions.csv
  distractor_masks/<patient_id>/<image_id>.png   uint8, image size: the pixels of the row whose
                    mask_value they hold (0 = none); only images with distractors have one.
                    Boxes alone are too coarse for a vessel or a paddle edge across the image,
                    so the evaluation's "CAM peak on a distractor" uses these masks.
Sizes are physical (pixel size = ImagerPixelSpacing; film: a 240 mm film height); metal
saturates the detector or nearly. No distractor lies within 20 mm of a malignant lesion, and
distractors do not overlap each other. Breast-level kinds show in every view of the breast,
placed per view. Markers, clips and vessels are not in lesions.csv or train_masks/.
"""
