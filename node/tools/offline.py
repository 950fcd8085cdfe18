"""Offline scoring (`mammonode score`): DICOM files from disk, without a network, into the node's outputs.

Unusable inputs are reported in one line each and skipped; the rest are still scored, and the
exit status is non-zero when anything was skipped. Output files are named by validated UIDs only.
Nothing here prints: :func:`run_score` returns the lines, the command prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from inference import (
    EncodedObject,
    ImageMeta,
    ImageScore,
    InputError,
    Pipeline,
    PixelPool,
    PreparedImage,
    StudyOutputs,
    aggregate_studies,
    dumps,
    is_mammogram,
    load_backend,
    read_dataset,
    read_meta,
    resolve_model_dir,
    save_png,
    score_stream,
    scrub,
    usable_cpus,
)

log = logging.getLogger(__name__)


@dataclass
class ScoreRun:
    """What one offline run produced and skipped."""

    outputs: list[StudyOutputs] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    render_failures: list[tuple[str, str]] = field(default_factory=list)
    """(source SOP Instance UID, why) for scored images whose CAM capture could not be made."""
    written: dict[str, list[str]] = field(default_factory=dict)


OUTPUT_FOLDERS = ("sc", "sr", "cad", "pr", "png")


def _own_outputs(out: Path) -> tuple[set[Path], set[Path]]:
    """The folders and files a run writes under ``out`` (resolved), never inputs of a later run."""
    root = out.resolve()
    return {root / sub for sub in OUTPUT_FOLDERS}, {root / "summary.json"}


def collect_files(paths: list[Path], *, out: Path | None = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand folders recursively (hidden files skipped); missing paths are reported.

    A previous run's results under ``out`` (its sc/, sr/, png/ and summary.json) are left out of
    folder expansion: scoring a folder that holds them must not read them back as inputs and
    report every PNG and CAM capture as a skipped file (and exit 1) on each re-run.
    """
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    own_dirs, own_files = _own_outputs(out) if out is not None else (set(), set())

    def is_own(p: Path) -> bool:
        resolved = p.resolve()
        return resolved in own_files or not own_dirs.isdisjoint(resolved.parents)

    for path in paths:
        if path.is_dir():
            files.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and not p.name.startswith(".") and not is_own(p)
            )
        elif path.is_file():
            files.append(path)
        else:
            missing.append((str(path), "no such file or folder"))
    return files, missing


def read_mammogram(path: Path) -> tuple[Dataset, ImageMeta]:
    """Read one input file and check that it is a mammogram; runs in the decode workers."""
    ds = read_dataset(path)
    meta = read_meta(ds)
    ok, reason = is_mammogram(ds, meta)
    if not ok:
        raise InputError(f"not a mammogram ({reason})")
    return ds, meta


def study_order(files: list[Path]) -> tuple[list[Path], dict[Path, object]]:
    """The files grouped by study (studies in order of first appearance, files in their order) and
    each file's study key, from a header-only read.

    Scoring in this order lets a study be finished, written and let go as soon as its last image is
    scored, so memory holds about one study whatever the number of files. A file whose header
    cannot be read keeps its place under a key of its own; the full read then reports why.
    """
    keys: dict[Path, object] = {}
    for index, path in enumerate(files):
        try:
            meta = read_meta(read_dataset(path, stop_before_pixels=True))
            keys[path] = (meta.patient_id, meta.study_instance_uid)
        except InputError:
            keys[path] = ("unreadable", index)
    first: dict[object, int] = {}
    for index, path in enumerate(files):
        first.setdefault(keys[path], index)
    ordered = sorted(files, key=lambda p: first[keys[p]])  # stable: file order within a study
    return ordered, keys


def score_files(
    pipeline: Pipeline,
    files: list[Path],
    out: Path,
    *,
    pool: PixelPool,
    png: bool = True,
    progress: Callable[[int], None] | None = None,
) -> ScoreRun:
    """Score ``files`` into ``out`` (SC, SR and, with ``png``, PNG files) and return what was done.

    Decoding runs in ``pool`` ahead of the backend (:func:`inference.batching.score_stream`), and
    each study is aggregated, rendered and written as soon as its last file has been handled, so
    the whole run holds the pool's window plus about one study in memory. Backend batches hold
    one study each (several breasts and views, never two studies), so a study's results are the
    same whatever else the run holds. Unusable files become (path, reason) entries of
    ``skipped``, in file order. ``progress`` is called with 1 after each file is handled.
    """
    ordered, keys = study_order(files)
    remaining = Counter(keys[p] for p in ordered)
    images: dict[object, list[tuple[PreparedImage, ImageScore]]] = defaultdict(list)
    run = ScoreRun(written={sub: [] for sub in OUTPUT_FOLDERS})
    failed: dict[Path, str] = {}
    seen: set[str] = set()

    def accept(meta: ImageMeta) -> None:
        if meta.sop_instance_uid in seen:
            raise InputError(f"duplicate SOP Instance UID {meta.sop_instance_uid}")
        seen.add(meta.sop_instance_uid)

    out.mkdir(parents=True, exist_ok=True)
    stream = score_stream(pipeline, ordered, read_mammogram, pool=pool, accept=accept, group=keys.__getitem__)
    for item in stream:
        key = keys[item.source]
        if item.error is not None:
            if not isinstance(item.error, InputError):
                raise item.error
            failed[item.source] = scrub(str(item.error))
        else:
            assert item.prepared is not None and item.score is not None
            images[key].append((item.prepared, item.score))
        remaining[key] -= 1
        if remaining[key] == 0 and key in images:
            _finish_study(pipeline, images.pop(key), out, run, pool=pool, png=png)
        if progress is not None:
            progress(1)
    run.skipped = [(str(p), failed[p]) for p in files if p in failed]
    return run


