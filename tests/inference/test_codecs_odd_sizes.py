"""Every transfer syntax MammoNode writes, at odd and extreme sizes, in a child process.

GDCM's RLE encoder aborts the whole process (an uncaught C++ exception, exit 134) on any odd
Rows x Columns, and pydicom used it for the CAM capture because it was the first plugin
installed. Design invariant 8 says encoders are chosen explicitly; these tests pin it for
everything we encode: the CAM secondary capture (RLE, RGB 8-bit) and each syntax of the
synthetic generator at its bit depths (12 and 14 as digital mammograms, 16 as digitised film).

Each encode runs in a spawned child, so an abort or a segfault fails the test through the
child's exit status instead of killing pytest. The parent re-reads the written file and decodes
it with the node's own :func:`inference.dicom_pixels.decode_pixels`, which must give the pixels back
bit for bit.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from mg_source_factory import make_dx_mg
from pydicom.pixels import pixel_array
from pydicom.uid import RLELossless, SecondaryCaptureImageStorage

from inference.dicom_header import read_dataset
from inference.dicom_pixels import decode_pixels
from inference.overlay import render_cam_overlay
from inference.rendering import display_factor, display_image, exact_display_factor
from inference.types import RESEARCH_NOTICE, AlgorithmInfo
from inference.writers.sc import build_cam_sc, cam_sc_uids
from training.synth import TRANSFER_SYNTAXES, make_dicom, write_dicom
from training.synth.encoding import LOSSY_SYNTAXES, MIN_FRAME_SIDE

SMALL_SIZES = [(1, 1), (5, 7)]
BIG_SIZES = [(2013, 1169), (4463, 2847)]
SYNTH_BITS = (12, 14, 16)
LOSSLESS_SYNTAXES = sorted(set(TRANSFER_SYNTAXES) - LOSSY_SYNTAXES)
"""Those checked bit for bit here; HTJ2K lossy at odd sizes: tests/inference/test_htj2k.py."""
CHILD_TIMEOUT_S = 300
ALGORITHM = AlgorithmInfo(
    name="efficientnet_b0", version="0.1.0", weights_sha256="ab" * 32, threshold=0.5, notice=RESEARCH_NOTICE
)


# --------------------------------------------------------------------------------------------
# Pixels (the same in child and parent) and the child processes
# --------------------------------------------------------------------------------------------


def grey_pixels(rows: int, cols: int, bits: int) -> np.ndarray:
    """Noise over the full range of ``bits`` (the hardest case for every codec), with the
    extreme values present wherever there is room for them."""
    arr = np.random.default_rng([rows, cols, bits]).integers(0, 1 << bits, (rows, cols), dtype=np.uint16)
    arr.flat[0] = (1 << bits) - 1
    if arr.size > 1:
        arr.flat[-1] = 0
    return arr


def rgb_pixels(rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng([rows, cols, 3]).integers(0, 256, (rows, cols, 3), dtype=np.uint8)


def synth_file(out: Path, syntax: str, bits: int) -> Path:
    return out / f"synth-{syntax}-{bits}.dcm"


def refusal_file(out: Path, syntax: str, bits: int) -> Path:
    return out / f"synth-{syntax}-{bits}.refused"


def encode_synth_in_child(
    out: Path, syntax: str, rows: int, cols: int, depths: tuple[int, ...] = SYNTH_BITS
) -> None:
    """Child: write the synth file of ``syntax`` at each bit depth of ``depths``.

    A clean refusal (ValueError, e.g. a syntax's minimum frame size) is written next to it for
    the parent to judge; any other exception exits non-zero with its traceback.
    """
    for bits in depths:
        try:
            ds = make_dicom(
                grey_pixels(rows, cols, bits),
                patient_id="ODD-SIZE",
                study_uid="1.2.826.0.1.3680043.8.498.1",
                laterality="L",
                view="CC",
                bits_stored=bits,
                transfer_syntax=syntax,
                film=bits == 16,  # 16 bits is the digitised-film style; 12/14 digital mammograms
            )
        except ValueError as exc:
            refusal_file(out, syntax, bits).write_text(str(exc), encoding="utf-8")
            continue
        write_dicom(ds, synth_file(out, syntax, bits))


def encode_cam_sc_in_child(path: Path, rows: int, cols: int) -> None:
    """Child: build the CAM secondary capture of an RGB overlay of this size and write it."""
    source = make_dx_mg("R", "MLO")
    series_uid, sop_uid = cam_sc_uids(source.SOPInstanceUID, ALGORITHM, source.StudyInstanceUID)
    sc = build_cam_sc(
        source,
        rgb_pixels(rows, cols),
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=901,
        instance_number=1,
        probability=0.5,
        display_factor=None,
    )
    sc.save_as(path, enforce_file_format=True)


def render_cam_sc_in_child(path: Path, rows: int, cols: int) -> None:
    """Child: the whole capture path at a source size -- display copy (exact integer shrink),
    overlay with its corner panel, SC with the source geometry -- written with the picture as .npy."""
    source = make_dx_mg("L", "CC")
    source.Rows, source.Columns = rows, cols
    image01 = grey_pixels(rows, cols, 14).astype(np.float32) / float((1 << 14) - 1)
    display = display_image(image01)
    factor = exact_display_factor(rows, cols, display.shape)
    cam = np.zeros_like(display)
    cam[display.shape[0] // 3 : display.shape[0] // 2, display.shape[1] // 3 : display.shape[1] // 2] = 1.0
    picture = render_cam_overlay(display, cam, notice=RESEARCH_NOTICE, caption_lines=["L CC  image P 0.50"])
    series_uid, sop_uid = cam_sc_uids(source.SOPInstanceUID, ALGORITHM, source.StudyInstanceUID)
    sc = build_cam_sc(
        source,
        picture,
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=901,
        instance_number=1,
        probability=0.5,
        display_factor=factor,
        view="CC",
    )
    sc.save_as(path, enforce_file_format=True)
    np.save(path.with_suffix(".npy"), picture)


def run_in_child(target: Callable[..., object], *args: object) -> None:
    """Run ``target(*args)`` in a spawned process; fail the test unless it exits with 0."""
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(CHILD_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        process.join()
        pytest.fail(f"encoder child did not finish in {CHILD_TIMEOUT_S} s")
    code = process.exitcode
    assert code == 0, (
        f"encoder child died with signal {-code} (abort = 6)" if code and code < 0 else f"child exit {code}"
    )


# --------------------------------------------------------------------------------------------
# Checks in the parent
# --------------------------------------------------------------------------------------------


def check_cam_sc(path: Path, rows: int, cols: int) -> None:
    ds = read_dataset(path)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated) == (rows, cols, 3, 8)
    expected = rgb_pixels(rows, cols)
    # The RGB itself, through a safe decoder named explicitly ...
    rgb = pixel_array(ds, decoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(rgb.reshape(rows, cols, 3), expected)
    # ... and what the node reads from a colour image: its luma.
    grey = decode_pixels(ds)
    luma = cv2.cvtColor(expected, cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(grey, luma.reshape(rows, cols))


def check_rendered_cam_sc(path: Path, rows: int, cols: int) -> None:
    """The rendered capture decodes to the picture bit for bit, on the source's grid shrunk by
    the display factor, with the source's spacing times it."""
    ds = read_dataset(path)
    picture = np.load(path.with_suffix(".npy"))
    factor = display_factor(rows, cols)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert picture.shape == (max(1, rows // factor), max(1, cols // factor), 3)
    assert (ds.Rows, ds.Columns) == picture.shape[:2]
    rgb = pixel_array(ds, decoding_plugin="pylibjpeg")
    np.testing.assert_array_equal(rgb.reshape(picture.shape), picture)
    if rows >= factor and cols >= factor:
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.1 * factor] * 2)
    else:
        assert "PixelSpacing" not in ds


def check_synth(out: Path, syntax: str, rows: int, cols: int, depths: tuple[int, ...] = SYNTH_BITS) -> None:
    for bits in depths:
        refused = refusal_file(out, syntax, bits)
        if min(rows, cols) < MIN_FRAME_SIDE.get(syntax, 1):
            # A documented limit of the codec: refused cleanly up front, never attempted.
            assert refused.is_file(), f"{syntax} {bits}-bit {rows}x{cols} should have been refused"
            assert str(MIN_FRAME_SIDE[syntax]) in refused.read_text(encoding="utf-8")
            continue
        assert not refused.exists(), refused.read_text(encoding="utf-8")
        ds = read_dataset(synth_file(out, syntax, bits))
        assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[syntax]
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (rows, cols, bits)
        decoded = decode_pixels(ds)
        assert decoded.dtype == np.uint16, decoded.dtype
        np.testing.assert_array_equal(decoded, grey_pixels(rows, cols, bits))


def _id(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SMALL_SIZES, ids=_id)
def test_cam_capture_encodes_odd_sizes(size: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "cam.dcm"
    run_in_child(encode_cam_sc_in_child, path, *size)
    check_cam_sc(path, *size)


@pytest.mark.parametrize("size", [*SMALL_SIZES, (1, 4097), (63, 65), (2049, 2049)], ids=_id)
def test_rendered_cam_capture_encodes_odd_sizes(size: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "cam.dcm"
    run_in_child(render_cam_sc_in_child, path, *size)
    check_rendered_cam_sc(path, *size)


@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES)
@pytest.mark.parametrize("size", SMALL_SIZES, ids=_id)
def test_synth_syntax_encodes_odd_sizes(syntax: str, size: tuple[int, int], tmp_path: Path) -> None:
    run_in_child(encode_synth_in_child, tmp_path, syntax, *size)
    check_synth(tmp_path, syntax, *size)


@pytest.mark.slow
@pytest.mark.parametrize("size", BIG_SIZES, ids=_id)
def test_cam_capture_encodes_real_sizes(size: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "cam.dcm"
    run_in_child(encode_cam_sc_in_child, path, *size)
    check_cam_sc(path, *size)


@pytest.mark.slow
@pytest.mark.parametrize("size", BIG_SIZES, ids=_id)
def test_rendered_cam_capture_encodes_real_sizes(size: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "cam.dcm"
    run_in_child(render_cam_sc_in_child, path, *size)
    check_rendered_cam_sc(path, *size)


@pytest.mark.slow
@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES)
def test_synth_syntax_encodes_a_mid_size(syntax: str, tmp_path: Path) -> None:
    size = BIG_SIZES[0]
    run_in_child(encode_synth_in_child, tmp_path, syntax, *size)
    check_synth(tmp_path, syntax, *size)


@pytest.mark.slow
@pytest.mark.parametrize("syntax", ["rle", "jpeg2000"])
def test_synth_film_encodes_the_cbis_ddsm_shape(syntax: str, tmp_path: Path) -> None:
    """The full CBIS-DDSM shape, 16-bit, in the two syntaxes such archives hold."""
    size, film_bits = BIG_SIZES[1], (16,)
    run_in_child(encode_synth_in_child, tmp_path, syntax, *size, film_bits)
    check_synth(tmp_path, syntax, *size, film_bits)


def test_a_gdcm_abort_fails_the_test_instead_of_killing_it(tmp_path: Path) -> None:
    """The harness itself: GDCM's RLE encoder on an odd frame really aborts, and the child's
    death is reported as a failure with the signal (skipped where python-gdcm is absent)."""
    from pydicom.pixels import get_encoder

    if "gdcm" not in get_encoder(RLELossless).available_plugins:
        pytest.skip("python-gdcm not installed")
    with pytest.raises(AssertionError, match="signal 6"):
        run_in_child(_gdcm_rle_in_child, 5, 7)


def _gdcm_rle_in_child(rows: int, cols: int) -> None:
    from pydicom.pixels import get_encoder

    get_encoder(RLELossless).encode(
        rgb_pixels(rows, cols),
        encoding_plugin="gdcm",
        rows=rows,
        columns=cols,
        samples_per_pixel=3,
        number_of_frames=1,
        bits_allocated=8,
        bits_stored=8,
        photometric_interpretation="RGB",
        pixel_representation=0,
        planar_configuration=0,
    )


def test_cam_capture_names_its_rle_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the capture is compressed with a named safe plugin, never pydicom's default."""
    import inference.writers.sc as sc_module

    used: list[str] = []
    original = pydicom.Dataset.compress

    def spy(self: pydicom.Dataset, *args: object, **kwargs: object) -> None:
        used.append(str(kwargs.get("encoding_plugin", "")))
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom.Dataset, "compress", spy)
    source = make_dx_mg("L", "CC")
    series_uid, sop_uid = cam_sc_uids(source.SOPInstanceUID, ALGORITHM, source.StudyInstanceUID)
    sc = build_cam_sc(
        source,
        rgb_pixels(6, 8),
        algorithm=ALGORITHM,
        series_instance_uid=series_uid,
        sop_instance_uid=sop_uid,
        series_number=901,
        instance_number=1,
        probability=0.5,
        display_factor=None,
    )
    assert used == [sc_module.rle_encoder_plugin()]
    assert used[0] in sc_module.RLE_ENCODER_PLUGINS and "gdcm" not in sc_module.RLE_ENCODER_PLUGINS
    assert sc.SOPInstanceUID == sop_uid  # compressing kept the derived UID


@pytest.mark.parametrize("syntax", ["jpeg2000", "jpegls", "jpeg-lossless", "rle"])
def test_node_decodes_without_gdcm(syntax: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Decoding names its plugins too: GDCM is installed as a decoder of these syntaxes (and on
    a corrupt JPEG-LS stream aborts), but :func:`decode_pixels` never asks it."""
    import inference.dicom_pixels as dicom_pixels

    asked: list[str] = []

    def spy(src: object, **kwargs: object) -> np.ndarray:
        asked.append(str(kwargs.get("decoding_plugin", "")))
        return np.asarray(pixel_array(src, **kwargs))  # type: ignore[arg-type]

    encode_synth_in_child(tmp_path, syntax, 40, 33, (16,))  # a valid file: in process is safe here
    monkeypatch.setattr(dicom_pixels, "pixel_array", spy)
    check_synth(tmp_path, syntax, 40, 33, (16,))
    assert asked and "" not in asked and "gdcm" not in asked
    assert set(asked) <= set(dicom_pixels._PLUGIN_ORDER) and "gdcm" not in dicom_pixels._PLUGIN_ORDER
