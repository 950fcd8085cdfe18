"""`mammonode export onnx`: the trained model as one ONNX graph, checked before it is accepted.

The graph has input ``image`` (B, C, H, W) float32 in [0, 1], outputs ``logit`` (B,) and ``cam``
(B, h, w) (design invariant 3) and a dynamic batch axis. It is written by the TorchScript exporter
(``dynamo=False``) at opset 17, which gives one self-contained file; the dynamo exporter needs
onnxscript and writes opset 18 with external data. Before the file replaces anything it must pass
``onnx.checker`` and match the torch model in ONNX Runtime on synthetic mammograms run through the
shared preprocessing, at batch sizes 1 and 3. Only then are the file and the manifest's
``onnx_sha256`` written, each atomically (ONNX first: a crash in between leaves a graph the
manifest does not vouch for, which the backend refuses, never a manifest vouching for a stale one).

Exporting the same weights again gives byte-identical output with the same torch and onnx versions;
another torch version may serialise differently (another SHA-256), and the parity check is what
guarantees the graph either way.

torch, onnx and onnxruntime are imported inside the functions. The command
(`mammonode export onnx`) is :func:`node.commands.export.onnx_command`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.backends.base import GRAPH_INPUT, GRAPH_OUTPUTS
from inference.backends.parity import ParityReport, compare_outputs
from inference.bundled import resolve_model_dir
from inference.manifest import ModelManifest, atomic_write_bytes, file_sha256, load_manifest, save_manifest
from inference.types import ImageMeta, MammoNodeError

if TYPE_CHECKING:
    from inference.model import MammoNet

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
DEFAULT_OPSET = 17
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 3)
"""Batch sizes the graph is checked at: the exporter traces at 2, so both differ from the trace."""


class ExportError(MammoNodeError):
    """The export was refused (invalid graph, parity failure); nothing was written."""


@dataclass(frozen=True)
class ExportResult:
    """Where the graph went, its SHA-256 as now recorded in the manifest, and the parity check."""

    model_dir: Path
    onnx_path: Path
    onnx_sha256: str
    parity: dict[int, ParityReport]  # batch size -> report
    engines_dropped: bool


def parity_inputs(manifest: ModelManifest, count: int = 3, seed: int = 0) -> np.ndarray:
    """``count`` synthetic mammograms (with and without lesions, both sides, both views) through
    the shared preprocessing, as a (count, C, H, W) batch on the model grid.

    Real-looking input matters: uniform noise drives EfficientNet to extreme activations nobody
    serves, and can hide (or invent) differences in the regime that counts.
    """
    from inference.preprocessing import preprocess_array
    from training.synth.lesions import random_lesion
    from training.synth.phantom import synth_breast

    rng = np.random.default_rng(seed)
    grid_h, grid_w = manifest.preprocess.input_height, manifest.preprocess.input_width
    size = (max(2 * grid_h, 64), max(3 * grid_h // 2, grid_w, 64))  # rows x columns, as a detector
    views = (("L", "CC", "mass"), ("R", "MLO", None), ("R", "CC", "calcification"), ("L", "MLO", None))
    batch: list[np.ndarray] = []
    for index in range(count):
        laterality, view, lesion_kind = views[index % len(views)]
        lesions = [random_lesion(rng, lesion_kind)] if lesion_kind else []
        pixels, _ = synth_breast(rng, laterality=laterality, view=view, size=size, lesions=lesions)
        meta = ImageMeta(
            sop_instance_uid=f"2.25.{index + 1}",
            sop_class_uid="",
            study_instance_uid="2.25.0",
            series_instance_uid="2.25.0",
            patient_id="parity",
            laterality=laterality,
            view=view,
        )
        grid = preprocess_array(pixels.astype(np.float32) / 4095.0, meta, manifest.preprocess).pixels
        batch.append(np.repeat(grid[None], manifest.in_chans, axis=0))
    return np.stack(batch).astype(np.float32)


def export_graph(model: MammoNet, example: np.ndarray, *, opset: int = DEFAULT_OPSET) -> bytes:
    """Serialise ``model`` (eval mode, on the CPU) as ONNX bytes with a dynamic batch axis."""
    import torch

    axes = {name: {0: "batch"} for name in (GRAPH_INPUT, *GRAPH_OUTPUTS)}
    with tempfile.TemporaryDirectory(prefix="mammonode-onnx-") as tmp, warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but it is the one that
        # writes a single self-contained opset-17 file (see the module docstring).
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        torch.onnx.export(
            model,
            (torch.from_numpy(np.ascontiguousarray(example)),),
            str(Path(tmp) / ONNX_FILE),
            input_names=[GRAPH_INPUT],
            output_names=list(GRAPH_OUTPUTS),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
        return (Path(tmp) / ONNX_FILE).read_bytes()


def check_onnx(data: bytes, *, opset: int) -> None:
    """Validate the graph with ``onnx.checker`` (full shape inference) and check its contract."""
    import onnx

    proto = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
    versions = {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")}
    if versions != {opset}:
        raise ExportError(f"the exported graph has opset {sorted(versions)}, expected {opset}")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportError("the exported graph refers to external data; it must be one file")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch_dim.dim_param:
        raise ExportError("the exported graph has a fixed batch size; the batch axis must be dynamic")


def check_parity(model: MammoNet, data: bytes, inputs: np.ndarray) -> dict[int, ParityReport]:
    """Run torch and ONNX Runtime on the same inputs at each of :data:`PARITY_BATCH_SIZES`."""
    import torch

    from inference.backends.onnxruntime_backend import create_session

    session = create_session(data, device="cpu")
    with torch.inference_mode():
        ref_logit, ref_cam = (t.numpy() for t in model(torch.from_numpy(inputs)))
    reports: dict[int, ParityReport] = {}
    for size in PARITY_BATCH_SIZES:
        logit, cam = session.run(list(GRAPH_OUTPUTS), {GRAPH_INPUT: inputs[:size]})
        reports[size] = compare_outputs((ref_logit[:size], ref_cam[:size]), (logit, cam))
    return reports


def _copy_model_dir(source: Path, out: Path) -> Path:
    """Copy a model folder to ``out`` (which must not exist or be empty) for exporting there."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MammoNodeError(f"--out {out} exists and is not an empty folder")
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(".*"), dirs_exist_ok=True)
    return out


