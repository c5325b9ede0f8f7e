"""Degradations that imitate other acquisitions (dicomai.train.degrade)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import require_train_extra

pytestmark = pytest.mark.train
require_train_extra()

from dicomai.train.degrade import (  # noqa: E402
    Degradation,
    burn_markers,
    film_scan,
    jpeg_artefacts,
    pad_border,
    random_mix,
    resolution_loss,
    tone,
)


def _image(h: int = 96, w: int = 80) -> np.ndarray:
    """A smooth ramp with a bright bar: texture-free, so that added texture shows."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (0.2 + 0.5 * xx / w).astype(np.float32)
    img[40:50, 10:70] = 0.9
    return img


def test_tone_gamma_and_contrast() -> None:
    """Gamma darkens mid-tones; lower contrast narrows the range; the input is left alone."""
    img = _image()
    before = img.copy()
    assert tone(img, gamma=2.0).mean() < img.mean()
    low = tone(img, contrast=0.5)
    assert np.ptp(low) < np.ptp(img)
    assert np.array_equal(img, before)
    with pytest.raises(ValueError, match="gamma"):
        tone(img, gamma=0.0)


def test_film_scan_adds_grain_and_uneven_light_seeded() -> None:
    """Same seed, same film; the grain shows as local texture, the light as a slow change."""
    img = _image()
    a = film_scan(img, np.random.default_rng(1), grain=0.05, illumination=0.3)
    b = film_scan(img, np.random.default_rng(1), grain=0.05, illumination=0.3)
    assert np.array_equal(a, b)
    diff = a - img
    assert float(np.abs(np.diff(diff, axis=1)).mean()) > 0.02  # grain: pixel-to-pixel texture
    flat = film_scan(img, np.random.default_rng(1), grain=0.0, illumination=0.3) - img
    sides = abs(flat[:, :10].mean() - flat[:, -10:].mean()) + abs(flat[:10].mean() - flat[-10:].mean())
    assert sides > 0.005
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 1


def test_resolution_loss_blurs_an_edge_keeps_size() -> None:
    img = np.zeros((64, 64), np.float32)
    img[:, 32:] = 1.0
    out = resolution_loss(img, 4.0)
    assert out.shape == img.shape
    assert np.sum((out > 0.05) & (out < 0.95)) > np.sum((img > 0.05) & (img < 0.95)) + 64


def test_jpeg_artefacts_lose_detail() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((64, 64)).astype(np.float32)
    low = jpeg_artefacts(img, 10)
    high = jpeg_artefacts(img, 95)
    assert np.abs(low - img).mean() > 2 * np.abs(high - img).mean()
    with pytest.raises(ValueError, match="quality"):
        jpeg_artefacts(img, 0)


def test_pad_border_grows_or_keeps_size_and_carries_the_mask() -> None:
    """The border is the padding value; with keep_size the mask moves with the content."""
    img = _image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[40:50, 10:70] = 1
    grown, m = pad_border(img, (4, 6, 8, 2), value=1.0, mask=mask)
    assert grown.shape == (74, 74) and m is not None and m.shape == (74, 74)
    assert np.all(grown[:4] == 1.0) and m[44:54].any() and not m[:4].any()
    kept, km = pad_border(img, (16, 16, 16, 16), value=0.0, mask=mask, keep_size=True)
    assert kept.shape == (64, 64) and km is not None
    ys, xs = np.nonzero(km)
    # the bar shrinks towards the centre by the scale 64 / 96
    assert abs(ys.mean() - (16 + 44.5) * 64 / 96) < 1.5 and kept[0, 0] == 0.0
    with pytest.raises(ValueError, match="mask"):
        pad_border(img, (1, 1, 1, 1), mask=np.zeros((3, 3), np.uint8))


def test_burn_markers_draws_a_letter_on_a_plate() -> None:
    img = np.full((200, 200), 0.5, np.float32)
    out = burn_markers(img, np.random.default_rng(3), count=1, size=0.1, letters=("R",))
    changed = out != 0.5
    ys, xs = np.nonzero(changed)
    assert 15 <= ys.max() - ys.min() + 1 <= 25  # the plate: 10 % of the short side
    plate = out[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert (plate > 0.9).any() and (plate < 0.1).any()  # a letter on it, in the other shade
    assert ys.min() < 200 // 6 or ys.max() > 200 - 200 // 6 - 1  # near an edge


def test_random_mix_seeded_at_least_one_kind() -> None:
    img = _image()
    a = random_mix(img, np.random.default_rng(7))
    b = random_mix(img, np.random.default_rng(7))
    assert a.applied == b.applied and np.array_equal(a.image, b.image)
    assert a.applied and all(isinstance(k, Degradation) for k in a.applied)
    seen: set[Degradation] = set()
    for seed in range(30):
        seen.update(random_mix(img, np.random.default_rng(seed)).applied)
    assert seen == set(Degradation)
    none = random_mix(img, np.random.default_rng(0), p=0.0, kinds=[Degradation.JPEG])
    assert none.applied == (Degradation.JPEG,)


def test_random_mix_keep_size_for_training() -> None:
    """keep_size: the letterboxed training image and its box mask keep their shape."""
    img = _image(64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 20:30] = 1
    for seed in range(10):
        out = random_mix(img, np.random.default_rng(seed), p=1.0, mask=mask, keep_size=True)
        assert out.image.shape == (64, 64) and out.mask is not None and out.mask.shape == (64, 64)
        assert out.mask.any() and out.image.min() >= 0 and out.image.max() <= 1
