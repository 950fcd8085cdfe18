"""The synthetic screening-study generator: layout, determinism, DICOM validity, ground truth.

Datasets are tiny (256x192, a few patients) and written to disk and read back, as the training
loop and the node will read them.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array
from typer.testing import CliRunner

from inference.dicom_header import is_mammogram, read_dataset, read_meta
from inference.dicom_pixels import decode_pixels
from inference.uids import derive_uid
from node.commands import app as cli
from training.datasets.rsna import LESION_COLUMNS, RSNA_COLUMNS
from training.synth import (
    DEFAULT_SIZES,
    FILM,
    MIXED,
    TRANSFER_SYNTAXES,
    VOI_STYLES,
    BreastAnatomy,
    Lesion,
    generate_dataset,
    make_dicom,
    render_view,
    synth_breast,
    write_dicom,
)
from training.synth.anatomy import view_geometry
from training.synth.encoding import LOSSY_SYNTAXES, MIXED_SYNTAXES
from training.synth.plan import plan_dataset

SIZE = (256, 192)
SEED = 20240
SC_UID = "1.2.840.10008.5.1.4.1.1.7"
MG_UID = "1.2.840.10008.5.1.4.1.1.1.2"
DECODERS = {
    "jpeg2000": "pylibjpeg",
    "jpegls": "pyjpegls",
    "jpeg-lossless": "pylibjpeg",
    "rle": "pylibjpeg",
    "htj2k": "pylibjpeg",
    "htj2k-rpcl": "pylibjpeg",
}
LOSSLESS_SYNTAXES = sorted(set(TRANSFER_SYNTAXES) - LOSSY_SYNTAXES)
MIXED_UIDS = {TRANSFER_SYNTAXES[name] for name in MIXED_SYNTAXES}


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert mask is not None, f"cannot read {path}"
    return np.asarray(mask)


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels in the MONOCHROME2 sense (dense = bright), as the generator rendered them."""
    arr = ds.pixel_array.astype(np.int64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = (1 << int(ds.BitsStored)) - 1 - arr
    return arr


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five patients, every transfer syntax ``mixed`` chooses, 60% cancer patients."""
    out = tmp_path_factory.mktemp("synth") / "mixed"
    summary = generate_dataset(out, patients=5, seed=SEED, cancer_rate=0.6, size=SIZE, transfer_syntax=MIXED)
    assert summary.n_patients == 5
    assert summary.transfer_syntaxes == tuple(sorted(MIXED_SYNTAXES))
    return out


@pytest.fixture(scope="module")
def rows(mixed: Path) -> list[dict[str, str]]:
    return _read_csv(mixed / "train.csv")


@pytest.fixture(scope="module")
def datasets(mixed: Path, rows: list[dict[str, str]]) -> dict[str, pydicom.Dataset]:
    return {
        r["image_id"]: pydicom.dcmread(mixed / "train_images" / r["patient_id"] / f"{r['image_id']}.dcm")
        for r in rows
    }


# --- layout ---------------------------------------------------------------------------------


def test_layout_is_rsna(mixed: Path, rows: list[dict[str, str]]) -> None:
    with (mixed / "train.csv").open() as fh:
        assert fh.readline().strip() == ",".join(RSNA_COLUMNS)
    with (mixed / "lesions.csv").open() as fh:
        assert fh.readline().strip() == ",".join(LESION_COLUMNS)
    assert len({r["patient_id"] for r in rows}) == 5
    assert len({r["image_id"] for r in rows}) == len(rows)
    for r in rows:
        assert (mixed / "train_images" / r["patient_id"] / f"{r['image_id']}.dcm").is_file()
        assert r["laterality"] in ("L", "R") and r["view"] in ("CC", "MLO")
        assert r["cancer"] in ("0", "1") and r["difficult_negative_case"] in ("True", "False")
        assert r["density"] in ("A", "B", "C", "D", "")
        assert r["BIRADS"] in ("0", "1", "2", "")
        assert r["patient_id"].isdigit() and r["image_id"].isdigit()
        if r["site_id"] == "2":  # RSNA site 2 has neither BIRADS nor density
            assert r["BIRADS"] == "" and r["density"] == ""
    dicoms = sorted((mixed / "train_images").rglob("*.dcm"))
    assert len(dicoms) == len(rows)
    readme = (mixed / "README.txt").read_text()
    assert "NOT PATIENT DATA" in readme and f"seed={SEED}" in readme


def test_each_patient_has_a_four_view_exam_with_one_label_per_breast(rows: list[dict[str, str]]) -> None:
    by_patient: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], []).append(r)
    for images in by_patient.values():
        views = {(r["laterality"], r["view"]) for r in images}
        assert len(views) >= 3 and {r["laterality"] for r in images} == {"L", "R"}
        for side in ("L", "R"):
            labels = {(r["cancer"], r["biopsy"], r["invasive"]) for r in images if r["laterality"] == side}
            assert len(labels) == 1
    cancer_breasts = {(r["patient_id"], r["laterality"]) for r in rows if r["cancer"] == "1"}
    assert len(cancer_breasts) >= 3  # round(0.6 * 5) patients
    for r in rows:
        if r["cancer"] == "1":
            assert r["biopsy"] == "1"
        else:
            assert r["invasive"] == "0"


def test_every_dicom_matches_its_csv_row(
    rows: list[dict[str, str]], datasets: dict[str, pydicom.Dataset]
) -> None:
    for r in rows:
        ds = datasets[r["image_id"]]
        assert ds.PatientID == r["patient_id"]
        assert ds.Modality == "MG" and ds.PatientSex == "F"
        assert ds.Manufacturer == "MammoNode synthetic phantom"
        assert (ds.Rows, ds.Columns) == SIZE
        assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 14) and ds.HighBit == ds.BitsStored - 1
        assert ds.PixelRepresentation == 0
        if ds.SOPClassUID == SC_UID:
            assert "ViewPosition" not in ds and "ImageLaterality" not in ds
            assert ds.Laterality == r["laterality"]
            assert ds.SeriesDescription == f"{r['laterality']} {r['view']}"
        else:
            assert ds.SOPClassUID == MG_UID
            assert ds.PresentationIntentType == "FOR PRESENTATION"
            assert ds.ImageLaterality == r["laterality"] and ds.ViewPosition == r["view"]
            assert ds.ViewCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_uids_are_derived_and_unique(datasets: dict[str, pydicom.Dataset]) -> None:
    sops = [ds.SOPInstanceUID for ds in datasets.values()]
    assert len(set(sops)) == len(sops)
    assert all(uid.startswith("2.25.") for uid in sops)
    studies = {ds.PatientID: ds.StudyInstanceUID for ds in datasets.values()}
    assert len(set(studies.values())) == len(studies)


# --- determinism ----------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_with_workers(mixed: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(
        again, patients=5, seed=SEED, cancer_rate=0.6, size=SIZE, transfer_syntax=MIXED, workers=2
    )
    first, second = _files(mixed), _files(again)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", patients=1, seed=1, size=SIZE)
    b = generate_dataset(tmp_path / "b", patients=1, seed=2, size=SIZE)
    fa, fb = _files(a.out), _files(b.out)
    assert fa["train.csv"] != fb["train.csv"]
    pixels_a = [pydicom.dcmread(p).PixelData for p in sorted((a.out / "train_images").rglob("*.dcm"))]
    pixels_b = [pydicom.dcmread(p).PixelData for p in sorted((b.out / "train_images").rglob("*.dcm"))]
    assert not set(pixels_a) & set(pixels_b)


def test_generate_refuses_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "old.txt").write_text("stale")
    with pytest.raises(ValueError, match="not empty"):
        generate_dataset(tmp_path / "busy", patients=1, seed=0, size=SIZE)
    with pytest.raises(ValueError, match="transfer syntax"):
        generate_dataset(tmp_path / "x", patients=1, seed=0, size=SIZE, transfer_syntax="jpeg-xl")
    with pytest.raises(ValueError, match="cancer_rate"):
        generate_dataset(tmp_path / "y", patients=1, seed=0, cancer_rate=1.5, size=SIZE)
    with pytest.raises(ValueError, match="size"):
        generate_dataset(tmp_path / "z", patients=1, seed=0, size=(16, 16))


# --- encodings ------------------------------------------------------------------------------


def test_dataset_files_decode_to_the_pixels_their_syntax_claims(datasets: dict[str, pydicom.Dataset]) -> None:
    seen = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets.values()}
    assert seen == MIXED_UIDS
    for ds in datasets.values():
        arr = ds.pixel_array
        assert arr.dtype == np.uint16 and arr.shape == SIZE
        assert int(arr.max()) < 1 << int(ds.BitsStored)


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    view = render_view(
        np.random.default_rng(7),
        laterality="L",
        view="MLO",
        size=SIZE,
        density="C",
        bits_stored=14,
        lesions=[Lesion("mass", 0.4, 0.0, 0.0, 0.07, seed=3)],
    )
    return view.pixels


@pytest.mark.parametrize("name", LOSSLESS_SYNTAXES)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_each_transfer_syntax_round_trips_bit_exactly(
    phantom: np.ndarray, name: str, photometric: str, tmp_path: Path
) -> None:
    ds = make_dicom(
        phantom,
        patient_id="4242",
        study_uid=derive_uid("test", "study"),
        laterality="L",
        view="MLO",
        bits_stored=14,
        photometric=photometric,
        transfer_syntax=name,
    )
    path = tmp_path / f"{name}.dcm"
    write_dicom(ds, path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]
    expected = (16383 - phantom) if photometric == "MONOCHROME1" else phantom
    np.testing.assert_array_equal(back.pixel_array, expected)
    if name in DECODERS:  # and with the decoder the serving side uses, not only the default
        np.testing.assert_array_equal(pixel_array(path, decoding_plugin=DECODERS[name]), expected)
    assert back.SOPInstanceUID == ds.SOPInstanceUID  # compression must not mint a new UID


@pytest.mark.dcmtk
def test_jpeg_lossless_decodes_bit_exactly_with_dcmtk(phantom: np.ndarray, tmp_path: Path) -> None:
    if shutil.which("dcmdjpeg") is None:
        pytest.skip("dcmdjpeg not installed")
    ds = make_dicom(
        phantom,
        patient_id="4242",
        study_uid=derive_uid("test", "study"),
        laterality="L",
        view="MLO",
        bits_stored=14,
        transfer_syntax="jpeg-lossless",
    )
    src, dst = tmp_path / "jpegll.dcm", tmp_path / "raw.dcm"
    write_dicom(ds, src)
    subprocess.run(["dcmdjpeg", str(src), str(dst)], check=True, capture_output=True)
    back = pydicom.dcmread(dst)
    assert back.file_meta.TransferSyntaxUID.is_compressed is False
    np.testing.assert_array_equal(back.pixel_array, phantom)


@pytest.mark.dcmtk
def test_dciodvfy_finds_no_errors(mixed: Path, datasets: dict[str, pydicom.Dataset], tmp_path: Path) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed")
    by_kind: dict[tuple[str, str], Path] = {}
    for path in sorted((mixed / "train_images").rglob("*.dcm")):
        ds = datasets[path.stem]
        by_kind.setdefault((str(ds.file_meta.TransferSyntaxUID), str(ds.SOPClassUID)), path)
    assert {ts for ts, _ in by_kind} == MIXED_UIDS
    assert {sop for _, sop in by_kind} == {MG_UID, SC_UID}
    for path in by_kind.values():
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


# --- variants -------------------------------------------------------------------------------


def test_views_photometrics_and_voi_variants_are_all_present(datasets: dict[str, pydicom.Dataset]) -> None:
    found: set[str] = set()
    photometrics = set()
    for ds in datasets.values():
        photometrics.add(ds.PhotometricInterpretation)
        if "VOILUTSequence" in ds:
            item = ds.VOILUTSequence[0]
            assert len(item.LUTData) // 2 == item.LUTDescriptor[0] or item.LUTDescriptor[0] == 0
            found.add("lut")
        elif "WindowCenter" in ds:
            multi = isinstance(ds.WindowCenter, pydicom.multival.MultiValue)
            found.add("multi" if multi else ds.VOILUTFunction.lower())
        else:
            found.add("none")
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}
    assert found == set(VOI_STYLES)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_windows_cover_the_breast_and_ignore_the_collimator_strip(photometric: str) -> None:
    """A window that clips dense tissue hides lesions; one stretched to the strip flattens it."""
    view = render_view(
        np.random.default_rng(8),
        laterality="R",
        view="CC",
        size=(512, 384),
        density="D",
        bits_stored=12,
        border="top",
        lesions=[Lesion("mass", 0.4, 0.0, 0.0, 0.06, seed=2)],
    )
    assert view.border_box is not None
    ds = make_dicom(
        view.pixels,
        patient_id="5",
        study_uid=derive_uid("window"),
        laterality="R",
        view="CC",
        bits_stored=12,
        photometric=photometric,
        voi="linear",
        breast_mask=view.breast_mask,
    )
    stored = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    lo, hi = center - width / 2, center + width / 2
    breast = stored[view.breast_mask]
    assert np.mean((breast >= lo) & (breast <= hi)) > 0.99
    lesion = stored[view.lesion_mask > 0]
    assert np.mean((lesion >= lo) & (lesion <= hi)) > 0.99
    y0, x0, y1, x1 = view.border_box
    strip = stored[y0:y1, x0:x1]
    assert np.mean((strip >= lo) & (strip <= hi)) < 0.05
    assert width < 1.3 * (breast.max() - breast.min())


def test_background_is_dark_noisy_and_inverted_for_monochrome1(datasets: dict[str, pydicom.Dataset]) -> None:
    for ds in datasets.values():
        maxval = (1 << int(ds.BitsStored)) - 1
        display = _display(ds)
        background = display[display < 0.05 * maxval]
        assert background.size > 0.1 * display.size
        assert background.std() > 0  # detector noise, not a flat zero
        assert np.mean(background == 0) < 0.5
        # The background (a large part of every image) sits at the dark end of the display:
        # high stored values for MONOCHROME1, low ones for MONOCHROME2.
        if ds.PhotometricInterpretation == "MONOCHROME1":
            assert np.percentile(ds.pixel_array, 95) > 0.95 * maxval
        else:
            assert np.percentile(ds.pixel_array, 5) < 0.05 * maxval


def test_chest_wall_is_left_for_right_breasts(
    rows: list[dict[str, str]], datasets: dict[str, pydicom.Dataset]
) -> None:
    for r in rows:
        display = _display(datasets[r["image_id"]]).astype(np.float64)
        half = display.shape[1] // 2
        left, right = display[:, :half].sum(), display[:, half:].sum()
        assert (left > right) == (r["laterality"] == "R")


# --- lesions --------------------------------------------------------------------------------


def test_every_cancer_image_has_a_lesion_mask_and_box(mixed: Path, rows: list[dict[str, str]]) -> None:
    lesions = _read_csv(mixed / "lesions.csv")
    boxes: dict[str, list[dict[str, str]]] = {}
    for box in lesions:
        boxes.setdefault(box["image_id"], []).append(box)
    for r in rows:
        mask_path = mixed / "train_masks" / r["patient_id"] / f"{r['image_id']}.png"
        if r["cancer"] == "0":
            assert not mask_path.exists() and r["image_id"] not in boxes
            continue
        mask = _read_mask(mask_path)
        assert mask.dtype == np.uint8 and mask.shape == SIZE
        assert set(np.unique(mask)) == {0, 255}
        assert r["image_id"] in boxes
        for box in boxes[r["image_id"]]:
            y0, x0, y1, x1 = (int(box[k]) for k in ("y0", "x0", "y1", "x1"))
            assert box["kind"] in ("mass", "calcification")
            assert 0 <= y0 < y1 <= SIZE[0] and 0 <= x0 < x1 <= SIZE[1]
            assert mask[y0:y1, x0:x1].any()
            assert box["laterality"] == r["laterality"] and box["view"] == r["view"]


def test_lesion_masks_cover_brighter_pixels(
    mixed: Path, rows: list[dict[str, str]], datasets: dict[str, pydicom.Dataset]
) -> None:
    checked = 0
    for r in rows:
        if r["cancer"] != "1":
            continue
        mask = _read_mask(mixed / "train_masks" / r["patient_id"] / f"{r['image_id']}.png") > 0
        display = _display(datasets[r["image_id"]]).astype(np.float64)
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        ring &= ~mask
        assert display[mask].mean() > display[ring].mean() + 0.02 * display.max()
        checked += 1
    assert checked >= 6


def _chest_wall_distance(box: dict[str, str], width: int) -> float:
    xc = (int(box["x0"]) + int(box["x1"])) / 2
    return xc if box["laterality"] == "R" else width - xc


def test_both_views_show_the_lesion_at_the_same_depth(mixed: Path) -> None:
    """Radiologists match findings across views by distance from the chest wall/nipple."""
    by_breast: dict[tuple[str, str, str], dict[str, float]] = {}
    for box in _read_csv(mixed / "lesions.csv"):
        key = (box["patient_id"], box["laterality"], box["kind"])
        by_breast.setdefault(key, {})[box["view"]] = _chest_wall_distance(box, SIZE[1])
    pairs = [d for d in by_breast.values() if {"CC", "MLO"} <= d.keys()]
    assert pairs
    for d in pairs:
        assert abs(d["CC"] - d["MLO"]) < 0.15 * SIZE[1]


def test_render_view_places_a_lesion_in_each_view_of_a_breast() -> None:
    rng = np.random.default_rng(0)
    anatomy = BreastAnatomy.random(rng, "D")
    lesion = Lesion("calcification", 0.5, -0.5, 0.6, 0.05, seed=11, n_specks=12)
    depths = []
    for view in ("CC", "MLO"):
        out = render_view(
            np.random.default_rng(1),
            laterality="R",
            view=view,
            size=(512, 384),
            anatomy=anatomy,
            lesions=[lesion],
        )
        assert len(out.lesion_boxes) == 1
        assert (out.lesion_mask > 0).sum() > 0
        assert not (out.lesion_mask.astype(bool) & ~out.breast_mask).any()
        box = out.lesion_boxes[0]
        depths.append((box.x0 + box.x1) / 2)
    assert abs(depths[0] - depths[1]) < 0.1 * 384


def test_calcification_specks_survive_downsampling_to_the_model_grid() -> None:
    lesion = Lesion("calcification", 0.5, 0.0, 0.0, 0.05, seed=5, n_specks=15, speck_diameter=0.005)

    def render(lesions: list[Lesion]) -> np.ndarray:
        view = render_view(
            np.random.default_rng(2),
            laterality="R",
            view="CC",
            size=(1024, 768),
            density="B",
            lesions=lesions,
        )
        if lesions:
            assert [b.kind for b in view.lesion_boxes] == ["calcification"]
            box = view.lesion_boxes[0]
            boxes.append((box.y0 // 2, box.x0 // 2, box.y1 // 2, box.x1 // 2))
        # Halving is about the scale of the 512x256 model grid after the background crop.
        return cv2.resize(view.pixels.astype(np.float32), (384, 512), interpolation=cv2.INTER_AREA)

    boxes: list[tuple[int, int, int, int]] = []
    diff = render([lesion]) - render([])
    # The brightest speck still stands out by >10% of the 12-bit range once the image is halved...
    assert diff.max() > 0.10 * 4095
    # ...and only around the cluster: the two images are otherwise identical.
    y0, x0, y1, x1 = boxes[0]
    diff[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = 0
    assert np.abs(diff).max() < 1e-3


def test_benign_mass_is_fainter_than_a_cancer_and_not_in_the_mask() -> None:
    anatomy = BreastAnatomy.random(np.random.default_rng(3), "A")

    def render(lesions: list[Lesion]) -> tuple[np.ndarray, np.ndarray]:
        view = render_view(
            np.random.default_rng(4),
            laterality="L",
            view="CC",
            size=(512, 384),
            anatomy=anatomy,
            lesions=lesions,
        )
        return view.pixels.astype(np.float64), view.lesion_mask

    base, _ = render([])
    bright = {}
    for kind in ("benign", "mass"):
        pixels, mask = render([Lesion(kind, 0.4, 0.0, 0.0, 0.04, seed=9)])
        bright[kind] = float((pixels - base).max())
        assert mask.any() == (kind == "mass")
    assert 0 < bright["benign"] < 0.6 * bright["mass"]


# --- overlays, one-image API, secondary capture ---------------------------------------------


def test_labels_and_borders_stay_clear_of_the_breast() -> None:
    out = render_view(
        np.random.default_rng(5),
        laterality="R",
        view="CC",
        size=(512, 384),
        density="B",
        bits_stored=12,
        label="R CC",
        border="far",
    )
    assert out.label_box is not None and out.border_box is not None
    for y0, x0, y1, x1 in (out.label_box, out.border_box):
        assert not out.breast_mask[y0:y1, x0:x1].any()
    y0, x0, y1, x1 = out.label_box
    assert out.pixels[y0:y1, x0:x1].max() == 4095  # burned-in text is saturated white
    assert x0 > 384 // 2  # on the side away from the chest wall
    y0, x0, y1, x1 = out.border_box
    assert out.pixels[y0:y1, x0:x1].mean() > 0.8 * 4095


def test_breast_is_one_piece_including_the_nipple() -> None:
    """A nipple floating beside the skin line would be a second 'breast' for the crop."""
    for seed in range(100):
        rng = np.random.default_rng(seed)
        anatomy = BreastAnatomy.random(rng, "B")
        for view in ("CC", "MLO"):
            geom = view_geometry(anatomy, view, (1024, 768), rng)
            count, _ = cv2.connectedComponents(geom.mask.astype(np.uint8))
            assert count == 2, f"seed {seed} {view}: breast mask has {count - 1} pieces"


def test_synth_breast_returns_pixels_and_mask() -> None:
    lesion = Lesion("mass", 0.3, 0.2, 0.2, 0.06, seed=1)
    pixels, mask = synth_breast(
        np.random.default_rng(0),
        laterality="L",
        view="CC",
        size=SIZE,
        density="B",
        lesions=[lesion],
        bits_stored=14,
    )
    assert pixels.dtype == np.uint16 and pixels.shape == SIZE and pixels.max() < 1 << 14
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    again, _ = synth_breast(
        np.random.default_rng(0),
        laterality="L",
        view="CC",
        size=SIZE,
        density="B",
        lesions=[lesion],
        bits_stored=14,
    )
    np.testing.assert_array_equal(pixels, again)
    with pytest.raises(ValueError, match="laterality"):
        synth_breast(np.random.default_rng(0), laterality="X", view="CC", size=SIZE, density="B", lesions=[])


def test_secondary_capture_hides_the_view_in_text(phantom: np.ndarray, tmp_path: Path) -> None:
    ds = make_dicom(
        phantom,
        patient_id="77",
        study_uid=derive_uid("sc"),
        laterality="L",
        view="MLO",
        bits_stored=14,
        photometric="MONOCHROME1",
        voi="sigmoid",
        transfer_syntax="rle",
        secondary_capture=True,
    )
    write_dicom(ds, tmp_path / "sc.dcm")
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    assert back.SOPClassUID == SC_UID and back.Modality == "MG"
    assert back.Laterality == "L" and back.SeriesDescription == "L MLO"
    for absent in ("ViewPosition", "ImageLaterality", "WindowCenter", "WindowWidth", "VOILUTSequence"):
        assert absent not in back
    np.testing.assert_array_equal(back.pixel_array, 16383 - phantom)


def test_make_dicom_rejects_bad_input(phantom: np.ndarray) -> None:
    study = derive_uid("bad")
    with pytest.raises(ValueError, match="pixel values"):
        make_dicom(phantom, patient_id="1", study_uid=study, laterality="L", view="CC", bits_stored=12)
    with pytest.raises(ValueError, match="study_uid"):
        make_dicom(phantom, patient_id="1", study_uid="../../x", laterality="L", view="CC", bits_stored=14)
    with pytest.raises(ValueError, match="voi"):
        make_dicom(
            phantom, patient_id="1", study_uid=study, laterality="L", view="CC", bits_stored=14, voi="gamma"
        )


# --- film style (digitised screen-film, CBIS-DDSM-like) ------------------------------------

FILM_SIZE = (331, 213)  # nominal rows x columns; small, the shape matters here, not the size
FILM_SEED = 3131


@pytest.fixture(scope="module")
def film(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six digitised films, RLE and JPEG 2000 alternating, half with a cancer."""
    out = tmp_path_factory.mktemp("synth") / "film"
    summary = generate_dataset(
        out, patients=6, seed=FILM_SEED, cancer_rate=0.5, size=FILM_SIZE, transfer_syntax=MIXED, style=FILM
    )
    assert (summary.n_patients, summary.n_images) == (6, 6)
    assert summary.transfer_syntaxes == ("jpeg2000", "rle")
    return out


@pytest.fixture(scope="module")
def film_rows(film: Path) -> list[dict[str, str]]:
    return _read_csv(film / "train.csv")


def _film_path(film: Path, row: dict[str, str]) -> Path:
    return film / "train_images" / row["patient_id"] / f"{row['image_id']}.dcm"


def test_film_images_are_secondary_captures_without_view_position(
    film: Path, film_rows: list[dict[str, str]]
) -> None:
    keywords: set[str] = set()
    for row in film_rows:
        ds = read_dataset(_film_path(film, row))
        assert ds.SOPClassUID == SC_UID and ds.Modality == "MG" and ds.ConversionType == "DF"
        assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored) == ("MONOCHROME2", 16, 16)
        for absent in ("ViewPosition", "ViewCodeSequence", "WindowCenter", "VOILUTSequence", "PixelSpacing"):
            assert absent not in ds
        sides = {k: ds.get(k) for k in ("Laterality", "ImageLaterality") if k in ds}
        assert list(sides.values()) == [row["laterality"]]
        keywords |= sides.keys()
        # The view is only in free text, and the node's reader finds it there.
        assert row["view"] in ds.SeriesDescription and "MammoNode" not in ds.SeriesDescription
        meta = read_meta(ds)
        assert (meta.laterality, meta.view) == (row["laterality"], row["view"])
        ok, _ = is_mammogram(ds, meta)
        assert ok
        pixels = decode_pixels(ds)
        assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns)
        assert int(pixels.max()) > 1 << 14  # really uses the 16 bits
    assert keywords == {"Laterality", "ImageLaterality"}


