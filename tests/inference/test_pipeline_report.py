"""Pipeline.outputs hands the report what only it knows: the CAM marks of every scored image and
the CAM captures it just made. The report places its groups on those marks and references those
captures (by UIDs that resolve to the encoded objects), and a single-view film is PARTIAL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from peers import write_study

from inference.aggregation import aggregate_studies
from inference.backends.loader import load_backend
from inference.dicom_header import read_dataset, read_meta
from inference.marks import cam_marks
from inference.pipeline import Pipeline, PreparedImage, StudyOutputs, prepare_image
from inference.pixel_pool import PixelPool
from inference.types import SCREENING_VIEWS, view_key
from inference.writers.sr_codes import VISUAL_EXPLANATION
from training.synth import FILM, generate_dataset


@pytest.fixture(scope="module")
def pipeline(test_model: Path) -> Pipeline:
    return Pipeline(load_backend("torch", test_model))


@pytest.fixture
def pool() -> Iterator[PixelPool]:
    with PixelPool("serial") as p:
        yield p


def _score(
    pipeline: Pipeline, paths: list[Path], pool: PixelPool
) -> tuple[list[PreparedImage], StudyOutputs]:
    prepared = []
    for path in paths:
        ds = read_dataset(path)
        prepared.append(prepare_image(ds, read_meta(ds), pipeline.manifest.preprocess))
    (study,) = aggregate_studies(pipeline.infer(prepared), pipeline.aggregation, pipeline.manifest.threshold)
    return prepared, pipeline.outputs(study, prepared, pool=pool)


def _groups(result: StudyOutputs) -> dict[str, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]:
    sr = hd.sr.Comprehensive3DSR.from_dataset(result.report.dataset())
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return {str(g.tracking_identifier): g for g in sr.content.get_planar_roi_measurement_groups()}


def _region(group: hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations) -> tuple[str, np.ndarray]:
    roi = group.roi
    assert roi is not None
    uid = str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return uid, np.asarray(roi.value).reshape(-1, 2)


def test_the_report_references_the_captures_made_and_sits_on_the_cam_marks(
    pipeline: Pipeline, pool: PixelPool, tmp_path: Path
) -> None:
    paths = write_study(tmp_path, patient_id="PIPE-1", study_uid="1.2.826.0.1.78")
    prepared, result = _score(pipeline, paths, pool)
    report = result.report.dataset()
    assert report.CompletionFlag == "COMPLETE"
    evidence = {
        str(sop.ReferencedSOPInstanceUID): str(series.SeriesInstanceUID)
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    groups = _groups(result)
    for index, (image, capture) in enumerate(
        zip(result.score.images, result.secondary_captures, strict=True)
    ):
        assert capture is not None
        sc = capture.dataset()
        assert evidence[capture.sop_instance_uid] == str(sc.SeriesInstanceUID)  # resolvable
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) == image.meta.sop_instance_uid
        group = next(g for label, g in groups.items() if label.startswith(f"Image {index + 1}:"))
        (item,) = hd.sr.utils.find_content_items(group[0], name=VISUAL_EXPLANATION)
        assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == capture.sop_instance_uid
        uid, points = _region(group)
        assert uid == image.meta.sop_instance_uid
        marks = cam_marks(image)
        if marks:  # the box around the rank-1 mark (a rectangle viewers can redraw)
            outline = np.asarray(marks[0].outline)
            assert len(points) == 5 and np.array_equal(points[0], points[-1])
            np.testing.assert_allclose(points.min(axis=0), outline.min(axis=0), atol=1e-2)
            np.testing.assert_allclose(points.max(axis=0), outline.max(axis=0), atol=1e-2)
        else:
            assert points.max(axis=0).tolist() == [image.meta.columns, image.meta.rows]
    assert {p.meta.sop_instance_uid for p in prepared} <= set(evidence)


def test_a_single_view_film_is_partial_and_names_the_views_it_lacks(
    pipeline: Pipeline, pool: PixelPool, tmp_path: Path
) -> None:
    generate_dataset(
        tmp_path / "film", patients=1, seed=5, size=(385, 241), transfer_syntax="explicit", style=FILM
    )
    (path,) = sorted((tmp_path / "film").rglob("*.dcm"))
    film = pydicom.dcmread(path, stop_before_pixels=True)
    assert film.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and film.Modality == "MG"
    assert "ViewPosition" not in film
    _, result = _score(pipeline, [path], pool)
    (image,) = result.score.images
    present = view_key(image.meta.laterality, image.meta.view)  # from SeriesDescription, e.g. LEFT_CC
    expected_missing = tuple(v for v in SCREENING_VIEWS if v != present)
    assert len(expected_missing) >= 3
    report = result.report.dataset()
    assert not result.complete and result.missing_views == expected_missing
    assert report.CompletionFlag == "PARTIAL"
    assert all(view in report.CompletionFlagDescription for view in expected_missing)
    texts = [str(i.TextValue) for i in report.ContentSequence[-1].ContentSequence if i.ValueType == "TEXT"]
    (missing,) = [t for t in texts if "missing" in t]
    assert all(view in missing for view in expected_missing), missing
    groups = _groups(result)
    assert {_region(g)[0] for g in groups.values()} == {str(film.SOPInstanceUID)}
    (capture,) = result.secondary_captures
    assert capture is not None
    assert capture.sop_instance_uid in {
        str(sop.ReferencedSOPInstanceUID)
        for study in report.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
