"""Tests of the evaluation metrics against hand-computed values."""

from __future__ import annotations

import numpy as np

from dicomai.train.metrics import (
    auroc,
    bootstrap_auroc,
    calibration_error,
    confusion,
    pointing_game,
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


def test_calibration_and_pointing_game() -> None:
    """A calibrated constant has zero ECE; the pointing game finds the box."""
    y = np.array([1, 0, 1, 0])
    assert calibration_error(y, np.full(4, 0.5)) == 0.0
    cam = np.zeros((50, 60))
    cam[30, 40] = 1.0
    assert pointing_game(cam, [(35, 25, 10, 10)]) == (True, 1.0)
    assert pointing_game(cam, [(0, 0, 10, 10)])[0] is False
