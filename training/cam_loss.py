"""Optional lesion-mask guidance for the class-activation matrix (and distractor-mask suppression).

With global average pooling the image logit is ``mean(M) + b``, so a weakly supervised network
is rewarded for spreading activation over every cell whose receptive field sees the lesion: the
CAM of the first demo model covered each lesion but as a plateau of 4x5 cells, and its maximum
(what the pointing game and a radiologist look at) fell anywhere on it.

Where lesion masks exist (the synthetic phantoms; public sets with ROI annotations) this term
asks for the CAM's *maximum* to sit on the lesion, without touching its mean: a spatial softmax
over the cells of each malignant image, trained by cross-entropy towards the lesion's coverage
of the cells. It is invariant to adding a constant to ``M``, so it does not fight the
classification loss over the image logit, and the model keeps ``logit = mean(M) + b``.
"""

from __future__ import annotations

import torch
from torch.nn import functional


def lesion_coverage(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each feature cell covered by lesion: ``(B, H, W)`` masks -> ``(B, h, w)``."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, H, W), got {tuple(masks.shape)}")
    return functional.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid).squeeze(1)


def cam_peak_loss(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean spatial-softmax cross-entropy between the CAM and the lesion coverage.

    ``cams`` are ``(B, h, w)``; ``masks`` are ``(B, H, W)`` on the model grid. Images whose mask
    is empty (benign images, lesions outside the crop) do not count; with none left the loss is
    a zero that still belongs to the graph, so every rank of a distributed run backpropagates.
    """
    if cams.dim() != 3 or masks.dim() != 3 or cams.shape[0] != masks.shape[0]:
        shapes = f"{tuple(cams.shape)}, {tuple(masks.shape)}"
        raise ValueError(f"need cams (B, h, w) and masks (B, H, W) of one batch, got {shapes}")
    coverage = lesion_coverage(masks, (cams.shape[1], cams.shape[2])).flatten(1)
    total = coverage.sum(dim=1)
    keep = total > 0
    if not bool(keep.any()):
        return cams.sum() * 0.0
    target = coverage[keep] / total[keep, None]
    log_p = functional.log_softmax(cams[keep].float().flatten(1), dim=1)
    return -(target * log_p).sum(dim=1).mean()


def distractor_peak_loss(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean ``-log(1 - p_on)``: ``p_on`` is the spatial-softmax mass of the CAM on the cells that
    see a distractor (a skin marker, clip, calcified vessel, device... of the phantoms).

    The counterpart of :func:`cam_peak_loss` for what is *not* cancer: it asks the CAM's maximum to
    stay off those cells, in every image that has one (cancer-free or not), and like it is
    invariant to a constant added to the CAM, so the image logit is left to the image loss.
    Images without a distractor do not count (a zero in the graph when none is left).
    """
    if cams.dim() != 3 or masks.dim() != 3 or cams.shape[0] != masks.shape[0]:
        shapes = f"{tuple(cams.shape)}, {tuple(masks.shape)}"
        raise ValueError(f"need cams (B, h, w) and masks (B, H, W) of one batch, got {shapes}")
    on = (lesion_coverage(masks, (cams.shape[1], cams.shape[2])).flatten(1) > 0).float()
    keep = on.sum(dim=1) > 0
    if not bool(keep.any()):
        return cams.sum() * 0.0
    p = functional.softmax(cams[keep].float().flatten(1), dim=1)
    p_on = (p * on[keep]).sum(dim=1).clamp(max=1.0 - 1e-6)
    return -torch.log1p(-p_on).mean()
