"""Lesion-mask guidance of the CAM peak and distractor-mask suppression: the losses, and how the
loop feeds them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loop_toys import MaskedToyBreasts, TinyCamNet, ToyBreasts

from training import epoch as epoch_module
from training.cam_loss import cam_peak_loss, distractor_peak_loss, lesion_coverage
from training.loop import train
from training.loop_types import TrainConfig


def _mask(h: int, w: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    m = torch.zeros(1, h, w, dtype=torch.bool)
    m[0, box[0] : box[1], box[2] : box[3]] = True
    return m


def test_coverage_is_the_lesion_fraction_of_each_cell() -> None:
    mask = _mask(8, 8, (0, 2, 0, 4))  # top-left cell of a 2x2 grid, half covered
    cover = lesion_coverage(mask, (2, 2))
    assert torch.allclose(cover, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))


def test_loss_is_lower_when_the_peak_is_on_the_lesion() -> None:
    mask = _mask(16, 8, (4, 8, 0, 4))  # cell (1, 0) of a 4x2 grid
    on = torch.zeros(1, 4, 2)
    on[0, 1, 0] = 5.0
    off = torch.zeros(1, 4, 2)
    off[0, 3, 1] = 5.0
    assert cam_peak_loss(on, mask) < cam_peak_loss(off, mask) - 4.0


def test_loss_ignores_the_cam_mean_so_it_does_not_fight_the_image_logit() -> None:
    cams = torch.randn(2, 4, 2)
    masks = torch.cat([_mask(16, 8, (0, 4, 0, 4)), _mask(16, 8, (12, 16, 4, 8))])
    assert torch.allclose(cam_peak_loss(cams, masks), cam_peak_loss(cams + 7.0, masks))


def test_images_without_a_lesion_do_not_count_and_all_empty_still_backpropagates() -> None:
    cams = torch.randn(2, 4, 2, requires_grad=True)
    lesion = _mask(16, 8, (0, 4, 0, 4))
    empty = torch.zeros(1, 16, 8, dtype=torch.bool)
    both = cam_peak_loss(cams, torch.cat([lesion, empty]))
    alone = cam_peak_loss(cams[:1], lesion)
    assert torch.allclose(both, alone)
    zero = cam_peak_loss(cams, torch.cat([empty, empty]))
    zero.backward()
    assert zero.item() == 0.0 and cams.grad is not None


def test_gradient_descent_moves_the_cam_maximum_onto_the_lesion() -> None:
    torch.manual_seed(0)
    cams = torch.randn(1, 8, 4, requires_grad=True)
    mask = _mask(32, 16, (20, 24, 8, 12))  # cell (5, 2)
    opt = torch.optim.SGD([cams], lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        cam_peak_loss(cams, mask).backward()
        opt.step()
    assert divmod(int(cams.detach().flatten().argmax()), 4) == (5, 2)


def test_shape_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="cams"):
        cam_peak_loss(torch.zeros(2, 4), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="cams"):
        cam_peak_loss(torch.zeros(2, 4, 4), torch.zeros(3, 8, 8))


def _config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "architecture": "tiny",
        "out_dir": tmp_path / "run",
        "epochs": 1,
        "batch_ids": 4,
        "batches_per_epoch": 3,
        "lr": 1e-2,
        "progress": False,
    }
    return TrainConfig(**{**base, **overrides})


def test_the_loop_augments_masks_with_their_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What reaches the CAM loss is the lesion where the augmented image shows it."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recorder(TinyCamNet):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append((x.detach().clone(), torch.zeros(0)))
            return super().forward(x)

    def spy(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        images = seen[-1][0]
        seen[-1] = (images, masks.detach().clone())
        return cam_peak_loss(cams, masks)

    monkeypatch.setattr(epoch_module, "cam_peak_loss", spy)
    train_set, val_set = MaskedToyBreasts(16, positive_every=2, seed=0), MaskedToyBreasts(8, seed=1)
    train(_config(tmp_path, cam_mask_weight=1.0), train_set, val_set, Recorder)
    batches = [(x, m) for x, m in seen if m.numel()]
    assert len(batches) == 3
    lesion_px, other_px = [], []
    for images, masks in batches:
        for image, mask in zip(images[:, 0], masks, strict=True):
            if mask.sum() >= 4:  # lesions that stayed in view after the affine transform
                lesion_px.append(image[mask].mean())
                other_px.append(image[~mask].mean())
    assert lesion_px, "no malignant image reached the loss"
    assert min(lesion_px) > 0.7 > 0.3 > max(other_px)


def test_cam_mask_weight_needs_a_dataset_with_masks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lesion masks"):
        train(_config(tmp_path, cam_mask_weight=0.5), ToyBreasts(8), ToyBreasts(4, seed=1), TinyCamNet)
    with pytest.raises(ValueError, match="cam_mask_weight"):
        _config(tmp_path, cam_mask_weight=-1.0)


def test_distractor_loss_is_lower_when_the_peak_is_off_the_distractor_and_ignores_the_mean() -> None:
    marker = _mask(16, 8, (4, 8, 0, 4))  # cell (1, 0) of a 4x2 grid
    on = torch.zeros(1, 4, 2)
    on[0, 1, 0] = 5.0
    off = torch.zeros(1, 4, 2)
    off[0, 3, 1] = 5.0
    assert distractor_peak_loss(off, marker) < distractor_peak_loss(on, marker) - 3.0
    assert torch.allclose(distractor_peak_loss(on, marker), distractor_peak_loss(on + 7.0, marker))


def test_a_wire_thinner_than_a_cell_still_counts_and_images_without_one_do_not() -> None:
    cams = torch.randn(2, 4, 2, requires_grad=True)
    wire = _mask(16, 8, (0, 16, 3, 4))  # one pixel wide, the whole height
    empty = torch.zeros(1, 16, 8, dtype=torch.bool)
    assert torch.allclose(
        distractor_peak_loss(cams, torch.cat([wire, empty])), distractor_peak_loss(cams[:1], wire)
    )
    zero = distractor_peak_loss(cams, torch.cat([empty, empty]))
    zero.backward()
    assert zero.item() == 0.0 and cams.grad is not None


def test_gradient_descent_moves_the_cam_maximum_off_the_distractor() -> None:
    cams = torch.zeros(1, 8, 4)
    cams[0, 5, 2] = 3.0  # the peak sits on the marker
    cams.requires_grad_(True)
    marker = _mask(32, 16, (20, 24, 8, 12))  # cell (5, 2)
    opt = torch.optim.SGD([cams], lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        distractor_peak_loss(cams, marker).backward()
        opt.step()
    assert divmod(int(cams.detach().flatten().argmax()), 4) != (5, 2)


class DistractedToyBreasts(MaskedToyBreasts):
    """Benign images also show a mid-grey 3x3 'marker', handed over as a distractor mask."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        gen = torch.Generator().manual_seed(99)
        self.markers = torch.zeros_like(self.masks)
        for k, label in enumerate(self.labels):
            if not label:
                y, x = (int(v) for v in torch.randint(0, 13, (2,), generator=gen))
                self.images[k, :, y : y + 3, x : x + 3] = 0.6
                self.markers[k, y : y + 3, x : x + 3] = True

    def distractor_masks(self, indices: list[int]) -> torch.Tensor:
        return self.markers[torch.as_tensor(indices, dtype=torch.long)]


