"""The study page's pictures: a radiograph with its heat map at a viewer-friendly size, as PNG.

Drawn from what the node kept: the spooled image and the reduced Grad-CAM map
(``predictions.gradcam_path``, float16 ``gradcam``), with the same display transform and
blend as the Secondary Capture, so the console shows what the PACS receives.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom import dcmread

from dicomai.imaging.overlay import overlay
from dicomai.imaging.pixels import FloatImage, resize, to_display

__all__ = ["MAX_SIDE", "overlay_picture", "picture_png", "png"]

#: Longer side of a picture on the study page, in pixels.
MAX_SIDE = 1024


def overlay_picture(image: FloatImage, cam: NDArray[np.floating] | None, max_side: int = MAX_SIDE,
                    opacity: float = 0.45, floor: float = 0.25) -> NDArray[np.uint8]:
    """The display image (in [0, 1]) shrunk to ``max_side`` with the map (any size) blended on it."""
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    h, w = image.shape
    scale = min(1.0, max_side / max(h, w))
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = resize(image, nh, nw)
    if cam is None:
        return overlay(small, None)
    if cam.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {cam.shape}")
    on_small = np.clip(resize(np.asarray(cam, dtype=np.float32), nh, nw), 0.0, 1.0)
    return overlay(small, on_small, opacity, floor)


def png(rgb: NDArray[np.uint8]) -> bytes:
    """``rgb`` as a PNG file (fast compression: pictures are made on request)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def picture_png(source: Path, gradcam: Path | None, opacity: float, floor: float,
                max_side: int = MAX_SIDE) -> bytes:
    """The PNG of a spooled image with its kept map (``None``: the image alone)."""
    ds = dcmread(source)
    display = to_display(ds).image
    cam = None
    if gradcam is not None:
        with np.load(gradcam) as kept:
            cam = np.asarray(kept["gradcam"], dtype=np.float32)
    return png(overlay_picture(display, cam, max_side, opacity, floor))
