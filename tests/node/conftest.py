"""Shared fixtures of the node tests: small real models and a small synthetic screening dataset.

The bundled demo model does not ship yet, and a test must not depend on it anyway: the scores it
checks are made by models built here, saved through the product's own model I/O and loaded back
from disk by the CLI. Everything is tiny (384x288 images, a 128x64 model grid) because the whole
node suite shares two CPU cores.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.manifest import ModelManifest, load_manifest, save_manifest

MODEL_NAME = "mammonode-test"
MODEL_VERSION = "0.0.1"
IMAGE_SIZE = (384, 288)
MODEL_GRID = (128, 64)
SYNTH_SEED = 4242


@pytest.fixture(scope="package", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread while the node tests run, then restore the setting.

    The tests share two CPU cores with other jobs; measured there, torch's two spinning OpenMP
    threads make a 12-image scoring run 5-7x slower (about 6 s instead of under 1 s) than one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_model(model_dir: Path, seed: int) -> Path:
    """An efficientnet_b0 with real BatchNorm statistics, saved as a model folder.

    A freshly built network's BatchNorm layers have unit running statistics and it outputs
    about 1e-20; a few forward passes in train mode on random data give them real ones, so the
    scores, CAMs and weights hash are those of an ordinary model. ``seed`` changes the weights.
    """
    import torch

    from inference.model import build_model
    from inference.model_io import save_model
    from inference.types import PreprocessConfig

    torch.manual_seed(seed)
    model = build_model("efficientnet_b0")
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, *MODEL_GRID, generator=generator))
    model.eval()
    manifest = ModelManifest(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        architecture="efficientnet_b0",
        preprocess=PreprocessConfig(*MODEL_GRID),
        synthetic_training_data=True,
    )
    save_model(model, manifest, model_dir)
    return model_dir


@pytest.fixture(scope="session")
def test_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main test model: trained (as far as the manifest says) on synthetic data."""
    return _make_model(tmp_path_factory.mktemp("model-a"), seed=0)


@pytest.fixture(scope="session")
def other_weights_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same name, version and manifest as ``test_model``; only the weights differ."""
    return _make_model(tmp_path_factory.mktemp("model-b"), seed=1)


@pytest.fixture(scope="session")
def no_notice_model(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``test_model``'s very weights, but a manifest that does not declare synthetic training data,
    so the outputs carry no research notice: the control for the burned-in banner."""
    model_dir = tmp_path_factory.mktemp("model-no-notice")
    manifest = load_manifest(test_model)
    shutil.copy2(test_model / manifest.weights_file, model_dir / manifest.weights_file)
    save_manifest(dataclasses.replace(manifest, synthetic_training_data=False), model_dir)
    return model_dir


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic 4-view(ish) screening exams in the RSNA layout, every transfer syntax the
    generator offers mixed across the images (``train.csv`` + ``train_images/<patient>/*.dcm``)."""
    from training.synth import MIXED, generate_dataset

    root = tmp_path_factory.mktemp("synth") / "rsna"
    generate_dataset(
        root, patients=3, seed=SYNTH_SEED, cancer_rate=0.34, size=IMAGE_SIZE, transfer_syntax=MIXED
    )
    return root