def test_the_loop_augments_distractor_masks_with_their_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both masks follow their image through the same flips and affine transform."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = epoch_module.distractor_peak_loss

    class Recorder(TinyCamNet):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            seen.append((x.detach().clone(), torch.zeros(0)))
            return super().forward(x)

    def spy(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        seen[-1] = (seen[-1][0], masks.detach().clone())
        return real(cams, masks)

    monkeypatch.setattr(epoch_module, "distractor_peak_loss", spy)
    train_set = DistractedToyBreasts(16, positive_every=2, seed=0)
    config = _config(tmp_path, cam_mask_weight=1.0, cam_distractor_weight=1.0)
    train(config, train_set, DistractedToyBreasts(8, seed=1), Recorder)
    marker_px = [
        image[mask].mean()
        for images, masks in seen
        if masks.numel()
        for image, mask in zip(images[:, 0], masks, strict=True)
        if mask.sum() >= 4
    ]
    assert marker_px, "no distractor reached the loss"
    assert all(0.45 < float(v) < 0.75 for v in marker_px)


def test_cam_distractor_weight_needs_a_dataset_with_distractor_masks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distractor masks"):
        train(_config(tmp_path, cam_distractor_weight=0.5), ToyBreasts(8), ToyBreasts(4, seed=1), TinyCamNet)
    with pytest.raises(ValueError, match="cam_distractor_weight"):
        _config(tmp_path, cam_distractor_weight=-1.0)
