"""Grad-CAM maps from the model's grid to the original image: pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dicomai.imaging.pixels import Letterbox, unletterbox

__all__ = ["GradcamGrid", "gradcam_on_image", "normalize_map"]


@dataclass(frozen=True)
class GradcamGrid:
    """The model's Grad-CAM grid and the letterbox that maps it back onto the image."""

    grid: NDArray[np.float32]
    geometry: Letterbox

    def on_image(self) -> NDArray[np.float32]:
        """The map on the original image's geometry, in [0, 1]."""
        return gradcam_on_image(self.grid, self.geometry)


def normalize_map(cam: NDArray[np.floating]) -> NDArray[np.float32]:
    """ReLU, then scale to [0, 1] (an all-zero map stays zero)."""
    pos = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    peak = float(pos.max()) if pos.size else 0.0
    return (pos / np.float32(peak)).astype(np.float32) if peak > 0 else pos


def gradcam_on_image(cam: NDArray[np.floating], geom: Letterbox) -> NDArray[np.float32]:
    """The Grad-CAM grid (over the letterboxed model input) on the original geometry, in [0, 1]."""
    if cam.ndim != 2:
        raise ValueError(f"expected a 2-D Grad-CAM map, got shape {cam.shape}")
    # Normalize the small grid; bilinear resampling keeps values in [0, 1], so the full-size
    # map only needs one rescale of its peak back to 1.
    full = unletterbox(normalize_map(cam), geom)
    peak = float(full.max())
    return full * np.float32(1.0 / peak) if peak > 0 else np.array(full, dtype=np.float32)
