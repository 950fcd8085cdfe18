"""A serving install without torch: it imports, refuses torch with the reason, and scores with ONNX.

The base install has no torch, timm or safetensors (the ``train`` extra brings them). Each check
runs in a fresh interpreter where an import hook makes those packages unimportable and records
every attempt, so the serving path is proven not to need them, not merely not to have loaded them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mg_source_factory import make_dx_mg
from pydicom.uid import JPEG2000Lossless

ROOT = Path(__file__).resolve().parents[2]

BLOCK = """
import importlib.abc, sys
BLOCKED = ("torch", "torchvision", "timm", "safetensors", "tensorrt")
ATTEMPTS = []

class _Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            ATTEMPTS.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _Unimportable())
"""

IMPORTS = """
import inference.manifest, inference.cam, inference.aggregation
import inference.backends.base, inference.backends.loader
avail = inference.backends.loader.available_backends()
assert avail["torch"] is not None and avail["onnxruntime"] is None, avail
try:
    inference.backends.loader.load_backend("torch", __import__("pathlib").Path("."))
except inference.backends.base.BackendUnavailable as exc:
    print("refused:", exc.reason)
"""

SCORE = """
import json
from pathlib import Path
from node.commands.app import main

args = json.loads(sys.argv[1])
sys.argv = ["mammonode", "score", *args["files"], "--out", args["out"], "--model", args["model"],
            "--backend", "onnxruntime", "--json"]
try:
    main()
except SystemExit as exc:
    code = exc.code

# The node's worker builds its pipeline from config the same way.
import node.queue.worker
from node.config import NodeConfig
from node.admin.registry import pipeline_factory

model = Path(args["model"])
pipeline = pipeline_factory(NodeConfig(backend="onnxruntime", model_dir=model))(model)
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
Path(args["result"]).write_text(json.dumps(
    {"code": code, "backend": pipeline.backend.name, "attempts": ATTEMPTS, "loaded": loaded}
))
"""


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_torch_free_modules_import_without_torch() -> None:
    result = _run(IMPORTS)
    assert result.returncode == 0, result.stderr
    assert "refused: package torch not installed" in result.stdout


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Made here, where torch exists; the subprocess only reads it."""
    from model_factory import save_calibrated_model

    from training.onnx_export import export_onnx

    model_dir = save_calibrated_model(tmp_path_factory.mktemp("torch-free") / "model")
    export_onnx(model_dir)
    return model_dir


def test_scores_a_study_with_onnxruntime_and_no_torch(onnx_model: Path, tmp_path: Path) -> None:
    """`mammonode score --backend onnxruntime` on a 4-view study (two views JPEG 2000) writes SC + SR."""
    files = []
    for index, (side, view) in enumerate((("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")), start=1):
        ds = make_dx_mg(side, view, index=index)
        if view == "MLO":  # decoded by pylibjpeg-openjpeg, a base dependency
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        path = tmp_path / "in" / f"{index}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(str(path))
    out, result_file = tmp_path / "out", tmp_path / "result.json"
    args = {"files": files, "out": str(out), "model": str(onnx_model), "result": str(result_file)}
    proc = _run(SCORE, json.dumps(args))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["code"] == 0, proc.stderr
    assert result["attempts"] == [] and result["loaded"] == [], "the serving path tried to import torch"
    assert result["backend"] == "onnxruntime"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["backend"] == "onnxruntime" and not summary["skipped"]
    (study,) = summary["studies"]
    assert len(study["images"]) == 4 and {b["laterality"] for b in study["breasts"]} == {"L", "R"}
    assert len(list((out / "sc").glob("*.dcm"))) == 4 and len(list((out / "sr").glob("*.dcm"))) == 1
