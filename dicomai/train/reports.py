"""Typed views of the training reports the commands print.

The training functions return (and write) their reports as JSON-shaped dicts; these views
pick out the figures a command shows, so that no caller indexes nested dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EnsembleMember", "EnsembleSummary", "Evaluation", "FitSummary", "SplitFigures"]


@dataclass(frozen=True)
class SplitFigures:
    """One split's figures from :func:`dicomai.train.evaluate.evaluate_package`."""

    auroc: float
    pointing_game: float | None
    auroc_ci95: tuple[float, float] | None

    @classmethod
    def of(cls, split: Mapping[str, Any]) -> SplitFigures:
        ci = split.get("auroc_ci95")
        return cls(float(split["auroc"]), split.get("pointing_game"),
                   None if ci is None else (float(ci[0]), float(ci[1])))


@dataclass(frozen=True)
class Evaluation:
    """A package's evaluation: validation and test figures and the chosen thresholds."""

    val: SplitFigures
    test: SplitFigures
    operating_points: dict[str, float]

    @classmethod
    def of(cls, evaluation: Mapping[str, Any]) -> Evaluation:
        return cls(SplitFigures.of(evaluation["val"]), SplitFigures.of(evaluation["test"]),
                   dict(evaluation["operating_points"]))


@dataclass(frozen=True)
class FitSummary:
    """The best epoch of a run of :func:`dicomai.train.fit.fit`."""

    best_val_auroc: float
    best_epoch: int
    seconds: float

    @classmethod
    def of(cls, summary: Mapping[str, Any]) -> FitSummary:
        return cls(float(summary["best_val_auroc"]), int(summary["best_epoch"]), float(summary["seconds"]))


@dataclass(frozen=True)
class EnsembleMember:
    """One run of an ensemble and its own validation AUROC."""

    run: str
    backbone: str
    val_auroc: float


@dataclass(frozen=True)
class EnsembleSummary:
    """What :func:`dicomai.train.ensemble.make_ensemble` scored."""

    members: list[EnsembleMember]
    best_val_auroc: float
    val_images: int

    @classmethod
    def of(cls, summary: Mapping[str, Any]) -> EnsembleSummary:
        members = [EnsembleMember(str(m["run"]), str(m["config"]["backbone"]), float(m["val_auroc"]))
                   for m in summary["members"]]
        return cls(members, float(summary["best_val_auroc"]), int(summary["val_images"]))
