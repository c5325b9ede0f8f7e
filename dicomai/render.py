"""Pictures for people: the radiograph with its Grad-CAM heat map, as 8-bit RGB. Pure numpy."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["colormap", "overlay"]

# Control points of a perceptually ordered black-red-yellow-white ("hot"-like) map that
# stays readable on a grey radiograph.
_STOPS = np.array([0.0, 0.35, 0.7, 1.0], dtype=np.float32)
_COLOURS = np.array([[0, 0, 0.6], [0.9, 0.1, 0.1], [1.0, 0.85, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32)


def colormap(values: NDArray[np.floating]) -> NDArray[np.float32]:
    """Map [0, 1] to RGB in [0, 1] (shape ... x 3)."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    return np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1).astype(np.float32)


def overlay(image: NDArray[np.floating], cam: NDArray[np.floating] | None, opacity: float = 0.45,
            floor: float = 0.25) -> NDArray[np.uint8]:
    """Blend the heat map onto the grey image where the map exceeds ``floor``.

    Parameters
    ----------
    image:
        Display image in [0, 1], H x W.
    cam:
        Map in [0, 1] on the same geometry, or ``None`` (then only the grey image).
    opacity:
        Weight of the heat map where it is at its maximum.
    floor:
        Map values below this are not drawn, so cold regions stay untouched.
    """
    if not 0.0 <= opacity <= 1.0 or not 0.0 <= floor < 1.0:
        raise ValueError("opacity must be in [0, 1] and floor in [0, 1)")
    grey = np.repeat(np.clip(np.asarray(image, dtype=np.float32), 0, 1)[..., None], 3, axis=-1)
    if cam is None:
        return np.asarray(np.round(grey * 255), dtype=np.uint8)
    if cam.shape != image.shape:
        raise ValueError(f"map shape {cam.shape} differs from image shape {image.shape}")
    c = np.clip(np.asarray(cam, dtype=np.float32), 0, 1)
    alpha = (opacity * np.clip((c - floor) / (1.0 - floor), 0.0, 1.0))[..., None]
    out = grey * (1.0 - alpha) + colormap(c) * alpha
    return np.asarray(np.round(out * 255), dtype=np.uint8)
