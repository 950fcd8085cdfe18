"""The scoring worker: claims, scores, writes the outbox and records everything, exactly once."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import write_mammogram, write_study
from pydicom import dcmread
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage, MammographyCADSRStorage
from queue_helpers import T0, events, make_config, referenced_uids, spool_file, study_row
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.manifest import load_manifest
from inference.pipeline import Pipeline, PreparedImage
from inference.types import ImageScore
from inference.uids import derive_uid
from node.admin.registry import pipeline_factory, select_model_dir
from node.config import Destination, NodeConfig
from node.db.models import (
    Breast,
    Instance,
    Job,
    ModelVersion,
    OutputObject,
    Score,
    Study,
    Transmission,
    as_utc,
    utcnow,
)
from node.queue.assembly import promote_ready
from node.queue.claims import claim_job, renew_leases, requeue_stale_claims
from node.queue.retry import MAX_ATTEMPTS
from node.queue.worker import Worker

STUDY_A = derive_uid("tests", "queue", "study-a")
STUDY_B = derive_uid("tests", "queue", "study-b")
DESTINATIONS = (Destination("PACS", "127.0.0.1", 1), Destination("ARCHIVE", "127.0.0.1", 2))
READY = T0.replace(minute=5)  # long after every study below is complete


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Two 4-view studies and a late fifth image (L-CC) of study A, explicit VR for speed."""
    root = tmp_path_factory.mktemp("queue-studies")
    a = write_study(root / "a", patient_id="P-A", study_uid=STUDY_A, transfer_syntax="explicit")
    b = write_study(root / "b", patient_id="P-B", study_uid=STUDY_B, transfer_syntax="explicit", seed=1)
    late = root / "late" / "L_CC_2.dcm"
    write_mammogram(
        late,
        patient_id="P-A",
        study_uid=STUDY_A,
        laterality="L",
        view="CC",
        transfer_syntax="explicit",
        instance_number=5,
    )
    return {"a": a, "b": b, "late": [late]}


def _config(tmp_path: Path, model: Path | None, **overrides: object) -> NodeConfig:
    return make_config(tmp_path, model_dir=model, destinations=DESTINATIONS, **overrides)


def _queue(sessions: sessionmaker[Session], config: NodeConfig, files: list[Path]) -> list[int]:
    for path in files:
        spool_file(sessions, config, path)
    return promote_ready(config, sessions, now=READY)


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _outputs(sessions: sessionmaker[Session], job_id: int | None = None) -> list[OutputObject]:
    with sessions() as session:
        query = select(OutputObject).order_by(OutputObject.id)
        if job_id is not None:
            query = query.where(OutputObject.job_id == job_id)
        return list(session.scalars(query))


