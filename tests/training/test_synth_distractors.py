"""Distractors in the phantoms (issue 13): markers, clips, vessels, devices, labels, paddle edges
and film defects, their ground truth, their frequencies, and that they change nothing else.

Datasets are small (256x192 digital, ~330x213 film); physical sizes and intensities are checked
on single 1024x768 renders.
"""

from __future__ import annotations

import csv
import hashlib
import math
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from node.commands import app as cli
from training.datasets.distractors import (
    DISTRACTOR_COLUMNS,
    DISTRACTOR_KINDS,
    load_distractors,
    read_distractor_mask,
)
from training.synth import FILM, BreastAnatomy, Lesion, RenderedView, generate_dataset, render_view
from training.synth.dataset import DEFAULT_DISTRACTOR_RATE, render_planned_image
from training.synth.distractor_plan import DEFAULTS, plan_distractors
from training.synth.distractors import (
    DIGITAL_HEIGHT_MM,
    FILM_HEIGHT_MM,
    LESION_CLEARANCE_MM,
    DistractorItem,
    ImageDistractors,
)
from training.synth.noise import power_law_noise
from training.synth.plan import plan_dataset
from training.synth.texture import breast_betas

SEED = 20240613
DIGITAL = ((256, 192), 4)
FILM_ARGS = ((331, 213), 3)

# sha256[:16] of each image's decoded pixels and of lesions.csv, written by the generator
# before distractors existed (same seed and arguments): distractor_rate=0 must reproduce them.
GOLDEN = {
    "digital/19460/1108422355": "29006e8da35370c4",
    "digital/19460/1588733808": "05cfc86f09d35497",
    "digital/19460/355082608": "68de3539694d0e67",
    "digital/19460/361978504": "077aa6e7411e4daa",
    "digital/20783/100460495": "827b8fbbe4c2b050",
    "digital/20783/1214949570": "7d0a9cdcfdf91a79",
    "digital/20783/1551269066": "053692fbbf0c1747",
    "digital/20783/804823027": "50312bd0c4017574",
    "digital/21226/1322401002": "f3ec64b0f53ae8ba",
    "digital/21226/1324404982": "30959f162ca0fb99",
    "digital/21226/206411231": "f4be5e1e1d6ee26c",
    "digital/21226/78463161": "45b4dad4a8114e14",
    "digital/82201/1489004167": "49e340627f9ecb2b",
    "digital/82201/2056218021": "3619756590cb0385",
    "digital/82201/746437082": "4d668b6dc2aeb065",
    "digital/82201/870137809": "106dbbf668858246",
    "digital/lesions.csv": "1e1e308c4aa7d8eb",
    "film/13491/1412933588": "578f24a6e8282bba",
    "film/29569/652937284": "03c96c9997e319cb",
    "film/30030/1579438580": "8c942399fd10a2e9",
    "film/lesions.csv": "fc10b1bcd02407b4",
}
METAL_KINDS = ("bb_marker", "nipple_marker", "clip", "metal_label", "chest_device")


