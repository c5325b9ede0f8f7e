"""The classification stage: a stable study in, per-image and per-study results out.

:class:`ClassifyStage` is the :data:`~dicomai.studies.StudyHook` the node runs on stable
studies. Each new instance is read from the spool, checked against the scope rules,
decoded and normalized; all in-scope images of the study go through the model in one batch.
Every image gets a result (a grade, ``not_analysed`` with the reason, or ``failed`` with the
reason); a failed image never stops the others. The study's grade is the highest of all its
analysed images, including those of earlier runs when late images re-opened it.

The result objects are made by :class:`~dicomai.results.publish.Publisher`: the study's Structured
Report is recorded in the same transaction as the predictions (with its outbox items), and
``on_queued`` wakes the sender at once; the Secondary Captures, which need the full-size
heat maps drawn, follow in a second transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.analysis.scope import out_of_scope
from dicomai.config import Settings
from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.imaging.pixels import FloatImage, Letterbox, NormalizeError, decode, resize, to_display
from dicomai.model.classifier import Classifier, ModelInput, preprocess
from dicomai.model.grading import Grade, grade_image, grade_study
from dicomai.model.package import ModelPackage, OperatingPoints
from dicomai.results.publish import Failure, Made, Plan, Publisher, RunImage
from dicomai.store import Instance, InstanceState, Prediction, Study, record_event
from dicomai.store.models import utcnow
from dicomai.studies import StudyWork, WorkInstance

__all__ = ["ClassifyStage", "ImageResult", "NoModelStage", "operating_points"]

log = structlog.get_logger("dicomai.analysis.stage")
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
    source: Dataset | None = None  # the received data set, when it could be read
    display: FloatImage | None = None  # kept for the Secondary Capture
    cam: FloatImage | None = None  # Grad-CAM map on the original geometry
    prediction_id: int | None = None


@dataclass
class _Candidate:
    result: ImageResult
    model_input: ModelInput
    grid: NDArray[np.float32] | None = None  # the model's Grad-CAM grid


class ClassifyStage:
    """Classify the new images of a stable study, record the results, publish the objects.

    Two steps, so that the triage flag reaches the PACS first: (1) decode, normalize and
    classify, then record the predictions together with the study's SR and queue it; (2) draw
    the full-size Grad-CAM maps, keep them, make the Secondary Captures and queue those.
    """

    #: Longer side of the Grad-CAM map kept on disk (the grid itself is in the database).
    MAP_SIDE = 512

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], package: ModelPackage,
                 classifier: Classifier, on_queued: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.package = package
        self.classifier = classifier
        self.points = operating_points(settings, package)
        self.results_dir = settings.data_dir / "results"
        self.publisher = Publisher(settings, package.manifest, self.points)
        self.on_queued = on_queued

    def __call__(self, work: StudyWork) -> None:
        started = time.perf_counter()
        self._finish_planned(work)
        if not work.instances:  # re-queued after a restart with nothing new: done
            return
        results, candidates = self._prepare(work)
        self._infer(candidates)
        this_run = {r.instance.instance_id for r in results}
        with self.sessions() as s:  # short: on SQLite a transaction holds the write lock
            grade, prob, images = self._study_grade(s, work, results)
            earlier = self.publisher.gather(s, work.study_id, this_run)
            s.rollback()
        run_images = self._run_images(results)
        plan = self.publisher.plan(run_images, earlier)
        report, failures = self.publisher.make_report(work.study_instance_uid, run_images, plan, earlier,
                                                      grade, prob)
        queued = self._record(work, results, grade, prob, images, report, failures, plan, run_images)
        self._kick(queued)
        flagged_s = time.perf_counter() - started
        made = self._maps_and_captures(work, results, candidates, plan)
        grades = [r.grade for r in results]
        log.info("study.classified", study_uid=work.study_instance_uid, images=len(results),
                 positive=grades.count(Grade.POSITIVE), doubtful=grades.count(Grade.DOUBTFUL),
                 failed=grades.count(Grade.FAILED), not_analysed=grades.count(Grade.NOT_ANALYSED),
                 grade=grade, objects=len(report) + made, flagged_s=round(flagged_s, 3),
                 seconds=round(time.perf_counter() - started, 3))

    def _kick(self, queued: int) -> None:
        if queued and self.on_queued is not None:
            self.on_queued()

    @staticmethod
    def _run_images(results: list[ImageResult]) -> list[RunImage]:
        return [RunImage(r.instance.instance_id, r.source, r.grade, r.probability, r.reason,
                         r.display, r.cam) for r in results if r.source is not None]

    @staticmethod
    def _study_grade(s: Session, work: StudyWork, results: list[ImageResult],
                     ) -> tuple[Grade, float | None, int]:
        """The study's result over every image ever classified, this run's included."""
        this_run = {r.instance.instance_id for r in results}
        latest = select(func.max(Prediction.id)).where(
            Prediction.study_id == work.study_id, Prediction.level == "image",
        ).group_by(Prediction.instance_id)
        earlier = [(Grade(g), p) for i, g, p in s.execute(
            select(Prediction.instance_id, Prediction.grade, Prediction.probability).where(
                Prediction.id.in_(latest))).all() if i not in this_run]
        items = earlier + [(r.grade, r.probability) for r in results]
        grade, prob = grade_study(items)
        return grade, prob, len(items)

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
            result.source = ds
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
            result.display = shown.image
            candidates.append(_Candidate(result, model_input))
        return results, candidates

    def _infer(self, candidates: list[_Candidate]) -> None:
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
            c.grid = out.gradcam
            g = c.model_input.geometry
            r.gradcam = {"available": True, "grid": np.round(out.gradcam, 5).tolist(),
                         "geometry": {"src": [g.src_h, g.src_w], "dst": [g.dst_h, g.dst_w],
                                      "new": [g.new_h, g.new_w], "top": g.top, "left": g.left}}

    def _maps_and_captures(self, work: StudyWork, results: list[ImageResult], candidates: list[_Candidate],
                           plan: Plan) -> int:
        """Step 2: full-size maps (kept, reduced), SCs made and queued. Returns how many SCs."""
        try:
            for c in candidates:
                if c.grid is None:
                    continue
                t1 = time.perf_counter()
                c.result.cam = gradcam_on_image(c.grid, c.model_input.geometry)
                c.result.gradcam_path = self._save_map(work.study_instance_uid,
                                                       c.result.instance.sop_instance_uid, c.result.cam)
                c.result.timings["gradcam_ms"] = (time.perf_counter() - t1) * 1e3
            made, failures = self.publisher.make_secondary_captures(
                work.study_instance_uid, self._run_images(results), plan)
            with self.sessions.begin() as s:
                for r in results:
                    if r.prediction_id is not None and r.gradcam_path is not None:
                        s.execute(update(Prediction).where(Prediction.id == r.prediction_id).values(
                            gradcam_path=r.gradcam_path, gradcam_ms=r.timings.get("gradcam_ms")))
                queued = self.publisher.record(s, work.study_id, work.study_instance_uid, work.reopen_count,
                                               made, failures)
            self._kick(queued)
            return len(made)
        except Exception as exc:  # the predictions and the SR are recorded already: report, go on
            log.exception("result.sc_failed", study_uid=work.study_instance_uid)
            with self.sessions.begin() as s:
                record_event(s, "results", "result.failed", level="error",
                             study_instance_uid=work.study_instance_uid, details={"kind": "sc"},
                             error=repr(exc))
            return 0

    def _finish_planned(self, work: StudyWork) -> None:
        """Make the SCs an interrupted run planned (and its SR references) but did not make.

        The heat map is drawn again from the grid kept in the prediction row; the radiograph
        is read from the spool again.
        """
        with self.sessions() as s:
            plan, grades = self.publisher.planned(s, work.study_id)
            if not plan.sc:
                s.rollback()
                return
            latest = select(func.max(Prediction.id)).where(
                Prediction.instance_id.in_(list(plan.sc))).group_by(Prediction.instance_id)
            rows = s.execute(select(Prediction.instance_id, Prediction.probability, Prediction.gradcam,
                                    Instance.spool_path).join(Instance, Instance.id == Prediction.instance_id)
                             .where(Prediction.id.in_(latest))).all()
            s.rollback()
        images: list[RunImage] = []
        for inst_id, prob, gradcam, spool_path in rows:
            try:
                ds = dcmread(self.settings.data_dir / spool_path)
                display = to_display(ds, decode(ds)).image
            except Exception as exc:  # noqa: BLE001 -- reported below as a failed SC
                log.warning("result.resume_unreadable", study_uid=work.study_instance_uid, error=repr(exc))
                continue
            cam = None
            if gradcam and gradcam.get("available"):
                g = gradcam["geometry"]
                geom = Letterbox(g["src"][0], g["src"][1], g["dst"][0], g["dst"][1], g["new"][0],
                                 g["new"][1], g["top"], g["left"])
                cam = gradcam_on_image(np.asarray(gradcam["grid"], dtype=np.float32), geom)
            images.append(RunImage(inst_id, ds, Grade(grades.get(inst_id) or Grade.NEGATIVE), prob,
                                   display=display, cam=cam))
        made, failures = self.publisher.make_secondary_captures(work.study_instance_uid, images, plan)
        with self.sessions.begin() as s:
            queued = self.publisher.record(s, work.study_id, work.study_instance_uid, work.reopen_count,
                                           made, failures)
            record_event(s, "results", "result.resumed", study_instance_uid=work.study_instance_uid,
                         details={"planned": len(plan.sc), "made": len(made)})
        log.info("results.resumed", study_uid=work.study_instance_uid, planned=len(plan.sc), made=len(made))
        self._kick(queued)

    def _save_map(self, study_uid: str, sop_uid: str, cam: np.ndarray) -> str:
        h, w = cam.shape
        scale = min(1.0, self.MAP_SIDE / max(h, w))
        small = resize(cam, max(1, round(h * scale)), max(1, round(w * scale)))
        folder = self.results_dir / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sop_uid}.gradcam.npz"
        np.savez(path, gradcam=small.astype(np.float16), image_shape=np.array([h, w]))
        return str(path.relative_to(self.settings.data_dir))

    def _record(self, work: StudyWork, results: list[ImageResult], grade: Grade, prob: float | None,
                images: int, made: list[Made], failures: list[Failure], plan: Plan,
                run_images: list[RunImage]) -> int:
        """Step 1's transaction: predictions, study result, SR and planned SCs, and the
        instances marked processed, so that a restart never classifies them a second time."""
        m = self.package.manifest
        now = utcnow()
        common = {"model_name": m.name, "model_version": m.version, "model_sha256": m.sha256,
                  "high_sensitivity": self.points.high_sensitivity,
                  "high_specificity": self.points.high_specificity, "run": work.reopen_count,
                  "created_at": now}
        with self.sessions.begin() as s:
            rows = []
            for r in results:
                row = Prediction(study_id=work.study_id, instance_id=r.instance.instance_id,
                                 sop_instance_uid=r.instance.sop_instance_uid, level="image",
                                 probability=r.probability, grade=r.grade, reason=r.reason,
                                 window=r.window, gradcam=r.gradcam, **r.timings, **common)
                s.add(row)
                rows.append(row)
                record_event(s, _STAGE, f"image.{r.grade}" if r.grade in (Grade.FAILED, Grade.NOT_ANALYSED)
                             else "image.classified",
                             level="error" if r.grade == Grade.FAILED else "info",
                             study_instance_uid=work.study_instance_uid,
                             sop_instance_uid=r.instance.sop_instance_uid,
                             details={"grade": r.grade, "probability": r.probability},
                             error=r.reason if r.grade == Grade.FAILED else None)
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
                         details={"grade": grade, "probability": prob, "images": images,
                                  "model": f"{m.name} {m.version}"})
            queued = self.publisher.record(s, work.study_id, work.study_instance_uid, work.reopen_count, made,
                                           failures)
            self.publisher.record_plan(s, work.study_id, work.reopen_count, plan, run_images)
            s.execute(update(Instance).where(Instance.id.in_([i.instance_id for i in work.instances]))
                      .values(state=InstanceState.PROCESSED))
            s.flush()
            for r, row in zip(results, rows, strict=True):
                r.prediction_id = row.id
            return queued


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
