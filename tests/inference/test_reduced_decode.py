"""Decoding only the resolution needed (issue 12): the pyramid is JPEG 2000's own, a reduced
decode gives exactly what a full decode gives, and so do the model inputs and the scores.

The parity tests score the same files twice with the bundled demo model on ONNX Runtime: once as
the node does (a reduced JPEG 2000 decode where the code stream allows) and once with the reduced
decode switched off (every image decoded in full, its levels computed), on a synthetic 4-view
3328x2560 study and on real-shaped films (4000+ rows, odd sizes, Secondary Capture MG).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
from corpus import real_shaped_corpus
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame

import inference.reduced_decode as reduced_decode
from inference import load_backend, resolve_model_dir
from inference.dicom_header import read_dataset, read_meta
from inference.dicom_pixels import decode_stored
from inference.pipeline import Pipeline, PreparedImage, prepare_image
from inference.preprocessing import find_level, model_level, preprocess
from inference.pyramid import Pyramid, lowpass, next_level, sample_range
from inference.reduced_decode import SourceLevels, decode_pyramid, parse_header
from inference.rendering import display_level
from inference.types import ImageScore, PreprocessConfig
from training.synth import make_dicom, synth_breast

MODEL_SIZE = (3328, 2560)
PROBABILITY_TOLERANCE = 0.01


def _j2k(pixels: np.ndarray, syntax: str = "jpeg2000", **tags: object) -> Dataset:
    tags = {"laterality": "L", "view": "CC", **tags}
    return make_dicom(
        pixels, patient_id="PYR", study_uid="1.2.826.0.1.3680043.8.498.1", transfer_syntax=syntax, **tags
    )


def _frame(ds: Dataset) -> bytes:
    return bytes(get_frame(ds.PixelData, 0, number_of_frames=1))


def _openjpeg_level(ds: Dataset, level: int) -> np.ndarray:
    """openjpeg's own reduced decode (through Pillow) as stored values."""
    with Image.open(io.BytesIO(_frame(ds))) as image:
        image.reduce = level  # type: ignore[method-assign,assignment]
        image.load()
        raw = np.asarray(image, dtype=np.uint16)
    return raw.astype(np.int32) >> (16 - parse_header(_frame(ds)).precision)


