"""DALI preprocessing against the CPU path it mirrors, in DALI's CPU-only mode (runs in CI).

Tolerances, and why:

- decoding: bit-exact (DALI's JPEG 2000 decoder and pydicom + pylibjpeg-openjpeg are both exact
  decoders of a lossless code stream);
- the windowed image (what the CAM capture is drawn on): within WINDOW_ATOL. The device evaluates
  the PS3.3 window in float32, the CPU path in float64 before rounding to float32;
- the model input: the same GeometricTransform exactly (the crop/flip/scale decision runs the CPU
  path's own code on the windowed image), and pixels within GRID_MAX_ATOL / GRID_MEAN_ATOL.
  OpenCV shrinks with INTER_AREA (exact box integrals); DALI has no box filter, so the device
  resamples bilinearly onto a grid ceil(1/scale) times finer and averages the blocks. On the
  2000x1500 image shrunk ~4x that measures max 0.004, mean 1e-4 of the [0, 1] range, up to ~0.015
  at the crop border at other scales; DALI's own antialiased filter (a triangle twice as wide as
  the box) differed by 0.04 max and moved the demo model's logits by up to 0.2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import JPEGBaseline8Bit

from inference.dicom_header import read_meta
from inference.dicom_pixels import decode_pixels
from inference.pipeline import prepare_image
from inference.preprocessing import preprocess
from inference.types import InputError, PreprocessConfig

pytest.importorskip("nvidia.dali")  # in the dev extra: CI installs it, so this never skips there

from inference import preprocessing_dali
from inference.preprocessing_dali import (
    DaliPreprocessor,
    NotForDali,
    route,
)
from training.synth import make_dicom, render_view

WINDOW_ATOL = 1e-5
GRID_MAX_ATOL = 0.03  # the box mean of 8+ samples a side vs the exact area integral, at a 1-2x shrink
GRID_MEAN_ATOL = 1e-3
PROBABILITY_ATOL = 0.02
"""Demo model, DALI input vs CPU input: measured up to 0.002 (logits up to 0.06 near p = 0.97)."""

CONFIG = PreprocessConfig(input_height=512, input_width=256)
PARITY_SIZE = (2000, 1500)
SMALL = (256, 192)


def _mammogram(
    seed: int,
    *,
    size: tuple[int, int] = SMALL,
    laterality: str = "L",
    view: str = "CC",
    bits: int = 14,
    voi: str = "linear",
    photometric: str = "MONOCHROME2",
    syntax: str = "jpeg2000",
) -> Dataset:
    rendered = render_view(
        np.random.default_rng(seed), laterality=laterality, view=view, size=size, bits_stored=bits
    )
    return make_dicom(
        rendered.pixels,
        patient_id=f"DALI{seed}",
        study_uid=f"1.2.826.0.1.3680043.10.1.{seed}",
        laterality=laterality,
        view=view,
        bits_stored=bits,
        voi=voi,
        photometric=photometric,
        transfer_syntax=syntax,
        breast_mask=rendered.breast_mask,
    )


def _rescaled(ds: Dataset, slope: float, intercept: float) -> Dataset:
    """The same stored pixels with a Modality LUT, the window moved to the rescaled units."""
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.WindowCenter, ds.WindowWidth = center * slope + intercept, width * slope
    return ds


@pytest.fixture(scope="module")
def parity_datasets() -> list[Dataset]:
    """2000x1500 JPEG 2000 mammograms (16-bit LINEAR; 12-bit SIGMOID MONOCHROME1) and a small
    14-bit LINEAR_EXACT one with a rescale slope and intercept."""
    return [
        _mammogram(1, size=PARITY_SIZE, bits=16),
        _mammogram(
            2, size=PARITY_SIZE, laterality="R", view="MLO", bits=12, voi="sigmoid", photometric="MONOCHROME1"
        ),
        _rescaled(_mammogram(3, laterality="R", voi="linear_exact"), 2.0, -100.0),
    ]


@pytest.fixture(scope="module")
def prep() -> DaliPreprocessor:
    return DaliPreprocessor(CONFIG, device_id=None, batch_size=4)


@pytest.fixture(scope="module")
def parity_run(prep: DaliPreprocessor, parity_datasets: list[Dataset]) -> preprocessing_dali.DaliBatch:
    return prep.prepare(parity_datasets)


def test_dali_cpu_decode_is_bit_exact(prep: DaliPreprocessor, parity_datasets: list[Dataset]) -> None:
    for ds, decoded in zip(parity_datasets[:2], prep.decode(parity_datasets[:2]), strict=True):
        reference = decode_pixels(ds)  # pydicom + pylibjpeg-openjpeg
        assert decoded.dtype == np.uint16 and reference.dtype == np.uint16
        np.testing.assert_array_equal(decoded, reference)


def test_dali_cpu_preprocessing_matches_the_cpu_path(
    parity_run: preprocessing_dali.DaliBatch, parity_datasets: list[Dataset]
) -> None:
    assert parity_run.fallbacks == [] and parity_run.errors == []
    assert isinstance(parity_run.batch, np.ndarray)
    assert parity_run.batch.shape == (3, 1, 512, 256) and parity_run.batch.dtype == np.float32
    assert [row.index for row in parity_run.rows] == [0, 1, 2]
    for k, row in enumerate(parity_run.rows):
        ds = parity_datasets[row.index]
        display = prepare_image(ds, read_meta(ds), CONFIG).display
        np.testing.assert_array_equal(row.display, display)  # made on the host by the CPU path's code
        reference = preprocess(ds, CONFIG)
        assert row.transform == reference.transform
        assert row.meta == read_meta(ds)
        diff = np.abs(parity_run.batch[k, 0] - reference.pixels)
        assert diff.max() <= GRID_MAX_ATOL, (k, diff.max())
        assert diff.mean() <= GRID_MEAN_ATOL, (k, diff.mean())
        assert parity_run.batch[k].min() >= 0.0 and parity_run.batch[k].max() <= 1.0


def test_any_voi_goes_to_dali_and_is_applied_on_the_host_as_on_the_cpu_path(
    prep: DaliPreprocessor,
) -> None:
    """A VOI LUT Sequence, no VOI at all (the percentile fallback) and a sigmoid window: the host
    windows the pyramid levels with the CPU path's code, so the displays are the same arrays."""
    datasets = [_mammogram(17, voi="lut"), _mammogram(18, voi="none"), _mammogram(22, voi="sigmoid")]
    result = prep.prepare(datasets)
    assert result.fallbacks == [] and result.errors == []
    for row in result.rows:
        ds = datasets[row.index]
        reference = prepare_image(ds, read_meta(ds), CONFIG)
        np.testing.assert_array_equal(row.display, reference.display)
        assert row.transform == reference.model_input.transform


