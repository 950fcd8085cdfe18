"""DistributedDataParallel on CPU: two torchrun processes with gloo train one model together."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REPO = HERE.parent.parent

WORKER = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, {helpers!r})
    import torch

    from loop_toys import TinyCamNet, ToyBreasts
    from training.loop import train
    from training.loop_types import TrainConfig

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    real_save = torch.save
    saved = []

    def counting_save(obj, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)):  # all_gather_object pickles into BytesIO
            saved.append(str(path))
        return real_save(obj, path, *args, **kwargs)

    torch.save = counting_save
    built = []

    def factory():
        built.append(TinyCamNet(drop_rate=0.2))
        return built[0]

    config = TrainConfig(
        architecture="tiny", out_dir=out / "run", epochs=2, batch_ids=2, batches_per_epoch=3,
        lr=1e-2, seed=0, progress=False,
    )
    result = train(config, ToyBreasts(24, seed=0), ToyBreasts(12, seed=1), factory)
    torch.save = real_save
    real_save(
        {{
            "state": {{k: v.detach().clone() for k, v in built[0].state_dict().items()}},
            "saved": saved,
            "history": [{{k: v for k, v in row.items() if k != "seconds"}} for row in result.history],
            "best_epoch": result.best_epoch,
            "val_probabilities": torch.from_numpy(result.val_probabilities),
        }},
        out / f"rank{{rank}}.pt",
    )
    """
)


@pytest.mark.slow
def test_two_process_gloo_training(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(helpers=str(HERE)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # Only rank 0 writes checkpoints.
    assert ranks[1]["saved"] == []
    assert any(p.endswith("last.pt.tmp") for p in ranks[0]["saved"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["best.pt", "last.pt"]

    # Gradients were all-reduced: both ranks hold the same weights, equal to the checkpoint,
    # and training moved them away from the initial ones.
    checkpoint = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    torch.manual_seed(0)
    from loop_toys import TinyCamNet

    initial = TinyCamNet(drop_rate=0.2).state_dict()
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0)
        torch.testing.assert_close(checkpoint["model"][key], value, rtol=0, atol=0)
    assert not torch.equal(ranks[0]["state"]["conv.weight"], initial["conv.weight"])

    # The validation loss was all-reduced: both ranks made the same decisions.
    assert (
        ranks[0]["history"]
        == ranks[1]["history"]
        == [{k: v for k, v in row.items() if k != "seconds"} for row in checkpoint["history"]]
    )
    assert len(ranks[0]["history"]) == 2
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"]
    torch.testing.assert_close(ranks[0]["val_probabilities"], ranks[1]["val_probabilities"])
    assert not torch.isnan(ranks[0]["val_probabilities"]).any()
