"""Augmentation keeps image and mask aligned, is reproducible and can be switched off."""

from __future__ import annotations

import math

import pytest
import torch

from training.transforms import NO_AUGMENTATION, AugmentConfig, augment, random_affine_theta


def _blob_batch(n: int, height: int = 48, width: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose channel 0 is the lesion mask (and channel 1 a gradient), plus the masks."""
    masks = torch.zeros(n, height, width, dtype=torch.bool)
    for i in range(n):
        y, x = 10 + 3 * i, 6 + i
        masks[i, y : y + 8, x : x + 6] = True
    gradient = torch.linspace(0, 1, height).view(height, 1).expand(height, width)
    images = torch.stack([torch.stack([m.float(), gradient]) for m in masks])
    return images, masks


def _centroid(m: torch.Tensor) -> torch.Tensor:
    idx = torch.nonzero(m > 0.5).float()
    return idx.mean(dim=0)


def test_mask_stays_aligned_with_image() -> None:
    images, masks = _blob_batch(6)
    gen = torch.Generator().manual_seed(7)
    out, out_masks = augment(images, masks, generator=gen)
    assert out_masks.dtype == torch.bool and out_masks.shape == masks.shape
    moved = 0
    for i in range(6):
        warped_lesion = out[i, 0] > 0.5
        assert out_masks[i].sum() > 0
        inter = (warped_lesion & out_masks[i]).sum().item()
        union = (warped_lesion | out_masks[i]).sum().item()
        assert inter / union > 0.7, f"sample {i}: IoU {inter / union:.2f}"
        assert torch.allclose(_centroid(out[i, 0]), _centroid(out_masks[i]), atol=1.0)
        moved += int(not torch.equal(out_masks[i], masks[i]))
    assert moved >= 5  # the transforms really did something


def test_single_image_with_2d_mask() -> None:
    images, masks = _blob_batch(1)
    out, out_mask = augment(images[0], masks[0], generator=torch.Generator().manual_seed(3))
    assert out.shape == images[0].shape and out_mask.shape == masks[0].shape
    assert _centroid(out[0]).sub(_centroid(out_mask)).abs().max() <= 1.0


def test_identity_when_probabilities_are_zero() -> None:
    images, masks = _blob_batch(3)
    out, out_masks = augment(images, masks, config=NO_AUGMENTATION, generator=torch.Generator())
    assert torch.equal(out, images) and torch.equal(out_masks, masks)
    # Affine ranges present but never applied, flips off: still exact.
    cfg = AugmentConfig(hflip_p=0.0, vflip_p=0.0, affine_p=0.0, max_rotation_deg=15)
    assert torch.equal(augment(images, config=cfg, generator=torch.Generator()), images)
    assert NO_AUGMENTATION.is_identity and not AugmentConfig().is_identity


def test_certain_flips_are_exact() -> None:
    images, masks = _blob_batch(2)
    cfg = AugmentConfig(hflip_p=1.0, vflip_p=1.0, affine_p=0.0)
    out, out_masks = augment(images, masks, config=cfg)
    assert torch.equal(out, images.flip(-1).flip(-2))
    assert torch.equal(out_masks, masks.flip(-1).flip(-2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_and_range_preserved(dtype: torch.dtype) -> None:
    images = torch.rand(4, 3, 32, 16, dtype=torch.float32).to(dtype)
    out = augment(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    single = augment(images[0], generator=torch.Generator().manual_seed(0))
    assert single.shape == images[0].shape and single.dtype == dtype


def test_deterministic_given_generator_seed() -> None:
    images, masks = _blob_batch(4)
    a = augment(images, masks, generator=torch.Generator().manual_seed(11))
    b = augment(images, masks, generator=torch.Generator().manual_seed(11))
    c = augment(images, masks, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_rotation_is_rigid_on_non_square_grid() -> None:
    """Built in pixel units, a rotation keeps distances on a 2:1 image (no anisotropic skew)."""
    height, width = 64, 32
    image = torch.zeros(1, 1, height, width)
    image[0, 0, 20:23, 10:13] = 1.0  # dot A, centre (21, 11)
    image[0, 0, 44:47, 18:21] = 1.0  # dot B, centre (45, 19)
    cfg = AugmentConfig(hflip_p=0, vflip_p=0, max_rotation_deg=15, max_translate=0, max_shear_deg=0)
    for seed in range(8):  # angles from about -11 to +13 degrees
        out = augment(image, config=cfg, generator=torch.Generator().manual_seed(seed))
        top, bottom = out[0, 0, :33], out[0, 0, 33:]
        dist = torch.dist(_centroid(top), _centroid(bottom) + torch.tensor([33.0, 0.0]))
        # A rotation in normalised coordinates would be off by 1-3 px here.
        assert dist.item() == pytest.approx(math.hypot(24, 8), abs=0.75), f"seed {seed}"


def test_translation_stays_within_range() -> None:
    cfg = AugmentConfig(hflip_p=0, vflip_p=0, max_rotation_deg=0, max_translate=0.1, max_shear_deg=0)
    theta = random_affine_theta(200, 64, 32, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(theta[:, :, :2], torch.eye(2, dtype=theta.dtype).expand(200, 2, 2))
    # Normalised offset of 0.2 = 10 % of the image (the normalised span is 2).
    assert theta[:, :, 2].abs().max() <= 0.2 + 1e-9
    assert theta[:, :, 2].abs().max() > 0.15


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="floating"):
        augment(torch.zeros(1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mask size"):
        augment(torch.zeros(1, 8, 8), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="batch size"):
        augment(torch.zeros(2, 1, 8, 8), torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="probability"):
        AugmentConfig(hflip_p=1.5)
