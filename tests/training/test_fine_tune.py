"""Fine-tuning: a run can start from a model folder's weights, and says so in its manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inference.bundled import bundled_model_dir
from inference.manifest import load_manifest
from inference.model_io import load_model
from inference.types import InputError
from training.request import TrainRequest


def test_initial_model_starts_from_the_named_weights_and_records_them(tmp_path: Path) -> None:
    source_dir = bundled_model_dir()
    request = TrainRequest(dataset=tmp_path, out=tmp_path / "run", init_model=source_dir, cam_mask_weight=0.5)
    model = request.initial_model()
    source, manifest = load_model(source_dir)
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    fresh = TrainRequest(dataset=tmp_path, out=tmp_path / "run").initial_model()
    last = list(source.state_dict())[-2]  # the linear unit's weight
    assert not torch.equal(fresh.state_dict()[last], source.state_dict()[last])
    info = request.provenance()
    assert info == {
        "cam_mask_weight": 0.5,
        "cam_distractor_weight": 0.0,
        "initialised_from": {
            "name": manifest.name,
            "version": manifest.version,
            "weights_sha256": load_manifest(source_dir).weights_sha256,
        },
    }
    assert request.loop_config().cam_mask_weight == 0.5


def test_fine_tuning_requests_that_cannot_work_are_refused(tmp_path: Path) -> None:
    source_dir = bundled_model_dir()
    other = TrainRequest(
        dataset=tmp_path, out=tmp_path, architecture="efficientnet_b1", init_model=source_dir
    )
    with pytest.raises(InputError, match="efficientnet_b0 with 1 channel"):
        other.initial_model()
    with pytest.raises(InputError, match="channel"):
        TrainRequest(dataset=tmp_path, out=tmp_path, init_model=source_dir).initial_model(in_chans=3)
    with pytest.raises(InputError, match="rsna layout"):
        TrainRequest(dataset=tmp_path, out=tmp_path, layout="idc", cam_mask_weight=1.0)
    with pytest.raises(InputError, match=">= 0"):
        TrainRequest(dataset=tmp_path, out=tmp_path, cam_mask_weight=-0.1)
