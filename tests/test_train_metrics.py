"""Tests of the evaluation metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import require_train_extra

pytestmark = pytest.mark.train
require_train_extra()  # scipy

from dicomai.train.metrics import (  # noqa: E402
    auroc,
    bootstrap_auroc,
    calibration_error,
    confusion,
    pointing_game,
    proportion_ci95,
    threshold_for_sensitivity,
    threshold_for_specificity,
)


def test_auroc_known_values() -> None:
    """Perfect, inverted, random-tie and a hand-counted case."""
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    # pairs (pos, neg): (0.4>0.1) (0.4<0.5) (0.8>0.1) (0.8>0.5) -> 3/4
    assert auroc([0, 1, 0, 1], [0.1, 0.4, 0.5, 0.8]) == 0.75


def test_bootstrap_interval_contains_point() -> None:
    """The bootstrap interval brackets the point estimate on a noisy sample."""
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    lo, hi = bootstrap_auroc(y, p, n=300)
    assert lo < auroc(y, p) < hi and hi - lo < 0.2


def test_operating_points_meet_their_targets() -> None:
    """Chosen thresholds reach sensitivity >= 0.95 / specificity >= 0.95 on the same data."""
    rng = np.random.default_rng(2)
    y = np.array([1] * 40 + [0] * 160)
    p = np.concatenate([rng.uniform(0.3, 1, 40), rng.uniform(0, 0.7, 160)])
    t1 = threshold_for_sensitivity(y, p, 0.95)
    t2 = threshold_for_specificity(y, p, 0.95)
    assert confusion(y, p, t1)["sensitivity"] >= 0.95
    assert confusion(y, p, t2)["specificity"] >= 0.95
    c = confusion(y, p, 0.5)
    assert c["tp"] + c["fn"] == 40 and c["tn"] + c["fp"] == 160


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, written out (Wilson 1927; Newcombe 1998, method 3)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_proportion_interval_is_wilsons() -> None:
    """The interval of a proportion is Wilson's, also at 0 and n successes, where the normal
    approximation collapses to a point; no interval without trials."""
    for k, n in [(99, 109), (44, 109), (0, 20), (20, 20), (1, 3), (489, 505)]:
        lo, hi = proportion_ci95(k, n)
        assert np.allclose([lo, hi], _wilson(k, n), atol=1e-9), (k, n)
        assert 0 <= lo <= k / n <= hi <= 1
    assert proportion_ci95(0, 20)[1] > 0.1 and proportion_ci95(20, 20)[0] < 0.9
    assert all(np.isnan(proportion_ci95(0, 0)))
    # confusion() carries the intervals of its sensitivity and specificity
    y = np.array([1] * 10 + [0] * 30)
    p = np.concatenate([np.linspace(0.2, 1, 10), np.linspace(0, 0.6, 30)])
    c = confusion(y, p, 0.5)
    assert np.allclose(c["sensitivity_ci95"], _wilson(c["tp"], 10))
    assert np.allclose(c["specificity_ci95"], _wilson(c["tn"], 30))


def test_target_verdicts_read_the_interval() -> None:
    """A figure above its target with the interval reaching below is not called safely met."""
    from dicomai.train.card import target_verdict

    assert target_verdict(0.95, [0.91, 0.98], 0.90).startswith("met: the whole interval")
    assert target_verdict(0.908, [0.839, 0.949], 0.90).startswith("met by the figure, but")
    assert target_verdict(0.404, [0.315, 0.499], 0.5).startswith("not met: the whole interval")
    assert target_verdict(0.45, [0.36, 0.54], 0.5).startswith("not met by the figure; the interval reaches")
    assert target_verdict(0.5, None, 0.5) == "met"
    assert target_verdict(float("nan"), [float("nan"), float("nan")], 0.5) == "not measured"


def test_calibration_and_pointing_game() -> None:
    """A calibrated constant has zero ECE; the pointing game finds the box."""
    y = np.array([1, 0, 1, 0])
    assert calibration_error(y, np.full(4, 0.5)) == 0.0
    cam = np.zeros((50, 60))
    cam[30, 40] = 1.0
    assert pointing_game(cam, [(35, 25, 10, 10)]) == (True, 1.0)
    assert pointing_game(cam, [(0, 0, 10, 10)])[0] is False


def test_pointing_ceiling_equals_the_best_one_hot_map() -> None:
    """The ceiling is hit exactly when some one-cell map, drawn back by the node, hits the box."""
    from dicomai.imaging.gradcam import gradcam_on_image
    from dicomai.imaging.pixels import letterbox
    from dicomai.train.metrics import pointing_ceiling

    _, geom = letterbox(np.zeros((512, 380), np.float32), 224, 224)
    grid = (7, 7)
    # cell (3, 3) lands near (189.5, 255.5) of the original: a box around it can be hit ...
    assert pointing_ceiling([(180.0, 245.0, 20.0, 20.0)], geom, grid)
    # ... a box between cell centres cannot, unless 15 px of tolerance reach a centre
    assert not pointing_ceiling([(210.0, 280.0, 12.0, 12.0)], geom, grid)
    assert pointing_ceiling([(200.0, 270.0, 12.0, 12.0)], geom, grid, tolerance=15)
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(40):
        x, y = rng.uniform(0, 350), rng.uniform(0, 480)
        boxes = [(float(x), float(y), float(rng.uniform(8, 40)), float(rng.uniform(8, 40)))]
        brute = False
        for r in range(7):
            for c in range(7):
                onehot = np.zeros(grid, np.float32)
                onehot[r, c] = 1
                brute |= pointing_game(gradcam_on_image(onehot, geom), boxes)[0]
        assert pointing_ceiling(boxes, geom, grid) == brute, boxes
        outcomes.append(brute)
    assert 0 < sum(outcomes) < len(outcomes)  # both cases occurred
