"""VOI per DICOM PS3.3 C.11.2, checked against values computed by hand from the formulas."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_windowing
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from inference.voi import (
    Window,
    apply_voi,
    apply_window,
    fallback_window,
    percentile_window,
    read_voi_lut,
    read_window,
)
from training.synth import BreastAnatomy, RenderedView, render_view


def voi_dataset(
    photometric: str = "MONOCHROME2", bits: int = 12, signed: bool = False, **tags: Any
) -> Dataset:
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.SamplesPerPixel = 1
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def lut_item(descriptor: list[int], data: list[int] | bytes, *, descriptor_vr: str = "US") -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, descriptor_vr, descriptor)
    if isinstance(data, bytes):
        item.add_new(0x00283006, "OW", data)
    else:
        item.add_new(0x00283006, "US", data)
    return item


def at(values: list[float], dtype: Any = np.int32) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(1, -1)


# ---------------------------------------------------------------------------- windows


def test_linear_window_hand_computed() -> None:
    # c=100, w=51: x <= 74.5 -> 0, x > 124.5 -> 1, else (x - 99.5) / 50 + 0.5
    ds = voi_dataset(WindowCenter="100", WindowWidth="51")
    out = apply_voi(at([0, 74, 75, 100, 124, 125, 4000]), ds)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.01, 0.51, 0.99, 1.0, 1.0], atol=1e-6)
    assert out.dtype == np.float32


def test_linear_window_width_one_is_a_threshold() -> None:
    out = apply_voi(at([99, 100, 101]), voi_dataset(WindowCenter="100", WindowWidth="1"))
    np.testing.assert_array_equal(out[0], [0.0, 1.0, 1.0])


def test_linear_window_full_range_maps_stored_values_exactly() -> None:
    # c=2048, w=4096 on 12-bit data: y = x / 4095
    out = apply_voi(at([0, 1, 2048, 4095]), voi_dataset(WindowCenter="2048", WindowWidth="4096"))
    np.testing.assert_allclose(out[0], [0.0, 1 / 4095, 2048 / 4095, 1.0], atol=1e-7)


def test_linear_exact_window_hand_computed() -> None:
    # c=100, w=50: x <= 75 -> 0, x > 125 -> 1, else (x - 100) / 50 + 0.5
    ds = voi_dataset(WindowCenter="100", WindowWidth="50", VOILUTFunction="LINEAR_EXACT")
    out = apply_voi(at([74, 75, 76, 100, 125, 126]), ds)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.02, 0.5, 1.0, 1.0], atol=1e-6)


def test_sigmoid_window_hand_computed() -> None:
    # y = 1 / (1 + exp(-4 (x - 100) / 50))
    ds = voi_dataset(WindowCenter="100", WindowWidth="50", VOILUTFunction="SIGMOID")
    out = apply_voi(at([75, 100, 125, 150]), ds)
    np.testing.assert_allclose(out[0], [0.1192029220, 0.5, 0.8807970780, 0.9820137900], atol=1e-6)


def test_first_of_multiple_windows_is_used() -> None:
    ds = voi_dataset()
    ds.WindowCenter = ["100", "3000"]
    ds.WindowWidth = ["51", "10"]
    np.testing.assert_allclose(apply_voi(at([100]), ds)[0], [0.51], atol=1e-6)


def test_window_in_rescaled_units_on_float_input() -> None:
    ds = voi_dataset(WindowCenter="-50.5", WindowWidth="100", RescaleIntercept="-1024")
    out = apply_voi(at([-101.0, -50.0, 0.0, 1.0], np.float32), ds)
    # low = -50.5 - 0.5 - 49.5 = -100.5, high = -1.5; between: y = (x + 100.5) / 99
    np.testing.assert_allclose(out[0], [0.0, 50.5 / 99, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_windows_match_pydicom(function: str) -> None:
    ds = voi_dataset(WindowCenter="1500", WindowWidth="801", VOILUTFunction=function)
    x = np.arange(0, 4096, dtype=np.uint16).reshape(64, 64)
    reference = apply_windowing(x, copy.deepcopy(ds)) / 4095.0
    np.testing.assert_allclose(apply_voi(x, ds), reference, atol=1e-6)


def test_integer_table_path_equals_float_path() -> None:
    x = np.random.default_rng(0).integers(0, 16384, (50, 40)).astype(np.uint16)
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        window = Window(center=7000.5, width=3001.0, function=function)
        np.testing.assert_allclose(
            apply_window(x, window), apply_window(x.astype(np.float64), window), atol=1e-6
        )


@pytest.mark.parametrize(
    ("width", "function"), [("0", "LINEAR"), ("0.5", "LINEAR"), ("0", "SIGMOID"), ("-3", "LINEAR_EXACT")]
)
def test_invalid_window_is_ignored(width: str, function: str) -> None:
    ds = voi_dataset(WindowCenter="100", WindowWidth=width, VOILUTFunction=function)
    assert read_window(ds) is None
    out = apply_voi(at([0, 50, 100]), ds, fallback="minmax")
    np.testing.assert_allclose(out[0], [0.0, 0.5, 1.0])


def test_monochrome1_is_inverted_after_the_window() -> None:
    ds = voi_dataset("MONOCHROME1", WindowCenter="100", WindowWidth="51")
    out = apply_voi(at([0, 75, 100, 125]), ds)
    np.testing.assert_allclose(out[0], [1.0, 0.99, 0.49, 0.0], atol=1e-6)


def test_colour_images_ignore_window_tags() -> None:
    ds = voi_dataset("RGB", WindowCenter="100", WindowWidth="51")
    out = apply_voi(at([0, 100, 200]), ds, fallback="minmax")
    np.testing.assert_allclose(out[0], [0.0, 0.5, 1.0])


# ---------------------------------------------------------------------------- VOI LUT Sequence


def test_voi_lut_hand_computed() -> None:
    # 4 entries from input 10, 8 bits: below 10 -> first entry, above 13 -> last entry
    ds = voi_dataset(VOILUTSequence=Sequence([lut_item([4, 10, 8], [0, 51, 102, 255])]))
    out = apply_voi(at([0, 10, 11, 12, 13, 500]), ds)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 0.2, 0.4, 1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("descriptor_vr", ["US", "SS"])
def test_voi_lut_signed_first_mapped(descriptor_vr: str) -> None:
    first = 65534 if descriptor_vr == "US" else -2  # -2 as read as US or as SS
    item = lut_item([3, first, 12], [0, 2048, 4095], descriptor_vr=descriptor_vr)
    ds = voi_dataset(signed=True, VOILUTSequence=Sequence([item]))
    assert read_voi_lut(ds) is not None and read_voi_lut(ds).first_mapped == -2  # type: ignore[union-attr]
    out = apply_voi(at([-5, -2, -1, 0, 7]), ds)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 2048 / 4095, 1.0, 1.0], atol=1e-6)


def test_voi_lut_zero_entries_means_65536() -> None:
    data = np.arange(65536, dtype="<u2").tobytes()
    ds = voi_dataset(bits=16, VOILUTSequence=Sequence([lut_item([0, 0, 16], data)]))
    lut = read_voi_lut(ds)
    assert lut is not None and lut.data.size == 65536
    out = apply_voi(at([0, 1, 32768, 65535], np.uint16), ds)
    np.testing.assert_allclose(out[0], [0.0, 1 / 65535, 32768 / 65535, 1.0], atol=1e-7)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_voi_lut_read_back_from_file(syntax: UID, tmp_path: Path) -> None:
    """LUT Data written as OW and LUT Descriptor as US survive both VR encodings."""
    table = np.linspace(0, 4095, 1000).astype("<u2")
    ds = voi_dataset(VOILUTSequence=Sequence([lut_item([1000, 100, 12], table.tobytes())]))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID = UID("1.2.840.10008.5.1.4.1.1.1.2"), generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "lut.dcm")
    out = apply_voi(at([0, 100, 600, 1099, 3000]), back)
    np.testing.assert_allclose(out[0], [0.0, 0.0, table[500] / 4095, 1.0, 1.0], atol=1e-6)


def test_malformed_lut_falls_back() -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0])  # two values instead of three, no LUT Data
    ds = voi_dataset(VOILUTSequence=Sequence([item]))
    out = apply_voi(at([0, 50, 100]), ds, fallback="minmax")
    np.testing.assert_allclose(out[0], [0.0, 0.5, 1.0])


def test_window_takes_precedence_over_lut() -> None:
    ds = voi_dataset(
        WindowCenter="100", WindowWidth="51", VOILUTSequence=Sequence([lut_item([2, 0, 8], [255, 0])])
    )
    np.testing.assert_allclose(apply_voi(at([100]), ds)[0], [0.51], atol=1e-6)


# ---------------------------------------------------------------------------- fallback


def _labelled_image(tissue_bright: bool = True) -> np.ndarray:
    """60 % noisy background near 100, tissue 1000..1500, a small label at the far end (4095)."""
    rng = np.random.default_rng(0)
    img = np.rint(rng.normal(100, 20, (200, 200))).astype(np.uint16)
    img[:, 80:] = rng.integers(1000, 1501, (200, 120))
    img[:5, :5] = 4095
    if not tissue_bright:  # MONOCHROME1 raw: air is the highest value, dense tissue the lowest
        img = (4095 - img).astype(np.uint16)
    return img


def test_percentile_fallback_ignores_background_and_labels() -> None:
    img = _labelled_image()
    out = apply_voi(img, voi_dataset())  # no VOI at all
    background, tissue = out[5:, :80], out[:, 80:]
    assert np.mean(background == 0.0) > 0.99 and background.max() < 0.05  # window starts above air
    assert out[:5, :5].min() == 1.0  # the label is clipped at the top...
    assert tissue.max() > 0.99  # ...and does not squash the tissue, which spans the window top
    assert tissue.min() > 0.6  # the faintest tissue stays well above black
    minmax = apply_voi(img, voi_dataset(), fallback="minmax")
    np.testing.assert_allclose(minmax[img == 1250], (1250 - img.min()) / (4095 - img.min()), atol=1e-6)


def test_percentile_fallback_monochrome1() -> None:
    img = _labelled_image(tissue_bright=False)
    out = apply_voi(img, voi_dataset("MONOCHROME1"))
    background, tissue = out[5:, :80], out[:, 80:]
    assert np.mean(background == 0.0) > 0.99  # air is dark after inversion
    assert out[:5, :5].min() == 1.0
    dense, fatty = tissue[img[:, 80:] == 4095 - 1500], tissue[img[:, 80:] == 4095 - 1000]
    assert dense.min() > 0.99 and 0.6 < fatty.max() < 0.8


def test_fallback_of_uniform_image_is_zero() -> None:
    out = fallback_window(np.full((10, 10), 7, dtype=np.uint16))
    assert out.shape == (10, 10) and not out.any()


def test_sigmoid_is_symmetric_about_the_centre() -> None:
    window = Window(center=0.0, width=10.0, function="SIGMOID")
    out = apply_window(np.asarray([-5.0, 5.0]), window)
    assert math.isclose(float(out[0] + out[1]), 1.0, abs_tol=1e-6)


# ---------------------------------------------------------------------------- fallback on phantoms
# Regression: a two-class Otsu split put a bright collimator strip (or an implant) in one class
# and air + breast in the other, so the window missed the breast; MONOCHROME1 images went black
# ("no breast tissue found"), others lost the skin line or all tissue outside the implant.


def no_voi_phantom(
    photometric: str, view: str, *, border: str | None, implant: bool = False, seed: int = 0, bits: int = 14
) -> tuple[RenderedView, np.ndarray]:
    """A 1024x768 phantom with a burned-in label (and strip/implant) as stored in a file
    without VOI: MONOCHROME2-sense pixels inverted for MONOCHROME1."""
    rng = np.random.default_rng(seed)
    laterality = "R" if seed % 2 == 0 else "L"
    rendered = render_view(
        rng,
        laterality=laterality,
        view=view,
        size=(1024, 768),
        anatomy=BreastAnatomy.random(rng, "B", implant=implant),
        bits_stored=bits,
        label=f"{laterality} {view}",
        border=border,
        border_fraction=0.03,
    )
    assert (rendered.border_box is not None) is (border is not None)  # the strip is really there
    assert rendered.label_box is not None
    maxval = (1 << bits) - 1
    stored = maxval - rendered.pixels if photometric == "MONOCHROME1" else rendered.pixels
    return rendered, np.ascontiguousarray(stored, dtype=np.uint16)


def _box_mask(shape: tuple[int, ...], boxes: list[tuple[int, int, int, int] | None]) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=bool)
    for box in boxes:
        if box is not None:
            y0, x0, y1, x1 = box
            mask[y0:y1, x0:x1] = True
    return mask


def assert_breast_windowed(out: np.ndarray, rendered: RenderedView) -> None:
    """The whole breast above black with full contrast, the air black, the strip clipped."""
    breast = rendered.breast_mask
    assert np.mean(out[breast] > 0.0) > 0.999  # the faint skin line is kept above black
    assert np.percentile(out[breast], 99) > 0.9  # no strip or label squashes the contrast
    near = cv2.dilate(
        (breast | _box_mask(out.shape, [rendered.border_box, rendered.label_box])).astype(np.uint8),
        np.ones((9, 9), np.uint8),
    )
    assert np.mean(out[near == 0] == 0.0) > 0.99  # air starts the window
    if rendered.border_box is not None:
        y0, x0, y1, x1 = rendered.border_box
        assert np.median(out[y0:y1, x0:x1]) > 0.9  # the strip stays bright: it is not air


@pytest.mark.parametrize(
    ("photometric", "view", "border", "seed"),
    [
        ("MONOCHROME1", "CC", "top", 0),  # the reported "no breast tissue found"
        ("MONOCHROME1", "CC", "bottom", 1),
        ("MONOCHROME1", "MLO", "far", 3),  # strip + pectoral muscle
        ("MONOCHROME2", "CC", "far", 2),
        ("MONOCHROME2", "MLO", "bottom", 5),
    ],
)
def test_percentile_fallback_ignores_border_strip(
    photometric: str, view: str, border: str, seed: int
) -> None:
    rendered, stored = no_voi_phantom(photometric, view, border=border, seed=seed)
    out = apply_voi(stored, voi_dataset(photometric, bits=14))
    assert_breast_windowed(out, rendered)


@pytest.mark.parametrize(("photometric", "view"), [("MONOCHROME2", "CC"), ("MONOCHROME1", "MLO")])
def test_percentile_fallback_with_implant_keeps_the_tissue(photometric: str, view: str) -> None:
    """A silicone implant, far denser than tissue, is a mode of its own: the window still
    starts at the air, so the tissue around the implant stays visible."""
    rendered, stored = no_voi_phantom(photometric, view, border=None, implant=True, seed=4)
    out = apply_voi(stored, voi_dataset(photometric, bits=14))
    assert_breast_windowed(out, rendered)
    assert np.percentile(out[rendered.breast_mask], 10) > 0.15  # fatty tissue is not squashed to black


def test_percentile_window_orientation_is_symmetric() -> None:
    """MONOCHROME1 stored values give the mirrored window of the same image as MONOCHROME2."""
    _, stored = no_voi_phantom("MONOCHROME2", "CC", border="top", seed=0)
    low, high = percentile_window(stored, tissue_bright=True)
    inverted = (16383 - stored).astype(np.uint16)
    low1, high1 = percentile_window(inverted, tissue_bright=False)
    assert (low1, high1) == pytest.approx((16383 - high, 16383 - low))
