"""The machine a bench figure was measured on: CPUs, model, OS, Python, load and GPU.

Every `mammonode bench` report carries it, so no figure travels without its context.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from inference import usable_cpus


def machine_info() -> dict[str, Any]:
    """CPU count and model, OS, Python, load average and GPU: the context of every figure."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from inference import gpu_info, gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    return {
        "cpus": usable_cpus(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": load_average(),
        "gpu": gpu_info(0).name if reason is None else None,
        "gpu_unavailable": reason,
    }


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
