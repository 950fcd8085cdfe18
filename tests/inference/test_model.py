"""MammoNet: one forward pass gives logit and CAM with logit = mean(CAM) + b (design invariant 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from model_factory import calibrate_bn

from inference.manifest import ARCHITECTURES
from inference.model import MammoNet, build_model
from inference.types import InputError


@pytest.fixture(scope="module")
def effnet() -> MammoNet:
    torch.manual_seed(1)
    return calibrate_bn(build_model("efficientnet_b0"), (4, 1, 128, 64))


@pytest.fixture(scope="module")
def cancernet() -> MammoNet:
    torch.manual_seed(2)
    return calibrate_bn(build_model("cancernet", in_chans=3), (4, 3, 48, 48))


def _check_invariant(model: MammoNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logit, cam = model(x)
    assert logit.shape == (x.shape[0],)
    assert cam.shape[0] == x.shape[0] and cam.ndim == 3
    assert logit.abs().max() > 1e-3, "outputs are degenerate; the comparison would prove nothing"
    expected = cam.mean(dim=(1, 2)) + model.fc.bias[0]
    torch.testing.assert_close(logit, expected, atol=1e-5, rtol=1e-5)
    return logit, cam


def test_effnet_logit_is_mean_cam_plus_bias(effnet: MammoNet) -> None:
    torch.manual_seed(3)
    _, cam = _check_invariant(effnet, torch.rand(3, 1, 128, 64))
    assert cam.shape == (3, 128 // 32, 64 // 32)
    assert cam.std() > 0  # a CAM that actually varies over the image


def test_cancernet_logit_is_mean_cam_plus_bias(cancernet: MammoNet) -> None:
    torch.manual_seed(4)
    _, cam = _check_invariant(cancernet, torch.rand(2, 3, 48, 48))
    assert cam.shape == (2, 48 // 8, 48 // 8)


def test_cam_is_the_linear_weight_applied_to_the_feature_maps(effnet: MammoNet) -> None:
    x = torch.rand(2, 1, 128, 64)
    with torch.no_grad():
        _, cam = effnet(x)
        f = effnet.features(x)
    manual = (f * effnet.fc.weight[0].view(1, -1, 1, 1)).sum(1)
    torch.testing.assert_close(cam, manual, atol=1e-5, rtol=1e-5)


def test_batch_independence(effnet: MammoNet) -> None:
    """Eval mode: an image scores the same alone or next to others (no batch statistics leak)."""
    torch.manual_seed(5)
    x = torch.rand(4, 1, 128, 64)
    with torch.no_grad():
        logits, cams = effnet(x)
        single_logit, single_cam = effnet(x[2:3])
    torch.testing.assert_close(logits[2:3], single_logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cams[2:3], single_cam, atol=1e-5, rtol=1e-5)


def test_normalisation_is_inside_the_model(effnet: MammoNet) -> None:
    """Callers feed [0, 1]: a uniform mid-grey and a black image must give different features."""
    with torch.no_grad():
        a, _ = effnet(torch.full((1, 1, 128, 64), 0.5))
        b, _ = effnet(torch.zeros(1, 1, 128, 64))
    assert not torch.allclose(a, b)


def test_dropout_after_gap_not_on_the_cam() -> None:
    """In train mode dropout perturbs the logit, but the CAM is the undropped map."""
    torch.manual_seed(6)
    model = build_model("cancernet", in_chans=1, drop_rate=0.5)
    model.backbone.eval()  # isolate the head's dropout from CancerNet's own
    model.dropout.train()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        logits = {tuple(model(x)[0].tolist()) for _ in range(5)}
        cams = [model(x)[1] for _ in range(2)]
    assert len(logits) > 1
    torch.testing.assert_close(cams[0], cams[1])


def test_unknown_architecture_and_bad_args() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vit_base_patch16_224")
    with pytest.raises(ValueError, match="drop_rate"):
        build_model("cancernet", drop_rate=1.0)


def test_pretrained_backbone_from_a_local_file_only(tmp_path: Path) -> None:
    """A user-named RGB ImageNet-style checkpoint is adapted to 1 channel; nothing is downloaded."""
    import timm

    torch.manual_seed(7)
    rgb: Any = timm.create_model("efficientnet_b0", pretrained=False)
    ckpt = tmp_path / "b0.pth"
    torch.save(rgb.state_dict(), ckpt)
    backbone: Any = build_model("efficientnet_b0", pretrained_file=ckpt).backbone
    torch.testing.assert_close(backbone.conv_stem.weight, rgb.conv_stem.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(backbone.conv_head.weight, rgb.conv_head.weight)
    with pytest.raises(InputError, match="not found"):
        build_model("efficientnet_b0", pretrained_file=tmp_path / "missing.pth")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a not in ("efficientnet_b0", "cancernet")])
def test_every_architecture_builds_and_keeps_the_invariant(arch: str) -> None:
    torch.manual_seed(9)
    model = calibrate_bn(build_model(arch), (2, 1, 64, 64), steps=1)
    _, cam = _check_invariant(model, torch.rand(2, 1, 64, 64))
    assert cam.shape == (2, 2, 2)
