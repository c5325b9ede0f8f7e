"""Drift of the node's scores against the validation set's: pure functions over probabilities.

The manifest's reference (:class:`~dicomai.model.package.ScoreReference`) holds the inner
edges of equal-count bins of the validation set's probabilities. The running scores are
counted in the same bins and compared by the population stability index,
``PSI = sum((a - e) * ln(a / e))`` over the bins' shares ``a`` (running) and ``e``
(reference); by the usual rule of thumb PSI < 0.1 is stable, 0.1-0.2 a moderate shift and
> 0.2 a shift worth acting on. The share of images at or above each operating point is
compared too: a flagged rate far from the reference's is what a site notices first.

When the manifest also has the validation images' mean intensities (windowed, displayed),
their PSI is computed the same way: new equipment or processing shows there before enough
labelled cases exist. :func:`watch` groups the images overall, per body part and per
manufacturer, and summarises each group's matrix sizes and bit depths (the reference has
none: the project's validation copy is downscaled 8-bit JPEG).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dicomai.imaging.stats import ImageStats
from dicomai.model.package import IntensityReference, OperatingPoints, Reference, ScoreReference

__all__ = ["MIN_IMAGES", "PSI_WARN", "Drift", "Sample", "bin_counts", "drift", "drifted_groups", "judged",
           "make_reference", "psi", "watch"]

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
    """The running scores (and image statistics) of a group of images against the reference."""

    images: int
    psi: float | None  # None: no scores
    high_sensitivity_rate: float | None  # share at or above the high-sensitivity threshold
    high_specificity_rate: float | None
    reference_high_sensitivity_rate: float
    reference_high_specificity_rate: float
    intensity_psi: float | None = None  # None: no reference or no statistics
    median_size: tuple[int, int] | None = None  # rows, columns
    bit_depths: tuple[int, ...] = ()

    @property
    def enough(self) -> bool:
        return self.images >= MIN_IMAGES

    @property
    def drifted(self) -> bool:
        """The scores' PSI past :data:`PSI_WARN` on a sample large enough to say so.

        The intensities' PSI is shown, not judged: the reference images (the project's JPEG
        copy of FracAtlas) are darker than any windowed DICOM radiograph, so it is high at
        every site from the first day; what tells is its movement within a manufacturer."""
        return self.enough and self.psi is not None and self.psi > PSI_WARN

    def brief(self) -> dict[str, object]:
        """Images and both PSIs, rounded: what a ``model.drift`` log line says of a group."""
        return {"images": self.images, "psi": _round(self.psi), "intensity_psi": _round(self.intensity_psi)}

    def as_dict(self) -> dict[str, object]:
        return {"images": self.images, "psi": self.psi, "intensity_psi": self.intensity_psi,
                "drifted": self.drifted, "enough": self.enough,
                "high_sensitivity_rate": self.high_sensitivity_rate,
                "high_specificity_rate": self.high_specificity_rate,
                "reference_high_sensitivity_rate": self.reference_high_sensitivity_rate,
                "reference_high_specificity_rate": self.reference_high_specificity_rate,
                "median_size": list(self.median_size) if self.median_size else None,
                "bit_depths": list(self.bit_depths)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass(frozen=True)
class Sample:
    """One analysed image as the drift watch sees it."""

    probability: float
    body_part: str | None
    stats: ImageStats | None = None


def drift(reference: ScoreReference, scores: Sequence[float], points: OperatingPoints) -> Drift:
    """PSI and flagged rates of ``scores`` against ``reference``.

    The flagged rates use ``points`` (the thresholds in force); the reference's rates were
    measured at the manifest's, so after a site calibration they differ by design.
    """
    n = len(scores)
    return Drift(
        images=n, psi=_equal_count_psi(reference.edges, scores),
        high_sensitivity_rate=sum(s >= points.high_sensitivity for s in scores) / n if n else None,
        high_specificity_rate=sum(s >= points.high_specificity for s in scores) / n if n else None,
        reference_high_sensitivity_rate=reference.high_sensitivity_rate,
        reference_high_specificity_rate=reference.high_specificity_rate,
    )


def _equal_count_psi(edges: Sequence[float], values: Sequence[float]) -> float | None:
    bins = len(edges) + 1
    return psi([1 / bins] * bins, bin_counts(values, edges)) if values else None


def _group(reference: Reference, samples: Sequence[Sample], points: OperatingPoints) -> Drift:
    scores = drift(reference.scores, [s.probability for s in samples], points)
    stats = [s.stats for s in samples if s.stats is not None]
    intensity: IntensityReference | None = reference.intensity
    sizes = sorted((st.rows, st.columns) for st in stats)
    return Drift(
        images=scores.images, psi=scores.psi, high_sensitivity_rate=scores.high_sensitivity_rate,
        high_specificity_rate=scores.high_specificity_rate,
        reference_high_sensitivity_rate=scores.reference_high_sensitivity_rate,
        reference_high_specificity_rate=scores.reference_high_specificity_rate,
        intensity_psi=(_equal_count_psi(intensity.edges, [st.mean_intensity for st in stats])
                       if intensity is not None else None),
        median_size=sizes[len(sizes) // 2] if sizes else None,
        bit_depths=tuple(sorted({st.bits_stored for st in stats})),
    )


def _norm(value: str | None) -> str:
    return "".join((value or "").upper().split()) or "(none)"


def watch(reference: Reference, samples: Sequence[Sample], points: OperatingPoints) -> dict[str, Drift]:
    """The drift of every group: ``"all"``, ``"body_part=HAND"``, ``"manufacturer=ACME"``, ...
    (names upper-cased without spaces; ``(none)`` where the header gives none). A group too
    small for a verdict is still listed, with ``enough`` false."""
    groups: dict[str, list[Sample]] = {"all": list(samples)}
    for s in samples:
        groups.setdefault(f"body_part={_norm(s.body_part)}", []).append(s)
        maker = s.stats.manufacturer if s.stats is not None else None
        groups.setdefault(f"manufacturer={_norm(maker)}", []).append(s)
    return {name: _group(reference, members, points) for name, members in groups.items()}


def _deciles(values: Sequence[float]) -> list[float]:
    ordered = sorted(values)
    return [round(ordered[min(len(ordered) - 1, (len(ordered) * k) // 10)], 6) for k in range(1, 10)]


def make_reference(scores: Sequence[float], intensities: Sequence[float], points: OperatingPoints,
                   data: str) -> Reference:
    """The reference of a validation set: the deciles of its probabilities and of its images'
    mean displayed intensities, and the share flagged at each of ``points``."""
    if not scores:
        raise ValueError("no validation scores")
    def rate(threshold: float) -> float:
        return round(sum(s >= threshold for s in scores) / len(scores), 4)

    return Reference(
        scores=ScoreReference(edges=_deciles(scores), images=len(scores), data=data,
                              high_sensitivity_rate=rate(points.high_sensitivity),
                              high_specificity_rate=rate(points.high_specificity)),
        intensity=(IntensityReference(edges=_deciles(intensities), images=len(intensities), data=data)
                   if intensities else None))


def judged(group: str) -> bool:
    """Whether a group's drift is a verdict (warning, ``dicomai_model_drifted``): all images and
    each manufacturer (new equipment). A body part's is shown only: the reference mixes all
    regions, so a body part scores unlike it from the first day (hands higher, legs lower)."""
    return group == "all" or group.startswith("manufacturer=")


def drifted_groups(groups: dict[str, Drift]) -> dict[str, Drift]:
    """The judged groups (:func:`judged`) that have drifted."""
    return {name: d for name, d in groups.items() if judged(name) and d.drifted}
