"""Segmentation helpers shared by the VOI fallback window and the crop."""

from __future__ import annotations

import numpy as np

from inference.segmentation import otsu_thresholds3, remove_edge_bands


def test_three_class_otsu_keeps_air_a_class_of_its_own() -> None:
    """Air, tissue and a small far strip: the lower threshold separates air from tissue (a
    two-class split of these values puts air and tissue together, against the strip)."""
    rng = np.random.default_rng(0)
    air, tissue, strip = (
        rng.normal(100, 5, 50_000),
        rng.normal(1000, 100, 30_000),
        rng.normal(6000, 10, 6_000),
    )
    low, high = otsu_thresholds3(np.concatenate([air, tissue, strip]))
    assert air.max() < low < tissue.min() and low < high
    assert otsu_thresholds3(np.full(10, 3.0)) == (3.0, 3.0)


def test_remove_edge_bands_clears_strips_keeps_breast() -> None:
    mask = np.zeros((100, 80), dtype=bool)
    yy, xx = np.mgrid[0:100, 0:80]
    mask[((yy - 50) / 40.0) ** 2 + (xx / 50.0) ** 2 <= 1.0] = True  # breast on the left edge
    mask[:4, :] = True  # strip along the top
    mask[:, -3:] = True  # strip along the right
    cleaned = remove_edge_bands(mask)
    assert not cleaned[:4, 20:].any() and not cleaned[:, -3:].any()
    np.testing.assert_array_equal(cleaned[4:, :-3], mask[4:, :-3])  # the breast is untouched
    assert mask[:4].all()  # the input is not modified
