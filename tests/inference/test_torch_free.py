"""A serving install without torch can still import the torch-free half of inference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
for name in ("torch", "timm", "onnxruntime", "tensorrt"):
    sys.modules[name] = None  # any import of them now raises ImportError
import inference.manifest, inference.cam, inference.aggregation
import inference.backends.base, inference.backends.registry
avail = inference.backends.registry.available_backends()
assert avail["torch"] is not None, avail
try:
    inference.backends.registry.load_backend("torch", __import__("pathlib").Path("."))
except inference.backends.base.BackendUnavailable as exc:
    print("refused:", exc.reason)
"""


def test_torch_free_modules_import_without_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout
