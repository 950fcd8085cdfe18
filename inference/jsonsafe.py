"""Strict JSON for reports and manifests: undefined metrics (NaN, inf) become ``null``.

Python's json writes NaN, which is not JSON and breaks other readers (jq, JavaScript, databases).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def json_safe(value: Any) -> Any:
    """A copy of ``value`` with non-finite floats replaced by None and numpy scalars made plain."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """``json.dumps`` of :func:`json_safe` of ``value``, refusing NaN so nothing slips through."""
    return json.dumps(json_safe(value), indent=indent, ensure_ascii=False, allow_nan=False)
