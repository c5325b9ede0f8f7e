"""Degradations that imitate other acquisitions: pure numpy/PIL functions over display images.

FracAtlas comes from one source; a hospital with other equipment sends radiographs that differ
in ways a model can be thrown by without any change in the anatomy: scanned films (grain,
uneven illumination), lower resolution, another tone curve, lossy compression, the film's
border, burnt-in side markers. Each function takes a display image (2-D float32 in [0, 1],
as :func:`dicomai.train.data.load_display` gives it) and returns a new one; none touches its
input. :func:`random_mix` draws a seeded mix of them, for a degraded copy of a test split
(:mod:`dicomai.train.robust`) and as a training augmentation (``train distill --degrade``).

Degradations that change the image's geometry (only :func:`pad_border`) carry a mask (the
fracture boxes of box guidance) along, so that box and image stay aligned.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "Degradation",
    "Mixed",
    "burn_markers",
    "film_scan",
    "jpeg_artefacts",
    "pad_border",
    "random_mix",
    "resolution_loss",
    "tone",
]

Grey = NDArray[np.float32]


class Degradation(StrEnum):
    """The kinds :func:`random_mix` draws from, in the order it applies them."""

    TONE = "tone"
    FILM = "film"
    RESOLUTION = "resolution"
    MARKERS = "markers"
    BORDER = "border"
    JPEG = "jpeg"


def _check(image: NDArray[np.floating]) -> Grey:
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"expected a 2-D image of at least 8 x 8 pixels, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    return image.astype(np.float32, copy=False)


def _resize(image: Grey, height: int, width: int, resample: Image.Resampling) -> Grey:
    return np.array(Image.fromarray(image, mode="F").resize((width, height), resample), np.float32)


def tone(image: Grey, gamma: float = 1.0, contrast: float = 1.0, brightness: float = 0.0) -> Grey:
    """Another tone curve: ``image ** gamma``, contrast about mid-grey, brightness offset; clipped."""
    img = _check(image)
    if not 0.2 <= gamma <= 5.0:
        raise ValueError(f"gamma {gamma} outside [0.2, 5]")
    if not 0.0 < contrast <= 4.0:
        raise ValueError(f"contrast {contrast} outside (0, 4]")
    out: Grey = (np.clip(img, 0.0, 1.0) ** gamma - 0.5) * contrast + 0.5 + brightness
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def film_scan(image: Grey, rng: np.random.Generator, grain: float = 0.04, illumination: float = 0.2,
              grain_size: float = 1.5) -> Grey:
    """A scanned film: correlated grain and illumination that varies smoothly across the film.

    ``grain`` is the standard deviation of the grain (in display units), ``grain_size`` its
    correlation length in pixels; ``illumination`` the largest relative change of brightness
    across the image (a light box or scanner lamp that is brighter on one side).
    """
    img = _check(image)
    if grain < 0 or illumination < 0 or illumination >= 1 or grain_size < 1:
        raise ValueError(f"grain {grain} and illumination {illumination} must be >= 0 "
                         f"(illumination < 1), grain_size {grain_size} >= 1")
    h, w = img.shape
    gh, gw = max(int(h / grain_size), 2), max(int(w / grain_size), 2)
    noise = _resize(rng.normal(0.0, 1.0, (gh, gw)).astype(np.float32), h, w, Image.Resampling.BILINEAR)
    noise *= grain / max(float(noise.std()), 1e-6)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h - 1, 1) - 0.5, xx / max(w - 1, 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy  # in [-0.71, 0.71]
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    vignette = (yy - cy) ** 2 + (xx - cx) ** 2  # in [0, 0.7]
    field = 1.0 + illumination * (0.7 * ramp - 0.6 * vignette + 0.2)
    out: Grey = np.clip(img * field + noise, 0.0, 1.0).astype(np.float32)
    return out


def resolution_loss(image: Grey, factor: float) -> Grey:
    """Down-sampled by ``factor`` (area average) and up-sampled back to the same size (bilinear)."""
    img = _check(image)
    if factor < 1:
        raise ValueError(f"factor {factor} < 1")
    h, w = img.shape
    small = _resize(img, max(round(h / factor), 2), max(round(w / factor), 2), Image.Resampling.BOX)
    return np.clip(_resize(small, h, w, Image.Resampling.BILINEAR), 0.0, 1.0)


def jpeg_artefacts(image: Grey, quality: int) -> Grey:
    """Through 8-bit JPEG at ``quality`` (1-95) and back: blocks, ringing, lost fine texture."""
    img = _check(image)
    if not 1 <= quality <= 95:
        raise ValueError(f"quality {quality} outside [1, 95]")
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(
        buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im, dtype=np.float32) / 255.0


def pad_border(image: Grey, widths: tuple[int, int, int, int], value: float = 0.0,
               mask: NDArray[np.uint8] | None = None, keep_size: bool = False,
               ) -> tuple[Grey, NDArray[np.uint8] | None]:
    """A border around the image (a film's frame, a scanner's bed): ``widths`` top, bottom, left, right.

    The image grows, as a scanned film does; with ``keep_size`` the padded image is scaled
    back to the input's size (the content shrinks), for training on letterboxed images. A
    ``mask`` of the same shape takes the same geometry (nearest neighbour), padded with 0.
    """
    img = _check(image)
    if min(widths) < 0 or len(widths) != 4:
        raise ValueError(f"widths {widths}: four non-negative pixel counts (top, bottom, left, right)")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"value {value} outside [0, 1]")
    if mask is not None and mask.shape != img.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the image's {img.shape}")
    top, bottom, left, right = widths
    out = np.pad(img, ((top, bottom), (left, right)), constant_values=value)
    m = None if mask is None else np.pad(mask, ((top, bottom), (left, right)))
    if keep_size:
        h, w = img.shape
        out = np.clip(_resize(out, h, w, Image.Resampling.BILINEAR), 0.0, 1.0)
        if m is not None:
            m = np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST), np.uint8)
    return out.astype(np.float32), m


def _glyph(letter: str, height: int) -> NDArray[np.bool_]:
    """The letter in PIL's built-in bitmap font, scaled to ``height`` pixels (no font file needed)."""
    font = ImageFont.load_default()
    left, top, right, bottom = (int(v) for v in font.getbbox(letter))
    im = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(im).text((1 - left, 1 - top), letter, fill=255, font=font)
    width = max(int(round(im.width * height / im.height)), 1)
    return np.asarray(im.resize((width, height), Image.Resampling.NEAREST)) > 127