@pytest.fixture
def full_decode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch the reduced decode off: every image is decoded in full and its levels computed."""
    monkeypatch.setattr(reduced_decode, "REDUCED_SYNTAXES", frozenset())


# -- the pyramid ------------------------------------------------------------------------------


def _reference_lowpass(x: np.ndarray) -> np.ndarray:
    """ISO/IEC 15444-1 F.4.8.2 written out sample by sample (one 1-D step along axis 0)."""
    n = x.shape[0]
    if n == 1:
        return x.copy()

    def ext(i: int) -> np.ndarray:  # whole-sample symmetric extension
        period = 2 * (n - 1)
        i = abs(i) % period
        return x[period - i] if i >= n else x[i]

    d = {k: ext(2 * k + 1) - (ext(2 * k) + ext(2 * k + 2)) // 2 for k in range(-1, (n + 1) // 2)}
    return np.stack([ext(2 * k) + (d[k - 1] + d[k] + 2) // 4 for k in range((n + 1) // 2)])


@pytest.mark.parametrize("shape", [(1, 5), (2, 2), (7, 4), (8, 9), (33, 17)])
def test_lowpass_is_the_standards_5_3_lifting(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(sum(shape)).integers(-5000, 5000, shape).astype(np.int32)
    np.testing.assert_array_equal(lowpass(x, 0), _reference_lowpass(x))
    np.testing.assert_array_equal(lowpass(x, 1), _reference_lowpass(x.T).T)


@pytest.mark.parametrize("shape", [(3328, 2560), (4095, 3071), (333, 251)])
def test_a_reduced_openjpeg_decode_is_the_pyramids_level_one_bit_for_bit(shape: tuple[int, int]) -> None:
    """Including the clipping: a bright label on black undershoots below 0 at level 1."""
    pixels, _ = synth_breast(np.random.default_rng(3), laterality="L", view="CC", size=shape)
    pixels[10:40, 10:80] = 4095  # a saturated burned-in block next to black background
    ds = _j2k(pixels)
    full = decode_stored(ds).astype(np.int32)
    low, high = sample_range(12, False)
    ours = next_level(full, low, high)
    unclipped = lowpass(lowpass(full, 0), 1)
    assert unclipped.min() < 0  # the test exercises the clipping
    np.testing.assert_array_equal(_openjpeg_level(ds, 1), ours)


def test_levels_are_trimmed_to_whole_source_blocks() -> None:
    pyramid = Pyramid.of(np.zeros((4095, 3071), np.int32), 4095, 3071, 0, 0, 4095)
    assert pyramid.level(1).shape == (2047, 1535)
    assert pyramid.level(2).shape == (1023, 767)
    assert pyramid.untrimmed[1].shape == (2048, 1536)
    with pytest.raises(ValueError, match="level 1 of a 10x10 image"):
        Pyramid.of(np.zeros((4, 5), np.int32), 10, 10, 1, 0, 1)


# -- which levels are used --------------------------------------------------------------------


def test_level_choices() -> None:
    config = PreprocessConfig(input_height=512, input_width=256)
    assert find_level(3328, 2560) == 2  # 832 rows: still above the finder's 512
    assert find_level(1024, 768) == 1 and find_level(1000, 700) == 0
    assert model_level(3000, 1500, config) == 2  # 5.9x smaller: level 2, then resized
    assert model_level(3000, 1500, PreprocessConfig(input_height=1024, input_width=512)) == 1
    assert model_level(900, 400, config) == 0  # never enlarged from a coarser level
    assert display_level(3328, 2560) == (1, 1)
    assert display_level(4463, 2847) == (0, 3)  # factor 3: shown from the source
    assert display_level(8000, 6000) == (2, 1)
    assert display_level(1024, 768) == (0, 1)


def test_what_a_reduced_decode_needs_from_the_code_stream() -> None:
    pixels, _ = synth_breast(np.random.default_rng(4), laterality="R", view="MLO", size=(1024, 768))
    lossless = parse_header(_frame(_j2k(pixels)))
    assert (lossless.rows, lossless.columns, lossless.tiles, lossless.at_origin) == (1024, 768, 1, True)
    assert lossless.reversible and lossless.levels >= 1 and lossless.precision == 12
    assert reduced_decode._not_reducible(lossless, 1024, 768) == ""
    tiled = bytearray(_frame(_j2k(pixels)))
    tiled[24:32] = struct.pack(">II", 256, 256)  # XTsiz, YTsiz: 3 x 4 tiles
    assert "12 tiles" in reduced_decode._not_reducible(parse_header(bytes(tiled)), 1024, 768)
    lossy = parse_header(_frame(_j2k(pixels, "htj2k-lossy")))
    assert "irreversible" in reduced_decode._not_reducible(lossy, 1024, 768)


@pytest.mark.parametrize("syntax", ["htj2k", "htj2k-rpcl"])
def test_lossless_htj2k_is_decoded_at_half_resolution_bit_for_bit(syntax: str) -> None:
    pixels, _ = synth_breast(np.random.default_rng(8), laterality="R", view="CC", size=(1331, 1023))
    ds = _j2k(pixels, syntax)
    reduced = decode_pyramid(ds, 1)
    assert reduced.base == 1
    low, high = sample_range(12, False)
    np.testing.assert_array_equal(
        reduced.untrimmed[1], next_level(decode_stored(ds).astype(np.int32), low, high)
    )


def test_lossy_streams_are_decoded_in_full() -> None:
    pixels, _ = synth_breast(np.random.default_rng(9), laterality="R", view="CC", size=(1024, 768))
    assert decode_pyramid(_j2k(pixels, "htj2k-lossy"), 1).base == 0


def test_the_node_decodes_half_resolution_and_never_the_source() -> None:
    pixels, _ = synth_breast(np.random.default_rng(5), laterality="L", view="MLO", size=MODEL_SIZE)
    ds = _j2k(pixels)
    source = SourceLevels(ds, finest=display_level(*MODEL_SIZE)[0])
    source.level(2)
    assert source.decoded_level == 1
    native = _j2k(pixels, "explicit")
    assert decode_pyramid(native, 1).base == 0  # no pyramid in the stream: decoded in full


def test_a_damaged_code_stream_falls_back_to_the_full_decoders_error() -> None:
    pixels, _ = synth_breast(np.random.default_rng(6), laterality="L", view="CC", size=(1024, 768))
    ds = _j2k(pixels)
    frame = _frame(ds)
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    with pytest.raises(Exception) as caught:
        prepare_image(ds, read_meta(ds), PreprocessConfig(input_height=512, input_width=256))
    assert type(caught.value).__name__ == "InputError"


# -- parity: the same model inputs and scores -------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline(load_backend("onnxruntime", resolve_model_dir(None)), batch_size=4)


@pytest.fixture(scope="module")
def study_4view(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 4-view 3328x2560 lossless JPEG 2000 study, as `mammonode bench` makes it."""
    out = tmp_path_factory.mktemp("study")
    paths = []
    for number, (laterality, view) in enumerate((("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")), 1):
        pixels, _ = synth_breast(
            np.random.default_rng([7, number]), laterality=laterality, view=view, size=MODEL_SIZE
        )
        ds = make_dicom(
            pixels,
            patient_id="PARITY",
            study_uid="1.2.826.0.1.3680043.8.498.7",
            laterality=laterality,
            view=view,
            transfer_syntax="jpeg2000",
            instance_number=number,
        )
        path = out / f"{laterality}_{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def films(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return real_shaped_corpus(tmp_path_factory.mktemp("films") / "corpus", n=4)