def _scores(sessions: sessionmaker[Session], job_id: int) -> list[Score]:
    with sessions() as session:
        return list(session.scalars(select(Score).where(Score.job_id == job_id)))


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_study_is_scored_into_traceable_scores_outputs_and_transmissions(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, test_model)
    (job_id,) = _queue(sessions, config, studies["a"])
    manifest = load_manifest(test_model)

    assert Worker(config, sessions).run_once() == 1

    job = _job(sessions, job_id)
    assert job.state == "done" and job.error is None and job.model_version_id is not None
    with sessions() as session:
        model = session.get(ModelVersion, job.model_version_id)
        assert model is not None
        assert (model.name, model.version, model.weights_sha256) == (
            manifest.name,
            manifest.version,
            manifest.weights_sha256,
        )
        assert not model.active  # registering never promotes
    assert len(events(sessions, "model.registered")) == 1

    # Scores: 4 images, 2 breasts, 1 exam, each naming the model and weights.
    scores = _scores(sessions, job_id)
    assert sorted(s.level for s in scores) == ["breast"] * 2 + ["exam"] + ["image"] * 4
    sources = {_uid(p) for p in studies["a"]}
    for s in scores:
        assert (s.model_name, s.model_version, s.weights_sha256) == (
            manifest.name,
            manifest.version,
            manifest.weights_sha256,
        )
        assert s.threshold == manifest.threshold and 0.0 <= s.probability <= 1.0
    assert {s.sop_instance_uid for s in scores if s.level == "image"} == sources
    (exam,) = [s for s in scores if s.level == "exam"]
    assert exam.input_uids == {"sop_instance_uids": sorted(sources)}
    assert exam.recall == (exam.probability >= manifest.threshold)
    breasts = {s.laterality: s for s in scores if s.level == "breast"}
    assert set(breasts) == {"L", "R"} and exam.probability == max(b.probability for b in breasts.values())

    # Outputs: one CAM SC per image, the report and the CAD SR, as files in outbox/<study>/<sop>.dcm.
    outputs = _outputs(sessions)
    assert sorted(o.kind for o in outputs) == ["CAD"] + ["SC"] * 4 + ["SR"]
    sc_sources: set[str] = set()
    for output in outputs:
        path = config.outbox_dir / output.outbox_path
        assert path == config.outbox_dir / STUDY_A / f"{output.sop_instance_uid}.dcm"
        ds = dcmread(path)
        assert str(ds.SOPInstanceUID) == output.sop_instance_uid
        assert str(ds.StudyInstanceUID) == STUDY_A
        if output.kind == "SC":
            (source,) = ds.SourceImageSequence
            sc_sources.add(str(source.ReferencedSOPInstanceUID))
            assert output.source_uids == {"sop_instance_uids": [str(source.ReferencedSOPInstanceUID)]}
        else:
            assert referenced_uids(ds) >= sources
    assert sc_sources == sources

    # One pending transmission per output and destination.
    with sessions() as session:
        sends = list(session.scalars(select(Transmission)))
    assert sorted((t.output_id, t.destination) for t in sends) == sorted(
        (o.id, str(d)) for o in outputs for d in DESTINATIONS
    )
    assert {t.state for t in sends} == {"pending"}

    study = study_row(sessions, STUDY_A)
    assert (study.state, study.scored_version) == ("scored", 1)
    with sessions() as session:
        assert {(b.laterality, b.dirty, b.scored_version) for b in session.scalars(select(Breast))} == {
            ("L", False, 1),
            ("R", False, 1),
        }
    (scored,) = events(sessions, "study.scored")
    assert scored.study_uid == STUDY_A and scored.patient_id == "P-A" and scored.details is not None
    assert scored.details["weights_sha256"] == manifest.weights_sha256
    assert scored.details["model_version"] == manifest.version
    assert scored.details["exam_probability"] == pytest.approx(exam.probability, abs=1e-6)
    assert scored.details["breast_probabilities"]["L"] == pytest.approx(breasts["L"].probability, abs=1e-6)
    assert scored.details["recall"] == exam.recall

    assert Worker(config, sessions).run_once() == 0  # nothing left


def test_presentation_states_when_asked_for_one_per_image_with_its_transmissions(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, test_model, write_presentation_states=True)
    (job_id,) = _queue(sessions, config, studies["a"])
    assert Worker(config, sessions).run_once() == 1

    outputs = _outputs(sessions, job_id)
    assert sorted(o.kind for o in outputs) == ["CAD"] + ["PR"] * 4 + ["SC"] * 4 + ["SR"]
    sources = {_uid(p) for p in studies["a"]}
    referenced = set()
    for output in (o for o in outputs if o.kind == "PR"):
        ds = dcmread(config.outbox_dir / output.outbox_path)
        assert ds.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
        (image,) = ds.ReferencedSeriesSequence[0].ReferencedImageSequence
        referenced.add(str(image.ReferencedSOPInstanceUID))
        assert output.source_uids == {"sop_instance_uids": [str(image.ReferencedSOPInstanceUID)]}
    assert referenced == sources
    (cad,) = [o for o in outputs if o.kind == "CAD"]
    assert dcmread(config.outbox_dir / cad.outbox_path).SOPClassUID == MammographyCADSRStorage
    with sessions() as session:
        sends = list(session.scalars(select(Transmission)))
    assert len(sends) == len(outputs) * len(DESTINATIONS)


