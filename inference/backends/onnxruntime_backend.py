"""ONNX Runtime backend: the exported graph on CPU (default) or CUDA, with no torch at all.

This is what a base install serves with: the graph from `mammonode export onnx`, verified against
the manifest's SHA-256, run by ONNX Runtime with every graph optimisation on. On a small CPU box it
is several times faster than torch eager on the same model (design notes: 2-4x on 2 cores).

Imports onnxruntime; loaded lazily by :mod:`inference.backends.loader`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from inference.backends.base import GRAPH_INPUT, GRAPH_OUTPUTS, BackendUnavailable, check_batch
from inference.device import parse_device
from inference.manifest import ModelManifest, load_manifest, read_verified
from inference.types import InputError

logger = logging.getLogger(__name__)

BACKEND_NAME = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
_SYS_CPU = Path("/sys/devices/system/cpu")
_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 quota (a container's ``--cpus``), or None when unlimited."""
    try:
        quota, period = _CGROUP_CPU_MAX.read_text(encoding="ascii").split()
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):  # no cgroup v2, "max" (unlimited) or an unexpected format
        return None


def physical_cores() -> int:
    """Physical cores this process may use: ONNX Runtime's intra-op pool is fastest with one
    thread per core (hyper-threads share the vector units), and a container's CPU affinity and
    quota must be respected or the threads fight over too few CPUs."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not allowed:
        allowed = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in allowed:
        topology = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text(encoding="ascii").strip()
            core = (topology / "core_id").read_text(encoding="ascii").strip()
        except OSError:  # no sysfs (not Linux): count logical CPUs
            package, core = "cpu", str(cpu)
        cores.add((package, core))
    limit = _cgroup_cpu_limit()
    return max(1, min(len(cores), limit) if limit else len(cores))


def _providers(device: str) -> list[Any]:
    """Execution providers for ``device`` ("cpu", "cuda" or "cuda:N"), CPU always last as fallback."""
    parsed = parse_device(device)
    if not parsed.is_cuda:
        return [CPU_PROVIDER]
    available = ort.get_available_providers()
    if CUDA_PROVIDER not in available:
        raise BackendUnavailable(
            f"no {CUDA_PROVIDER} in this onnxruntime (install onnxruntime-gpu for CUDA); "
            f"available: {', '.join(available)}",
            backend=BACKEND_NAME,
        )
    return [(CUDA_PROVIDER, {"device_id": parsed.cuda_index}), CPU_PROVIDER]


def create_session(model: bytes, *, device: str = "cpu", threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for a serialised graph, tuned for serving.

    All graph optimisations (constant folding, conv+BN+activation fusion, layout transforms); one
    intra-op thread per physical core unless ``threads`` is given; sequential execution, since the
    graph is a single chain and parallel branches only add scheduling overhead. Raises
    :class:`BackendUnavailable` when CUDA is asked for and cannot be used.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads if threads is not None else physical_cores()
    options.inter_op_num_threads = 1
    providers = _providers(device)
    session = ort.InferenceSession(model, sess_options=options, providers=providers)
    if device != "cpu" and CUDA_PROVIDER not in session.get_providers():
        # ORT falls back to the CPU silently when the provider cannot start (no GPU, no driver).
        raise BackendUnavailable(
            f"{CUDA_PROVIDER} could not start on {device} (no GPU visible, or CUDA/cuDNN libraries missing)",
            backend=BACKEND_NAME,
        )
    return session


def check_graph(session: Any, manifest: ModelManifest) -> None:
    """Refuse a graph whose tensors do not match the manifest (names, channels, model grid).

    The batch axis must be dynamic (a symbolic dimension) so the worker can send any batch size.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [GRAPH_INPUT] or [o.name for o in outputs] != list(GRAPH_OUTPUTS):
        raise InputError(
            f"ONNX graph has inputs {[i.name for i in inputs]} and outputs {[o.name for o in outputs]}; "
            f"expected [{GRAPH_INPUT!r}] and {list(GRAPH_OUTPUTS)}"
        )
    shape = list(inputs[0].shape)
    expected = [manifest.in_chans, manifest.preprocess.input_height, manifest.preprocess.input_width]
    if len(shape) != 4 or shape[1:] != expected or isinstance(shape[0], int):
        raise InputError(f"ONNX input shape {shape} does not match [batch (dynamic), *{expected}]")


class OnnxRuntimeBackend:
    """Scores batches with the ONNX graph of the model in ``model_dir`` (checked against its manifest)."""

    name = BACKEND_NAME

    def __init__(self, model_dir: Path, *, device: str = "cpu", max_batch: int = 8) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        manifest = load_manifest(model_dir)
        if manifest.onnx_file is None:
            raise BackendUnavailable(
                f"model has no ONNX export: run `mammonode export onnx --model {model_dir}`",
                backend=self.name,
            )
        data = read_verified(model_dir / manifest.onnx_file, manifest.onnx_sha256, what="ONNX graph")
        self.session = create_session(data, device=device)
        check_graph(self.session, manifest)
        self.device = device
        self.max_batch = max_batch
        self.manifest: ModelManifest = manifest
        logger.info(
            "loaded %s %s ONNX (%s) with %s",
            manifest.name,
            manifest.version,
            (manifest.onnx_sha256 or "")[:12],
            ", ".join(self.session.get_providers()),
        )

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arr = check_batch(batch, self.manifest)
        logits: list[np.ndarray] = []
        cams: list[np.ndarray] = []
        for start in range(0, arr.shape[0], self.max_batch):
            logit, cam = self.session.run(
                list(GRAPH_OUTPUTS), {GRAPH_INPUT: arr[start : start + self.max_batch]}
            )
            logits.append(np.asarray(logit))
            cams.append(np.asarray(cam))
        return np.concatenate(logits).astype(np.float32), np.concatenate(cams).astype(np.float32)
