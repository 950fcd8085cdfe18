"""`mammonode export tensorrt`: a TensorRT engine for this GPU, built from the model's ONNX graph.

The engine is built from the graph `mammonode export onnx` recorded in the manifest (its SHA-256
checked first), with one optimisation profile for batches 1..N (N = ``--max-batch``, also the
shape TensorRT tunes for, as the worker fills its batches), in FP32, FP16 or INT8. INT8 is
calibrated (entropy calibration) on images of a dataset folder, run through the CPU preprocessing
that training and serving share, so the activation ranges are those of real model inputs.

Engines are cached by GPU name, TensorRT version and ONNX SHA-256
(:func:`inference.backends.tensorrt_engines.engine_key`): asking again for an engine that exists
with the same precision and batch range, and whose file still has its recorded SHA-256, does
nothing. The engine file is written beside the weights and its SHA-256 recorded in
``manifest.engines[key]`` (design invariant 5), which is where the tensorrt backend looks.

TensorRT 10 is required: TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrator
(it wants an ONNX already converted with NVIDIA's ModelOpt); with it, only FP32 builds work here.

This module imports only light modules at load time; tensorrt and cuda-python are imported inside
the functions (the ``gpu`` extra). The command is :func:`node.commands.export.tensorrt_command`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from inference.backends.base import GRAPH_INPUT
from inference.backends.tensorrt_engines import (
    EngineRecord,
    engine_file_name,
    engine_key,
    engine_records,
    with_engine,
)
from inference.bundled import resolve_model_dir
from inference.manifest import (
    ModelManifest,
    atomic_write_bytes,
    file_sha256,
    load_manifest,
    read_verified,
    save_manifest,
)
from inference.types import InputError, MammoNodeError, PreprocessConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_CALIBRATION_IMAGES = 64
DEFAULT_WORKSPACE_GIB = 4.0
_DICOM_SUFFIXES = ("", ".dcm", ".dicom")


class TensorRTExportError(MammoNodeError):
    """The engine was not built (no ONNX, no GPU, no TensorRT, a build or calibration failure)."""


@dataclass(frozen=True)
class EngineBuildResult:
    key: str
    path: Path
    record: EngineRecord
    cached: bool  # True when an existing engine was reused


def precision_of(*, fp16: bool, int8: bool) -> str:
    """INT8 engines keep FP16 for the layers INT8 cannot run, so --int8 wins over --fp16."""
    return "int8" if int8 else "fp16" if fp16 else "fp32"


# --------------------------------------------------------------------------------------------
# Calibration data (pure Python: tested without TensorRT)
# --------------------------------------------------------------------------------------------


def calibration_files(folder: Path) -> list[Path]:
    """DICOM candidates under ``folder`` (any depth, RSNA layout included), in a stable order."""
    if not folder.is_dir():
        raise TensorRTExportError(f"calibration folder {folder} does not exist")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _DICOM_SUFFIXES)


def calibration_batches(
    folder: Path, config: PreprocessConfig, *, in_chans: int, batch_size: int, limit: int
) -> Iterator[np.ndarray]:
    """Float32 (batch_size, in_chans, H, W) batches of up to ``limit`` images of ``folder``,
    each through :func:`inference.preprocessing.preprocess` exactly as served.

    Files that are not usable mammograms are skipped with a warning (a dataset folder has CSVs,
    READMEs and the odd broken file). Only full batches are yielded: TensorRT calibrates at the
    profile's batch size, and the remainder of fewer than ``batch_size`` images is dropped (logged).
    """
    from inference.dicom_header import read_dataset
    from inference.preprocessing import preprocess

    if batch_size < 1 or limit < batch_size:
        raise ValueError(f"need limit >= batch_size >= 1, got limit {limit}, batch_size {batch_size}")
    pending: list[np.ndarray] = []
    used = 0
    for path in calibration_files(folder):
        if used >= limit:
            break
        try:
            grid = preprocess(read_dataset(path), config).pixels
        except InputError as exc:
            logger.warning("calibration: skipping %s: %s", path.name, exc)
            continue
        used += 1
        pending.append(np.repeat(grid[None], in_chans, axis=0))
        if len(pending) == batch_size:
            yield np.stack(pending).astype(np.float32)
            pending = []
    if pending:
        logger.info(
            "calibration: %d images left over after the last full batch of %d", len(pending), batch_size
        )


def cached_engine(
    model_dir: Path, manifest: ModelManifest, key: str, precision: str, max_batch: int
) -> EngineRecord | None:
    """The manifest's engine under ``key`` if it can be reused as is: same precision and batch
    range, and its file present with the recorded SHA-256. None means build."""
    record = engine_records(manifest).get(key)
    if record is None or record.precision != precision or record.max_batch != max_batch:
        return None
    path = model_dir / record.file
    if not path.is_file() or file_sha256(path) != record.sha256:
        logger.warning("cached engine %s is missing or modified: building it again", path.name)
        return None
    return record


# --------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------


def _tensorrt() -> ModuleType:
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTExportError(
            "package tensorrt not installed: use NVIDIA's TensorRT container or "
            "pip install 'mammonode[gpu]' --extra-index-url https://pypi.nvidia.com (see README)"
        ) from exc
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTExportError(f"TensorRT {tensorrt.__version__} is too old: version 10 is required")
    return tensorrt


def _check_precision(trt: Any, precision: str) -> None:
    flag = {"fp16": "FP16", "int8": "INT8"}.get(precision)
    if flag is not None and not hasattr(trt.BuilderFlag, flag):
        raise TensorRTExportError(
            f"TensorRT {trt.__version__} has no {precision.upper()} builder flag (removed in TensorRT 11, "
            "which needs a ModelOpt-converted ONNX): build with TensorRT 10, or in FP32"
        )


def make_calibrator(trt: Any, batches: Iterable[np.ndarray]) -> Any:
    """An entropy calibrator (``IInt8EntropyCalibrator2``) feeding ``batches`` to TensorRT from one
    device buffer. Its batch size is the profile's, which the batches must have."""
    from inference.backends.cuda_runtime import DeviceBuffer, Stream

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # TensorRT requires the explicit call
            self._batches = iter(batches)
            self._buffer: DeviceBuffer | None = None
            self._stream = Stream()
            self.count = 0

        def get_batch_size(self) -> int:
            return 1  # ignored for explicit-batch networks: the calibration profile sets it

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            if self._buffer is None:
                self._buffer = DeviceBuffer(batch.nbytes)
            self._stream.copy_to_device(self._buffer.ptr, np.ascontiguousarray(batch))
            self._stream.synchronize()
            self.count += 1
            logger.info("calibration batch %d (%d images)", self.count, batch.shape[0])
            return [self._buffer.ptr]

        def read_calibration_cache(self) -> bytes | None:
            return None  # always calibrate: the data and the graph decide, no stale tables

        def write_calibration_cache(self, cache: Any) -> None:
            logger.debug("calibration table of %d bytes computed", len(bytes(cache)))

    return Calibrator()