def burn_markers(image: Grey, rng: np.random.Generator, count: int = 1, size: float = 0.08,
                 letters: Sequence[str] = ("L", "R")) -> Grey:
    """Burnt-in side markers: ``count`` rectangles with a letter, near the image's edges.

    ``size`` is the marker's height as a share of the image's shorter side. Each marker is a
    white letter on a dark plate or a dark letter on a white plate, as lead markers and
    annotation boxes look on a radiograph.
    """
    img = _check(image).copy()
    if count < 0 or not 0.01 <= size <= 0.4 or not letters:
        raise ValueError(f"count {count} >= 0, size {size} in [0.01, 0.4] and some letters needed")
    h, w = img.shape
    plate_h = max(int(size * min(h, w)), 6)
    for _ in range(count):
        glyph = _glyph(str(rng.choice(list(letters))), max(int(plate_h * 0.7), 4))
        plate_w = min(glyph.shape[1] + plate_h - glyph.shape[0], w)
        y = int(rng.choice([rng.integers(0, max(h // 6, 1)), rng.integers(max(h - h // 6 - plate_h, 0),
                                                                            max(h - plate_h, 1))]))
        x = int(rng.integers(0, max(w - plate_w, 1)))
        light = bool(rng.random() < 0.5)
        img[y:y + plate_h, x:x + plate_w] = 1.0 if light else 0.05
        gy, gx = y + (plate_h - glyph.shape[0]) // 2, x + (plate_w - glyph.shape[1]) // 2
        region = img[gy:gy + glyph.shape[0], gx:gx + glyph.shape[1]]
        region[glyph[:region.shape[0], :region.shape[1]]] = 0.05 if light else 1.0
    return img


@dataclass(frozen=True)
class Mixed:
    """What :func:`random_mix` returns: the image, the mask (if one came in), the kinds applied."""

    image: Grey
    mask: NDArray[np.uint8] | None
    applied: tuple[Degradation, ...]


def random_mix(image: Grey, rng: np.random.Generator, p: float = 0.5, mask: NDArray[np.uint8] | None = None,
               keep_size: bool = False, kinds: Sequence[Degradation] = tuple(Degradation)) -> Mixed:
    """Each of ``kinds`` with probability ``p`` (at least one), with parameters drawn from ``rng``.

    The ranges are those of plausible acquisitions elsewhere, strong enough to matter but
    leaving a radiologist able to read the image. ``keep_size`` and ``mask``: see
    :func:`pad_border`; with ``keep_size`` the output has the input's shape.
    """
    img = _check(image)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p {p} outside [0, 1]")
    wanted = [k for k in Degradation if k in set(kinds)]
    chosen = [k for k in wanted if rng.random() < p]
    if not chosen and wanted:
        chosen = [wanted[int(rng.integers(len(wanted)))]]
    short = min(img.shape)
    for kind in chosen:
        if kind is Degradation.TONE:
            img = tone(img, gamma=float(np.exp(rng.uniform(np.log(0.6), np.log(1.7)))),
                       contrast=float(rng.uniform(0.6, 1.3)), brightness=float(rng.uniform(-0.1, 0.1)))
        elif kind is Degradation.FILM:
            img = film_scan(img, rng, grain=float(rng.uniform(0.02, 0.07)),
                            illumination=float(rng.uniform(0.1, 0.4)),
                            grain_size=float(rng.uniform(1.0, 2.5)))
        elif kind is Degradation.RESOLUTION:
            img = resolution_loss(img, float(rng.uniform(1.5, 4.0)))
        elif kind is Degradation.MARKERS:
            img = burn_markers(img, rng, count=int(rng.integers(1, 3)), size=float(rng.uniform(0.05, 0.12)))
        elif kind is Degradation.BORDER:
            widths = tuple(int(v) for v in rng.integers(0, max(int(0.12 * short), 2), 4))
            img, mask = pad_border(img, widths, value=float(rng.choice([0.0, 0.05, 0.9, 1.0])),  # type: ignore[arg-type]
                                   mask=mask, keep_size=keep_size)
        elif kind is Degradation.JPEG:
            img = jpeg_artefacts(img, int(rng.integers(8, 40)))
    return Mixed(img, mask, tuple(chosen))
