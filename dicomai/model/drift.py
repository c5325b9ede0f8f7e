"""Drift of the node's scores against the validation set's: pure functions over probabilities.

The manifest's reference (:class:`~dicomai.model.package.ScoreReference`) holds the inner
edges of equal-count bins of the validation set's probabilities. The running scores are
counted in the same bins and compared by the population stability index,
``PSI = sum((a - e) * ln(a / e))`` over the bins' shares ``a`` (running) and ``e``
(reference); by the usual rule of thumb PSI < 0.1 is stable, 0.1-0.2 a moderate shift and
> 0.2 a shift worth acting on. The share of images at or above each operating point is
compared too: a flagged rate far from the reference's is what a site notices first.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dicomai.model.package import OperatingPoints, ScoreReference

__all__ = ["MIN_IMAGES", "PSI_WARN", "Drift", "bin_counts", "drift", "psi"]

#: PSI above which the shift is reported as drift.
PSI_WARN = 0.2
#: Fewer images than this give no verdict: with 10 bins the PSI of an unshifted sample of n
#: images is about 9/n by chance alone (0.09 at 100).
MIN_IMAGES = 100
_FLOOR = 1e-4  # share given to an empty bin, so that the logarithm stays finite


def bin_counts(scores: Sequence[float], edges: Sequence[float]) -> list[int]:
    """How many scores fall in each bin: ``(-inf, e0), [e0, e1), ..., [e_last, inf)``."""
    counts = [0] * (len(edges) + 1)
    for s in scores:
        counts[bisect.bisect_right(edges, s)] += 1
    return counts


def psi(expected: Sequence[float], counts: Sequence[int]) -> float:
    """Population stability index of ``counts`` against the bins' expected shares."""
    if len(expected) != len(counts):
        raise ValueError("expected shares and counts differ in length")
    total = sum(counts)
    if total == 0:
        raise ValueError("no scores")
    value = 0.0
    for e, c in zip(expected, counts, strict=True):
        a, e = max(c / total, _FLOOR), max(e, _FLOOR)
        value += (a - e) * math.log(a / e)
    return value


@dataclass(frozen=True)
class Drift:
    """The running scores against the reference."""

    images: int
    psi: float | None  # None: no scores
    high_sensitivity_rate: float | None  # share at or above the high-sensitivity threshold
    high_specificity_rate: float | None
    reference_high_sensitivity_rate: float
    reference_high_specificity_rate: float

    @property
    def enough(self) -> bool:
        return self.images >= MIN_IMAGES

    @property
    def drifted(self) -> bool:
        """PSI past :data:`PSI_WARN` on a sample large enough to say so."""
        return self.enough and self.psi is not None and self.psi > PSI_WARN

    def as_dict(self) -> dict[str, object]:
        return {"images": self.images, "psi": self.psi, "drifted": self.drifted, "enough": self.enough,
                "high_sensitivity_rate": self.high_sensitivity_rate,
                "high_specificity_rate": self.high_specificity_rate,
                "reference_high_sensitivity_rate": self.reference_high_sensitivity_rate,
                "reference_high_specificity_rate": self.reference_high_specificity_rate}


def drift(reference: ScoreReference, scores: Sequence[float], points: OperatingPoints) -> Drift:
    """PSI and flagged rates of ``scores`` against ``reference``.

    The flagged rates use ``points`` (the thresholds in force); the reference's rates were
    measured at the manifest's, so after a site calibration they differ by design.
    """
    n = len(scores)
    bins = len(reference.edges) + 1
    value = psi([1 / bins] * bins, bin_counts(scores, reference.edges)) if n else None
    return Drift(
        images=n, psi=value,
        high_sensitivity_rate=sum(s >= points.high_sensitivity for s in scores) / n if n else None,
        high_specificity_rate=sum(s >= points.high_specificity for s in scores) / n if n else None,
        reference_high_sensitivity_rate=reference.high_sensitivity_rate,
        reference_high_specificity_rate=reference.high_specificity_rate,
    )