def _finish_study(
    pipeline: Pipeline,
    scored: list[tuple[PreparedImage, ImageScore]],
    out: Path,
    run: ScoreRun,
    *,
    pool: PixelPool,
    png: bool,
) -> None:
    """Aggregate one study's scores, render its SCs and SR in the pool, write them (as
    :meth:`Pipeline.score` and :meth:`Pipeline.outputs` do for the sequential path). A capture
    that could not be made is reported like a skipped file, and the report says so."""
    prepared = [p for p, _ in scored]
    for image in prepared:
        if image.dropped:
            log.warning(
                "%s: attributes with invalid values left out of the outputs: %s",
                image.meta.sop_instance_uid,
                ", ".join(image.dropped),
            )
    for study in aggregate_studies([s for _, s in scored], pipeline.aggregation, pipeline.manifest.threshold):
        result = pipeline.outputs(study, prepared, pool=pool, keep_pictures=png)
        for key, values in write_outputs(result, out, png=png).items():
            run.written[key].extend(values)
        for failure in result.capture_failures:
            run.render_failures.append((failure.sop_instance_uid, f"no CAM image: {failure.reason}"))
        for problem in result.object_failures:
            run.render_failures.append((study.study_instance_uid, problem))
        run.outputs.append(_written(result))


def _written(result: StudyOutputs) -> StudyOutputs:
    """What the summary still needs once the files are written: the scores and the UIDs, not the
    encoded objects and pictures (about 10 MB per image), so a long run does not keep them."""

    def identity(obj: EncodedObject) -> EncodedObject:
        return EncodedObject(obj.sop_instance_uid, obj.sop_class_uid, b"")

    return dataclasses.replace(
        result,
        secondary_captures=[None if sc is None else identity(sc) for sc in result.secondary_captures],
        overlays=[None] * len(result.overlays),
        report=identity(result.report),
        cad_report=None if result.cad_report is None else identity(result.cad_report),
        presentation_states=[None if p is None else identity(p) for p in result.presentation_states],
    )


def write_outputs(result: StudyOutputs, out: Path, *, png: bool = True) -> dict[str, list[str]]:
    """Write one study's files under ``out``: CAM captures (``sc/``), the TID 1500 report
    (``sr/``), the Mammography CAD SR (``cad/``), presentation states when made (``pr/``) and, with
    ``png``, PNG pictures (``png/``); returns the paths by folder."""
    written: dict[str, list[str]] = {sub: [] for sub in OUTPUT_FOLDERS}

    def put(sub: str, name: str, data: bytes) -> None:
        path = out / sub / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[sub].append(str(path))

    states = result.presentation_states or [None] * len(result.score.images)
    for image, sc, rgb, state in zip(
        result.score.images, result.secondary_captures, result.overlays, states, strict=True
    ):
        if sc is not None:
            put("sc", sc.sop_instance_uid, sc.data)
        if state is not None:
            put("pr", state.sop_instance_uid, state.data)
        if png and rgb is not None:
            written["png"].append(str(save_png(rgb, out / "png" / f"{image.meta.sop_instance_uid}.png")))
    put("sr", result.report.sop_instance_uid, result.report.data)
    if result.cad_report is not None:
        put("cad", result.cad_report.sop_instance_uid, result.cad_report.data)
    return written


