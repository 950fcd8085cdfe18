"""`mammonode bench`: how fast this machine decodes, preprocesses, infers and scores a study.

Every figure is measured in the same run as its reference, on the same inputs and model: ONNX
Runtime against torch at the same batch size, DALI against the CPU preprocessing, and the end-to-end
time of a 4-view study against its floor, the time its four decodes and one inference take when
measured alone. The result is a JSON-able dict (``ratios`` beside the raw figures, the machine and
the model in every report) and a plain-text table.

Inputs are files: one image per transfer syntax (the same pixels in each) and a study; the CLI
synthesises them with the training extra or takes a folder of DICOM files. Heavy libraries are
imported inside the functions; the node never imports training (the CLI hands the generator and
the ONNX exporter in as callables).
"""

from __future__ import annotations

import functools
import gc
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import uid
from pydicom.dataset import Dataset

from inference import (
    POOL_KINDS,
    Backend,
    BackendUnavailable,
    MammoNodeError,
    ModelManifest,
    Pipeline,
    PixelPool,
    PoolKind,
    PreparedImage,
    SourceLevels,
    copyable_header,
    decode_pixels,
    display_copy,
    display_level,
    load_backend,
    load_manifest,
    prepare_image,
    preprocess_levels,
    read_dataset,
    read_meta,
    resolve_model_dir,
    usable_cpus,
)
from node.tools.bench_burst import network_lines, network_ratio_lines
from node.tools.bench_machine import load_average, machine_info
from node.tools.offline import score_files

log = logging.getLogger(__name__)

SYNTAXES = ("explicit", "jpeg2000", "jpegls", "jpeg-lossless", "rle", "htj2k", "htj2k-rpcl", "htj2k-lossy")
"""Transfer syntaxes timed by the decode bench (names as in the synthetic generator)."""
SYNTAX_UIDS: dict[str, str] = {
    uid.ExplicitVRLittleEndian: "explicit",
    uid.ImplicitVRLittleEndian: "implicit",
    uid.JPEG2000Lossless: "jpeg2000",
    uid.JPEG2000: "jpeg2000-lossy",
    uid.JPEGLSLossless: "jpegls",
    uid.JPEGLSNearLossless: "jpegls-near-lossless",
    uid.JPEGLosslessSV1: "jpeg-lossless",
    uid.JPEGLossless: "jpeg-lossless-p14",
    uid.JPEGBaseline8Bit: "jpeg-baseline",
    uid.RLELossless: "rle",
    uid.HTJ2KLossless: "htj2k",
    uid.HTJ2KLosslessRPCL: "htj2k-rpcl",
    uid.HTJ2K: "htj2k-lossy",
}
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "tensorrt")
INFERENCE_SECONDS = 3.0
"""Each inference figure is timed over at least this long in all, split over its interleaved rounds."""
TARGETS = {"onnxruntime_vs_torch_min": 2.0, "e2e_vs_floor_max": 0.4}
"""The "done" thresholds on the reference 2-core machine (ONNX Runtime: issue 4; end to end,
decoding only the levels needed, against the full-resolution floor: issue 12); reported, not
enforced."""


@dataclass(frozen=True)
class BenchInputs:
    """The files measured: one image per transfer syntax name, and the study scored end to end."""

    syntaxes: dict[str, Path]
    study: list[Path]
    origin: str  # "synthetic" or the --data folder


@dataclass(frozen=True)
class BenchSettings:
    """What to measure and how often (``iterations`` timed runs after one warm-up, median kept)."""

    model_dir: Path | None = None
    iterations: int = 3
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    backends: tuple[str, ...] = BACKENDS
    device: str = "cpu"  # for torch and onnxruntime; tensorrt always runs on cuda:0
    e2e_backend: str | None = None  # default: onnxruntime if it loads, else torch
    pool: PoolKind = "process"
    pools: tuple[PoolKind, ...] = POOL_KINDS  # the end-to-end run is timed with each of these
    workers: int | None = None
    image_size: tuple[int, int] | None = None  # for the report; None when the inputs were given


