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
from training.datasets.rsna import LESION_COLUMNS, LESIONS_CSV, MASKS_DIR
from training.synth.dicom_writer import make_dicom, write_dicom
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
    transfer_syntaxes: set[str]
    n_cancer_breasts: int


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
    results = _render_patients(plans, out, lesion_contrast, workers)

    rows = [row for r in results for row in r.rows]
    _write_csv(out / CSV_NAME, RSNA_COLUMNS, rows)
    _write_csv(out / LESIONS_CSV, LESION_COLUMNS, [row for r in results for row in r.lesion_rows])
    used = tuple(sorted(set().union(*(r.transfer_syntaxes for r in results))))
    summary = SynthSummary(
        out=out,
        n_patients=patients,
        n_images=len(rows),
        n_cancer_breasts=sum(r.n_cancer_breasts for r in results),
        transfer_syntaxes=used,
    )
    _write_readme(out, summary, seed, cancer_rate, size, transfer_syntax, lesion_contrast, style)
    logger.info("wrote %d images, %d cancer breasts", summary.n_images, summary.n_cancer_breasts)
    return summary


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
    check_transfer_syntax(transfer_syntax)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output directory {out} exists and is not empty")
    return (int(size[0]), int(size[1])), transfer_syntax


def _render_patients(
    plans: list[PatientPlan], out: Path, lesion_contrast: float, workers: int
) -> list[_PatientOutput]:
    """Render every planned patient, in plan order; ``workers`` > 1 in a "spawn" process pool."""
    if workers == 1:
        return [_render_patient(plan, out, lesion_contrast) for plan in plans]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        n = len(plans)
        return list(pool.map(_render_patient, plans, [out] * n, [lesion_contrast] * n))


def _render_image(plan: PatientPlan, image: ImagePlan, lesion_contrast: float) -> RenderedView:
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
    )


def _render_patient(plan: PatientPlan, out: Path, lesion_contrast: float) -> _PatientOutput:
    """Render and write every image of one patient; return its csv rows."""
    rows: list[list[str]] = []
    lesion_rows: list[list[str]] = []
    used: set[str] = set()
    machine = plan.machine
    for image in plan.images:
        breast = plan.breast(image.laterality)
        view = _render_image(plan, image, lesion_contrast)
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
            breast_mask=view.breast_mask,
            film=image.film,
            view_text=image.view_text or None,
            laterality_keyword=image.laterality_keyword or None,
        )
        write_dicom(ds, out / IMAGES_DIR / str(plan.patient_id) / f"{image.image_id}.dcm")
        used.add(image.transfer_syntax)
        if breast.cancer:
            mask_path = out / MASKS_DIR / str(plan.patient_id) / f"{image.image_id}.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            if not cv2.imwrite(str(mask_path), view.lesion_mask):
                raise OSError(f"could not write {mask_path}")
            for box in view.lesion_boxes:
                lesion_rows.append(
                    [
                        str(plan.patient_id),
                        str(image.image_id),
                        image.laterality,
                        image.view,
                        box.kind,
                        *(str(v) for v in (box.y0, box.x0, box.y1, box.x1)),
                    ]
                )
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
        transfer_syntaxes=used,
        n_cancer_breasts=sum(b.cancer for b in plan.breasts),
    )


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
) -> None:
    mixed = " (one of the others per image)" if transfer_syntax == MIXED else ""
    style_arg = f" style={style}" if style != DIGITAL else ""
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
    (out / "README.txt").write_text(text, encoding="utf-8")
