"""Grades from probabilities: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from dicomai.model.package import OperatingPoints

__all__ = ["Grade", "grade_image", "grade_label", "grade_study"]


class Grade(StrEnum):
    POSITIVE = "positive"  # >= high-specificity threshold
    DOUBTFUL = "doubtful"  # >= high-sensitivity threshold
    NEGATIVE = "negative"
    NOT_ANALYSED = "not_analysed"  # nothing in scope
    FAILED = "failed"  # decoding or inference failed


#: What each grade says about the finding, in the words of the SR's coded values (SNOMED CT
#: present / indeterminate / absent), so a viewer's text and the report agree.
_FINDING = {Grade.POSITIVE: "fracture present", Grade.DOUBTFUL: "indeterminate",
            Grade.NEGATIVE: "fracture absent"}


def grade_label(grade: Grade) -> str:
    """The grade as result objects print it: ``DOUBTFUL (indeterminate)``, ``NOT ANALYSED``."""
    word = grade.upper().replace("_", " ")
    return f"{word} ({_FINDING[grade]})" if grade in _FINDING else word


_RANK = {Grade.FAILED: 0, Grade.NOT_ANALYSED: 1, Grade.NEGATIVE: 2, Grade.DOUBTFUL: 3, Grade.POSITIVE: 4}


def grade_image(probability: float, points: OperatingPoints) -> Grade:
    """Grade one analysed image."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    if probability >= points.high_specificity:
        return Grade.POSITIVE
    if probability >= points.high_sensitivity:
        return Grade.DOUBTFUL
    return Grade.NEGATIVE


def grade_study(images: Iterable[tuple[Grade, float | None]]) -> tuple[Grade, float | None]:
    """The study's grade and probability: the highest analysed image's.

    Failed images do not hide the others; a study with only failed images is failed, one
    with nothing analysed (and nothing failed) is not_analysed.
    """
    items = list(images)
    analysed = [(g, p) for g, p in items if g in (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE)]
    if analysed:
        best = max(analysed, key=lambda gp: (_RANK[gp[0]], gp[1] or 0.0))
        return best[0], max(p for _, p in analysed if p is not None)
    if any(g == Grade.FAILED for g, _ in items):
        return Grade.FAILED, None
    return Grade.NOT_ANALYSED, None
