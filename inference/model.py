"""The CAM classifier: a convolutional backbone, global average pooling and one linear unit.

Design invariant 3 (seed 003): because the head is only GAP followed by a single linear unit, the
class-activation matrix ``M(x, y) = sum_k w_k f_k(x, y)`` and the logit come out of the same
forward pass and ``logit = mean(M) + b`` exactly (in eval mode). Serving therefore needs no second
pass and no gradients, and the exported graphs (ONNX, TensorRT) simply have two outputs.

This module imports torch and timm at the top; it is only imported where torch is needed
(training, the torch backend, model I/O).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import timm
import torch
from torch import Tensor, nn

from inference.manifest import ARCHITECTURES
from inference.types import InputError

logger = logging.getLogger(__name__)

INPUT_MEAN = 0.5
INPUT_STD = 0.25
"""Callers feed [0, 1]; the model maps it to roughly zero mean, unit variance itself, so no caller
(preprocessing, ONNX/TensorRT backends, training) can forget or duplicate the step."""


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D(k, 3x3, padding="same")``: depthwise 3x3, then pointwise 1x1."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_chans, in_chans, 3, padding=1, groups=in_chans, bias=False)
        self.pointwise = nn.Conv2d(in_chans, out_chans, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class CancerNetBackbone(nn.Module):
    """The convolutional part of CancerNet (seed 002), without its FC/softmax head.

    Three stages of ``(SEPCONV => RELU => BN) * n => MAXPOOL => DROPOUT(0.25)`` with n = 1, 2, 3
    and 32, 64, 128 filters, in the seed's order (ReLU before BN). The FC-256 head of the seed is
    replaced by MammoNet's GAP + single linear unit so that CancerNet also yields a CAM; the
    feature stride is 8 (a 50x50 histology patch gives a 6x6 matrix).
    """

    STAGES: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (128, 3))

    def __init__(self, in_chans: int = 3, drop_rate: float = 0.25) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = in_chans
        for width, repeats in self.STAGES:
            for _ in range(repeats):
                layers += [SeparableConv2d(chans, width), nn.ReLU(inplace=True), nn.BatchNorm2d(width)]
                chans = width
            layers += [nn.MaxPool2d(2), nn.Dropout(drop_rate)]
        self.features = nn.Sequential(*layers)
        self.num_features = chans

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)


class MammoNet(nn.Module):
    """Backbone -> feature maps f_k -> GAP -> dropout -> linear(K -> 1), plus the CAM.

    ``forward`` returns ``(logit (B,), cam (B, h, w))``. The logit is computed the usual way
    (GAP, dropout, linear) and the CAM with an einsum over the same linear weight; the two paths
    agree to float rounding in eval mode, which the tests pin rather than assume.
    """

    def __init__(
        self, backbone: nn.Module, num_features: int, *, architecture: str, in_chans: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.architecture = architecture
        self.in_chans = in_chans
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(num_features, 1)

    def features(self, x: Tensor) -> Tensor:
        """Last feature maps f_k (B, K, h, w) for an input in [0, 1]."""
        x = (x - INPUT_MEAN) / INPUT_STD
        forward_features = cast(Callable[[Tensor], Tensor], self.backbone.forward_features)
        return forward_features(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        pooled = f.mean(dim=(2, 3))
        logit = self.fc(self.dropout(pooled)).squeeze(1)
        cam = torch.einsum("bkhw,k->bhw", f, self.fc.weight[0])
        return logit, cam


def build_model(
    architecture: str = "efficientnet_b0",
    *,
    drop_rate: float = 0.2,
    in_chans: int = 1,
    pretrained_file: Path | None = None,
) -> MammoNet:
    """Build an untrained MammoNet (or one whose backbone starts from a local weights file).

    ``pretrained_file`` is a timm/torchvision-format state dict (``.pth``/``.safetensors``) the
    user names explicitly (design invariant 7: nothing is downloaded); timm adapts the first
    convolution to ``in_chans`` and drops the ImageNet classifier.

    The backbone is created with timm's own ``drop_rate=0``: with ``global_pool=""`` timm would
    apply that dropout to the unpooled feature maps, i.e. to the CAM; our dropout sits after GAP.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {', '.join(ARCHITECTURES)}")
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    backbone: nn.Module
    if architecture == "cancernet":
        if pretrained_file is not None:
            raise ValueError("cancernet has no pretrained backbone weights; train it from scratch")
        backbone = CancerNetBackbone(in_chans=in_chans)
        num_features = backbone.num_features
    else:
        overlay: dict[str, str] | None = None
        if pretrained_file is not None:
            if not pretrained_file.is_file():
                raise InputError(f"pretrained weights file not found: {pretrained_file}")
            logger.info("initialising %s backbone from %s", architecture, pretrained_file)
            overlay = {"file": str(pretrained_file)}  # a local file only, never the hub
        backbone = timm.create_model(
            architecture,
            pretrained=overlay is not None,
            pretrained_cfg_overlay=overlay,
            num_classes=0,
            global_pool="",
            in_chans=in_chans,
            drop_rate=0.0,
        )
        num_features = int(cast(int, backbone.num_features))
    return MammoNet(backbone, num_features, architecture=architecture, in_chans=in_chans, drop_rate=drop_rate)
