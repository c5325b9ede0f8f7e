"""Operating points from a site's own labelled cases: pure functions over scores and labels.

A site's scores shift with its equipment, so the manifest's thresholds need not give the
sensitivity and specificity they gave on the validation set. :func:`calibrate` picks the
thresholds that reach a target on the site's cases and refuses when the sample is too small
to show it: the lower bound of the Wilson 95% interval of the achieved figure must be at least
``target - margin``. :func:`wilson` is written out here (no SciPy on the node).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "Calibration",
    "Confusion",
    "InsufficientSample",
    "Rate",
    "SiteCalibration",
    "calibrate",
    "calibrate_site",
    "confusion",
    "threshold_for_sensitivity",
    "threshold_for_specificity",
    "wilson",
]

#: z of a two-sided 95% interval.
Z95 = 1.959963984540054


def wilson(successes: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default).

    Returns ``(0.0, 1.0)`` for an empty sample: nothing is known.
    """
    if not 0 <= successes <= total:
        raise ValueError(f"successes {successes} outside 0..{total}")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """A proportion with its Wilson 95% interval; ``value`` is None when the sample is empty."""

    successes: int
    total: int

    @property
    def value(self) -> float | None:
        return self.successes / self.total if self.total else None

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.successes, self.total)

    def as_dict(self) -> dict[str, object]:
        lo, hi = self.ci95
        return {"value": self.value, "ci95": [lo, hi], "n": self.total}

    def __str__(self) -> str:
        if self.value is None:
            return "n/a (no cases)"
        lo, hi = self.ci95
        return f"{self.value:.3f} ({lo:.3f}-{hi:.3f}, {self.successes}/{self.total})"


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary decision against the truth."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def sensitivity(self) -> Rate:
        return Rate(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Rate:
        return Rate(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> Rate:
        return Rate(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> Rate:
        return Rate(self.tn, self.tn + self.fn)

    def as_dict(self) -> dict[str, object]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
                "sensitivity": self.sensitivity.as_dict(), "specificity": self.specificity.as_dict(),
                "ppv": self.ppv.as_dict(), "npv": self.npv.as_dict()}


def confusion(flagged: Sequence[bool], truth: Sequence[bool]) -> Confusion:
    """Counts of ``flagged`` (the decision) against ``truth`` (fractured)."""
    if len(flagged) != len(truth):
        raise ValueError("flagged and truth differ in length")
    tp = sum(f and t for f, t in zip(flagged, truth, strict=True))
    fp = sum(f and not t for f, t in zip(flagged, truth, strict=True))
    fn = sum(t and not f for f, t in zip(flagged, truth, strict=True))
    return Confusion(tp=tp, fp=fp, tn=len(truth) - tp - fp - fn, fn=fn)


def _check(scores: Sequence[float], labels: Sequence[bool], target: float) -> None:
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    if not 0 < target < 1:
        raise ValueError(f"target {target} outside (0, 1)")
    if any(not 0 <= s <= 1 for s in scores):
        raise ValueError("scores must be probabilities in [0, 1]")


def threshold_for_sensitivity(scores: Sequence[float], labels: Sequence[bool], target: float) -> float:
    """The highest threshold (flag at ``score >= threshold``) whose sensitivity reaches ``target``.

    Raises ``ValueError`` without positives.
    """
    _check(scores, labels, target)
    positives = sorted((s for s, y in zip(scores, labels, strict=True) if y), reverse=True)
    if not positives:
        raise ValueError("no positive cases")
    needed = math.ceil(target * len(positives) - 1e-9)  # positives at or above the threshold
    return positives[max(needed, 1) - 1]


def threshold_for_specificity(scores: Sequence[float], labels: Sequence[bool], target: float) -> float:
    """The lowest threshold (flag at ``score >= threshold``) whose specificity reaches ``target``.

    Just above the highest negative score that must stay below it. Raises ``ValueError``
    without negatives.
    """
    _check(scores, labels, target)
    negatives = sorted(s for s, y in zip(scores, labels, strict=True) if not y)
    if not negatives:
        raise ValueError("no negative cases")
    needed = math.ceil(target * len(negatives) - 1e-9)  # negatives strictly below the threshold
    if needed == 0:
        return 0.0
    return min(1.0, math.nextafter(negatives[needed - 1], math.inf))


class InsufficientSample(ValueError):  # noqa: N818 -- reads as the condition it reports
    """The sample cannot show the target: the interval's lower bound falls short."""

    def __init__(self, figure: str, achieved: Rate, target: float, margin: float) -> None:
        lo, _ = achieved.ci95
        super().__init__(
            f"too few cases to show {figure} {target:.2f}: achieved {achieved}, lower 95% bound "
            f"{lo:.3f} < {target - margin:.3f} (target - margin {margin:.2f})")
        self.figure, self.achieved, self.target, self.margin = figure, achieved, target, margin


@dataclass(frozen=True)
class Calibration:
    """Thresholds for the targets, and what they achieve on the sample they came from."""

    cases: int
    positives: int
    high_sensitivity: float
    high_specificity: float | None  # None: no specificity target given
    at_high_sensitivity: Confusion
    at_high_specificity: Confusion | None

    def as_dict(self) -> dict[str, object]:
        return {"cases": self.cases, "positives": self.positives,
                "high_sensitivity": self.high_sensitivity, "high_specificity": self.high_specificity,
                "at_high_sensitivity": self.at_high_sensitivity.as_dict(),
                "at_high_specificity": (self.at_high_specificity.as_dict()
                                        if self.at_high_specificity else None)}


def _at(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> Confusion:
    return confusion([s >= threshold for s in scores], labels)


def calibrate(scores: Sequence[float], labels: Sequence[bool], target_sensitivity: float,
              target_specificity: float | None = None, margin: float = 0.05) -> Calibration:
    """Thresholds reaching the targets on this sample.

    Raises
    ------
    InsufficientSample
        The lower Wilson 95% bound of an achieved figure is below ``target - margin``
        (too few positives for a sensitivity target, too few negatives for a specificity one).
    ValueError
        Scores outside [0, 1], targets outside (0, 1), or no positives / no negatives.
    """
    hs = threshold_for_sensitivity(scores, labels, target_sensitivity)
    at_hs = _at(scores, labels, hs)
    if at_hs.sensitivity.ci95[0] < target_sensitivity - margin:
        raise InsufficientSample("sensitivity", at_hs.sensitivity, target_sensitivity, margin)
    hp: float | None = None
    at_hp: Confusion | None = None
    if target_specificity is not None:
        hp = threshold_for_specificity(scores, labels, target_specificity)
        at_hp = _at(scores, labels, hp)
        if at_hp.specificity.ci95[0] < target_specificity - margin:
            raise InsufficientSample("specificity", at_hp.specificity, target_specificity, margin)
        # A doubtful band cannot start above the positive threshold: the stricter point wins.
        hs = min(hs, hp)
        at_hs = _at(scores, labels, hs)
    return Calibration(cases=len(scores), positives=sum(bool(y) for y in labels), high_sensitivity=hs,
                       high_specificity=hp, at_high_sensitivity=at_hs, at_high_specificity=at_hp)


@dataclass(frozen=True)
class SiteCalibration:
    """The site-wide calibration, and the body parts whose own sample met the targets."""

    overall: Calibration
    body_parts: dict[str, Calibration]
    skipped: dict[str, str]  # body part: why it uses the site-wide points


def calibrate_site(scores: Sequence[float], labels: Sequence[bool], parts: Sequence[str | None],
                   target_sensitivity: float, target_specificity: float | None = None,
                   margin: float = 0.05, ceiling: float | None = None) -> SiteCalibration:
    """:func:`calibrate` on the whole sample, then on each body part's own cases.

    ``ceiling`` is the high-specificity threshold kept when no specificity target is given:
    a high-sensitivity threshold above it is refused. A body part whose own sample is too small
    (or whose threshold would pass the ceiling) is listed in ``skipped`` and uses the site's.

    Raises
    ------
    InsufficientSample, ValueError
        As :func:`calibrate`, for the whole sample; or the threshold passes ``ceiling``.
    """
    def one(s: Sequence[float], y: Sequence[bool]) -> Calibration:
        cal = calibrate(s, y, target_sensitivity, target_specificity, margin)
        if target_specificity is None and ceiling is not None and cal.high_sensitivity > ceiling:
            raise ValueError(f"the high-sensitivity threshold {cal.high_sensitivity:.4f} would lie above "
                             f"the high-specificity threshold {ceiling:.4f}: give a specificity target too")
        return cal

    overall = one(scores, labels)
    own: dict[str, Calibration] = {}
    skipped: dict[str, str] = {}
    for part in sorted({p for p in parts if p}):
        idx = [i for i, p in enumerate(parts) if p == part]
        try:
            own[part] = one([scores[i] for i in idx], [labels[i] for i in idx])
        except ValueError as exc:  # InsufficientSample included
            skipped[part] = str(exc)
    return SiteCalibration(overall, own, skipped)