def test_film_is_one_image_per_patient_and_study(film: Path, film_rows: list[dict[str, str]]) -> None:
    headers = [pydicom.dcmread(_film_path(film, r), stop_before_pixels=True) for r in film_rows]
    assert len({r["patient_id"] for r in film_rows}) == len(film_rows) == 6
    assert len({str(ds.StudyInstanceUID) for ds in headers}) == 6
    assert {ds.PatientID for ds in headers} == {r["patient_id"] for r in film_rows}
    assert {(r["laterality"], r["view"]) for r in film_rows} == {
        ("L", "CC"),
        ("L", "MLO"),
        ("R", "CC"),
        ("R", "MLO"),
    }
    assert sum(r["cancer"] == "1" for r in film_rows) == 3
    readme = (film / "README.txt").read_text()
    assert "style=film" in readme and "CBIS-DDSM" in readme


def test_film_sizes_are_odd_and_vary_around_the_nominal_size(
    film: Path, film_rows: list[dict[str, str]]
) -> None:
    sizes = []
    for row in film_rows:
        ds = pydicom.dcmread(_film_path(film, row), stop_before_pixels=True)
        sizes.append((int(ds.Rows), int(ds.Columns)))
    assert FILM_SIZE in sizes  # the first image has exactly the nominal size
    assert all(cols % 2 == 1 for _, cols in sizes)
    assert {rows % 2 for rows, _ in sizes} == {0, 1}
    assert len(set(sizes)) >= 5
    for rows, cols in sizes:
        assert 0.9 * FILM_SIZE[0] <= rows <= 1.06 * FILM_SIZE[0]
        assert 0.9 * FILM_SIZE[1] <= cols <= 1.08 * FILM_SIZE[1]


