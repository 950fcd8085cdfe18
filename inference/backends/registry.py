"""Which backends exist, which are usable here, and how to load one by name.

Adding a backend means adding one :class:`_Spec` row: the packages it needs and the
``module:Class`` that implements :class:`~inference.backends.base.Backend` with the constructor
``(model_dir, *, device)``. Modules are imported only when that backend is loaded, so listing
backends never imports torch, onnxruntime or tensorrt.
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


_BACKENDS: dict[str, _Spec] = {
    "torch": _Spec(("torch", "timm", "safetensors"), "inference.backends.torch_backend:TorchBackend"),
    "onnxruntime": _Spec(("onnxruntime",), None),
    "tensorrt": _Spec(("tensorrt",), None),
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
            return f"package {package} not installed"
    return None


def available_backends() -> dict[str, str | None]:
    """Every known backend -> None if it can be loaded here, else the reason it cannot."""
    return {name: _unavailable_reason(spec) for name, spec in _BACKENDS.items()}


def load_backend(name: str, model_dir: Path, *, device: str = "cpu") -> Backend:
    """Load the model in ``model_dir`` with backend ``name``.

    Raises :class:`BackendUnavailable` if the backend is unknown or cannot run here.
    """
    spec = _BACKENDS.get(name)
    if spec is None:
        raise BackendUnavailable(f"unknown backend; known: {', '.join(_BACKENDS)}", backend=name)
    reason = _unavailable_reason(spec)
    if reason is not None or spec.target is None:
        raise BackendUnavailable(reason or NOT_IMPLEMENTED, backend=name)
    module_name, _, class_name = spec.target.partition(":")
    factory = getattr(importlib.import_module(module_name), class_name)
    backend: Backend = factory(model_dir, device=device)
    logger.info("loaded backend %s for %s on %s", name, model_dir, device)
    return backend