def _prepared(paths: list[Path], pipeline: Pipeline) -> tuple[list[PreparedImage], list[ImageScore]]:
    images = [
        prepare_image(ds, read_meta(ds), pipeline.manifest.preprocess) for ds in map(read_dataset, paths)
    ]
    return images, pipeline.infer(images)


def _assert_same_scores(reduced: list[ImageScore], full: list[ImageScore], threshold: float) -> None:
    for a, b in zip(reduced, full, strict=True):
        assert abs(a.probability - b.probability) <= PROBABILITY_TOLERANCE
        assert (a.probability >= threshold) == (b.probability >= threshold)
        peak_a = np.unravel_index(int(np.argmax(a.cam)), a.cam.shape)
        peak_b = np.unravel_index(int(np.argmax(b.cam)), b.cam.shape)
        assert max(abs(int(i) - int(j)) for i, j in zip(peak_a, peak_b, strict=True)) <= 1
        assert a.transform == b.transform


@pytest.mark.slow
def test_a_4view_study_scores_the_same_from_a_reduced_and_a_full_decode(
    study_4view: list[Path], pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    reduced_images, reduced = _prepared(study_4view, pipeline)
    monkeypatch.setattr(reduced_decode, "REDUCED_SYNTAXES", frozenset())
    full_images, full = _prepared(study_4view, pipeline)
    for a, b in zip(reduced_images, full_images, strict=True):
        np.testing.assert_array_equal(a.model_input.pixels, b.model_input.pixels)
        np.testing.assert_array_equal(a.display, b.display)
    _assert_same_scores(reduced, full, pipeline.manifest.threshold)
    breasts_a = pipeline.score(reduced_images)[0].breasts
    breasts_b = pipeline.score(full_images)[0].breasts
    for a, b in zip(breasts_a, breasts_b, strict=True):
        assert abs(a.probability - b.probability) <= PROBABILITY_TOLERANCE
        assert (a.probability >= pipeline.manifest.threshold) == (
            b.probability >= pipeline.manifest.threshold
        )


@pytest.mark.slow
def test_real_shaped_films_give_the_same_model_inputs_from_a_reduced_and_a_full_decode(
    films: list[Path], pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Films are 4000+ rows: the capture needs the source (display factor 3) but the model reads
    level 3, so training and evaluation (:func:`preprocess`) decode at half resolution."""
    config = pipeline.manifest.preprocess
    datasets = [read_dataset(p) for p in films]
    reduced = [preprocess(ds, config) for ds in datasets]
    j2k = [ds for ds in datasets if ds.file_meta.TransferSyntaxUID in reduced_decode.REDUCED_SYNTAXES]
    assert j2k
    for ds in j2k:
        source = SourceLevels(ds)
        source.level(find_level(source.rows, source.columns))
        assert source.decoded_level == 1
    monkeypatch.setattr(reduced_decode, "REDUCED_SYNTAXES", frozenset())
    full = [preprocess(ds, config) for ds in datasets]
    for a, b in zip(reduced, full, strict=True):
        np.testing.assert_array_equal(a.pixels, b.pixels)
        assert a.transform == b.transform
    scores_a = pipeline.infer([_as_prepared(p) for p in reduced])
    scores_b = pipeline.infer([_as_prepared(p) for p in full])
    _assert_same_scores(scores_a, scores_b, pipeline.manifest.threshold)


def _as_prepared(model_input: object) -> PreparedImage:
    return PreparedImage(Dataset(), np.zeros((2, 2), np.float32), model_input)  # type: ignore[arg-type]
