"""Tests of the hotspot box taken from a Grad-CAM map."""

from __future__ import annotations

import numpy as np
import pytest

from dicomai.results.region import box_outline, hotspot_box


def test_box_is_the_connected_region_around_the_peak() -> None:
    """The box covers the peak's region above half the peak, not a weaker separate blob."""
    cam = np.zeros((1000, 800), dtype=np.float32)
    cam[200:300, 100:250] = 1.0
    cam[700:900, 500:700] = 0.6  # above the level, but not connected to the peak
    c0, r0, c1, r1 = hotspot_box(cam) or (0, 0, 0, 0)
    assert abs(c0 - 100) <= 4 and abs(r0 - 200) <= 4 and abs(c1 - 249) <= 4 and abs(r1 - 299) <= 4
    assert box_outline((c0, r0, c1, r1))[0].tolist() == box_outline((c0, r0, c1, r1))[-1].tolist()


def test_no_box_for_an_empty_map_and_bad_arguments_refused() -> None:
    """An all-zero map has no hotspot; a 3-D map or a level outside (0, 1] is refused."""
    assert hotspot_box(np.zeros((10, 10), dtype=np.float32)) is None
    with pytest.raises(ValueError):
        hotspot_box(np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError):
        hotspot_box(np.ones((2, 2), dtype=np.float32), level=0)
