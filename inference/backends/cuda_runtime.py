"""The little of the CUDA runtime the GPU path needs, through cuda-python, and a device-array view.

TensorRT takes raw device pointers and a CUDA stream; this module provides them with cuda-python
(``cuda.bindings.runtime``, the binding TensorRT's own samples use) rather than torch, so a GPU
serving node needs neither torch nor its CUDA libraries: TensorRT, DALI and cuda-python suffice.
Every call's error code is checked and turned into :class:`CudaError` with CUDA's own error name.

:class:`CudaArray` describes memory already on the device (a DALI output, a TensorRT binding) by
the ``__cuda_array_interface__`` protocol, so it can be handed to TensorRT (pointer), to torch
(``torch.as_tensor``) or to CuPy without a copy. It does not import cuda-python.

cuda-python is imported inside the functions (it is optional, part of the ``gpu`` extra).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from inference.device import parse_device as parse_device_text
from inference.types import MammoNodeError

logger = logging.getLogger(__name__)

CUDA_PYTHON = "cuda-python"


class CudaError(MammoNodeError):
    """A CUDA runtime call failed; the message names the call and CUDA's error name."""


def cudart() -> ModuleType:
    """The CUDA runtime binding of cuda-python (``cuda.bindings.runtime``; ``cuda.cudart`` before
    cuda-python 12.6). ImportError when cuda-python is not installed."""
    try:
        return importlib.import_module("cuda.bindings.runtime")
    except ImportError:
        return importlib.import_module("cuda.cudart")


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python result ``(error, *values)``: the value(s), or CudaError."""
    rt = cudart()
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(error)
        raise CudaError(f"{call} failed: {name.decode() if isinstance(name, bytes) else name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_unavailable_reason(device_index: int = 0) -> str | None:
    """None when CUDA device ``device_index`` can be used here, else why not (one line)."""
    try:
        rt = cudart()
    except ImportError:
        return f"package {CUDA_PYTHON} not installed (part of the gpu extra)"
    error, count = rt.cudaGetDeviceCount()
    if error != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(error)
        return f"no CUDA GPU ({name.decode() if isinstance(name, bytes) else name})"
    if count == 0:
        return "no CUDA GPU"
    if not 0 <= device_index < count:
        return f"no CUDA GPU {device_index} (this machine has {count})"
    return None


def parse_device(device: str) -> int:
    """The CUDA device index of ``cuda`` / ``cuda:N`` (:func:`inference.device.parse_device`);
    ValueError for anything else, the CPU included: TensorRT needs a GPU."""
    try:
        return parse_device_text(device).cuda_index
    except ValueError:
        raise ValueError(f"invalid CUDA device {device!r}; use cuda or cuda:N") from None


@dataclass(frozen=True)
class GpuInfo:
    """What identifies a GPU for a TensorRT engine: engines are built for one GPU model."""

    index: int
    name: str
    compute_capability: str


def gpu_info(device_index: int) -> GpuInfo:
    """Name and compute capability of a CUDA device (CudaError when there is none)."""
    props = check(cudart().cudaGetDeviceProperties(device_index), "cudaGetDeviceProperties")
    raw = props.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuInfo(device_index, name.strip(), f"{props.major}.{props.minor}")


def set_device(device_index: int) -> None:
    check(cudart().cudaSetDevice(device_index), "cudaSetDevice")


class DeviceBuffer:
    """``nbytes`` of device memory, freed by :meth:`free` (also on garbage collection)."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 1:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        self.nbytes = nbytes
        self.ptr: int = int(check(cudart().cudaMalloc(nbytes), "cudaMalloc"))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr), "cudaFree")

    def __del__(self) -> None:
        with contextlib.suppress(CudaError, ImportError, AttributeError, TypeError):  # at interpreter exit
            self.free()


class Stream:
    """A CUDA stream; ``handle`` is what TensorRT's ``execute_async_v3`` takes."""

    def __init__(self) -> None:
        self._stream = check(cudart().cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def copy_to_device(self, dst_ptr: int, src: np.ndarray) -> None:
        """Enqueue a host-to-device copy of the C-contiguous array ``src``."""
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(dst_ptr, src.ctypes.data, src.nbytes, kind, self._stream), "cudaMemcpyAsync")

    def copy_to_host(self, dst: np.ndarray, src_ptr: int) -> None:
        """Enqueue a device-to-host copy into the C-contiguous array ``dst`` (synchronise before use)."""
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(dst.ctypes.data, src_ptr, dst.nbytes, kind, self._stream), "cudaMemcpyAsync")

    def destroy(self) -> None:
        if self.handle:
            self.handle = 0
            check(cudart().cudaStreamDestroy(self._stream), "cudaStreamDestroy")

    def __del__(self) -> None:
        with contextlib.suppress(CudaError, ImportError, AttributeError, TypeError):  # at interpreter exit
            self.destroy()


@dataclass
class CudaArray:
    """A C-contiguous array in device memory that this object does not own.

    ``owner`` keeps the memory alive (a DALI tensor, a :class:`DeviceBuffer`); ``to_host`` copies
    it back when a consumer cannot read device memory. Exposes ``__cuda_array_interface__``
    (version 3), so torch, CuPy and Numba can wrap it without a copy.
    """

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    owner: Any = field(repr=False)
    to_host: Callable[[], np.ndarray] = field(repr=False)
    device_index: int = 0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self.ptr, False), "version": 3}
