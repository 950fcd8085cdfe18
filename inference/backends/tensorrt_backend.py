"""TensorRT backend: the engine built for this GPU, run from device buffers on one CUDA stream.

Loading picks the engine the manifest records for this GPU, TensorRT version and ONNX graph
(:func:`inference.backends.tensorrt_engines.find_engine`, which says which of the three differs
when none fits), checks its SHA-256 on the very bytes it deserialises, checks the engine's tensors
against the model contract (input ``image`` (B, C, H, W) float32, outputs ``logit`` (B,) and
``cam`` (B, h, w), design invariant 3), allocates device buffers for the largest batch of the
engine's optimisation profile, and runs a warm-up at batch 1 and at the largest batch so the
first study does not pay for lazy initialisation.

Device memory and the stream come from cuda-python (:mod:`inference.backends.cuda_runtime`),
not torch, so a GPU node needs no torch. Inference uses the TensorRT 10 name-based API:
``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``. :meth:`infer` takes a host
batch (copied into the input buffer); :meth:`infer_device` takes a batch already on the GPU (the
DALI preprocessing output) and binds its memory directly, so it never travels through the host.

Imports tensorrt; loaded lazily by :mod:`inference.backends.loader`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tensorrt as trt

from inference.backends.base import GRAPH_INPUT, GRAPH_OUTPUTS, BackendUnavailable, check_batch
from inference.backends.cuda_runtime import (
    CudaArray,
    DeviceBuffer,
    Stream,
    gpu_info,
    gpu_unavailable_reason,
    parse_device,
    set_device,
)
from inference.backends.tensorrt_engines import NoMatchingEngine, find_engine
from inference.manifest import ModelManifest, load_manifest, read_verified
from inference.types import InputError

logger = logging.getLogger(__name__)

BACKEND_NAME = "tensorrt"
_FLOAT32 = np.dtype(np.float32)


class TensorRTBackend:
    """Scores batches with the TensorRT engine of the model in ``model_dir`` built for this GPU."""

    name = BACKEND_NAME

    def __init__(self, model_dir: Path, *, device: str = "cuda:0") -> None:
        if device == "cpu":
            raise BackendUnavailable(
                "TensorRT runs on a CUDA GPU: use device cuda or cuda:N", backend=self.name
            )
        self.device_index = parse_device(device)
        reason = gpu_unavailable_reason(self.device_index)
        if reason is not None:
            raise BackendUnavailable(reason, backend=self.name)
        set_device(self.device_index)
        gpu = gpu_info(self.device_index)
        manifest = load_manifest(model_dir)
        try:
            key, record = find_engine(manifest, gpu.name, trt.__version__)
        except NoMatchingEngine as exc:
            raise BackendUnavailable(exc.reason, backend=self.name) from exc
        data = read_verified(model_dir / record.file, record.sha256, what="TensorRT engine")
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise InputError(f"TensorRT could not deserialise the engine {record.file} (see its log above)")
        self.manifest: ModelManifest = manifest
        self.engine_key = key
        self.engine_sha256 = record.sha256
        self.precision = record.precision
        self._sample_shape = (
            manifest.in_chans,
            manifest.preprocess.input_height,
            manifest.preprocess.input_width,
        )
        self.max_batch = self._check_engine()
        self.context = self.engine.create_execution_context()
        self.stream = Stream()
        self._lock = threading.Lock()  # one context, stream and input buffer: one batch at a time
        self._input = DeviceBuffer(self.max_batch * int(np.prod(self._sample_shape)) * _FLOAT32.itemsize)
        self._outputs = self._allocate_outputs()
        self._warm_up()
        logger.info(
            "loaded %s %s TensorRT engine %s (%s, batch 1..%d, sha256 %s) on %s",
            manifest.name,
            manifest.version,
            key,
            record.precision,
            self.max_batch,
            record.sha256[:12],
            gpu.name,
        )

    def _check_engine(self) -> int:
        """Refuse an engine whose tensors break the model contract; return its largest batch."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        modes = {name: self.engine.get_tensor_mode(name) for name in names}
        expected = {
            GRAPH_INPUT: trt.TensorIOMode.INPUT,
            **dict.fromkeys(GRAPH_OUTPUTS, trt.TensorIOMode.OUTPUT),
        }
        if modes != expected:
            raise InputError(
                f"TensorRT engine has tensors {names}; "
                f"expected input {GRAPH_INPUT!r}, outputs {list(GRAPH_OUTPUTS)}"
            )
        for name in names:
            if self.engine.get_tensor_dtype(name) != trt.float32:
                raise InputError(
                    f"TensorRT engine tensor {name!r} is {self.engine.get_tensor_dtype(name)}, not float32"
                )
        low, _, high = (tuple(s) for s in self.engine.get_tensor_profile_shape(GRAPH_INPUT, 0))
        if low[1:] != self._sample_shape or high[1:] != self._sample_shape or low[0] != 1:
            raise InputError(
                f"TensorRT engine input profile {low}..{high} does not match (1..N, *{self._sample_shape})"
            )
        return int(high[0])

    def _allocate_outputs(self) -> dict[str, tuple[DeviceBuffer, tuple[int, ...]]]:
        """Output buffers for the largest batch, bound once (their addresses never change)."""
        if not self.context.set_input_shape(GRAPH_INPUT, (self.max_batch, *self._sample_shape)):
            raise InputError(f"TensorRT refused batch {self.max_batch} of its own profile")
        outputs: dict[str, tuple[DeviceBuffer, tuple[int, ...]]] = {}
        for name in GRAPH_OUTPUTS:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            buffer = DeviceBuffer(int(np.prod(shape)) * _FLOAT32.itemsize)
            if not self.context.set_tensor_address(name, buffer.ptr):
                raise InputError(f"TensorRT refused the address of output {name!r}")
            outputs[name] = (buffer, shape[1:])
        return outputs

    def _warm_up(self) -> None:
        """First executions allocate and tune lazily; do them now, not on the first study."""
        for size in sorted({1, self.max_batch}):
            self._run(self._input.ptr, size)

    def _run(self, input_ptr: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Execute on ``size`` samples at ``input_ptr`` (device) and copy both outputs back.

        Callers hold ``self._lock`` (except during construction).
        """
        if not self.context.set_input_shape(GRAPH_INPUT, (size, *self._sample_shape)):
            raise ValueError(f"batch {size} is outside the engine's profile 1..{self.max_batch}")
        self.context.set_tensor_address(GRAPH_INPUT, input_ptr)
        if not self.context.execute_async_v3(self.stream.handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        results: list[np.ndarray] = []
        for name in GRAPH_OUTPUTS:
            buffer, tail = self._outputs[name]
            host = np.empty((size, *tail), dtype=np.float32)
            self.stream.copy_to_host(host, buffer.ptr)
            results.append(host)
        self.stream.synchronize()
        logit, cam = results
        return logit.reshape(size), cam

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = check_batch(batch, self.manifest)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, arr.shape[0], self.max_batch):
            chunk = np.ascontiguousarray(arr[start : start + self.max_batch])
            with self._lock:
                self.stream.copy_to_device(self._input.ptr, chunk)
                parts.append(self._run(self._input.ptr, chunk.shape[0]))
        return _concat(parts)

    def infer_device(self, batch: CudaArray) -> tuple[np.ndarray, np.ndarray]:
        """Score a float32 (B, C, H, W) batch that is already in this GPU's memory, in place.

        The batch must be complete when this is called (the DALI preprocessing returns
        host-synchronous outputs); values are not range-checked, as that would need a pass over
        device memory: the preprocessing that made them clips to [0, 1].
        """
        if batch.dtype != _FLOAT32 or tuple(batch.shape[1:]) != self._sample_shape or len(batch.shape) != 4:
            raise ValueError(
                f"device batch {batch.dtype} {batch.shape} does not match (B, *{self._sample_shape}) float32"
            )
        if batch.device_index != self.device_index:
            raise ValueError(
                f"device batch is on GPU {batch.device_index}, the engine on GPU {self.device_index}"
            )
        sample_bytes = int(np.prod(self._sample_shape)) * _FLOAT32.itemsize
        with self._lock:
            parts = [
                self._run(batch.ptr + start * sample_bytes, min(self.max_batch, batch.shape[0] - start))
                for start in range(0, batch.shape[0], self.max_batch)
            ]
        return _concat(parts)

    def close(self) -> None:
        """Release the device buffers and the stream (also done on garbage collection)."""
        with self._lock:
            self._input.free()
            for buffer, _ in self._outputs.values():
                buffer.free()
            self.stream.destroy()


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    logits: list[Any] = [p[0] for p in parts]
    cams: list[Any] = [p[1] for p in parts]
    return np.concatenate(logits).astype(np.float32), np.concatenate(cams).astype(np.float32)