@dataclass
class _Context:
    """Things measured once and reused: the study's datasets and model inputs, the backends."""

    manifest: ModelManifest
    model_dir: Path
    datasets: list[Any] = field(default_factory=list)
    prepared: list[PreparedImage] = field(default_factory=list)
    decode_seconds: dict[Path, float] = field(default_factory=dict)


ExportOnnx = Callable[[Path, Path], Path]
"""Exports the model folder (first argument) with its ONNX graph into a new folder (second);
returns that folder. The CLI passes :func:`training.onnx_export.export_onnx` when training is installed."""


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _timed(fn: Callable[[], object], iterations: int, *, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn`` over ``iterations`` runs after one untimed warm-up run, with more
    runs while they add up to less than ``min_seconds`` (short calls, such as one inference, vary
    from run to run by more than three samples can average out)."""
    fn()
    times: list[float] = []
    while len(times) < iterations or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return _median(times)


def ensure_onnx(model_dir: Path, workdir: Path, export: ExportOnnx | None) -> tuple[Path, str | None]:
    """A folder of the same model that has its ONNX graph: ``model_dir`` itself when it has one,
    else a copy exported under ``workdir``; and why there is none (onnxruntime is then unavailable)."""
    if load_manifest(model_dir).onnx_file is not None:
        return model_dir, None
    if export is None:
        return model_dir, (
            f"model has no ONNX export and the training extra (needed to export one) is not installed: "
            f"run `mammonode export onnx --model {model_dir}` where it is"
        )
    try:
        return export(model_dir, workdir / "model-with-onnx"), None
    except MammoNodeError as exc:
        return model_dir, f"ONNX export failed: {exc}"


def run_bench(
    inputs: BenchInputs, settings: BenchSettings, *, export_onnx: ExportOnnx | None = None
) -> dict[str, Any]:
    """Measure everything; returns the report (see :func:`format_report` for the table)."""
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="mammonode-bench-") as tmp:
        work = Path(tmp)
        source_dir = resolve_model_dir(settings.model_dir)
        model_dir, onnx_missing = ensure_onnx(source_dir, work, export_onnx)
        manifest = load_manifest(model_dir)
        context = _Context(manifest, model_dir)
        report: dict[str, Any] = {
            "machine": machine,
            "model": {
                "name": manifest.name,
                "version": manifest.version,
                "architecture": manifest.architecture,
                "weights_sha256": manifest.weights_sha256,
                "onnx_sha256": manifest.onnx_sha256,
                "input_size": [manifest.preprocess.input_height, manifest.preprocess.input_width],
                "in_chans": manifest.in_chans,
                "path": str(source_dir),
            },
            "settings": {
                "inputs": inputs.origin,
                "image_size": list(settings.image_size) if settings.image_size else None,
                "iterations": settings.iterations,
                "batch_sizes": list(settings.batch_sizes),
                "device": settings.device,
                "pool": settings.pool,
                "decode_workers": settings.workers or usable_cpus(),
            },
        }
        report["decode"] = bench_decode(inputs, settings.iterations)
        report["preprocessing"] = bench_preprocessing(inputs, context, settings.iterations)
        report["inference"] = bench_inference(context, settings, onnx_missing)
        report["e2e"] = bench_e2e(inputs, context, settings, work, onnx_missing)
    report["machine"]["load_average_end"] = load_average()  # other work during the run shows here
    report["ratios"] = ratios(report)
    report["targets"] = {**TARGETS, "met": targets_met(report["ratios"])}
    return report


def bench_decode(inputs: BenchInputs, iterations: int) -> dict[str, Any]:
    """Seconds to decode one image (pixels only, the file already read), per transfer syntax."""
    out: dict[str, Any] = {}
    for name, path in inputs.syntaxes.items():
        ds = read_dataset(path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        seconds = _timed(functools.partial(decode_pixels, ds), iterations)
        level = display_level(rows, cols)[0]
        levels = _timed(functools.partial(_decode_level, ds, level), iterations)
        out[name] = {
            "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
            "image_size": [rows, cols],
            "file_megabytes": round(path.stat().st_size / 1e6, 3),
            "seconds": seconds,
            "megapixels_per_second": rows * cols / 1e6 / seconds,
            "level": level,
            "level_seconds": levels,
        }
    return out


def _decode_level(ds: Dataset, level: int) -> np.ndarray:
    """What the node decodes of an image: the capture's display level (a reduced decode where
    the code stream allows, else a full decode and the pyramid computed)."""
    return SourceLevels(ds, level).level(level)


def bench_preprocessing(inputs: BenchInputs, context: _Context, iterations: int) -> dict[str, Any]:
    """Per-image seconds of the CPU preprocessing (what a pool child does for an image: decode the
    levels needed, window, crop/orient/resize, the display copy; and that without the decode),
    and of DALI's (which decodes too) in CPU mode and on a GPU.

    Also fills ``context`` with the study's datasets, decode times and model inputs.
    """
    config = context.manifest.preprocess
    level_decode: list[float] = []
    prepare: list[float] = []
    for path in inputs.study:
        ds = read_dataset(path)
        meta = read_meta(ds)
        context.decode_seconds[path] = _timed(functools.partial(decode_pixels, ds), iterations)
        level = display_level(int(ds.Rows), int(ds.Columns))[0]
        level_decode.append(_timed(functools.partial(_decode_level, ds, level), iterations))
        prepare.append(_timed(functools.partial(prepare_image, ds, meta, config), iterations))
        context.datasets.append((ds, meta))
        context.prepared.append(prepare_image(ds, meta, config))
    per_image = _median(prepare)
    out: dict[str, Any] = {
        "images": len(inputs.study),
        "cpu": {
            "threads": 1,
            "seconds_per_image": per_image - _median(level_decode),
            "decode_and_preprocess_seconds_per_image": per_image,
        },
    }
    out["dali_cpu"] = _bench_dali(context, iterations, device_id=None)
    from inference import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    out["dali_gpu"] = (
        _bench_dali(context, iterations, device_id=0) if reason is None else {"unavailable": reason}
    )
    return out


def _bench_dali(context: _Context, iterations: int, *, device_id: int | None) -> dict[str, Any]:
    """DALI decode + preprocessing of the study in one batch, seconds per image."""
    import importlib.util

    if importlib.util.find_spec("nvidia.dali") is None:
        return {"unavailable": "package nvidia-dali-cuda120 not installed (gpu or dev extra)"}
    from inference import DaliPreprocessor

    threads = usable_cpus()
    dali = DaliPreprocessor(
        context.manifest.preprocess,
        device_id=device_id,
        batch_size=len(context.datasets),
        num_threads=threads,
    )
    datasets = [ds for ds, _ in context.datasets]
    metas = [meta for _, meta in context.datasets]
    first = dali.prepare(datasets, metas)
    if first.fallbacks or first.errors:
        why = "; ".join(r for _, r in first.fallbacks) or "; ".join(str(e) for _, e in first.errors)
        return {"unavailable": f"DALI does not take these inputs: {why}"}
    seconds = _timed(lambda: dali.prepare(datasets, metas), iterations)
    return {"threads": threads, "seconds_per_image": seconds / len(datasets)}


def _min_seconds(settings: BenchSettings) -> float:
    """Time spent per inference figure: a second, or none in a one-run (quick) bench."""
    return 0.0 if settings.iterations == 1 else INFERENCE_SECONDS


def _load(name: str, model_dir: Path, device: str) -> Backend:
    return load_backend(name, model_dir, device="cuda:0" if name == "tensorrt" else device)


def bench_inference(context: _Context, settings: BenchSettings, onnx_missing: str | None) -> dict[str, Any]:
    """Images per second of each backend at each batch size, the same model inputs for all (the
    study's images, repeated to fill the batch), warm-up excluded.

    The backends are timed in interleaved rounds (torch, onnxruntime, torch, ...) and each figure
    is the median of its rounds: a shared or throttled machine drifts in speed over a minute, and
    timing one backend after the other would put that drift into their ratio.
    """
    out: dict[str, Any] = {}
    images = np.stack([p.model_input.pixels[None] for p in context.prepared]).astype(np.float32)
    min_s = _min_seconds(settings)
    rounds = max(settings.iterations, 1)
    loaded: dict[str, Backend] = {}
    for name in settings.backends:
        if name == "onnxruntime" and onnx_missing:
            out[name] = {"unavailable": onnx_missing}
            continue
        try:
            loaded[name] = _load(name, context.model_dir, settings.device)
        except (BackendUnavailable, MammoNodeError) as exc:
            out[name] = {"unavailable": getattr(exc, "reason", None) or str(exc)}
    batches: dict[str, dict[str, Any]] = {name: {} for name in loaded}
    for size in settings.batch_sizes:
        batch = images[np.arange(size) % len(images)]
        samples: dict[str, list[float]] = {name: [] for name in loaded}
        for _ in range(rounds):
            for name, backend in loaded.items():
                run = functools.partial(backend.infer, batch)
                samples[name].append(_timed(run, 1, min_seconds=min_s / rounds))
        for name, times in samples.items():
            seconds = _median(times)
            batches[name][str(size)] = {"seconds_per_batch": seconds, "images_per_second": size / seconds}
    for name, backend in loaded.items():
        out[name] = {"device": getattr(backend, "device", settings.device), "batches": batches[name]}
    loaded.clear()
    gc.collect()
    return {name: out[name] for name in settings.backends if name in out}


def bench_e2e(
    inputs: BenchInputs, context: _Context, settings: BenchSettings, work: Path, onnx_missing: str | None
) -> dict[str, Any]:
    """Score the study end to end (read, decode, preprocess, infer, CAM, write SC + SR) with each
    decode pool, and its floor: its decodes and one inference of its images, measured alone."""
    name = settings.e2e_backend or ("torch" if onnx_missing else "onnxruntime")
    try:
        backend = _load(name, context.model_dir, settings.device)
    except (BackendUnavailable, MammoNodeError) as exc:
        return {"backend": name, "unavailable": getattr(exc, "reason", None) or str(exc)}
    pipeline = Pipeline(backend, batch_size=max(8, len(inputs.study)))
    batch = np.stack([p.model_input.pixels[None] for p in context.prepared]).astype(np.float32)
    inference = _timed(lambda: backend.infer(batch), settings.iterations, min_seconds=_min_seconds(settings))
    decode = sum(context.decode_seconds.values())
    pools: dict[str, float] = {}
    runs = 0
    for kind in dict.fromkeys((settings.pool, *settings.pools)):
        with PixelPool(kind, settings.workers) as pool:
            pool.warm()

            def score(pool: PixelPool = pool) -> None:
                nonlocal runs
                runs += 1
                out = work / f"e2e-{runs}"
                run = score_files(pipeline, inputs.study, out, pool=pool, png=False)
                if run.skipped or len(run.written["sc"]) != len(inputs.study):
                    raise MammoNodeError(f"the bench study did not score cleanly: {run.skipped}")
                shutil.rmtree(out)

            pools[kind] = _timed(score, settings.iterations)
    seconds = pools[settings.pool]
    return {
        "backend": name,
        "images": len(inputs.study),
        "image_sizes": [[int(ds.Rows), int(ds.Columns)] for ds, _ in context.datasets],
        "pool": settings.pool,
        "seconds": seconds,
        "floor_seconds": decode + inference,
        "decode_seconds": decode,
        "decode_seconds_per_image": [context.decode_seconds[p] for p in inputs.study],
        "inference_seconds": inference,
        "pools": pools,
        "stages": _stages(pipeline, context, inputs, work),
    }


def _stages(pipeline: Pipeline, context: _Context, inputs: BenchInputs, work: Path) -> dict[str, float]:
    """One sequential pass split by step (seconds for the whole study): where the time goes."""
    from inference import aggregate_studies

    config = context.manifest.preprocess
    clock = time.perf_counter
    stages = dict.fromkeys(("read", "decode", "preprocess", "infer", "render_sc_sr", "write"), 0.0)
    prepared: list[PreparedImage] = []
    for path in inputs.study:
        t0 = clock()
        ds = read_dataset(path)
        meta = read_meta(ds)
        t1 = clock()
        source = SourceLevels(ds)
        level = display_level(source.rows, source.columns)[0]
        source.finest = level
        source.level(level)
        t2 = clock()
        model_input = preprocess_levels(source, ds, meta, config)
        display = display_copy(source, ds, fallback=config.fallback_window)
        header, dropped = copyable_header(ds)
        prepared.append(PreparedImage(header, display, model_input, dropped))
        t3 = clock()
        stages["read"] += t1 - t0
        stages["decode"] += t2 - t1
        stages["preprocess"] += t3 - t2
    t0 = clock()
    scores = pipeline.infer(prepared)
    t1 = clock()
    (study,) = aggregate_studies(scores, pipeline.aggregation, pipeline.manifest.threshold)
    with PixelPool("serial") as pool:  # the stages are timed one after the other, in this process
        result = pipeline.outputs(study, prepared, pool=pool)
    t2 = clock()
    out = work / "stages"
    out.mkdir()
    for obj in [*result.secondary_captures, result.report]:
        if obj is not None:
            (out / f"{obj.sop_instance_uid}.dcm").write_bytes(obj.data)
    t3 = clock()
    stages.update(infer=t1 - t0, render_sc_sr=t2 - t1, write=t3 - t2)
    stages["total"] = sum(stages.values())
    return stages


def ratios(report: dict[str, Any]) -> dict[str, Any]:
    """The same-run comparisons, computed from the raw figures of ``report``."""
    inference = report["inference"]
    torch_batches = inference.get("torch", {}).get("batches")
    ort_batches = inference.get("onnxruntime", {}).get("batches")
    ort_vs_torch = None
    if torch_batches and ort_batches:
        ort_vs_torch = {
            size: ort_batches[size]["images_per_second"] / torch_batches[size]["images_per_second"]
            for size in torch_batches
            if size in ort_batches
        }
    e2e = report["e2e"]
    e2e_vs_floor = e2e["seconds"] / e2e["floor_seconds"] if "seconds" in e2e else None
    cpu = report["preprocessing"]["cpu"]["decode_and_preprocess_seconds_per_image"]
    out: dict[str, Any] = {"onnxruntime_vs_torch": ort_vs_torch, "e2e_vs_floor": e2e_vs_floor}
    for mode in ("dali_cpu", "dali_gpu"):
        dali = report["preprocessing"][mode]
        # images/s over images/s: DALI (which decodes too) against the CPU's decode + preprocessing
        out[f"{mode}_vs_cpu_preprocessing"] = (
            cpu / dali["seconds_per_image"] if "seconds_per_image" in dali else None
        )
    return out


def targets_met(values: dict[str, Any]) -> dict[str, Any]:
    """Whether issue 4's thresholds hold in this run: per batch size for the backends, None for
    what was not measured here."""
    ort = values["onnxruntime_vs_torch"]
    e2e = values["e2e_vs_floor"]
    return {
        "onnxruntime_vs_torch": (
            None if not ort else {size: v >= TARGETS["onnxruntime_vs_torch_min"] for size, v in ort.items()}
        ),
        "e2e_vs_floor": None if e2e is None else e2e <= TARGETS["e2e_vs_floor_max"],
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table, headed by the machine and model it was measured with."""
    m, model, s = report["machine"], report["model"], report["settings"]
    h, w = model["input_size"]
    load = m["load_average"]
    lines = [
        f"machine: {m['cpus']} CPUs, {m['cpu_model']}, GPU {m['gpu'] or 'none'}"
        + (f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else "")
        + (f" (1-min {m['load_average_end'][0]:.2f} at the end)" if m.get("load_average_end") else ""),
        f"model: {model['name']} {model['version']} ({model['architecture']}), input {h}x{w}; "
        f"inputs {s['inputs']}"
        + (f" {s['image_size'][0]}x{s['image_size'][1]}" if s["image_size"] else "")
        + f"; median of {s['iterations']} run(s) after a warm-up",
        "",
        f"{'decode':<28} {'s/image':>10} {'Mpx/s':>10} {'level':>6} {'s/image':>10}",
    ]
    for name, d in report["decode"].items():
        lines.append(
            f"  {name:<26} {d['seconds']:>10.4f} {d['megapixels_per_second']:>10.1f}"
            f" {d['level']:>6} {d['level_seconds']:>10.4f}"
        )
    lines += ["", f"{'preprocessing':<28} {'s/image':>10}"]
    for mode, d in report["preprocessing"].items():
        if mode == "images":
            continue
        if "unavailable" in d:
            lines.append(f"  {mode:<26} {'-':>10}  ({d['unavailable']})")
            continue
        lines.append(f"  {mode:<26} {d['seconds_per_image']:>10.4f}  ({d['threads']} thread(s))")
        if mode == "cpu":
            lines.append(
                f"  {'cpu decode+preprocess':<26} {d['decode_and_preprocess_seconds_per_image']:>10.4f}"
            )
    sizes = [str(b) for b in s["batch_sizes"]]
    lines += ["", f"{'inference images/s':<28} " + " ".join(f"{'batch ' + b:>10}" for b in sizes)]
    for name, d in report["inference"].items():
        if "unavailable" in d:
            lines.append(f"  {name:<26} unavailable: {d['unavailable']}")
            continue
        cells = " ".join(f"{d['batches'][b]['images_per_second']:>10.2f}" for b in sizes)
        lines.append(f"  {name + ' (' + d['device'] + ')':<26} {cells}")
    e2e = report["e2e"]
    lines.append("")
    if "unavailable" in e2e:
        lines.append(f"end to end ({e2e['backend']}): unavailable: {e2e['unavailable']}")
    else:
        lines += [
            f"end to end, {e2e['images']}-view study, {e2e['backend']}, {e2e['pool']} pool: "
            f"{e2e['seconds']:.3f} s; floor {e2e['floor_seconds']:.3f} s "
            f"(decode {e2e['decode_seconds']:.3f} + inference {e2e['inference_seconds']:.3f})",
            "  by decode pool: " + ", ".join(f"{k} {v:.3f} s" for k, v in e2e["pools"].items()),
            "  sequential steps: " + ", ".join(f"{k} {v:.3f}" for k, v in e2e["stages"].items()),
        ]
    lines += network_lines(report)
    r, met = report["ratios"], report["targets"]["met"]
    lines += ["", "ratios (same run):"]
    ort = r["onnxruntime_vs_torch"]
    lines.append(
        "  onnxruntime vs torch (images/s): "
        + (", ".join(f"batch {k} {v:.2f}x" for k, v in ort.items()) if ort else "not measured")
        + _verdict(met["onnxruntime_vs_torch"], f">= {TARGETS['onnxruntime_vs_torch_min']}x")
    )
    e2e_ratio = r["e2e_vs_floor"]
    lines.append(
        "  end to end vs floor: "
        + (f"{e2e_ratio:.2f}x" if e2e_ratio is not None else "not measured")
        + _verdict(met["e2e_vs_floor"], f"<= {TARGETS['e2e_vs_floor_max']}x")
    )
    for mode in ("dali_cpu", "dali_gpu"):
        value = r[f"{mode}_vs_cpu_preprocessing"]
        lines.append(
            f"  {mode} vs cpu decode+preprocess (images/s): "
            + (f"{value:.2f}x" if value is not None else "not measured")
        )
    lines += network_ratio_lines(report)
    return "\n".join(lines)


def _verdict(met: bool | dict[str, bool] | None, target: str) -> str:
    if met is None:
        return ""
    if isinstance(met, dict):
        missed = [size for size, ok in met.items() if not ok]
        return f"  [target {target}: " + (f"NOT met at batch {', '.join(missed)}]" if missed else "met]")
    return f"  [target {target}: {'met' if met else 'NOT met'}]"


def data_inputs(folder: Path) -> BenchInputs:
    """Inputs from a folder of DICOM files: the first file of each transfer syntax for the decode
    bench, and the study with the most images (up to 4) for the end-to-end run."""
    syntaxes: dict[str, Path] = {}
    studies: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            ds = read_dataset(path, stop_before_pixels=True)
            meta = read_meta(ds)
        except MammoNodeError:
            continue
        name = SYNTAX_UIDS.get(meta.transfer_syntax_uid, meta.transfer_syntax_uid)
        syntaxes.setdefault(name, path)
        studies.setdefault(meta.study_instance_uid, []).append(path)
    if not studies:
        raise MammoNodeError(f"no readable DICOM file under {folder}")
    study = max(studies.values(), key=len)[:4]
    return BenchInputs(syntaxes, study, str(folder))