def test_film_ground_truth_is_at_full_size(film: Path, film_rows: list[dict[str, str]]) -> None:
    lesions = _read_csv(film / "lesions.csv")
    cancers = [r for r in film_rows if r["cancer"] == "1"]
    assert cancers and {r["image_id"] for r in cancers} == {b["image_id"] for b in lesions}
    for row in cancers:
        ds = read_dataset(_film_path(film, row))
        mask = _read_mask(film / "train_masks" / row["patient_id"] / f"{row['image_id']}.png")
        assert mask.shape == (ds.Rows, ds.Columns) and set(np.unique(mask)) == {0, 255}
        pixels = decode_pixels(ds).astype(np.float64)
        for box in (b for b in lesions if b["image_id"] == row["image_id"]):
            y0, x0, y1, x1 = (int(box[k]) for k in ("y0", "x0", "y1", "x1"))
            assert 0 <= y0 < y1 <= ds.Rows and 0 <= x0 < x1 <= ds.Columns
            inside = mask[y0:y1, x0:x1] > 0
            assert inside.any()
            # The box is tight around the mask: each edge row and column touches it.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert pixels[mask > 0].mean() > np.median(pixels[pixels > pixels.min() + 2000])


@pytest.mark.dcmtk
def test_film_dciodvfy_finds_no_errors(film: Path) -> None:
    for path in sorted((film / "train_images").rglob("*.dcm")):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}: {errors}"


