"""Pictures for people: the radiograph with its Grad-CAM heat map, as 8-bit RGB. Pure numpy."""

from __future__ import annotations

import functools

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

__all__ = ["caption_band", "colormap", "overlay"]

# Control points of a jet-like map (blue - cyan - green - yellow - red), as Grad-CAM figures
# use: the hottest region is saturated red, which stands out on white bone as well as on
# dark soft tissue (a map ending in white would vanish on bone).
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0], dtype=np.float32)
_COLOURS = np.array([[0.0, 0.0, 0.6], [0.0, 0.5, 1.0], [0.1, 1.0, 0.5], [1.0, 0.9, 0.0], [1.0, 0.0, 0.0]],
                    dtype=np.float32)


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

    Both are 8-bit in the end, so the blend is one lookup in a 256 x 256 table per pixel
    (grey level, map level) -> RGB, a few times faster than blending in floating point.
    """
    if not 0.0 <= opacity <= 1.0 or not 0.0 <= floor < 1.0:
        raise ValueError("opacity must be in [0, 1] and floor in [0, 1)")
    grey = np.asarray(np.round(np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 255), dtype=np.uint8)
    if cam is None:
        return np.repeat(grey[..., None], 3, axis=-1)
    if cam.shape != image.shape:
        raise ValueError(f"map shape {cam.shape} differs from image shape {image.shape}")
    level = np.asarray(np.clip(np.asarray(cam, dtype=np.float32), 0, 1) * 255 + 0.5, dtype=np.uint8)
    table = _blend_table(round(opacity, 6), round(floor, 6))
    index = grey.astype(np.intp) * 256 + level
    return np.asarray(table[index], dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _blend_table(opacity: float, floor: float) -> NDArray[np.uint8]:
    """RGB for every (grey, map level) pair, shape 65536 x 3."""
    v = np.arange(256, dtype=np.float32) / 255
    alpha = opacity * np.clip((v - floor) / (1.0 - floor), 0.0, 1.0)  # per map level
    grey = np.arange(256, dtype=np.float32)[:, None, None]
    rgb = grey * (1.0 - alpha)[None, :, None] + (colormap(v) * 255 * alpha[:, None])[None, :, :]
    table = np.asarray(np.round(rgb), dtype=np.uint8).reshape(65536, 3)
    table.flags.writeable = False
    return table


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def caption_band(rgb: NDArray[np.uint8], lines: list[str]) -> NDArray[np.uint8]:
    """The image with a black band under it carrying ``lines`` in white.

    Font size follows the image width (about 1/55 of it, at least 12 px) so the caption
    stays legible from a 300 px thumbnail to a 4000 px radiograph.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected H x W x 3, got {rgb.shape}")
    h, w, _ = rgb.shape
    size = max(12, w // 55)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped: list[str] = []
    for text in lines:  # wrap, never cut: a small image gets more, shorter lines
        current = ""
        for word in text.split(" "):
            trial = f"{current} {word}".strip()
            if current and probe.textlength(trial, font=font) > w - 8:
                wrapped.append(current)
                current = word
            else:
                current = trial
        wrapped.append(current)
    line_h = int(size * 1.35)
    band = Image.new("RGB", (w, line_h * len(wrapped) + size // 2), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, text in enumerate(wrapped):
        draw.text((4, size // 4 + i * line_h), text, fill=(255, 255, 255), font=font)
    return np.concatenate([rgb, np.asarray(band, dtype=np.uint8)], axis=0)