def build_serialized(
    trt: Any,
    onnx: bytes,
    manifest: ModelManifest,
    *,
    precision: str,
    max_batch: int,
    calibrator: Any = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
) -> bytes:
    """Parse the ONNX graph and build the serialised engine (the TensorRT 10 builder API)."""
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch, the only mode since TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTExportError(f"TensorRT cannot parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    sample = (manifest.in_chans, manifest.preprocess.input_height, manifest.preprocess.input_width)
    profile = builder.create_optimization_profile()
    profile.set_shape(GRAPH_INPUT, (1, *sample), (max_batch, *sample), (max_batch, *sample))
    config.add_optimization_profile(profile)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(profile)  # calibration runs at the profile's OPT batch
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTExportError("TensorRT could not build the engine (see its log above)")
    return bytes(plan)


def _check_request(precision: str, max_batch: int, calibration: Path | None) -> None:
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}")
    if not 1 <= max_batch <= 256:
        raise ValueError(f"max batch must be in 1..256, got {max_batch}")
    if precision == "int8" and calibration is None:
        raise TensorRTExportError("--int8 needs --calibration DATASET_DIR (images to calibrate on)")


def _int8_calibrator(
    trt: Any, calibration: Path, manifest: ModelManifest, max_batch: int, calibration_images: int
) -> Any:
    """The INT8 calibrator over ``calibration``'s images; fails here, clearly, rather than deep
    inside the build when the folder holds no usable batch."""
    batches = calibration_batches(
        calibration,
        manifest.preprocess,
        in_chans=manifest.in_chans,
        batch_size=max_batch,
        limit=max(calibration_images, max_batch),
    )
    first = next(batches, None)
    if first is None:
        raise TensorRTExportError(f"no calibration batch of {max_batch} usable images in {calibration}")
    return make_calibrator(trt, itertools.chain([first], batches))