def _generate(root: Path, style: str, rate: float) -> Path:
    size, n = DIGITAL if style == "digital" else FILM_ARGS
    out = root / f"{style}-{rate}"
    generate_dataset(
        out, patients=n, seed=SEED, cancer_rate=0.5, size=size, style=style, distractor_rate=rate
    )
    return out


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {
        f"{p.parent.name}/{p.stem}": pydicom.dcmread(p).pixel_array
        for p in sorted((root / "train_images").rglob("*.dcm"))
    }


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module", params=["digital", FILM])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """The same seed without distractors and with many (rate 20), in one style."""
    root = tmp_path_factory.mktemp("distractors")
    return request.param, _generate(root, request.param, 0.0), _generate(root, request.param, 20.0)


def test_rate_zero_reproduces_the_images_from_before_distractors(pair: tuple[str, Path, Path]) -> None:
    style, none, _ = pair
    for key, pixels in _pixels(none).items():
        assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == GOLDEN[f"{style}/{key}"], key
    lesions = hashlib.sha256((none / "lesions.csv").read_bytes()).hexdigest()[:16]
    assert lesions == GOLDEN[f"{style}/lesions.csv"]
    assert not (none / "distractors.csv").exists() and not (none / "distractor_masks").exists()


def test_distractors_change_only_their_own_pixels(pair: tuple[str, Path, Path]) -> None:
    """Lesions, anatomy, labels and every pixel outside the distractor masks stay as at rate 0
    (film: 2 px more, the scan's interpolation)."""
    style, none, many = pair
    for name in ("train.csv", "lesions.csv"):
        assert (none / name).read_bytes() == (many / name).read_bytes()
    for path in sorted((none / "train_masks").rglob("*.png")):
        assert path.read_bytes() == (many / path.relative_to(none)).read_bytes()
    grow = 5 if style == FILM else 1
    before, after = _pixels(none), _pixels(many)
    changed_images = 0
    for key, pixels in before.items():
        patient, image = key.split("/")
        differs = pixels != after[key]
        if not differs.any():
            continue
        changed_images += 1
        labels = read_distractor_mask(many, int(patient), int(image)) > 0
        covered = cv2.dilate(labels.astype(np.uint8), np.ones((grow, grow), np.uint8)) > 0
        assert not (differs & ~covered).any(), f"{key}: pixels changed outside the distractor masks"
    assert changed_images == len(before), "rate 20 puts a distractor on every image"


def test_distractors_are_the_same_with_worker_processes(tmp_path: Path) -> None:
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"workers-{workers}"
        generate_dataset(out, patients=2, seed=SEED, size=(128, 96), distractor_rate=20.0, workers=workers)
        outs.append(out)
    assert (outs[0] / "distractors.csv").read_bytes() == (outs[1] / "distractors.csv").read_bytes()
    masks = sorted((outs[0] / "distractor_masks").rglob("*.png"))
    assert masks
    for path in masks:
        assert path.read_bytes() == (outs[1] / path.relative_to(outs[0])).read_bytes()


def test_distractors_csv_rows_match_their_masks(pair: tuple[str, Path, Path]) -> None:
    style, _, many = pair
    rows = _rows(many / "distractors.csv")
    assert rows and tuple(rows[0]) == DISTRACTOR_COLUMNS
    loaded = load_distractors(many)
    assert loaded is not None and sum(len(v) for v in loaded.values()) == len(rows)
    kinds = {r["kind"] for r in rows}
    assert kinds <= set(DISTRACTOR_KINDS)
    film_kinds = {"digitiser_border", "scratch"}
    assert film_kinds <= kinds if style == FILM else not kinds & film_kinds
    for row in rows:
        mask = read_distractor_mask(many, int(row["patient_id"]), int(row["image_id"]))
        ys, xs = np.nonzero(mask == int(row["mask_value"]))
        box = (int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1)
        assert box == tuple(int(row[c]) for c in ("y0", "x0", "y1", "x1")), row


def test_distractors_stay_clear_of_lesions(pair: tuple[str, Path, Path]) -> None:
    style, _, many = pair
    checked = 0
    for lesion_path in sorted((many / "train_masks").rglob("*.png")):
        patient, image = lesion_path.parent.name, lesion_path.stem
        labels = (
            read_distractor_mask(many, int(patient), int(image))
            if (many / "distractor_masks" / patient / f"{image}.png").exists()
            else None
        )
        lesion = np.asarray(cv2.imread(str(lesion_path), cv2.IMREAD_UNCHANGED)) > 0
        if labels is None or not lesion.any():
            continue
        distance = cv2.distanceTransform((~lesion).astype(np.uint8), cv2.DIST_L2, 5)
        rows = lesion.shape[0]
        mm = (FILM_HEIGHT_MM if style == FILM else DIGITAL_HEIGHT_MM) / rows
        slack = 3.0 if style == FILM else 1.0  # film masks are upscaled from half size
        assert distance[labels > 0].min() >= LESION_CLEARANCE_MM / mm - slack
        checked += 1
    assert checked > 0


def _render(
    kind: str, *, seed: int = 3, view: str = "CC", count: int = 1, port: bool = False
) -> RenderedView:
    spec = ImageDistractors((DistractorItem(kind, (seed, 1), count, port),), DIGITAL_HEIGHT_MM, "R")
    return render_view(
        np.random.default_rng(seed),
        laterality="R",
        view=view,
        size=(1024, 768),
        density="B",
        anatomy=BreastAnatomy(density="B"),
        distractors=spec,
    )


@pytest.mark.parametrize("kind", METAL_KINDS)
def test_metal_saturates_or_nearly(kind: str) -> None:
    view = _render(kind, view="MLO" if kind == "chest_device" else "CC", count=4 if kind == "clip" else 1)
    assert view.distractor_labels is not None and view.distractor_kinds == (kind,)
    inside = view.pixels[view.distractor_labels == 1]
    maxval = (1 << view.bits_stored) - 1
    assert inside.max() >= 0.93 * maxval, f"{kind}: brightest pixel {inside.max()} of {maxval}"


def test_bb_markers_are_1_5_to_4_mm_and_calcified_vessels_are_not_metal() -> None:
    mm = DIGITAL_HEIGHT_MM / 1024
    sizes = []
    for seed in range(12):
        view = _render("bb_marker", seed=seed)
        assert view.distractor_labels is not None
        ys, xs = np.nonzero(view.distractor_labels == 1)
        sizes.append(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
    # Solid BBs are 1.5-4 mm, mole rings 4-7 mm (+ their 0.3 mm wire); the mask reaches into
    # the blur, up to 2 px beyond each side.
    assert 1.5 / mm <= min(sizes) and max(sizes) <= 7.6 / mm + 5, [round(s * mm, 1) for s in sizes]
    vessel = _render("vessel_calcification", seed=5)
    assert vessel.distractor_labels is not None
    maxval = (1 << vessel.bits_stored) - 1
    assert vessel.pixels[vessel.distractor_labels == 1].max() < 0.97 * maxval


def test_a_distractor_never_lands_on_a_lesion() -> None:
    lesion = Lesion("mass", 0.5, 0.0, 0.0, 0.06, seed=4)
    placed = 0
    for seed in range(4):
        spec = ImageDistractors(
            tuple(
                DistractorItem(k, (seed, i), 3)
                for i, k in enumerate(("bb_marker", "vessel_calcification", "clip"))
            ),
            DIGITAL_HEIGHT_MM,
            "L",
        )
        view = render_view(
            np.random.default_rng(seed),
            laterality="L",
            view="CC",
            size=(512, 384),
            lesions=[lesion],
            distractors=spec,
        )
        assert view.lesion_mask.any() and view.distractor_labels is not None
        distance = cv2.distanceTransform((view.lesion_mask == 0).astype(np.uint8), cv2.DIST_L2, 5)
        labelled = view.distractor_labels > 0
        placed += len(view.distractor_kinds)
        if labelled.any():
            assert distance[labelled].min() >= LESION_CLEARANCE_MM / (DIGITAL_HEIGHT_MM / 512) - 1
    assert placed >= 8


def test_frequencies_follow_the_documented_defaults_and_grow_with_the_rate() -> None:
    plans = plan_dataset(patients=2000, seed=9, cancer_rate=0.3, size=(64, 48), transfer_syntax="explicit")
    counts: dict[str, int] = dict.fromkeys(DISTRACTOR_KINDS, 0)
    breasts = 0
    for plan in plans:
        low = plan_distractors(plan, seed=9, rate=1.0, film=False)
        high = plan_distractors(plan, seed=9, rate=2.0, film=False)
        assert plan_distractors(plan, seed=9, rate=0.0, film=False) == [
            ImageDistractors((), DIGITAL_HEIGHT_MM, image.laterality) for image in plan.images
        ]
        for a, b in zip(low, high, strict=True):
            assert {i.kind for i in a.items} <= {i.kind for i in b.items}, "a higher rate only adds"
        for lat in ("L", "R"):
            kinds = {
                i.kind
                for spec, image in zip(low, plan.images, strict=True)
                if image.laterality == lat
                for i in spec.items
            }
            if any(image.laterality == lat for image in plan.images):
                breasts += 1
                for kind in kinds:
                    counts[kind] += 1
    for kind in ("bb_marker", "nipple_marker", "scar_marker", "clip", "vessel_calcification"):
        expected = DEFAULTS[kind].rate
        sd = math.sqrt(expected * (1 - expected) / breasts)
        assert abs(counts[kind] / breasts - expected) < 4 * sd + 0.005, (kind, counts[kind] / breasts)
    assert counts["digitiser_border"] == counts["scratch"] == 0


def test_chest_devices_show_on_their_side_mostly_on_mlo() -> None:
    plans = plan_dataset(patients=400, seed=2, cancer_rate=0.3, size=(64, 48), transfer_syntax="explicit")
    seen = {"CC": 0, "MLO": 0}
    for plan in plans:
        specs = plan_distractors(plan, seed=2, rate=300.0, film=False)  # every patient has one
        sides = {
            image.laterality
            for spec, image in zip(specs, plan.images, strict=True)
            for i in spec.items
            if i.kind == "chest_device"
        }
        assert len(sides) <= 1
        for spec, image in zip(specs, plan.images, strict=True):
            seen[image.view] += any(i.kind == "chest_device" for i in spec.items)
    assert seen["MLO"] > 5 * seen["CC"] > 0


def test_synth_cli_writes_distractors_by_default_and_refuses_a_negative_rate(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["synth", str(out), "--patients", "3", "--size", "256x192", "--seed", "4"]
    result = CliRunner().invoke(cli.app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "distractors.csv").is_file() and "distractor_rate=1.0" in (out / "README.txt").read_text()
    more = CliRunner().invoke(
        cli.app, [*args[:1], str(tmp_path / "more"), *args[2:], "--distractor-rate", "10"]
    )
    assert more.exit_code == 0, more.output
    assert _rows(tmp_path / "more" / "distractors.csv")
    bad = CliRunner().invoke(cli.app, ["synth", str(tmp_path / "bad"), "--distractor-rate", "-1"])
    assert bad.exit_code != 0 and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_texture_beta_stays_in_the_band_of_real_mammograms_with_distractors() -> None:
    """Issue 13 point 4: median β 2.2-3.3 at 2048 rows with 128-px ROIs, at the default rate.

    The ROIs that count avoid the distractor masks: β describes the tissue texture, and the
    published band was measured on parenchyma. The median over every ROI, distractors included,
    must stay in the band too, so distractors do not make the images as a whole unlike real ones.
    """
    seed, size = 11, (2048, 1536)
    plans = plan_dataset(patients=2, seed=seed, cancer_rate=0.0, size=size, transfer_syntax="explicit")
    mm = DIGITAL_HEIGHT_MM / size[0]
    tissue: list[float] = []
    everywhere: list[float] = []
    kinds: list[str] = []
    for plan in plans:
        specs = plan_distractors(plan, seed=seed, rate=DEFAULT_DISTRACTOR_RATE, film=False)
        for image, spec in zip(plan.images, specs, strict=True):
            view = render_planned_image(plan, image, 1.0, spec)
            labels = view.distractor_labels
            tissue += breast_betas(
                view.pixels, view.breast_mask, mm, exclude=None if labels is None else labels > 0
            )
            everywhere += breast_betas(view.pixels, view.breast_mask, mm)
            kinds += view.distractor_kinds
    assert kinds and len(everywhere) > len(tissue) > 200, "some ROIs must hold a distractor"
    assert 2.2 <= float(np.median(tissue)) <= 3.3, np.median(tissue)
    assert 2.2 <= float(np.median(everywhere)) <= 3.3, np.median(everywhere)


def test_beta_of_synthetic_power_law_noise_is_recovered() -> None:
    """The measurement itself: a field made with a known exponent gives it back."""
    for beta in (2.0, 3.0):
        field = power_law_noise(np.random.default_rng(1), (512, 512), beta)
        betas = breast_betas(field, np.ones(field.shape, dtype=bool), DIGITAL_HEIGHT_MM / 2048)
        assert abs(float(np.median(betas)) - beta) < 0.25, (beta, np.median(betas))


def test_the_voi_window_ignores_the_metal(pair: tuple[str, Path, Path]) -> None:
    """A unit's automatic window leaves metal out: a saturated BB does not darken the breast."""
    _, none, many = pair
    compared = 0
    for path in sorted((none / "train_images").rglob("*.dcm")):
        before, after = pydicom.dcmread(path), pydicom.dcmread(many / path.relative_to(none))
        if "WindowWidth" not in before:
            continue
        widths = [float(np.ravel(ds.WindowWidth)[0]) for ds in (before, after)]
        assert widths[1] == pytest.approx(widths[0], rel=0.05), path.name
        compared += 1
    assert compared > 0 or (none / "README.txt").read_text().count("style=film")
