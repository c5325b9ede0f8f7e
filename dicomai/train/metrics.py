"""Classification and localisation metrics: numpy and scipy, no PyTorch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.imaging.pixels import Letterbox

__all__ = [
    "auroc",
    "bootstrap_auroc",
    "calibration_error",
    "confusion",
    "pointing_ceiling",
    "pointing_game",
    "proportion_ci95",
    "threshold_for_sensitivity",
    "threshold_for_specificity",
]

Array = NDArray[np.float64]


def auroc(y: Sequence[int] | NDArray[np.int_], p: Sequence[float] | Array) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    y_arr, p_arr = np.asarray(y), np.asarray(p, dtype=np.float64)
    pos, neg = p_arr[y_arr == 1], p_arr[y_arr == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(p_arr, kind="mergesort")
    ranks = np.empty(len(p_arr))
    sorted_p = p_arr[order]
    i = 0
    while i < len(sorted_p):  # average ranks over ties
        j = i
        while j + 1 < len(sorted_p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y_arr == 1].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def bootstrap_auroc(y: NDArray[np.int_], p: Array, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the AUROC."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            values.append(auroc(y[idx], p[idx]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def proportion_ci95(successes: int, trials: int) -> list[float]:
    """Wilson score 95% interval of a proportion (a sensitivity, a pointing-game hit rate).

    Wilson rather than the normal approximation, which leaves [0, 1] and is too narrow near 0
    and 1, where sensitivities lie; scipy's implementation, not ours.
    """
    if trials <= 0:
        return [float("nan"), float("nan")]
    from scipy.stats import binomtest  # the train extra has scipy

    ci = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def confusion(y: NDArray[np.int_], p: Array, threshold: float) -> dict[str, Any]:
    """Counts and rates at ``p >= threshold``, sensitivity and specificity with Wilson 95% intervals."""
    pred = p >= threshold
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * prec * sens / (prec + sens) if tp else 0.0
    return {"threshold": threshold, "tp": tp, "tn": tn, "fp": fp, "fn": fn, "sensitivity": sens,
            "sensitivity_ci95": proportion_ci95(tp, tp + fn), "specificity": spec,
            "specificity_ci95": proportion_ci95(tn, tn + fp), "precision": prec, "f1": f1,
            "accuracy": (tp + tn) / len(y)}


def threshold_for_sensitivity(y: NDArray[np.int_], p: Array, target: float) -> float:
    """The highest threshold whose sensitivity is at least ``target``."""
    pos = np.sort(p[y == 1])[::-1]
    k = int(np.ceil(target * len(pos)))  # at least k positives at or above the threshold
    return float(pos[max(k - 1, 0)])


def threshold_for_specificity(y: NDArray[np.int_], p: Array, target: float) -> float:
    """The lowest threshold whose specificity is at least ``target``."""
    neg = np.sort(p[y == 0])
    k = int(np.ceil(target * len(neg)))  # at least k negatives strictly below the threshold
    if k >= len(neg):
        return float(np.nextafter(neg[-1], np.inf))
    return float(np.nextafter(neg[k - 1], np.inf)) if k > 0 else float(neg[0])


def calibration_error(y: NDArray[np.int_], p: Array, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (p >= lo) & ((p < hi) if hi < 1 else (p <= hi))
        if m.any():
            total += m.sum() / len(p) * abs(p[m].mean() - y[m].mean())
    return float(total)


def pointing_game(cam: NDArray[np.floating], boxes: list[tuple[float, float, float, float]],
                  tolerance: float = 0.0) -> tuple[bool, float]:
    """(the map's maximum lies in a box, share of the map's energy inside the boxes).

    ``tolerance`` (pixels) counts a maximum that close to a box as a hit, as the original
    pointing game does (Zhang et al., 2016: 15 px); 0 is the strict variant.
    """
    inside = np.zeros(cam.shape, bool)
    for x, y, w, h in boxes:
        inside[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
    yy, xx = np.unravel_index(int(np.argmax(cam)), cam.shape)
    hit = any(x - tolerance <= xx <= x + w + tolerance and y - tolerance <= yy <= y + h + tolerance
              for x, y, w, h in boxes)
    total = float(cam.sum())
    return bool(hit), float(cam[inside].sum() / total) if total > 0 else 0.0


def pointing_ceiling(boxes: list[tuple[float, float, float, float]], geom: Letterbox, grid: tuple[int, int],
                     tolerance: float = 0.0) -> bool:
    """Could any map on this grid win the pointing game on this image?

    The node draws the map back with bilinear resampling, whose maximum lies at a cell centre (ties
    aside); so the best possible hit rate is the share of images where some cell centre,
    carried to the original image, falls in a box (within ``tolerance`` px). It bounds the
    pointing game of every model with this input size and grid, however well trained. Cells
    whose centre lands within 2 px of a box are checked with the node's own resampling.
    """
    h, w = grid
    ys = ((np.arange(h) + 0.5) * geom.dst_h / h - geom.top) * geom.src_h / geom.new_h - 0.5
    xs = ((np.arange(w) + 0.5) * geom.dst_w / w - geom.left) * geom.src_w / geom.new_w - 0.5
    slack = tolerance + 2
    for x, y, bw, bh in boxes:
        rows = np.flatnonzero((ys >= y - slack) & (ys <= y + bh + slack))
        cols = np.flatnonzero((xs >= x - slack) & (xs <= x + bw + slack))
        for r in rows:
            for c in cols:
                onehot = np.zeros(grid, np.float32)
                onehot[r, c] = 1.0
                if pointing_game(gradcam_on_image(onehot, geom), boxes, tolerance)[0]:
                    return True
    return False
