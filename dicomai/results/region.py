"""Where a Grad-CAM map points: its hotspot as a box on the source image. Pure numpy."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["hotspot_box", "box_outline"]

#: The map is searched at most this many pixels on its longer side (the box is then scaled).
_SEARCH_SIDE = 256


def hotspot_box(cam: NDArray[np.floating], level: float = 0.5) -> tuple[int, int, int, int] | None:
    """The bounding box ``(col0, row0, col1, row1)`` (inclusive, source pixels) of the connected
    region around the map's peak where the map is at least ``level`` times the peak; ``None``
    for an empty or all-zero map."""
    if cam.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {cam.shape}")
    if not 0 < level <= 1:
        raise ValueError(f"level must be in (0, 1], got {level}")
    h, w = cam.shape
    if cam.size == 0 or not np.isfinite(cam).all() or float(cam.max()) <= 0:
        return None
    step = max(1, -(-max(h, w) // _SEARCH_SIDE))
    small = np.asarray(cam, dtype=np.float32)[::step, ::step]
    mask = small >= np.float32(level * float(small.max()))
    region = np.zeros_like(mask)
    region[np.unravel_index(int(np.argmax(small)), small.shape)] = True
    while True:  # grow from the peak inside the mask (4-connected)
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        grown &= mask
        if (grown == region).all():
            break
        region = grown
    rows, cols = np.nonzero(region)
    return (int(cols.min()) * step, int(rows.min()) * step,
            min(w - 1, (int(cols.max()) + 1) * step - 1), min(h - 1, (int(rows.max()) + 1) * step - 1))


def box_outline(box: tuple[int, int, int, int]) -> NDArray[np.float32]:
    """The closed outline (column, row) of a box, first point repeated last (a DICOM polygon)."""
    c0, r0, c1, r1 = box
    return np.array([[c0, r0], [c1, r0], [c1, r1], [c0, r1], [c0, r0]], dtype=np.float32)
