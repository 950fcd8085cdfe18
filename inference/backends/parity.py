"""Do two backends give the same logits and CAMs? One comparison for export, tests and bench.

An exported graph (ONNX, TensorRT) is only trusted after it matches the torch model it came from on
the same inputs, for both outputs. Differences are judged against the scale of the values involved,
since fused kernels round differently: ``max|a - b| <= atol + rtol * scale``, where the CAM's scale
is its largest magnitude and the logit's is the larger of its own and the CAM's, because
``logit = mean(CAM) + b`` inherits the rounding of the terms it averages (a logit near 0 can come
from CAM values in the hundreds). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARITY_RTOL = 1e-3
"""Allowed difference as a fraction of the scale. ONNX Runtime with all graph optimisations (fused
Conv+BN+SiLU, another summation order) differs from torch eager by ~1e-5 of it on the trained demo
EfficientNet-B0 and up to ~2e-4 on test models pushed far outside their BatchNorm statistics; a
wrong or stale graph differs by order 1."""
PARITY_ATOL = 1e-4
"""Absolute slack for outputs whose scale is tiny."""
DEGENERATE_SCALE = 1e-3
"""Below this largest |CAM| (ten times the absolute slack) the input barely reaches the outputs
(an untrained EfficientNet gives CAMs of ~1e-6 and a logit equal to the bias) and agreement proves
nothing."""


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-x.astype(np.float64))))


@dataclass(frozen=True)
class ParityReport:
    """Largest differences between a candidate backend and the reference, and the scales they are
    judged against (the reference's largest |value|)."""

    logit_max_abs_diff: float
    cam_max_abs_diff: float
    probability_max_abs_diff: float
    logit_scale: float
    cam_scale: float
    rtol: float = PARITY_RTOL
    atol: float = PARITY_ATOL

    @property
    def degenerate(self) -> bool:
        return self.cam_scale < DEGENERATE_SCALE

    @property
    def ok(self) -> bool:
        """Both outputs within tolerance, and the outputs are not all ~0."""
        logit_scale = max(self.logit_scale, self.cam_scale)
        logit_ok = self.logit_max_abs_diff <= self.atol + self.rtol * logit_scale
        cam_ok = self.cam_max_abs_diff <= self.atol + self.rtol * self.cam_scale
        return logit_ok and cam_ok and not self.degenerate

    def describe(self) -> str:
        return (
            f"logit max |diff| {self.logit_max_abs_diff:.3g} (scale {self.logit_scale:.3g}), "
            f"CAM max |diff| {self.cam_max_abs_diff:.3g} (scale {self.cam_scale:.3g}), "
            f"probability max |diff| {self.probability_max_abs_diff:.3g}; "
            f"tolerance {self.atol:g} + {self.rtol:g} x scale (the logit's: max of both)"
        )


def compare_outputs(
    reference: tuple[np.ndarray, np.ndarray],
    candidate: tuple[np.ndarray, np.ndarray],
    *,
    rtol: float = PARITY_RTOL,
    atol: float = PARITY_ATOL,
) -> ParityReport:
    """Compare ``(logits (B,), cams (B, h, w))`` of a candidate backend with the reference's.

    Raises ValueError when the shapes differ: that is a broken graph, not a rounding question.
    """
    ref_logit, ref_cam = (np.asarray(a, dtype=np.float64) for a in reference)
    logit, cam = (np.asarray(a, dtype=np.float64) for a in candidate)
    if ref_logit.shape != logit.shape or ref_cam.shape != cam.shape:
        raise ValueError(
            f"output shapes differ: logit {logit.shape} vs {ref_logit.shape}, "
            f"cam {cam.shape} vs {ref_cam.shape}"
        )
    return ParityReport(
        logit_max_abs_diff=float(np.max(np.abs(logit - ref_logit))),
        cam_max_abs_diff=float(np.max(np.abs(cam - ref_cam))),
        probability_max_abs_diff=float(np.max(np.abs(_sigmoid(logit) - _sigmoid(ref_logit)))),
        logit_scale=float(np.max(np.abs(ref_logit))),
        cam_scale=float(np.max(np.abs(ref_cam))),
        rtol=rtol,
        atol=atol,
    )