def export_onnx(
    model_dir: Path | None = None, *, out: Path | None = None, opset: int = DEFAULT_OPSET
) -> ExportResult:
    """Export the model in ``model_dir`` (default: the bundled demo) to ``model.onnx`` beside its
    weights, or into a copy of the folder at ``out``; update the manifest with the graph's SHA-256.

    Raises :class:`ExportError` (nothing written) when the graph fails validation or parity.
    TensorRT engines listed in the manifest were built from the previous graph; if the graph's
    SHA-256 changes they are dropped from the manifest (build them again).
    """
    source = resolve_model_dir(model_dir)
    if out is None or out.resolve() == source.resolve():
        return _export_in(source, opset)
    target = _copy_model_dir(source, out)
    try:
        return _export_in(target, opset)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # no half-made copy left behind
        raise


def _export_in(target: Path, opset: int) -> ExportResult:
    from inference.model_io import load_model

    model, manifest = load_model(target, device="cpu")
    inputs = parity_inputs(manifest, count=max(PARITY_BATCH_SIZES))
    data = export_graph(model, inputs[:2], opset=opset)
    check_onnx(data, opset=opset)
    parity = check_parity(model, data, inputs)
    for size, report in parity.items():
        logger.info("parity at batch %d: %s", size, report.describe())
        if not report.ok:
            why = (
                "the CAM is ~0 (untrained model?), so parity proves nothing"
                if report.degenerate
                else report.describe()
            )
            raise ExportError(f"ONNX Runtime does not match torch at batch size {size}: {why}")

    if load_manifest(target).weights_sha256 != manifest.weights_sha256:
        raise ExportError(f"the weights in {target} changed during the export; run it again")
    path = target / ONNX_FILE
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise MammoNodeError(f"cannot write {path}: {exc}; export a copy with --out DIR") from exc
    sha = file_sha256(path)
    engines_dropped = bool(manifest.engines) and manifest.onnx_sha256 != sha
    if engines_dropped:
        logger.warning("the ONNX graph changed: dropping TensorRT engines built from the previous one")
    updated = dataclasses.replace(
        manifest, onnx_file=ONNX_FILE, onnx_sha256=sha, engines={} if engines_dropped else manifest.engines
    )
    save_manifest(updated, target)
    logger.info("exported %s %s to %s (sha256 %s)", manifest.name, manifest.version, path, sha[:12])
    return ExportResult(target, path, sha, parity, engines_dropped)
