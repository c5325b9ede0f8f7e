"""A stable study's new instances in, one :class:`StudyAnalysis` out.

Reads each new instance from the spool as the analysis reaches it and analyses them in turn
(:class:`~dicomai.analysis.image.Analyser`), so that one image's pixel data at a time is in
memory. Nothing is recorded or written here: the results stage records the analysis and
makes the objects from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dicomai.analysis.image import Analyser, ImageAnalysis
from dicomai.model.grading import Grade
from dicomai.model.package import Manifest, OperatingPoints
from dicomai.studies import StudyWork, WorkInstance

__all__ = ["AnalysedImage", "StudyAnalysis", "StudyAnalyser"]


@dataclass(frozen=True)
class AnalysedImage:
    instance: WorkInstance
    analysis: ImageAnalysis


@dataclass(frozen=True)
class StudyAnalysis:
    """This run's analysis of a study: one entry per new instance, in instance order."""

    work: StudyWork
    images: tuple[AnalysedImage, ...]
    manifest: Manifest
    points: OperatingPoints
    seconds: float

    def count(self, grade: Grade) -> int:
        return sum(1 for i in self.images if i.analysis.grade == grade)


class StudyAnalyser:
    """The analysis stage of the node."""

    def __init__(self, analyser: Analyser) -> None:
        self.analyser = analyser

    def __call__(self, work: StudyWork) -> StudyAnalysis:
        started = time.perf_counter()
        results = self.analyser.analyse(self.analyser.read(i.path) for i in work.instances)
        return StudyAnalysis(
            work=work,
            images=tuple(AnalysedImage(i, r) for i, r in zip(work.instances, results, strict=True)),
            manifest=self.analyser.package.manifest, points=self.analyser.points,
            seconds=time.perf_counter() - started)
