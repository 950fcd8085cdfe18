"""Things on the detector that are not the breast: burned-in text labels and collimator strips.

Real mammograms carry both, and a background crop that trusts "everything bright is breast"
fails on them; the phantoms include them so preprocessing is tested against them. Both are
placed only where they stay clear of the breast.
"""

from __future__ import annotations

import cv2
import numpy as np

Box = tuple[int, int, int, int]  # y0, x0, y1, x1 (half-open)


def _clear_of(breast: np.ndarray, box: Box, margin: int) -> bool:
    y0, x0, y1, x1 = box
    h, w = breast.shape
    region = breast[max(y0 - margin, 0) : min(y1 + margin, h), max(x0 - margin, 0) : min(x1 + margin, w)]
    return not bool(region.any())


def label_mask(
    text: str, breast: np.ndarray, chest_wall_left: bool, corner: int
) -> tuple[np.ndarray, Box] | None:
    """Where ``text`` would be burned in: a bool mask of its strokes and its box, or None.

    The label goes in a corner on the side away from the chest wall; ``corner`` 0 tries the top
    corner first, 1 the bottom one. None when neither corner is clear of the breast.
    """
    h, w = breast.shape
    scale = max(w / 900.0, 0.3)
    thickness = max(1, round(w / 400))
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    pad = max(2, round(0.03 * w))
    if tw + 2 * pad >= w or th + baseline + 2 * pad >= h:
        return None
    x0 = w - pad - tw if chest_wall_left else pad
    for choice in (corner, 1 - corner):
        y_top = pad if choice == 0 else h - pad - th - baseline
        box = (y_top, x0, y_top + th + baseline, x0 + tw)
        if not _clear_of(breast, box, pad):
            continue
        canvas = np.zeros((h, w), dtype=np.uint8)
        cv2.putText(
            canvas, text, (x0, y_top + th), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_8
        )
        return canvas > 0, box
    return None


def border_box(breast: np.ndarray, side: str, fraction: float, chest_wall_left: bool) -> Box | None:
    """The box of a bright collimator strip along ``side`` ("top", "bottom" or "far", the edge
    away from the chest wall), ``fraction`` of the image size thick; None if it would touch the
    breast."""
    h, w = breast.shape
    if side == "top":
        box = (0, 0, max(1, round(fraction * h)), w)
    elif side == "bottom":
        box = (h - max(1, round(fraction * h)), 0, h, w)
    elif side == "far":
        t = max(1, round(fraction * w))
        box = (0, w - t, h, w) if chest_wall_left else (0, 0, h, t)
    else:
        raise ValueError(f"border side must be 'top', 'bottom' or 'far', got {side!r}")
    return box if _clear_of(breast, box, max(2, round(0.01 * w))) else None
