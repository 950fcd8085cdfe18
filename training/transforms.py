"""Random geometric augmentation of image tensors, with an optional mask moved identically.

Seed 003 augments training images with random horizontal/vertical flips, rotations, translations
and shears. They are applied here to whole batches on the training device (one ``grid_sample``
call) with parameters drawn from an explicit :class:`torch.Generator`, so a run is reproducible
from its seed and DataLoader workers need no augmentation RNG of their own.

The affine matrix is built in pixel units about the image centre, so a rotation stays a rotation
on the 2:1 mammography grid instead of becoming a skew as it would in normalised coordinates.
Masks are resampled with nearest-neighbour interpolation so they stay binary; pixels that come
from outside the image are 0 (background after min-max normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the random transforms (defaults: seed 003's recipe)."""

    hflip_p: float = 0.5
    vflip_p: float = 0.5
    affine_p: float = 1.0
    """Probability that a sample gets a random rotation + translation + shear."""
    max_rotation_deg: float = 15.0
    max_translate: float = 0.1
    """Fraction of width (x) and height (y)."""
    max_shear_deg: float = 10.0

    def __post_init__(self) -> None:
        for name in ("hflip_p", "vflip_p", "affine_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if not 0.0 <= self.max_rotation_deg <= 180.0:
            raise ValueError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}")
        if not 0.0 <= self.max_translate < 1.0:
            raise ValueError(f"max_translate must be in [0, 1), got {self.max_translate}")
        if not 0.0 <= self.max_shear_deg < 90.0:
            raise ValueError(f"max_shear_deg must be in [0, 90), got {self.max_shear_deg}")

    @property
    def is_identity(self) -> bool:
        no_affine = self.affine_p == 0 or (
            self.max_rotation_deg == 0 and self.max_translate == 0 and self.max_shear_deg == 0
        )
        return self.hflip_p == 0 and self.vflip_p == 0 and no_affine


NO_AUGMENTATION = AugmentConfig(hflip_p=0.0, vflip_p=0.0, affine_p=0.0)


def _uniform(n: int, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _bernoulli(n: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64) < p


def random_affine_theta(
    n: int, height: int, width: int, config: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``(n, 2, 3)`` float64 matrices for :func:`torch.nn.functional.affine_grid`.

    Each maps output to input coordinates (normalised, ``align_corners=False``). Samples that
    skip the affine (probability ``1 - affine_p``) get the exact identity. Parameters are always
    drawn, whatever the probabilities, so the generator advances the same way for any config.
    """
    angle = torch.deg2rad(_uniform(n, config.max_rotation_deg, generator))
    shear = torch.deg2rad(_uniform(n, config.max_shear_deg, generator))
    tx = _uniform(n, config.max_translate, generator) * width
    ty = _uniform(n, config.max_translate, generator) * height
    apply = _bernoulli(n, config.affine_p, generator)

    cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
    # Forward map in centred pixel units: rotation @ horizontal shear, then translation.
    fwd = torch.zeros(n, 2, 2, dtype=torch.float64)
    fwd[:, 0, 0] = cos
    fwd[:, 0, 1] = cos * tan - sin
    fwd[:, 1, 0] = sin
    fwd[:, 1, 1] = sin * tan + cos
    inv = torch.linalg.inv(fwd)
    shift = torch.stack([tx, ty], dim=1).unsqueeze(-1)  # (n, 2, 1)
    # Normalised coordinate = centred pixel coordinate / (size / 2).
    scale = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64)
    lin = inv * scale.view(1, 1, 2) / scale.view(1, 2, 1)  # S^-1 A^-1 S
    off = -(inv @ shift).squeeze(-1) / scale  # -S^-1 A^-1 t
    theta = torch.cat([lin, off.unsqueeze(-1)], dim=2)
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return torch.where(apply.view(n, 1, 1), theta, identity.expand(n, 2, 3))


def _as_batch(t: torch.Tensor, name: str, dims: tuple[int, ...]) -> torch.Tensor:
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got {tuple(t.shape)}")
    return t


def _flip(t: torch.Tensor, which: torch.Tensor, dim: int) -> torch.Tensor:
    if not bool(which.any()):
        return t
    flipped = t.flip(dim)
    return torch.where(which.view(-1, *([1] * (t.dim() - 1))).to(t.device), flipped, t)


@overload
def augment(
    image: torch.Tensor,
    mask: None = None,
    *,
    config: AugmentConfig = ...,
    generator: torch.Generator | None = ...,
) -> torch.Tensor: ...


@overload
def augment(
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    config: AugmentConfig = ...,
    generator: torch.Generator | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


def augment(
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    config: AugmentConfig = AugmentConfig(),  # frozen, so sharing the default is safe
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, rotate, translate and shear ``image`` (and ``mask`` the same way).

    ``image`` is ``(C, H, W)`` or ``(B, C, H, W)`` floating point; every sample of a batch gets its
    own parameters. ``mask`` is ``(H, W)``, ``(K, H, W)`` for a single image or ``(B, H, W)``,
    ``(B, K, H, W)`` for a batch, any dtype. Shapes, dtypes and devices are preserved. The
    generator must be a CPU generator (parameters are drawn on the CPU).
    """
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor in [0, 1], got {image.dtype}")
    single = _as_batch(image, "image", (3, 4)).dim() == 3
    img = image.unsqueeze(0) if single else image
    n, _, height, width = img.shape

    msk: torch.Tensor | None = None
    if mask is not None:
        if mask.shape[-2:] != (height, width):
            raise ValueError(f"mask size {tuple(mask.shape[-2:])} != image size {(height, width)}")
        if single:
            m = _as_batch(mask, "mask of a single image", (2, 3))
            msk = m.view(1, 1, height, width) if m.dim() == 2 else m.unsqueeze(0)
        else:
            m = _as_batch(mask, "mask of a batch", (3, 4))
            msk = m.unsqueeze(1) if m.dim() == 3 else m
        if msk.shape[0] != n:
            raise ValueError(f"mask batch size {msk.shape[0]} != image batch size {n}")

    if not config.is_identity:
        hflip = _bernoulli(n, config.hflip_p, generator)
        vflip = _bernoulli(n, config.vflip_p, generator)
        theta = random_affine_theta(n, height, width, config, generator)
        img = _flip(_flip(img, hflip, 3), vflip, 2)
        if msk is not None:
            msk = _flip(_flip(msk, hflip, 3), vflip, 2)
        if config.affine_p > 0:
            img, msk = _warp(img, msk, theta)

    out_image = img.squeeze(0) if single else img
    if mask is None:
        return out_image
    assert msk is not None
    return out_image, msk.reshape(mask.shape)


def _warp(
    img: torch.Tensor, msk: torch.Tensor | None, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample image (bilinear) and mask (nearest) with the same per-sample matrices."""
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype)
    moved = ~torch.isclose(theta, identity).flatten(1).all(dim=1)
    if not bool(moved.any()):
        return img, msk
    # Sample in float32 at least: grid_sample lacks some reduced-precision CPU kernels.
    work = torch.promote_types(img.dtype, torch.float32)
    grid = F.affine_grid(theta.to(device=img.device, dtype=work), list(img.shape), align_corners=False)
    warped = F.grid_sample(img.to(work), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    keep = moved.view(-1, 1, 1, 1).to(img.device)
    out_img = torch.where(keep, warped.to(img.dtype), img)
    out_msk = msk
    if msk is not None:
        # The grid depends on (N, H, W) only, so the mask follows the image exactly.
        wm = F.grid_sample(msk.to(work), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        out_msk = torch.where(keep, wm.to(msk.dtype), msk)
    return out_img, out_msk
