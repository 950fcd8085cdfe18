"""The pipeline's CAM captures: the source's geometry, view and study, a caption that states the
breast's decision, and map opacity that follows the probability only when configured to."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from mg_source_factory import breast_pixels, dciodvfy_errors, make_dx_mg, make_sc_mg
from pydicom.dataset import Dataset

from inference.backends.base import check_batch
from inference.dicom_header import read_meta
from inference.manifest import ModelManifest
from inference.overlay import overlay_layout
from inference.pipeline import Pipeline, PreparedImage
from inference.rendering import Capture, capture_captions, distinct_decimals, render_capture
from inference.types import (
    BreastScore,
    ImageMeta,
    ImageScore,
    PreprocessConfig,
    StudyScore,
)

GRID = (128, 64)


class HotSpotBackend:
    """Instant and deterministic: a fixed logit, and a CAM with one hot cell."""

    name = "fake"
    max_batch = 64

    def __init__(self, logit: float) -> None:
        self.logit = logit
        self.manifest = ModelManifest(
            name="fake", version="1", architecture="efficientnet_b0", preprocess=PreprocessConfig(*GRID)
        )

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = check_batch(batch, self.manifest)
        cams = np.zeros((len(arr), GRID[0] // 16, GRID[1] // 16), dtype=np.float32)
        cams[:, 4, 1] = 5.0
        return np.full(len(arr), self.logit, dtype=np.float32), cams


def _sized_dx(laterality: str, view: str, rows: int, columns: int) -> Dataset:
    ds = make_dx_mg(laterality, view)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = breast_pixels(laterality, rows, columns).tobytes()
    return ds


def _capture(
    pipeline: Pipeline, source: Dataset, meta: ImageMeta | None = None
) -> tuple[Capture, StudyScore, PreparedImage]:
    """Prepare, score and render one image's capture as ``Pipeline.outputs`` does."""
    prepared = pipeline.prepare(source, meta or read_meta(source))
    (study,) = pipeline.score([prepared])
    task = pipeline._capture_task(study, prepared, study.images[0], 1, 1, keep_picture=True)
    return render_capture(task), study, prepared


def _colour_outside_panel(picture: np.ndarray, display: np.ndarray, captions: tuple[str, ...]) -> float:
    layout = overlay_layout(display, notice=None, caption_lines=captions)
    as_int = picture.astype(np.int16)
    colour = as_int.max(axis=2) - as_int.min(axis=2)
    if layout.panel is not None:
        colour[layout.panel.slices] = 0
    return float(colour.sum())


@pytest.mark.parametrize(("rows", "columns", "factor"), [(4463, 2847, 3), (2013, 1169, 1)])
def test_capture_keeps_the_source_grid_and_adds_no_rows(
    rows: int, columns: int, factor: int, tmp_path: Path
) -> None:
    pipeline = Pipeline(HotSpotBackend(1.0))
    capture, _, prepared = _capture(pipeline, _sized_dx("L", "CC", rows, columns))
    ds = capture.encoded.dataset()
    assert prepared.display.shape == (rows // factor, columns // factor)
    assert (ds.Rows, ds.Columns) == prepared.display.shape  # no strips added
    assert capture.picture is not None and capture.picture.shape[:2] == prepared.display.shape
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.1 * factor] * 2)
    assert ds.Modality == "MG" and ds.ImageLaterality == "L"
    assert ds.ViewCodeSequence[0].CodeValue == "399162004"
    assert ds.BurnedInAnnotation == "YES"
    if shutil.which("dciodvfy"):
        path = tmp_path / "cam.dcm"
        path.write_bytes(capture.encoded.data)
        assert dciodvfy_errors(path) == []


def test_film_capture_takes_the_view_of_the_callers_meta() -> None:
    source = make_sc_mg("R")
    meta = dataclasses.replace(read_meta(source), view="MLO")
    capture, _, _ = _capture(Pipeline(HotSpotBackend(1.0)), source, meta)
    ds = capture.encoded.dataset()
    assert ds.Modality == "MG" and ds.ImageLaterality == "R"
    assert ds.ViewCodeSequence[0].CodeValue == "399368009"


def test_opacity_follows_probability_only_when_configured() -> None:
    """A low-probability image (P = 0.05): by default its map is as visible as any other's; with
    the setting on it fades to almost nothing."""
    source = _sized_dx("R", "MLO", 1024, 640)
    constant, study, prepared = _capture(Pipeline(HotSpotBackend(-2.944)), source)
    fading, _, _ = _capture(Pipeline(HotSpotBackend(-2.944), cam_opacity_follows_probability=True), source)
    confident, _, _ = _capture(Pipeline(HotSpotBackend(3.0)), source)
    assert study.images[0].probability == pytest.approx(0.05, abs=1e-3)
    assert constant.picture is not None and fading.picture is not None and confident.picture is not None
    captions = capture_captions(study, study.images[0], Pipeline(HotSpotBackend(1.0)).manifest)
    shown = _colour_outside_panel(constant.picture, prepared.display, captions)
    faded = _colour_outside_panel(fading.picture, prepared.display, captions)
    assert shown > 0
    assert faded < 0.15 * shown
    # Constant opacity: the low- and the high-probability maps are drawn alike.
    assert shown == pytest.approx(
        _colour_outside_panel(confident.picture, prepared.display, captions), rel=0.05
    )


def _study(image_p: float, breast_p: float, threshold: float, laterality: str = "L") -> StudyScore:
    meta = ImageMeta("1.2.3.4", "1.2.840.10008.5.1.4.1.1.1.2", "1.2.3", "1.2.3.1", "P1", laterality, "CC")
    image = ImageScore(meta, 0.0, image_p, np.zeros((4, 2), np.float32), None)  # type: ignore[arg-type]
    breast = BreastScore("P1", "1.2.3", laterality, breast_p, "mean", {"1.2.3.4": image_p})
    return StudyScore("P1", "1.2.3", breast_p, [breast], [image], threshold, breast_p >= threshold)


def test_caption_states_the_breast_decision_explicitly() -> None:
    manifest = HotSpotBackend(0.0).manifest
    below = _study(0.85, 0.73, 0.77)
    lines = capture_captions(below, below.images[0], manifest)
    assert lines[0] == "L CC  image P 0.85"
    assert lines[1] == "L breast P 0.73 < threshold 0.77: no recall"
    above = _study(0.85, 0.80, 0.77, "R")
    assert (
        capture_captions(above, above.images[0], manifest)[1] == "R breast P 0.80 >= threshold 0.77: RECALL"
    )
    at = _study(0.5, 0.77, 0.77)
    assert capture_captions(at, at.images[0], manifest)[1].endswith(">= threshold 0.77: RECALL")


def test_close_scores_never_print_alike() -> None:
    assert distinct_decimals(0.73, 0.77) == ("0.73", "0.77")
    assert distinct_decimals(0.7699, 0.77) == ("0.7699", "0.7700")
    assert distinct_decimals(0.77, 0.77) == ("0.77", "0.77")
    close = _study(0.5, 0.76999, 0.77)
    assert (
        "0.76999 < threshold 0.77000: no recall"
        in capture_captions(close, close.images[0], HotSpotBackend(0).manifest)[1]
    )