def test_a_late_image_gives_version_2_with_that_breasts_captures_and_a_new_report(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, test_model)
    (first,) = _queue(sessions, config, studies["a"])
    worker = Worker(config, sessions)
    worker.run_once()

    spool_file(sessions, config, studies["late"][0], at=READY)
    assert study_row(sessions, STUDY_A).state == "receiving"
    (second,) = promote_ready(config, sessions, now=READY.replace(minute=6))
    assert _job(sessions, second).lateralities == "L"
    assert worker.run_once() == 1

    v1, v2 = _outputs(sessions, first), _outputs(sessions, second)
    assert len(v1) == 6  # version 1 is kept
    left = {_uid(p) for p in studies["a"][:2]} | {_uid(studies["late"][0])}
    assert sorted(o.kind for o in v2) == ["CAD"] + ["SC"] * 3 + ["SR"]
    assert {o.source_uids["sop_instance_uids"][0] for o in v2 if o.kind == "SC" and o.source_uids} == left
    (sr1,) = [o for o in v1 if o.kind == "SR"]
    (sr2,) = [o for o in v2 if o.kind == "SR"]
    assert sr1.sop_instance_uid != sr2.sop_instance_uid
    all_sources = {_uid(p) for p in studies["a"] + studies["late"]}
    assert referenced_uids(dcmread(config.outbox_dir / sr2.outbox_path)) >= all_sources
    assert {o.sop_instance_uid for o in v1}.isdisjoint(o.sop_instance_uid for o in v2)

    # Version 2 scores all five images (the exam needs both breasts).
    assert sum(s.level == "image" for s in _scores(sessions, second)) == 5
    study = study_row(sessions, STUDY_A)
    assert (study.state, study.scored_version) == ("scored", 2)
    assert [e.details["version"] for e in events(sessions, "study.scored") if e.details] == [1, 2]


def test_an_unreadable_spooled_image_is_skipped_and_the_rest_scored(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, test_model)
    (job_id,) = _queue(sessions, config, studies["a"])
    broken_uid = _uid(studies["a"][3])
    with sessions() as session:
        broken = session.scalars(select(Instance).where(Instance.sop_instance_uid == broken_uid)).one()
        path = config.spool_dir / broken.spool_path
    path.write_bytes(path.read_bytes()[:2000])  # cut inside the header

    assert Worker(config, sessions).run_once() == 1

    assert _job(sessions, job_id).state == "done"
    with sessions() as session:
        broken = session.scalars(select(Instance).where(Instance.sop_instance_uid == broken_uid)).one()
        assert not broken.scorable and "unreadable" in (broken.skip_reason or "")
    (failed,) = events(sessions, "image.failed")
    assert failed.sop_instance_uid == broken_uid and failed.details["stage"] == "decode"
    assert sum(s.level == "image" for s in _scores(sessions, job_id)) == 3
    assert sorted(o.kind for o in _outputs(sessions)) == ["CAD"] + ["SC"] * 3 + ["SR"]
    assert study_row(sessions, STUDY_A).state == "scored"
    # The report is PARTIAL and says which image was not analysed, and why.
    (sr_row,) = [o for o in _outputs(sessions) if o.kind == "SR"]
    sr = dcmread(config.outbox_dir / sr_row.outbox_path)
    assert sr.CompletionFlag == "PARTIAL"
    texts = [str(item.get("TextValue", "")) for item in sr.ContentSequence[-1].ContentSequence]
    assert any(broken_uid in text and "truncated" in text for text in texts), texts


