"""Preprocessing: crop, orientation, resize/pad and the geometry that maps CAMs back."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from inference.dicom_header import read_dataset, read_meta
from inference.geometry import grid_to_original, original_to_grid
from inference.pipeline import prepare_image
from inference.preprocessing import find_breast, preprocess, preprocess_array
from inference.types import GeometricTransform, ImageMeta, InputError, PreprocessConfig
from inference.voi import apply_voi
from training.synth import BreastAnatomy, make_dicom, random_lesion, render_view

logger = logging.getLogger(__name__)

DX_MAMMO = "1.2.840.10008.5.1.4.1.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CONFIG = PreprocessConfig(input_height=256, input_width=128)
H, W = 640, 480


def phantom(
    height: int = H,
    width: int = W,
    *,
    chest_wall: str = "left",
    center_y: float = 0.5,
    depth: float = 0.6,
    half_height: float = 0.4,
    seed: int = 0,
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A breast-like half-ellipse on a noisy background, values in [0, 1].

    Tissue is textured and fades towards the skin line like a compressed breast; returns the
    image and the true bounding box (y0, y1, x0, x1) of the tissue.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    dx = xx if chest_wall == "left" else (width - 1 - xx)
    r2 = ((yy - center_y * height) / (half_height * height)) ** 2 + (dx / (depth * width)) ** 2
    inside = r2 <= 1.0
    texture = cv2.GaussianBlur(rng.normal(0, 1, (height, width)).astype(np.float32), (0, 0), 6)
    tissue = 0.3 + 0.45 * np.sqrt(np.clip(1.0 - r2, 0, 1)) + 0.1 * texture / texture.std()
    img = rng.normal(0.04, 0.015, (height, width)).astype(np.float32)
    img[inside] = tissue[inside]
    ys, xs = np.nonzero(inside)
    return np.clip(img, 0.0, 1.0), (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)


def meta_for(laterality: str = "unknown", shape: tuple[int, int] = (H, W)) -> ImageMeta:
    return ImageMeta(
        sop_instance_uid="1.2.3.4",
        sop_class_uid=DX_MAMMO,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.5",
        patient_id="P",
        laterality=laterality,
        rows=shape[0],
        columns=shape[1],
    )


def to_dicom(image01: np.ndarray, *, bits: int = 12, monochrome1: bool = False, **tags: Any) -> Dataset:
    """Store a [0, 1] image as a 16-bit DX mammogram with a full-range LINEAR window."""
    top = 2**bits - 1
    stored = np.rint(image01 * top).astype(np.uint16)
    if monochrome1:
        stored = (top - stored).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DX_MAMMO, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P", "MG"
    ds.ImageLaterality, ds.ViewPosition = "R", "CC"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = str(2 ** (bits - 1)), str(2**bits)
    ds.PixelData = stored.tobytes()
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def burn_text(image: np.ndarray, text: str, origin: tuple[int, int]) -> None:
    """Burn white text into a float image (OpenCV draws text on 8-bit images only)."""
    canvas = np.zeros(image.shape, dtype=np.uint8)
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 1.5, 255, 4)
    image[canvas > 0] = 1.0


def centroid(values: np.ndarray, level: float) -> tuple[float, float]:
    ys, xs = np.nonzero(values >= level)
    weights = values[ys, xs]
    return float(np.average(ys, weights=weights)), float(np.average(xs, weights=weights))


def reread(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return read_dataset(path)


def assert_box_fits(
    box: tuple[int, int, int, int], truth: tuple[int, int, int, int], shape: tuple[int, int]
) -> None:
    """The crop holds all the tissue (up to 1 % at the tapering tips) and little else."""
    tol = int(0.01 * max(shape)) + 1
    slack = int(0.04 * max(shape))
    y0, y1, x0, x1 = box
    ty0, ty1, tx0, tx1 = truth
    assert y0 <= ty0 + tol and y1 >= ty1 - tol and x0 <= tx0 + tol and x1 >= tx1 - tol, (box, truth)
    assert y0 >= ty0 - slack and y1 <= ty1 + slack and x0 >= tx0 - slack and x1 <= tx1 + slack, (box, truth)


# ---------------------------------------------------------------------------- output


def test_preprocess_dicom_output(tmp_path: Path) -> None:
    image, truth = phantom()
    ds = reread(to_dicom(image), tmp_path)
    result = preprocess(ds, CONFIG)
    assert result.pixels.shape == (256, 128) and result.pixels.dtype == np.float32
    assert result.pixels.min() >= 0.0 and result.pixels.max() <= 1.0
    t = result.transform
    assert t.original_shape == (H, W) and t.input_shape == (256, 128)
    assert_box_fits(t.crop_box, truth, (H, W))
    assert not t.flipped  # R, chest wall already on the left
    rh, rw = t.resized_shape
    assert rh == 256 or rw == 128  # aspect ratio kept, one side fills the grid
    assert not result.pixels[rh:, :].any() and not result.pixels[:, rw:].any()  # zero padding
    assert result.meta.sop_instance_uid == ds.SOPInstanceUID


def test_preprocess_compressed_equals_uncompressed(tmp_path: Path) -> None:
    image, _ = phantom()
    ds = to_dicom(image)
    plain = preprocess(reread(ds, tmp_path), CONFIG)
    ds.compress(RLELossless)
    packed = preprocess(reread(ds, tmp_path), CONFIG)
    np.testing.assert_array_equal(plain.pixels, packed.pixels)
    assert plain.transform == packed.transform


# ---------------------------------------------------------------------------- crop


def test_crop_with_noisy_background() -> None:
    image, truth = phantom()
    region = find_breast(image, CONFIG)
    assert_box_fits(region.crop_box, truth, image.shape)
    assert region.chest_wall == "left"


def test_crop_ignores_burned_in_text() -> None:
    image, truth = phantom()
    burn_text(image, "R MLO", (W - 170, 50))
    burn_text(image, "R MLO", (W - 170, H - 20))
    assert image[:60, W - 170 :].max() == 1.0
    assert_box_fits(find_breast(image, CONFIG).crop_box, truth, image.shape)


@pytest.mark.parametrize("edge", ["top", "bottom", "left", "right"])
def test_crop_ignores_bright_border_strip(edge: str) -> None:
    """A collimator strip along any edge, even one the breast touches (MLO-like at the top)."""
    center = 0.4 if edge == "top" else 0.5
    chest = "right" if edge == "left" else "left"  # the strip is not under the chest wall
    image, truth = phantom(center_y=center, half_height=0.45 if edge == "top" else 0.4, chest_wall=chest)
    strip = 12
    if edge == "top":
        assert truth[0] == 0  # the breast touches the strip's edge
        image[:strip, :] = 0.95
    elif edge == "bottom":
        image[-strip:, :] = 0.95
    elif edge == "left":
        image[:, :strip] = 0.95
    else:
        image[:, -strip:] = 0.95
    box = find_breast(image, CONFIG).crop_box
    if edge == "top":  # the strip is inside the breast's rows, but must not widen the crop
        truth = (strip, truth[1], truth[2], truth[3])
        assert box[3] <= truth[3] + int(0.04 * W)
    assert_box_fits(box, truth, image.shape)


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0])
def test_uniform_image_has_no_breast(value: float) -> None:
    with pytest.raises(InputError, match="no breast tissue found"):
        preprocess_array(np.full((H, W), value, dtype=np.float32), meta_for(), CONFIG)


def test_text_only_image_has_no_breast() -> None:
    image = np.zeros((H, W), dtype=np.float32)
    burn_text(image, "L CC", (20, 60))
    with pytest.raises(InputError, match="no breast tissue found"):
        preprocess_array(image, meta_for(), CONFIG)


def test_tissue_everywhere_keeps_the_whole_image() -> None:
    rng = np.random.default_rng(1)
    image = 0.5 + 0.2 * cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 8)
    assert find_breast(image, CONFIG).crop_box == (0, H, 0, W)


def test_bad_arrays_are_input_errors() -> None:
    with pytest.raises(InputError, match="2-D"):
        preprocess_array(np.zeros((4, 5, 6, 7), dtype=np.float32), meta_for(), CONFIG)
    image, _ = phantom()
    image[10, 10] = np.nan
    with pytest.raises(InputError, match="non-finite"):
        preprocess_array(image, meta_for(), CONFIG)


def check_phantom_file(
    tmp_path: Path,
    *,
    photometric: str,
    laterality: str,
    view: str,
    voi: str,
    border: str | None = None,
    implant: bool = False,
    density: str = "C",
    seed: int = 17,
) -> None:
    """Render a 1024x768 phantom with a mass and a burned-in label, store it as the synthetic
    data does (``voi="none"`` as a Secondary Capture), preprocess it from the file and check
    that the crop holds the whole breast and the lesion and that the chest wall is on the left."""
    rng = np.random.default_rng(seed)
    rendered = render_view(
        rng,
        laterality=laterality,
        view=view,
        size=(1024, 768),
        anatomy=BreastAnatomy.random(rng, density, implant=implant),
        lesions=[random_lesion(rng, "mass")],
        bits_stored=14,
        label=f"{laterality} {view}",
        border=border,
        border_fraction=0.03,
    )
    assert (rendered.border_box is not None) is (border is not None) and rendered.lesion_boxes
    ds = make_dicom(
        rendered.pixels,
        patient_id="P",
        study_uid="1.2.826.0.1.3680043.8.498.1",
        laterality=laterality,
        view=view,
        bits_stored=14,
        photometric=photometric,
        voi=voi,
        secondary_capture=voi == "none",
        breast_mask=rendered.breast_mask,
    )
    back = reread(ds, tmp_path)
    assert ("WindowCenter" in back or "VOILUTSequence" in back) is (voi != "none")
    result = preprocess(back, PreprocessConfig(input_height=512, input_width=256))
    ys, xs = np.nonzero(rendered.breast_mask)
    truth = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
    assert_box_fits(result.transform.crop_box, truth, rendered.pixels.shape)
    y0, y1, x0, x1 = result.transform.crop_box
    for lesion in rendered.lesion_boxes:
        assert y0 <= lesion.y0 and lesion.y1 <= y1 and x0 <= lesion.x0 and lesion.x1 <= x1, lesion
    assert result.transform.flipped is (laterality == "L")


@pytest.mark.parametrize(
    ("photometric", "laterality", "view", "border", "implant"),
    [
        ("MONOCHROME1", "R", "CC", "top", False),  # was "no breast tissue found"
        ("MONOCHROME1", "L", "MLO", "far", False),  # strip + pectoral: crop missed the lesion
        ("MONOCHROME2", "L", "CC", "bottom", False),
        ("MONOCHROME2", "R", "MLO", "far", False),
        ("MONOCHROME2", "L", "CC", None, True),  # implant: crop held only the implant
    ],
)
def test_no_voi_phantom_crop_holds_breast_and_lesion(
    photometric: str, laterality: str, view: str, border: str | None, implant: bool, tmp_path: Path
) -> None:
    """Mammograms without VOI (the percentile fallback) with a label and a collimator strip or
    an implant."""
    check_phantom_file(
        tmp_path,
        photometric=photometric,
        laterality=laterality,
        view=view,
        voi="none",
        border=border,
        implant=implant,
    )


@pytest.mark.parametrize(
    ("photometric", "laterality", "view", "voi", "seed"),
    [
        ("MONOCHROME2", "R", "CC", "lut", 17),
        ("MONOCHROME1", "L", "MLO", "lut", 17),
        ("MONOCHROME1", "R", "CC", "lut", 35),  # the dark chest-wall fat also turned the breast round
        ("MONOCHROME2", "L", "CC", "sigmoid", 17),
    ],
)
def test_dark_skin_line_window_crop_holds_breast(
    photometric: str, laterality: str, view: str, voi: str, seed: int, tmp_path: Path
) -> None:
    """The file's own VOI is a sigmoid (VOI LUT Sequence or SIGMOID function): the skin line and
    subcutaneous fat come out nearly black, under the crop threshold. The crop follows the
    faint tissue connected to the breast instead of cutting 1-3 % off each tip."""
    check_phantom_file(
        tmp_path, photometric=photometric, laterality=laterality, view=view, voi=voi, seed=seed
    )


# ---------------------------------------------------------------------------- orientation


@pytest.mark.parametrize(
    ("chest_wall", "laterality", "flipped"),
    [("left", "R", False), ("right", "L", True), ("right", "R", True), ("left", "L", False)],
)
def test_orientation_from_content(chest_wall: str, laterality: str, flipped: bool) -> None:
    """Content wins over laterality: a mis-stored image is still turned the right way."""
    image, _ = phantom(chest_wall=chest_wall)
    result = preprocess_array(image, meta_for(laterality), CONFIG)
    assert result.transform.flipped is flipped
    rh, rw = result.transform.resized_shape
    content = result.pixels[:rh, :rw]
    band = rw // 10
    assert content[:, :band].mean() > 2 * content[:, -band:].mean()  # chest wall on the left


@pytest.mark.parametrize(("laterality", "flipped"), [("R", False), ("L", True), ("unknown", False)])
def test_orientation_tie_broken_by_laterality(laterality: str, flipped: bool) -> None:
    image, _ = phantom()
    image = np.concatenate([image[:, ::-1], image], axis=1)  # symmetric: no side hugs an edge
    assert find_breast(image, CONFIG).chest_wall is None
    assert preprocess_array(image, meta_for(laterality), CONFIG).transform.flipped is flipped


def test_chest_wall_right_config_anchors_right() -> None:
    image, _ = phantom(chest_wall="left")
    config = PreprocessConfig(input_height=256, input_width=256, chest_wall_side="right")
    result = preprocess_array(image, meta_for("R"), config)
    t = result.transform
    assert t.flipped
    assert t.pad_left + t.resized_shape[1] == 256 and t.pad_left > 0
    assert result.pixels[:, -10:].mean() > result.pixels[:, t.pad_left : t.pad_left + 10].mean()


def test_monochrome1_matches_monochrome2(tmp_path: Path) -> None:
    image, _ = phantom(chest_wall="right")
    mono2 = preprocess(reread(to_dicom(image, ImageLaterality="L"), tmp_path), CONFIG)
    mono1 = preprocess(reread(to_dicom(image, monochrome1=True, ImageLaterality="L"), tmp_path), CONFIG)
    assert mono1.transform == mono2.transform and mono1.transform.flipped
    np.testing.assert_allclose(mono1.pixels, mono2.pixels, atol=2e-3)


# ---------------------------------------------------------------------------- geometry


def _forward(point: tuple[float, float], t: GeometricTransform) -> tuple[float, float]:
    """Where an original pixel centre lands on the grid, computed independently of geometry.py."""
    y, x = point
    y0, _, x0, x1 = t.crop_box
    cx = (x1 - 1 - x) if t.flipped else (x - x0)
    return ((y - y0 + 0.5) * t.scale - 0.5 + t.pad_top, (cx + 0.5) * t.scale - 0.5 + t.pad_left)


@pytest.mark.parametrize("chest_wall", ["left", "right"])
def test_marker_round_trip(chest_wall: str, tmp_path: Path) -> None:
    image, _ = phantom(chest_wall=chest_wall)
    marker = (400, 100 if chest_wall == "left" else W - 101)
    cv2.circle(image, (marker[1], marker[0]), 6, 1.0, -1)
    image = np.minimum(image, 0.9)
    cv2.circle(image, (marker[1], marker[0]), 6, 1.0, -1)  # the unique brightest spot
    result = preprocess(reread(to_dicom(image), tmp_path), CONFIG)
    t = result.transform
    assert t.flipped is (chest_wall == "right")

    gy, gx = _forward(marker, t)
    py, px = centroid(result.pixels, 0.95)  # only the marker is brighter than the tissue
    assert abs(py - gy) <= 1.0 and abs(px - gx) <= 1.0, ((py, px), (gy, gx))

    mask = np.zeros((H, W), dtype=np.float32)
    cv2.circle(mask, (marker[1], marker[0]), 6, 1.0, -1)
    on_grid = original_to_grid(mask, t)
    my, mx = centroid(on_grid, 0.05)
    assert abs(my - gy) <= 1.0 and abs(mx - gx) <= 1.0, ((my, mx), (gy, gx))

    impulse = np.zeros(t.input_shape, dtype=np.float32)
    impulse[round(gy), round(gx)] = 1.0
    back = grid_to_original(cv2.GaussianBlur(impulse, (0, 0), 1.5), t)
    by, bx = np.unravel_index(np.argmax(back), back.shape)
    tolerance = 1.0 / t.scale + 1
    assert abs(by - marker[0]) <= tolerance and abs(bx - marker[1]) <= tolerance, ((by, bx), marker)


def test_grid_equals_forward_geometry_of_normalised_image() -> None:
    """The pixels are exactly original_to_grid of the normalised image: one geometry."""
    image, _ = phantom()
    result = preprocess_array(image, meta_for("R"), CONFIG)
    norm = (image - image.min()) / (image.max() - image.min())
    expected = original_to_grid(norm.astype(np.float32), result.transform)
    np.testing.assert_allclose(result.pixels, np.clip(expected, 0, 1), atol=1e-5)


# ---------------------------------------------------------------------------- secondary capture


@pytest.mark.parametrize("kind", ["rgb", "mono8", "jpeg_ybr"])
def test_secondary_capture_8bit(kind: str, tmp_path: Path) -> None:
    """SC mammograms: no ImageLaterality/ViewPosition/window, 8-bit, RGB or grey, maybe JPEG."""
    image, truth = phantom(chest_wall="right")
    grey = np.rint(image * 255).astype(np.uint8)
    ds = to_dicom(image, bits=8, ImageLaterality=None, ViewPosition=None, WindowCenter=None, WindowWidth=None)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    ds.Laterality = "L"
    ds.BitsAllocated = 8
    if kind == "mono8":
        ds.PixelData = grey.tobytes()
    else:
        ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
        ds.PixelData = np.repeat(grey[:, :, None], 3, axis=2).tobytes()
    back = reread(ds, tmp_path)
    if kind == "jpeg_ybr":  # what a viewer's "export as DICOM" often produces
        if shutil.which("dcmcjpeg") is None:
            pytest.skip("dcmcjpeg (dcmtk) is not installed")
        out = tmp_path / "baseline.dcm"
        subprocess.run(["dcmcjpeg", "+eb", str(tmp_path / f"{ds.SOPInstanceUID}.dcm"), str(out)], check=True)
        back = read_dataset(out)
        assert back.PhotometricInterpretation == "YBR_FULL_422"
    meta = read_meta(back)
    assert (meta.laterality, meta.view) == ("L", "unknown")
    result = preprocess(back, CONFIG, meta=meta)
    assert result.pixels.shape == (256, 128)
    assert result.transform.flipped
    assert_box_fits(result.transform.crop_box, truth, (H, W))


def test_preprocess_array_leaves_its_input_alone() -> None:
    image, _ = phantom()
    image *= 0.5
    before = image.copy()
    preprocess_array(image, meta_for("R"), CONFIG)
    np.testing.assert_array_equal(image, before)


def test_preprocess_array_accepts_rgb_and_any_range() -> None:
    image, _ = phantom()
    grey = preprocess_array(image, meta_for("R"), CONFIG)
    rgb = preprocess_array(np.repeat(image[:, :, None] * 1000 + 7, 3, axis=2), meta_for("R"), CONFIG)
    np.testing.assert_allclose(rgb.pixels, grey.pixels, atol=1e-4)


# ---------------------------------------------------------------------------- speed


@pytest.mark.slow
@pytest.mark.parametrize("voi", ["window", "fallback"])
def test_full_size_mammogram_is_fast(voi: str) -> None:
    """3328x2560 uint16 after decode: VOI (the file's window, or the percentile fallback with
    its statistics) + preprocessing well under 0.5 s on one core."""
    small, _ = phantom(832, 640)
    image = cv2.resize(small, (2560, 3328), interpolation=cv2.INTER_LINEAR)
    image[:60, :] = 0.95  # a collimator strip for the fallback to exclude
    stored = np.rint(image * 4095).astype(np.uint16)
    if voi == "window":
        ds = to_dicom(np.zeros((2, 2), dtype=np.float32))
    else:
        ds = to_dicom(
            np.zeros((2, 2), dtype=np.float32), monochrome1=True, WindowCenter=None, WindowWidth=None
        )
        stored = (4095 - stored).astype(np.uint16)
    config = PreprocessConfig()
    meta = meta_for("R", stored.shape)
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            result = preprocess_array(apply_voi(stored, ds), meta, config)
            best = min(best, time.perf_counter() - start)
    finally:
        cv2.setNumThreads(threads)
    logger.info("3328x2560 VOI (%s) + preprocess: %.3f s", voi, best)
    assert result.pixels.shape == (1024, 512)
    assert best < 0.5


def test_preprocess_and_the_pipelines_prepare_give_the_same_model_input(tmp_path: Path) -> None:
    """Training's :func:`preprocess` and serving's :func:`prepare_image` (which also decodes the
    capture's display level) read the same levels and give the same grid."""
    image, _ = phantom(2600, 1900)  # large enough for the breast to be found at level 2
    ds = reread(to_dicom(image), tmp_path)
    direct = preprocess(ds, CONFIG)
    served = prepare_image(ds, read_meta(ds), CONFIG).model_input
    np.testing.assert_array_equal(direct.pixels, served.pixels)
    assert direct.transform == served.transform