def _baseline_jpeg(ds: Dataset) -> bytes:
    """An 8-bit baseline (SOF0) JPEG of the image: what DALI's ANY_DATA decoder crashes on."""
    grey = (decode_pixels(ds) >> 6).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", grey)
    assert ok
    return bytes(data)


def _with_frame(ds: Dataset, frame: bytes, syntax: str) -> Dataset:
    out = copy.deepcopy(ds)
    out.file_meta.TransferSyntaxUID = syntax
    out.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)])
    out["PixelData"].VR = "OB"
    return out


def _baseline_dataset(ds: Dataset) -> Dataset:
    out = _with_frame(ds, _baseline_jpeg(ds), JPEGBaseline8Bit)
    out.BitsAllocated, out.BitsStored, out.HighBit = 8, 8, 7
    for keyword in ("WindowCenter", "WindowWidth"):
        delattr(out, keyword)
    return out


def _j2k_frame(ds: Dataset) -> bytes:
    return get_frame(ds.PixelData, 0, number_of_frames=1)


CASES: dict[str, tuple[Callable[[], Dataset], bool, str]] = {
    "explicit VR": (lambda: _mammogram(10, syntax="explicit"), False, "not decoded by DALI"),
    "RLE": (lambda: _mammogram(11, syntax="rle"), False, "not decoded by DALI"),
    "JPEG-LS": (lambda: _mammogram(12, syntax="jpegls"), True, "not decoded by DALI"),
    "8-bit baseline JPEG": (lambda: _baseline_dataset(_mammogram(13)), True, "not decoded by DALI"),
    "baseline JPEG labelled JPEG 2000": (
        lambda: _with_frame(_mammogram(14), _baseline_jpeg(_mammogram(14)), "1.2.840.10008.1.2.4.90"),
        True,
        "not a raw JPEG 2000 code stream",
    ),
    "baseline JPEG labelled JPEG Lossless": (
        lambda: _with_frame(_mammogram(15), _baseline_jpeg(_mammogram(15)), "1.2.840.10008.1.2.4.70"),
        True,
        "SOF0 is not lossless",
    ),
    "JPEG Lossless without a GPU": (lambda: _mammogram(16, syntax="jpeg-lossless"), False, "GPU only"),
    "code stream of another size": (
        lambda: _with_frame(
            _mammogram(19, size=(128, 96)), _j2k_frame(_mammogram(19)), "1.2.840.10008.1.2.4.90"
        ),
        True,
        "J2K header 256x192",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_route_sends_what_dali_cannot_take_to_the_cpu_path(case: str) -> None:
    make, gpu, reason = CASES[case]
    with pytest.raises(NotForDali, match=reason):
        route(make(), gpu=gpu)


def test_jpeg_lossless_goes_to_dali_on_a_gpu() -> None:
    stream = route(_mammogram(20, syntax="jpeg-lossless", bits=12), gpu=True)
    assert stream.kind == "jpeg-lossless" and stream.precision == 16  # GDCM writes precision 16
    assert stream.data.startswith(b"\xff\xd8")


def test_8bit_jpeg2000_goes_to_the_cpu_path() -> None:
    ds = _mammogram(21)
    pixels = (decode_pixels(ds) >> 6).astype(np.uint16)  # values below 256
    ds.BitsStored, ds.HighBit = 8, 7
    ds.compress("1.2.840.10008.1.2.4.90", pixels, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    with pytest.raises(NotForDali, match="8-bit J2K"):
        route(ds, gpu=True)


def _spy_on_decode_graph(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every code stream handed to DALI's decoder."""
    seen: list[bytes] = []
    real = preprocessing_dali._decode_graph

    def spying(**kwargs: Any) -> Any:
        pipe = real(**kwargs)
        run = pipe.run

        def recording_run(**inputs: Any) -> Any:
            seen.extend(bytes(s) for s in inputs["stream"])
            return run(**inputs)

        pipe.run = recording_run
        return pipe

    monkeypatch.setattr(preprocessing_dali, "_decode_graph", spying)
    return seen


def test_prepare_never_hands_baseline_jpeg_or_other_syntaxes_to_dali(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_on_decode_graph(monkeypatch)
    prep = DaliPreprocessor(CONFIG, device_id=None, batch_size=4)
    j2k = _mammogram(30)
    datasets = [
        _baseline_dataset(_mammogram(31)),
        _mammogram(32, syntax="rle"),
        j2k,
        _mammogram(33, syntax="jpegls"),
    ]
    result = prep.prepare(datasets)  # a baseline JPEG given to DALI would have killed this process
    assert [index for index, _ in result.fallbacks] == [0, 1, 3]
    assert [row.index for row in result.rows] == [2]
    assert seen == [_j2k_frame(j2k)]
    assert all(stream.startswith(b"\xff\x4f\xff\x51") for stream in seen)


def test_a_failed_dali_run_falls_back_and_the_next_batch_works() -> None:
    prep = DaliPreprocessor(CONFIG, device_id=None, batch_size=2)
    good = _mammogram(40)
    broken = _with_frame(good, _j2k_frame(good)[:60], "1.2.840.10008.1.2.4.90")  # SIZ, then nothing
    failed = prep.prepare([broken, good])
    assert failed.rows == [] and failed.batch.shape[0] == 0
    assert [index for index, _ in failed.fallbacks] == [0, 1]
    assert all(reason.startswith("DALI failed") for _, reason in failed.fallbacks)
    with pytest.raises(InputError):  # the CPU path then names what is wrong with the file
        decode_pixels(broken)
    recovered = prep.prepare([good])
    assert recovered.fallbacks == [] and [row.index for row in recovered.rows] == [0]


def test_a_uniform_image_is_an_error_like_on_the_cpu_path() -> None:
    ds = _mammogram(50)
    flat = np.full(SMALL, 1000, dtype=np.uint16)
    ds.compress("1.2.840.10008.1.2.4.90", flat, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    result = DaliPreprocessor(CONFIG, device_id=None, batch_size=1).prepare([ds])
    assert result.rows == [] and result.fallbacks == []
    [(index, error)] = result.errors
    assert index == 0 and "uniform" in str(error)
    with pytest.raises(InputError, match="uniform"):
        preprocess(ds, CONFIG)


def test_prepare_refuses_more_than_its_batch() -> None:
    with pytest.raises(ValueError, match="batch size"):
        DaliPreprocessor(CONFIG, batch_size=1).prepare([_mammogram(60), _mammogram(61)])


def test_pipeline_scores_the_same_with_dali(parity_datasets: list[Dataset]) -> None:
    """Pipeline.prepare_and_infer with DALI (and a fallback, and a failure) vs without."""
    pytest.importorskip("torch")
    from inference.backends.loader import load_backend
    from inference.bundled import bundled_model_dir
    from inference.pipeline import Pipeline

    backend = load_backend("torch", bundled_model_dir())
    uniform = _mammogram(70)
    uniform.compress(
        "1.2.840.10008.1.2.4.90",
        np.full(SMALL, 7, np.uint16),
        encoding_plugin="pylibjpeg",
        generate_instance_uid=False,
    )
    datasets = [parity_datasets[0], _mammogram(71, syntax="rle", laterality="R"), uniform, parity_datasets[1]]
    items = [(ds, read_meta(ds)) for ds in datasets]
    cpu = Pipeline(backend).prepare_and_infer(items)
    dali = DaliPreprocessor(backend.manifest.preprocess, device_id=None, batch_size=3)
    gpu_path = Pipeline(backend, dali=dali).prepare_and_infer(items)
    assert [i for i, _ in cpu.failures] == [i for i, _ in gpu_path.failures] == [2]
    assert (
        [s.meta for s in gpu_path.scores] == [s.meta for s in cpu.scores] == [items[i][1] for i in (0, 1, 3)]
    )
    for a, b, pa, pb in zip(cpu.scores, gpu_path.scores, cpu.prepared, gpu_path.prepared, strict=True):
        assert a.transform == b.transform
        assert abs(a.probability - b.probability) <= PROBABILITY_ATOL
        assert pb.dataset.SOPInstanceUID == pa.dataset.SOPInstanceUID and "PixelData" not in pb.dataset
        np.testing.assert_allclose(pb.display, pa.display, rtol=0, atol=WINDOW_ATOL)
        assert np.abs(pb.model_input.pixels - pa.model_input.pixels).max() <= GRID_MAX_ATOL


# --------------------------------------------------------------------------------------------
# On a GPU (skipped without one)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_decode_is_bit_exact_for_jpeg2000_and_jpeg_lossless(parity_datasets: list[Dataset]) -> None:
    lossless = _mammogram(80, size=PARITY_SIZE, bits=16, syntax="jpeg-lossless")
    datasets = [*parity_datasets[:2], lossless]
    decoded = DaliPreprocessor(CONFIG, device_id=0, batch_size=4).decode(datasets)
    for ds, pixels in zip(datasets, decoded, strict=True):
        np.testing.assert_array_equal(pixels, decode_pixels(ds))


@pytest.mark.gpu
def test_gpu_preprocessing_matches_the_cpu_path_and_stays_on_the_device(
    parity_datasets: list[Dataset],
) -> None:
    from inference.backends.cuda_runtime import CudaArray

    lossless = _mammogram(81, size=PARITY_SIZE, bits=16, syntax="jpeg-lossless", voi="sigmoid")
    datasets = [*parity_datasets, lossless]
    result = DaliPreprocessor(CONFIG, device_id=0, batch_size=4).prepare(datasets)
    assert result.fallbacks == [] and isinstance(result.batch, CudaArray)
    assert result.batch.shape == (4, 1, 512, 256)
    host = result.batch.to_host()
    for k, row in enumerate(result.rows):
        reference = preprocess(datasets[row.index], CONFIG)
        assert row.transform == reference.transform
        diff = np.abs(host[k, 0] - reference.pixels)
        assert diff.max() <= GRID_MAX_ATOL and diff.mean() <= GRID_MEAN_ATOL


@pytest.mark.gpu
def test_gpu_batch_goes_to_the_torch_backend_in_device_memory(parity_datasets: list[Dataset]) -> None:
    from inference.backends.torch_backend import TorchBackend
    from inference.bundled import bundled_model_dir

    backend = TorchBackend(bundled_model_dir(), device="cuda:0")
    result = DaliPreprocessor(backend.manifest.preprocess, device_id=0, batch_size=4).prepare(parity_datasets)
    assert not isinstance(result.batch, np.ndarray)
    logits, cams = backend.infer_device(result.batch)
    ref_logits, ref_cams = backend.infer(result.batch.to_host())
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(cams, ref_cams, rtol=0, atol=1e-4)