def test_patient_attributes_that_cannot_be_copied_are_left_out_not_fatal(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    studies: dict[str, list[Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A modality that writes a Patient's Name with VR FD or a birth date of ``PHIPROBE-DOB``
    still gets its study scored: the bad values stay out of the outputs and out of every log line."""
    from pydicom import config
    from pydicom.dataelem import DataElement

    bad = []
    for index, source in enumerate(studies["a"]):
        ds = dcmread(source)
        if index == 0:
            del ds.PatientName
            ds.add(DataElement(0x00100010, "FD", 3.25))
        ds.add(DataElement(0x00100030, "DA", "PHIPROBE-DOB", validation_mode=config.IGNORE))
        path = tmp_path / "bad" / source.name
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path)
        bad.append(path)
    node_config = _config(tmp_path, test_model)
    (job_id,) = _queue(sessions, node_config, bad)
    caplog.clear()
    caplog.set_level(logging.DEBUG)

    assert Worker(node_config, sessions).run_once() == 1

    assert _job(sessions, job_id).state == "done"
    outputs = _outputs(sessions, job_id)
    assert sorted(o.kind for o in outputs) == ["CAD"] + ["SC"] * 4 + ["SR"]
    for output in outputs:
        ds = dcmread(node_config.outbox_dir / output.outbox_path)
        assert "PHIPROBE" not in str(ds.get("PatientBirthDate", ""))
        assert ds.PatientID == "P-A"  # what could be copied was copied
    assert "PHIPROBE" not in caplog.text
    assert "left out of the results: PatientName, PatientBirthDate" in caplog.text


def test_a_study_with_no_readable_image_ends_skipped_without_outputs(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, test_model)
    (job_id,) = _queue(sessions, config, studies["a"][:2])
    for path in (config.spool_dir / STUDY_A).rglob("*.dcm"):
        path.write_bytes(b"not DICOM")

    assert Worker(config, sessions).run_once() == 1
    assert _job(sessions, job_id).state == "done"
    assert _outputs(sessions) == [] and _scores(sessions, job_id) == []
    assert study_row(sessions, STUDY_A).state == "skipped"
    assert len(events(sessions, "image.failed")) == 2
    assert len(events(sessions, "study.skipped")) == 1


def test_a_failing_study_is_recorded_and_does_not_stop_the_others(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    class Failing(Pipeline):
        def infer(self, images: list[PreparedImage]) -> list[ImageScore]:  # type: ignore[override]
            if any(p.meta.study_instance_uid == STUDY_B for p in images):
                raise RuntimeError("backend exploded")
            return super().infer(images)

    def factory(model_dir: Path) -> Pipeline:
        return Failing(pipeline_factory(config)(model_dir).backend)

    config = _config(tmp_path, test_model)
    job_a, job_b = _queue(sessions, config, studies["a"] + studies["b"])

    worker = Worker(config, sessions, pipeline_factory=factory)
    assert worker.run_once() == 2

    assert _job(sessions, job_a).state == "done"
    # An exception the job raises is charged as an attempt and retried after a backoff ...
    retried = _job(sessions, job_b)
    assert (retried.state, retried.attempts, retried.retries) == ("pending", 1, 0)
    assert retried.next_attempt_at is not None and as_utc(retried.next_attempt_at) > utcnow()
    assert "backend exploded" in (retried.error or "")
    assert study_row(sessions, STUDY_B).state == "queued"
    (deferred,) = events(sessions, "study.deferred")
    assert deferred.details and deferred.details["attempts"] == 1 and not deferred.details["transient"]
    assert worker.run_once() == 0  # not before its time

    # ... and after MAX_ATTEMPTS it fails for good.
    for _ in range(MAX_ATTEMPTS - 1):
        _make_due(sessions, job_b)
        assert worker.run_once() == 1
    failed = _job(sessions, job_b)
    assert failed.state == "failed" and failed.attempts == MAX_ATTEMPTS
    assert study_row(sessions, STUDY_B).state == "failed"
    (event,) = events(sessions, "study.failed")
    assert event.study_uid == STUDY_B and event.details and "backend exploded" in event.details["error"]
    assert {o.job_id for o in _outputs(sessions)} == {job_a}


def _make_due(sessions: sessionmaker[Session], job_id: int) -> None:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.next_attempt_at = utcnow() - dt.timedelta(seconds=1)
        session.commit()


def test_jobs_of_several_studies_share_backend_batches(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    calls: list[int] = []

    class Counting(Pipeline):
        def infer(self, images: list[PreparedImage]) -> list[ImageScore]:  # type: ignore[override]
            calls.append(len(images))
            return super().infer(images)

    config = _config(tmp_path, test_model, batch_size=8)
    _queue(sessions, config, studies["a"] + studies["b"])
    worker = Worker(
        config,
        sessions,
        pipeline_factory=lambda d: Counting(pipeline_factory(config)(d).backend, batch_size=8),
    )
    assert worker.run_once() == 2
    assert calls == [8]
    with sessions() as session:
        assert session.scalars(select(Job.state)).all() == ["done", "done"]
        assert session.scalar(select(Study.state).where(Study.study_uid == STUDY_B)) == "scored"


def test_concurrent_claims_take_each_job_exactly_once(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    with sessions() as session:
        for n in range(24):
            study = Study(study_uid=f"1.2.3.{n}", patient_id="P", state="queued")
            session.add(study)
            session.flush()
            session.add(Job(study_id=study.id, version=1, lateralities="LR", state="pending"))
        session.commit()
    claimed: dict[str, list[int]] = {}
    start = threading.Barrier(4)

    def claim_all(name: str) -> None:
        mine = claimed.setdefault(name, [])
        start.wait()
        while (job_id := claim_job(sessions, name, 60.0)) is not None:
            mine.append(job_id)

    threads = [threading.Thread(target=claim_all, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [j for mine in claimed.values() for j in mine]
    assert len(ids) == 24 and len(set(ids)) == 24
    with sessions() as session:
        rows = list(session.scalars(select(Job)))
    assert all(j.state == "claimed" and j.attempts == 0 for j in rows)  # a claim is not an attempt
    assert {j.id: j.claimed_by for j in rows} == {j: name for name, mine in claimed.items() for j in mine}


def test_two_workers_score_each_study_once(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    config = _config(tmp_path, test_model, batch_size=4)  # one study per round
    jobs = _queue(sessions, config, studies["a"] + studies["b"])
    workers = [Worker(config, sessions, name=f"worker-{i}") for i in range(2)]
    for w in workers:
        w.load()
    handled: list[int] = []
    start = threading.Barrier(2)

    def run(w: Worker) -> None:
        start.wait()
        while n := w.run_once():
            handled.append(n)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sum(handled) == 2
    for job_id in jobs:
        assert _job(sessions, job_id).state == "done"
        assert len(_scores(sessions, job_id)) == 7
    assert len(_outputs(sessions)) == 12
    assert len(events(sessions, "study.scored")) == 2


def test_a_run_killed_after_writing_files_is_resumed_with_one_set_of_results(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    studies: dict[str, list[Path]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(tmp_path, test_model)
    (job_id,) = _queue(sessions, config, studies["a"])

    class Killed(BaseException):
        """Stands in for the process dying (kill -9) between the files and the commit."""

    def die(*_args: object) -> bool:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(Worker, "_complete_job", die)
        with pytest.raises(Killed):
            Worker(config, sessions).run_once()
    written = sorted(p.name for p in (config.outbox_dir / STUDY_A).iterdir())
    assert len(written) == 6 and _outputs(sessions) == []
    assert _job(sessions, job_id).state == "claimed"

    # Restart: the claim is stale, the job runs again and lands once, under the same UIDs.
    assert requeue_stale_claims(sessions) == 1
    assert Worker(config, sessions).run_once() == 1
    outputs = _outputs(sessions)
    assert sorted(f"{o.sop_instance_uid}.dcm" for o in outputs) == written
    assert sorted(p.name for p in (config.outbox_dir / STUDY_A).iterdir()) == written
    assert len(_scores(sessions, job_id)) == 7
    assert _job(sessions, job_id).attempts == 0  # the killed run was not charged


def test_the_served_model_is_the_configured_then_the_promoted_one(
    sessions: sessionmaker[Session],
    tmp_path: Path,
    test_model: Path,
    other_weights_model: Path,
    studies: dict[str, list[Path]],
) -> None:
    loads: list[Path] = []

    def counting(config: NodeConfig) -> Callable[[Path], Pipeline]:
        def build(model_dir: Path) -> Pipeline:
            loads.append(model_dir)
            return pipeline_factory(config)(model_dir)

        return build

    pinned = _config(tmp_path, test_model)
    with sessions() as session:
        assert select_model_dir(pinned, session) == test_model
    unpinned = _config(tmp_path, None)
    worker = Worker(unpinned, sessions, pipeline_factory=counting(unpinned))

    # Promote the other model (what `mammonode model promote` does): the next round serves it.
    other = load_manifest(other_weights_model)
    with sessions() as session:
        session.add(
            ModelVersion(
                name=other.name,
                version=other.version,
                weights_sha256=other.weights_sha256,
                path=str(other_weights_model),
                active=True,
                promoted_at=T0,
            )
        )
        session.commit()
        assert select_model_dir(unpinned, session) == other_weights_model
    (job_id,) = _queue(sessions, unpinned, studies["a"])
    assert worker.run_once() == 1
    assert loads == [other_weights_model.resolve()]
    assert {s.weights_sha256 for s in _scores(sessions, job_id)} == {other.weights_sha256}
    assert worker.run_once() == 0 and worker.load() is worker.pipeline and len(loads) == 1
    assert events(sessions, "model.registered") == []  # already known by its hash


def test_the_pipeline_follows_the_configured_device_and_preprocessing(
    tmp_path: Path, test_model: Path
) -> None:
    from node.config import ConfigError

    cpu = pipeline_factory(_config(tmp_path, test_model, backend="torch"))(test_model)
    assert cpu.dali is None and cpu.backend.name == "torch"
    dali = pipeline_factory(_config(tmp_path, test_model, backend="torch", preprocessing="dali"))(test_model)
    assert dali.dali is not None and dali.dali.device_id is None  # DALI's CPU mode on a CPU node
    for bad in ({"device": "gpu"}, {"device": "cpu:1"}, {"preprocessing": "fast"}):
        with pytest.raises(ConfigError):
            _config(tmp_path, test_model, **bad)


def test_the_pipeline_fades_cam_maps_only_when_configured(tmp_path: Path, test_model: Path) -> None:
    default = pipeline_factory(_config(tmp_path, test_model, backend="torch"))(test_model)
    assert default.cam_opacity_follows_probability is False
    fading = _config(tmp_path, test_model, backend="torch", cam_opacity_follows_probability=True)
    assert pipeline_factory(fading)(test_model).cam_opacity_follows_probability is True


def test_a_worker_with_dali_preprocessing_scores_like_the_cpu_path(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DALI in its CPU mode (no GPU here) on JPEG 2000 files: same images scored, same outputs,
    probabilities within the DALI parity tolerance (0.02; box-filter resize approximation)."""
    from inference.backends.loader import load_backend
    from inference.dicom_header import read_dataset, read_meta
    from inference.preprocessing_dali import DaliPreprocessor

    by_dali: list[int] = []
    original = DaliPreprocessor.prepare

    def spy(self: DaliPreprocessor, *args: object, **kwargs: object) -> object:
        result = original(self, *args, **kwargs)  # type: ignore[arg-type]
        by_dali.append(len(result.rows))
        return result

    monkeypatch.setattr(DaliPreprocessor, "prepare", spy)

    files = write_study(tmp_path / "j2k", patient_id="P-DALI", study_uid=STUDY_B, transfer_syntax="jpeg2000")
    config = _config(tmp_path, test_model, backend="torch", preprocessing="dali")
    (job_id,) = _queue(sessions, config, files)
    assert Worker(config, sessions).run_once() == 1
    assert _job(sessions, job_id).state == "done"
    got = {s.sop_instance_uid: s.probability for s in _scores(sessions, job_id) if s.level == "image"}

    cpu = Pipeline(load_backend("torch", test_model))
    prepared = [cpu.prepare(ds, read_meta(ds)) for ds in map(read_dataset, files)]
    want = {s.meta.sop_instance_uid: s.probability for s in cpu.infer(prepared)}
    assert set(got) == set(want) and len(got) == 4
    assert max(abs(got[uid] - want[uid]) for uid in want) <= 0.02
    assert sorted(o.kind for o in _outputs(sessions, job_id)) == ["CAD"] + ["SC"] * 4 + ["SR"]
    assert sum(by_dali) == 4, "every J2K image went through DALI, none fell back"


def test_a_job_whose_claimer_stopped_renewing_is_taken_over_and_completed_once(
    sessions: sessionmaker[Session], tmp_path: Path, test_model: Path, studies: dict[str, list[Path]]
) -> None:
    """The last job of the queue, held by a worker on another machine that went silent: no other
    job is pending, yet a live worker takes it over once the lease lapses; the silent worker, if
    it comes back, cannot complete it a second time."""
    config = _config(tmp_path, test_model, lease_seconds=2.0)
    (job_id,) = _queue(sessions, config, studies["a"])
    assert claim_job(sessions, "elsewhere:1:silent", config.lease_seconds) == job_id
    worker = Worker(config, sessions)
    assert worker.run_once() == 0  # the lease still runs: the job is not free
    time.sleep(config.lease_seconds + 0.2)
    assert worker.run_once() == 1
    job = _job(sessions, job_id)
    assert (job.state, job.claimed_by, job.attempts) == ("done", worker.name, 0)
    assert len(_outputs(sessions, job_id)) == 6
    assert renew_leases(sessions, "elsewhere:1:silent", config.lease_seconds) == 0
    assert len(events(sessions, "study.scored")) == 1