def build_engine(
    model_dir: Path | None = None,
    *,
    precision: str = "fp32",
    max_batch: int = DEFAULT_MAX_BATCH,
    calibration: Path | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    device: str = "cuda:0",
    force: bool = False,
) -> EngineBuildResult:
    """Build (or reuse) the engine of the model in ``model_dir`` (default: the bundled demo) for
    GPU ``device``, write it beside the weights and record it in the manifest."""
    from inference.backends.cuda_runtime import gpu_info, gpu_unavailable_reason, parse_device, set_device

    _check_request(precision, max_batch, calibration)
    source = resolve_model_dir(model_dir)
    manifest = load_manifest(source)
    if manifest.onnx_file is None or manifest.onnx_sha256 is None:
        raise TensorRTExportError(
            f"the model has no ONNX graph: run `mammonode export onnx --model {source}` first"
        )
    onnx = read_verified(source / manifest.onnx_file, manifest.onnx_sha256, what="ONNX graph")
    trt = _tensorrt()
    _check_precision(trt, precision)
    index = parse_device(device)
    reason = gpu_unavailable_reason(index)
    if reason is not None:
        raise TensorRTExportError(f"cannot build a TensorRT engine: {reason}")
    set_device(index)
    gpu = gpu_info(index)
    key = engine_key(gpu.name, trt.__version__, manifest.onnx_sha256)
    path = source / engine_file_name(key)
    cached = None if force else cached_engine(source, manifest, key, precision, max_batch)
    if cached is not None:
        logger.info("engine %s is up to date (sha256 %s)", key, cached.sha256[:12])
        return EngineBuildResult(key, source / cached.file, cached, cached=True)

    calibrator, calibration_info = None, None
    if precision == "int8" and calibration is not None:
        calibrator = _int8_calibrator(trt, calibration, manifest, max_batch, calibration_images)
        calibration_info = {"dataset": str(calibration), "images_requested": calibration_images}
    logger.info(
        "building a %s TensorRT %s engine for %s, batch 1..%d",
        precision,
        trt.__version__,
        gpu.name,
        max_batch,
    )
    plan = build_serialized(
        trt, onnx, manifest, precision=precision, max_batch=max_batch, calibrator=calibrator
    )
    if calibrator is not None and calibration_info is not None:
        calibration_info["images_used"] = calibrator.count * max_batch
    atomic_write_bytes(path, plan)
    record = EngineRecord(
        file=path.name,
        sha256=file_sha256(path),
        gpu=gpu.name,
        compute_capability=gpu.compute_capability,
        tensorrt=str(trt.__version__),
        onnx_sha256=manifest.onnx_sha256,
        precision=precision,
        max_batch=max_batch,
        opt_batch=max_batch,
        calibration=calibration_info,
        created=datetime.now(UTC).date().isoformat(),
    )
    save_manifest(with_engine(manifest, key, record), source)
    logger.info("wrote %s (sha256 %s)", path, record.sha256[:12])
    return EngineBuildResult(key, path, record, cached=False)