def summary(pipeline: Pipeline, run: ScoreRun) -> dict[str, Any]:
    """The JSON summary: model identity, per-study, per-breast and per-image scores, skips."""
    m = pipeline.manifest
    studies = []
    for result in run.outputs:
        s = result.score
        studies.append(
            {
                "patient_id": s.patient_id,
                "study_instance_uid": s.study_instance_uid,
                "exam_probability": s.exam_probability,
                "threshold": s.threshold,
                "recall_recommended": s.recall_recommended,
                "sr_sop_instance_uid": result.report.sop_instance_uid,
                "cad_sr_sop_instance_uid": None
                if result.cad_report is None
                else result.cad_report.sop_instance_uid,
                "complete": result.complete,
                "missing_views": list(result.missing_views),
                "breasts": [
                    {
                        "laterality": b.laterality,
                        "probability": b.probability,
                        "method": b.method,
                        "aggregates": b.aggregates,
                        "image_probabilities": b.image_probabilities,
                    }
                    for b in s.breasts
                ],
                "images": [
                    {
                        "sop_instance_uid": i.meta.sop_instance_uid,
                        "laterality": i.meta.laterality,
                        "view": i.meta.view,
                        "probability": i.probability,
                        "logit": i.logit,
                        "cam_sc_sop_instance_uid": None if sc is None else sc.sop_instance_uid,
                    }
                    for i, sc in zip(s.images, result.secondary_captures, strict=True)
                ],
            }
        )
    return {
        "model": {
            "name": m.name,
            "version": m.version,
            "architecture": m.architecture,
            "weights_sha256": m.weights_sha256,
            "threshold": m.threshold,
            "aggregation": pipeline.aggregation,
            "notice": pipeline.algorithm.notice,
            "backend": pipeline.backend.name,
        },
        "studies": studies,
        "skipped": [{"path": p, "reason": r} for p, r in run.skipped],
        "written": run.written,
    }


def format_table(run: ScoreRun) -> str:
    """Image, breast and exam scores as a plain-text table."""
    lines = [f"{'level':<7} {'study / image':<66} {'side':<8} {'view':<8} {'P':>6}"]
    for result in run.outputs:
        s = result.score
        lines.append(
            f"{'exam':<7} {s.study_instance_uid:<66} {'':<8} {'':<8} {s.exam_probability:6.3f}"
            f"  {'RECALL' if s.recall_recommended else 'no recall'} (threshold {s.threshold:.3f})"
        )
        for b in s.breasts:
            lines.append(f"{'breast':<7} {'':<66} {b.laterality:<8} {b.method:<8} {b.probability:6.3f}")
        for i in s.images:
            lines.append(
                f"{'image':<7} {i.meta.sop_instance_uid:<66} {i.meta.laterality:<8} {i.meta.view:<8} "
                f"{i.probability:6.3f}"
            )
    return "\n".join(lines)


@dataclass(frozen=True)
class ScoreResult:
    """What :func:`run_score` has to say: the output (score table or JSON), the problem lines
    (skipped files, missing captures, nothing scored) and the exit status."""

    output: str
    problems: list[str]
    exit_code: int
    summary: dict[str, Any]


def run_score(
    paths: list[Path],
    *,
    out: Path,
    model_dir: Path | None,
    backend: str = "auto",
    aggregation: str | None = None,
    json_output: bool = False,
    pool: PixelPool | None = None,
    progress: Callable[[int], None] | None = None,
    on_files: Callable[[int], None] | None = None,
    cam_opacity_follows_probability: bool = False,
    presentation_states: bool = False,
) -> ScoreResult:
    """Score ``paths`` into ``out``; the exit status is 1 if anything was skipped.

    ``pool`` decodes ahead of the backend and renders the results; by default a process pool.
    ``on_files`` is told how many files will be scored (e.g. to size a progress bar), and
    ``progress`` is called with 1 after each of them. ``cam_opacity_follows_probability`` is the
    node setting of that name: fade each CAM by its image's probability (default: constant);
    ``presentation_states`` also writes a GSPS per image (``pr/``).
    """
    engine = load_backend(backend, resolve_model_dir(model_dir))
    pipeline = Pipeline(
        engine,
        aggregation=aggregation,
        cam_opacity_follows_probability=cam_opacity_follows_probability,
        write_presentation_states=presentation_states,
    )
    files, missing = collect_files(paths, out=out)
    if on_files is not None:
        on_files(len(files))
    with contextlib.ExitStack() as stack:
        if pool is None:
            # Always child processes, even for one file: a codec that aborts must not take the
            # run down with it (design invariant 8). One worker per CPU, or fewer files.
            pool = stack.enter_context(PixelPool("process", max(1, min(len(files), usable_cpus()))))
        run = score_files(pipeline, files, out, pool=pool, progress=progress)
    run.skipped = missing + run.skipped
    problems = [f"skipped {path}: {reason}" for path, reason in run.skipped]
    problems += [f"image {uid}: {why}" for uid, why in run.render_failures]
    report = summary(pipeline, run)
    (out / "summary.json").write_text(dumps(report))
    output = dumps(report) if json_output else format_table(run)
    if not run.outputs:
        problems.append("error: no image could be scored")
        return ScoreResult(output, problems, 1, report)
    return ScoreResult(output, problems, 1 if run.skipped or run.render_failures else 0, report)
