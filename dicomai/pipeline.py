"""The classification stage: a stable study in, per-image and per-study results out.

:class:`ClassifyStage` is the :data:`~dicomai.studies.StudyHook` the node runs on stable
studies. Each new instance is read from the spool, checked against the scope rules,
decoded and normalized; all in-scope images of the study go through the model in one batch.
Every image gets a result (a grade, ``not_analysed`` with the reason, or ``failed`` with the
reason); a failed image never stops the others. The study's grade is the highest of all its
analysed images, including those of earlier runs when late images re-opened it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Prediction, Study, record_event
from dicomai.audit.models import utcnow
from dicomai.config import Settings
from dicomai.explain import gradcam_on_image
from dicomai.grade import Grade, grade_image, grade_study
from dicomai.infer import Classifier, ModelInput, preprocess
from dicomai.model import ModelPackage, OperatingPoints
from dicomai.normalize import NormalizeError, decode, to_display
from dicomai.scope import out_of_scope
from dicomai.studies import StudyWork, WorkInstance

__all__ = ["ClassifyStage", "ImageResult", "NoModelStage", "operating_points"]

log = structlog.get_logger("dicomai.pipeline")
_STAGE = "classify"


def operating_points(settings: Settings, package: ModelPackage) -> OperatingPoints:
    """The manifest's thresholds, with the configuration's overrides applied."""
    base = package.manifest.operating_points
    return OperatingPoints(
        high_sensitivity=(settings.model.high_sensitivity
                          if settings.model.high_sensitivity is not None else base.high_sensitivity),
        high_specificity=(settings.model.high_specificity
                          if settings.model.high_specificity is not None else base.high_specificity),
    )


@dataclass
class ImageResult:
    instance: WorkInstance
    grade: Grade
    probability: float | None = None
    reason: str | None = None
    window: dict[str, Any] | None = None
    gradcam: dict[str, Any] | None = None
    gradcam_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Candidate:
    result: ImageResult
    model_input: ModelInput


class ClassifyStage:
    """Classify the new images of a stable study and record the results."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], package: ModelPackage,
                 classifier: Classifier) -> None:
        self.settings = settings
        self.sessions = sessions
        self.package = package
        self.classifier = classifier
        self.points = operating_points(settings, package)
        self.results_dir = settings.data_dir / "results"

    def __call__(self, work: StudyWork) -> None:
        started = time.perf_counter()
        results, candidates = self._prepare(work)
        self._infer(work, candidates)
        self._record(work, results)
        grades = [r.grade for r in results]
        log.info("study.classified", study_uid=work.study_instance_uid, images=len(results),
                 positive=grades.count(Grade.POSITIVE), doubtful=grades.count(Grade.DOUBTFUL),
                 failed=grades.count(Grade.FAILED), not_analysed=grades.count(Grade.NOT_ANALYSED),
                 seconds=round(time.perf_counter() - started, 3))

    def _prepare(self, work: StudyWork) -> tuple[list[ImageResult], list[_Candidate]]:
        results: list[ImageResult] = []
        candidates: list[_Candidate] = []
        body_parts = self.package.manifest.body_parts
        for inst in work.instances:
            result = ImageResult(inst, Grade.FAILED)
            results.append(result)
            t0 = time.perf_counter()
            try:
                ds = dcmread(inst.path)
            except Exception as exc:  # a spool file that no longer parses: report, go on
                result.reason = f"cannot read the stored file: {exc}"
                continue
            reason = out_of_scope(ds, self.settings.scope, body_parts)
            if reason is not None:
                result.grade, result.reason = Grade.NOT_ANALYSED, reason
                continue
            try:
                stored = decode(ds)
                t1 = time.perf_counter()
                shown = to_display(ds, stored)
                model_input = preprocess(shown.image, self.package)
                t2 = time.perf_counter()
            except NormalizeError as exc:
                result.reason = str(exc)
                continue
            result.window = {"center": shown.window.center, "width": shown.window.width,
                             "source": str(shown.window.source)}
            result.timings = {"decode_ms": (t1 - t0) * 1e3, "normalize_ms": (t2 - t1) * 1e3}
            candidates.append(_Candidate(result, model_input))
        return results, candidates

    def _infer(self, work: StudyWork, candidates: list[_Candidate]) -> None:
        if not candidates:
            return
        t0 = time.perf_counter()
        try:
            outputs = self.classifier.predict([c.model_input for c in candidates])
        except Exception as exc:  # the model itself failed: every candidate is failed
            for c in candidates:
                c.result.reason = f"inference failed: {exc}"
            return
        per_image = (time.perf_counter() - t0) * 1e3 / len(candidates)
        for c, out in zip(candidates, outputs, strict=True):
            r = c.result
            r.probability = out.probability
            r.grade = grade_image(out.probability, self.points)
            r.timings["infer_ms"] = per_image
            if out.gradcam is None:
                r.gradcam = {"available": False}
                continue
            t1 = time.perf_counter()
            cam = gradcam_on_image(out.gradcam, c.model_input.geometry)
            r.gradcam_path = self._save_map(work.study_instance_uid, r.instance.sop_instance_uid, cam)
            r.timings["gradcam_ms"] = (time.perf_counter() - t1) * 1e3
            g = c.model_input.geometry
            r.gradcam = {"available": True, "grid": np.round(out.gradcam, 5).tolist(),
                         "geometry": {"src": [g.src_h, g.src_w], "dst": [g.dst_h, g.dst_w],
                                      "new": [g.new_h, g.new_w], "top": g.top, "left": g.left}}

    def _save_map(self, study_uid: str, sop_uid: str, cam: np.ndarray) -> str:
        folder = self.results_dir / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sop_uid}.gradcam.npz"
        np.savez_compressed(path, gradcam=cam.astype(np.float16))
        return str(path.relative_to(self.settings.data_dir))

    def _record(self, work: StudyWork, results: list[ImageResult]) -> None:
        m = self.package.manifest
        now = utcnow()
        common = {"model_name": m.name, "model_version": m.version, "model_sha256": m.sha256,
                  "high_sensitivity": self.points.high_sensitivity,
                  "high_specificity": self.points.high_specificity, "run": work.reopen_count,
                  "created_at": now}
        with self.sessions.begin() as s:
            for r in results:
                s.add(Prediction(study_id=work.study_id, instance_id=r.instance.instance_id,
                                 sop_instance_uid=r.instance.sop_instance_uid, level="image",
                                 probability=r.probability, grade=r.grade, reason=r.reason,
                                 window=r.window, gradcam=r.gradcam, gradcam_path=r.gradcam_path,
                                 **r.timings, **common))
                record_event(s, _STAGE, f"image.{r.grade}" if r.grade in (Grade.FAILED, Grade.NOT_ANALYSED)
                             else "image.classified",
                             level="error" if r.grade == Grade.FAILED else "info",
                             study_instance_uid=work.study_instance_uid,
                             sop_instance_uid=r.instance.sop_instance_uid,
                             details={"grade": r.grade, "probability": r.probability},
                             error=r.reason if r.grade == Grade.FAILED else None)
            s.flush()
            # The study's result covers every image ever classified, not only this run's.
            latest = select(func.max(Prediction.id)).where(
                Prediction.study_id == work.study_id, Prediction.level == "image",
            ).group_by(Prediction.instance_id)
            rows = s.execute(select(Prediction.grade, Prediction.probability).where(
                Prediction.id.in_(latest))).all()
            grade, prob = grade_study((Grade(g), p) for g, p in rows)
            reason = None
            if grade == Grade.NOT_ANALYSED:
                reason = "no image in scope"
            elif grade == Grade.FAILED:
                reason = "every image in scope failed"
            s.add(Prediction(study_id=work.study_id, level="study", probability=prob, grade=grade,
                             reason=reason, **common))
            study = s.get_one(Study, work.study_id)
            study.grade, study.probability = grade, prob
            record_event(s, _STAGE, "study.classified", study_instance_uid=work.study_instance_uid,
                         details={"grade": grade, "probability": prob, "images": len(rows),
                                  "model": f"{m.name} {m.version}"})


class NoModelStage:
    """Used when no model is installed: records every image as not analysed, says why."""

    def __init__(self, sessions: sessionmaker[Session], reason: str) -> None:
        self.sessions = sessions
        self.reason = reason

    def __call__(self, work: StudyWork) -> None:
        with self.sessions.begin() as s:
            for inst in work.instances:
                s.add(Prediction(study_id=work.study_id, instance_id=inst.instance_id,
                                 sop_instance_uid=inst.sop_instance_uid, level="image",
                                 run=work.reopen_count, grade=Grade.NOT_ANALYSED, reason=self.reason,
                                 created_at=utcnow()))
            s.add(Prediction(study_id=work.study_id, level="study", run=work.reopen_count,
                             grade=Grade.NOT_ANALYSED, reason=self.reason, created_at=utcnow()))
            study = s.get_one(Study, work.study_id)
            study.grade, study.probability = Grade.NOT_ANALYSED, None
            record_event(s, _STAGE, "study.not_analysed", level="warning",
                         study_instance_uid=work.study_instance_uid, details={"reason": self.reason})
