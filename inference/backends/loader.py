"""Which backends exist, which are usable here, and how to load one by name.

Adding a backend means adding one :class:`_Spec` row: the packages it needs and the
``module:Class`` that implements :class:`~inference.backends.base.Backend` with the constructor
``(model_dir, *, device)``. Modules are imported only when that backend is loaded, so listing
backends never imports torch, onnxruntime or tensorrt.

Why a backend cannot run is always said in :class:`BackendUnavailable`'s ``reason``: a missing
package is found here, before importing anything; what only the backend can know (no GPU, a model
without an ONNX export, an engine built for another GPU) its constructor raises while loading.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from inference.backends.base import Backend, BackendUnavailable

logger = logging.getLogger(__name__)

NOT_IMPLEMENTED = "not implemented yet"


@dataclass(frozen=True)
class _Spec:
    requires: tuple[str, ...]  # importable top-level package names
    target: str | None  # "module:Class"; None while the backend is not implemented
    install: str = ""  # how to get the missing packages, appended to "package X not installed"
    probe: str | None = None  # "module:function" -> reason or None; cheap checks past the packages


_BACKENDS: dict[str, _Spec] = {
    "torch": _Spec(
        ("torch", "timm", "safetensors"),
        "inference.backends.torch_backend:TorchBackend",
        "install the train extra: pip install 'mammonode[train]'",
    ),
    "onnxruntime": _Spec(
        ("onnxruntime",),
        "inference.backends.onnxruntime_backend:OnnxRuntimeBackend",
        "it is part of the base install: pip install onnxruntime",
    ),
    "tensorrt": _Spec(
        ("tensorrt",),
        "inference.backends.tensorrt_backend:TensorRTBackend",
        "GPU only: pip install 'mammonode[gpu]' --extra-index-url https://pypi.nvidia.com, "
        "or NVIDIA's TensorRT container (see README)",
        probe="inference.backends.cuda_runtime:gpu_unavailable_reason",  # "no CUDA GPU"
    ),
}


def _package_installed(name: str) -> bool:
    """True if ``name`` can be imported, checked without importing it (fast, no side effects)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _unavailable_reason(spec: _Spec) -> str | None:
    if spec.target is None:
        return NOT_IMPLEMENTED
    for package in spec.requires:
        if not _package_installed(package):
            return f"package {package} not installed" + (f" ({spec.install})" if spec.install else "")
    if spec.probe is not None:
        module_name, _, function = spec.probe.partition(":")
        reason: str | None = getattr(importlib.import_module(module_name), function)()
        return reason
    return None


def available_backends() -> dict[str, str | None]:
    """Every known backend -> None if it can be loaded here, else the reason it cannot."""
    return {name: _unavailable_reason(spec) for name, spec in _BACKENDS.items()}


AUTO = "auto"


def resolve_auto(model_dir: Path) -> str:
    """What ``auto`` means for a model folder: ONNX Runtime when the model ships an ONNX export
    and onnxruntime is installed (faster on CPU, and the only choice without torch), else torch."""
    from inference.manifest import load_manifest

    manifest = load_manifest(model_dir)
    if manifest.onnx_file is not None and _unavailable_reason(_BACKENDS["onnxruntime"]) is None:
        return "onnxruntime"
    return "torch"


def load_backend(name: str, model_dir: Path, *, device: str = "cpu") -> Backend:
    """Load the model in ``model_dir`` with backend ``name`` (or ``auto``, see :func:`resolve_auto`).

    Raises :class:`BackendUnavailable` if the backend is unknown or cannot run here.
    """
    if name == AUTO:
        name = resolve_auto(model_dir)
    spec = _BACKENDS.get(name)
    if spec is None:
        raise BackendUnavailable(f"unknown backend; known: {AUTO}, {', '.join(_BACKENDS)}", backend=name)
    reason = _unavailable_reason(spec)
    if reason is not None or spec.target is None:
        raise BackendUnavailable(reason or NOT_IMPLEMENTED, backend=name)
    module_name, _, class_name = spec.target.partition(":")
    factory = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = factory(model_dir, device=device)
    logger.info("loaded backend %s for %s on %s", name, model_dir, device)
    return backend