def test_film_same_seed_gives_identical_bytes(film: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_dataset(
        again, patients=6, seed=FILM_SEED, cancer_rate=0.5, size=FILM_SIZE, transfer_syntax=MIXED, style=FILM
    )
    first, second = _files(film), _files(again)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    other = generate_dataset(tmp_path / "other", patients=1, seed=FILM_SEED + 1, size=FILM_SIZE, style=FILM)
    assert _files(other.out)["train.csv"] != first["train.csv"]


def test_film_defaults_to_rle_at_cbis_ddsm_size() -> None:
    plans = plan_dataset(
        patients=3, seed=1, cancer_rate=0.0, size=DEFAULT_SIZES[FILM], transfer_syntax="rle", style=FILM
    )
    sizes = [p.images[0].size for p in plans]
    assert sizes[0] == (4500, 2701)
    assert all(4000 <= rows <= 5000 and 2500 <= cols <= 3000 and cols % 2 for rows, cols in sizes)
    assert DEFAULT_SIZES[FILM] == (4500, 2700)


@pytest.mark.parametrize(
    ("text", "laterality", "view"),
    [
        ("LEFT_CC", "L", "CC"),
        ("RIGHT_MLO", "R", "MLO"),
        ("L CC", "L", "CC"),
        ("R-MLO", "R", "MLO"),
        ("LEFT MLO", "L", "MLO"),
        ("RCC", "R", "CC"),
    ],
)
def test_node_reads_side_and_view_from_free_text_alone(
    phantom: np.ndarray, text: str, laterality: str, view: str
) -> None:
    """Films carry the view only in SeriesDescription; with the side tag removed too, the
    node's reader still finds both there (the free-text forms real archives use)."""
    ds = make_dicom(
        phantom,
        patient_id="5",
        study_uid=derive_uid("film-text"),
        laterality="L" if laterality == "R" else "R",  # the tag (deleted below) must not matter
        view="CC",
        bits_stored=14,
        film=True,
        view_text=text,
    )
    del ds.Laterality
    meta = read_meta(ds)
    assert (meta.laterality, meta.view) == (laterality, view)


def test_synth_cli_film_style(tmp_path: Path) -> None:
    out = tmp_path / "cli-film"
    args = ["synth", str(out), "--style", "film", "--patients", "2", "--size", "300x200", "--seed", "9"]
    result = CliRunner().invoke(cli.app, [*args, "--transfer-syntax", "mixed"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    files = sorted((out / "train_images").rglob("*.dcm"))
    assert len(files) == 2
    syntaxes = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in files}
    assert syntaxes == {TRANSFER_SYNTAXES["rle"], TRANSFER_SYNTAXES["jpeg2000"]}
    bad = CliRunner().invoke(cli.app, ["synth", str(tmp_path / "bad"), "--style", "polaroid"])
    assert bad.exit_code != 0 and not (tmp_path / "bad").exists()
