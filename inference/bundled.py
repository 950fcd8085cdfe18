"""Where the bundled demo model lives inside the installed package."""

from __future__ import annotations

from pathlib import Path

from inference.types import InputError

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "demo"


def bundled_model_dir() -> Path:
    """The demo model folder (model.json, weights, ONNX, MODEL_CARD.md) shipped with the package."""
    if not (BUNDLED_MODEL_DIR / "model.json").is_file():
        raise InputError(f"the bundled demo model is missing from {BUNDLED_MODEL_DIR}; pass --model DIR")
    return BUNDLED_MODEL_DIR


def resolve_model_dir(model_dir: Path | None) -> Path:
    """The folder the user named, or the bundled demo model when none was named."""
    if model_dir is None:
        return bundled_model_dir()
    if not (model_dir / "model.json").is_file():
        raise InputError(f"{model_dir} is not a model folder (no model.json)")
    return model_dir
