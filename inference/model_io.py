"""Saving and loading a MammoNet model directory (``model.safetensors`` + ``model.json``).

safetensors rather than pickle: loading a model must never execute code from the file. The
weights' SHA-256 goes into the manifest on save and is checked on load, on the very bytes that
are then deserialised (no window between check and use).

Imports torch; only imported where torch is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from inference.manifest import ModelManifest, atomic_write_bytes, file_sha256, load_manifest, save_manifest
from inference.model import MammoNet, build_model
from inference.types import InputError

logger = logging.getLogger(__name__)


def save_model(model: MammoNet, manifest: ModelManifest, model_dir: Path) -> ModelManifest:
    """Write the weights and the manifest (with the weights' SHA-256); returns that manifest.

    The manifest must describe this model (architecture, in_chans). If the weights changed, any
    ONNX file or engines the old manifest listed no longer match them and are dropped from it
    (export them again) rather than left to vouch for weights they were not built from.
    """
    if manifest.architecture != model.architecture or manifest.in_chans != model.in_chans:
        raise ValueError(
            f"manifest says {manifest.architecture}/{manifest.in_chans} channels, "
            f"model is {model.architecture}/{model.in_chans}"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # One metadata key holding sorted JSON: safetensors writes a multi-key metadata map in hash
    # order, which would give the same weights a different SHA-256 on every save.
    info = {"name": manifest.name, "version": manifest.version, "architecture": model.architecture}
    data = save_safetensors(state, metadata={"mammonode": json.dumps(info, sort_keys=True)})
    path = model_dir / manifest.weights_file
    atomic_write_bytes(path, data)
    sha = file_sha256(path)
    saved = dataclasses.replace(manifest, weights_sha256=sha)
    if manifest.weights_sha256 and manifest.weights_sha256 != sha:
        if manifest.onnx_file is not None or manifest.engines:
            logger.warning("weights changed: dropping ONNX/engine entries built from the old weights")
        saved = dataclasses.replace(saved, onnx_file=None, onnx_sha256=None, engines={})
    save_manifest(saved, model_dir)
    logger.info("saved %s %s (%s) to %s", saved.name, saved.version, sha[:12], model_dir)
    return saved


def load_model(model_dir: Path, *, device: str = "cpu") -> tuple[MammoNet, ModelManifest]:
    """Load a model directory in eval mode after checking the weights' SHA-256.

    Raises :class:`InputError` for a missing directory/manifest/weights, a hash mismatch, or
    weights that do not fit the architecture (strict load).
    """
    if not model_dir.is_dir():
        raise InputError(f"model directory not found: {model_dir}")
    manifest = load_manifest(model_dir)
    if not manifest.weights_sha256:
        raise InputError(f"manifest in {model_dir} has no weights_sha256")
    path = model_dir / manifest.weights_file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read weights {path}: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.weights_sha256:
        raise InputError(f"weights {path} have SHA-256 {actual}, manifest says {manifest.weights_sha256}")
    try:
        state = load_safetensors(data)
    except SafetensorError as exc:
        raise InputError(f"weights {path} are not a valid safetensors file: {exc}") from exc
    model = build_model(manifest.architecture, in_chans=manifest.in_chans)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"weights {path} do not fit {manifest.architecture}: {exc}") from exc
    model.to(torch.device(device))
    model.eval()
    logger.info("loaded %s %s (%s) on %s", manifest.name, manifest.version, actual[:12], device)
    return model, manifest
