"""Small models with real BatchNorm statistics, for tests that compare backends or exports.

A freshly initialised EfficientNet outputs ~1e-20 everywhere, so two backends "agree" whatever
they compute (design notes). Running a few training-mode batches through the model gives BatchNorm
running statistics that make logits and CAMs vary with the input; every parity test starts here.
Importable from any test folder (pytest puts ``tests/`` on the path for its conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from inference.model import MammoNet

PARITY_ARCH = "efficientnet_b0"
PARITY_GRID = (128, 64)
"""The serving architecture on a small grid: the ops that fuse differently per backend (depthwise
conv, SiLU, squeeze-excitation, BatchNorm) are all there, and a forward pass takes milliseconds."""


def calibrate_bn(
    model: MammoNet,
    shape: tuple[int, ...],
    steps: int = 3,
    seed: int = 0,
    images: np.ndarray | None = None,
    exact: bool = False,
) -> MammoNet:
    """Give BatchNorm running statistics from ``steps`` batches; returns the model in eval mode.

    Batches are uniform noise of ``shape``, with their first half replaced by ``images`` (N, C, H, W)
    when given, so that mammogram-like inputs stay within the statistics: far outside them the
    activations grow into the hundreds and float32 rounding, not the backend, dominates parity.

    ``exact`` resets the statistics and averages the batches cumulatively (``momentum=None``).
    With the default momentum of 0.1, three batches leave them 73% at their initial (0, 1): the
    features stay tiny and the logit hardly depends on the input, a weak parity test. Exact
    statistics need enough calibration data, though (several batches of several images): from a
    couple of images the deep 2x2 maps give near-zero variances and huge activations elsewhere.
    """
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    if exact:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for step in range(steps):
            batch = torch.rand(*shape)
            if images is not None:
                half = shape[0] // 2
                picks = [(step * half + i) % len(images) for i in range(half)]
                batch[:half] = torch.from_numpy(images[picks])
            model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return model.eval()


def save_calibrated_model(
    model_dir: Path,
    *,
    architecture: str = PARITY_ARCH,
    grid: tuple[int, int] = PARITY_GRID,
    seed: int = 1,
    name: str = "parity",
) -> Path:
    """Write a calibrated model folder (weights + manifest, no ONNX yet) for ``grid`` (H, W).

    BatchNorm sees uniform noise and synthetic mammograms through the shared preprocessing (the
    exporter's own parity inputs), the two kinds of input the parity tests feed it.
    """
    import torch

    from inference.manifest import ModelManifest
    from inference.model import build_model
    from inference.model_io import save_model
    from inference.types import PreprocessConfig
    from training.onnx_export import parity_inputs

    manifest = ModelManifest(
        name=name,
        version="1",
        architecture=architecture,
        preprocess=PreprocessConfig(input_height=grid[0], input_width=grid[1]),
    )
    torch.manual_seed(seed)
    phantoms = parity_inputs(manifest, count=6, seed=seed)
    model = calibrate_bn(
        build_model(architecture, in_chans=1), (8, 1, *grid), seed=seed, images=phantoms, exact=True
    )
    save_model(model, manifest, model_dir)
    return model_dir
