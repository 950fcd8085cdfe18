"""Which TensorRT engine of a model serves on this GPU: the manifest's ``engines`` table.

A TensorRT engine is compiled for one GPU model and one TensorRT version, from one ONNX graph;
deserialising it anywhere else fails or, worse, runs kernels tuned for another chip. So each
engine is recorded in ``manifest.engines`` under a key made of exactly those three things
(:func:`engine_key`), with its own SHA-256 (design invariant 5), and the backend loads only the
entry whose GPU, TensorRT version and ONNX SHA-256 are the ones in front of it, saying precisely
which one differs otherwise. The builder (:mod:`inference.backends.tensorrt_build`) uses the same key as
its cache: asking again for an engine that exists with the same options is a no-op.

Pure Python: neither tensorrt nor CUDA is imported here, so this logic is tested everywhere.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

from inference.manifest import ModelManifest
from inference.types import InputError

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

_SLUG_RE = re.compile(r"[^a-z0-9]+")
_SHA_PREFIX = 16


def slug(text: str) -> str:
    """Lower-case letters and digits joined by '-' (GPU names contain spaces and slashes)."""
    return _SLUG_RE.sub("-", text.lower()).strip("-") or "unknown"


def engine_key(gpu_name: str, tensorrt_version: str, onnx_sha256: str) -> str:
    """The cache key of an engine: GPU model, TensorRT version and the ONNX graph's SHA-256.

    Readable on purpose (``nvidia-a100-sxm4-40gb_trt10.13.0.35_1a2b...``): it is also the
    engine's file name stem, and an operator looking at the model folder should see what is what.
    """
    if not onnx_sha256:
        raise ValueError("an engine key needs the ONNX SHA-256")
    return f"{slug(gpu_name)}_trt{slug(tensorrt_version).replace('-', '.')}_{onnx_sha256[:_SHA_PREFIX]}"


def engine_file_name(key: str) -> str:
    return f"model_{key}.engine"


@dataclass(frozen=True)
class EngineRecord:
    """One entry of ``manifest.engines`` (JSON object), everything a result must say about it."""

    file: str
    sha256: str
    gpu: str
    compute_capability: str
    tensorrt: str
    onnx_sha256: str
    precision: str
    max_batch: int
    opt_batch: int
    calibration: dict[str, Any] | None = None  # INT8: dataset folder and image count
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, key: str, data: Any) -> EngineRecord:
        """Parse a manifest entry; InputError naming the key when it is malformed."""
        if not isinstance(data, dict):
            raise InputError(f"manifest engine {key!r} must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            record = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise InputError(f"manifest engine {key!r} is incomplete: {exc}") from exc
        if record.precision not in PRECISIONS:
            raise InputError(f"manifest engine {key!r} has unknown precision {record.precision!r}")
        if not isinstance(record.max_batch, int) or record.max_batch < 1:
            raise InputError(f"manifest engine {key!r} has invalid max_batch {record.max_batch!r}")
        # As for the manifest's other artefacts: a plain file name in the model folder, never a path.
        name = record.file
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise InputError(f"manifest engine {key!r} file must be a plain file name, got {name!r}")
        return record


def engine_records(manifest: ModelManifest) -> dict[str, EngineRecord]:
    return {key: EngineRecord.from_dict(key, value) for key, value in manifest.engines.items()}


class NoMatchingEngine(Exception):
    """No engine of the manifest can run here; ``reason`` is the one line to show the operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def find_engine(manifest: ModelManifest, gpu_name: str, tensorrt_version: str) -> tuple[str, EngineRecord]:
    """The engine of ``manifest`` built for this GPU and TensorRT from the manifest's current ONNX.

    Raises :class:`NoMatchingEngine` with the nearest miss spelled out: an engine built for
    another GPU ("engine built for GPU X, this is Y"), with another TensorRT, from an older ONNX
    graph, or none at all.
    """
    if manifest.onnx_sha256 is None:
        raise NoMatchingEngine("model has no ONNX export, so no TensorRT engine: run `mammonode export onnx`")
    key = engine_key(gpu_name, tensorrt_version, manifest.onnx_sha256)
    records = engine_records(manifest)
    if key in records:
        return key, records[key]
    build = "build one with `mammonode export tensorrt` on this machine"
    if not records:
        raise NoMatchingEngine(f"model has no TensorRT engine; {build}")
    current = [r for r in records.values() if r.onnx_sha256 == manifest.onnx_sha256]
    if not current:
        raise NoMatchingEngine(f"the model's TensorRT engines were built from another ONNX graph; {build}")
    same_gpu = [r for r in current if r.gpu == gpu_name]
    if not same_gpu:
        built_for = ", ".join(sorted({r.gpu for r in current}))
        raise NoMatchingEngine(f"engine built for GPU {built_for}, this is {gpu_name}; {build}")
    versions = ", ".join(sorted({r.tensorrt for r in same_gpu}))
    raise NoMatchingEngine(
        f"engine built with TensorRT {versions}, this is TensorRT {tensorrt_version}; {build}"
    )


def with_engine(manifest: ModelManifest, key: str, record: EngineRecord) -> ModelManifest:
    """The manifest with ``record`` stored under ``key`` (replacing any engine of that key)."""
    engines = dict(manifest.engines)
    engines[key] = record.to_dict()
    return dataclasses.replace(manifest, engines=engines)
