"""SQL for analysis results and result objects: predictions, SC/SR rows, their outbox rows.

The results stage (:mod:`dicomai.results.publish`) calls these with typed values; the JSON
columns (window, Grad-CAM grid and geometry) are encoded and decoded here only. None of the
functions commits: the caller's transaction is the unit of work.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dicomai.imaging.gradcam import GradcamGrid
from dicomai.imaging.pixels import Letterbox, Window
from dicomai.imaging.stats import ImageStats
from dicomai.model.grading import Grade
from dicomai.model.package import OperatingPoints
from dicomai.store.events import record_event
from dicomai.store.models import (
    Instance,
    OutboxItem,
    OutboxState,
    Prediction,
    ResultObject,
    Series,
    Study,
)

__all__ = ["ImageRef", "ModelStamp", "NewObject", "PlannedSc", "PredictionRecord", "RecordedImage",
           "ScRef", "StudyOutputs", "add_objects", "add_planned_scs", "gather", "latest_image_results",
           "planned_scs", "record_failure", "record_not_analysed", "record_predictions",
           "set_gradcam_path"]

_STAGE = "results"


@dataclass(frozen=True)
class ImageRef:
    """Enough of a received image, from the database, for an SR to reference it."""

    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    spool_path: str


@dataclass(frozen=True)
class RecordedImage:
    """The latest recorded result of one image."""

    ref: ImageRef
    grade: Grade
    probability: float | None
    reason: str | None
    gradcam: GradcamGrid | None = None  # its map's grid, for the region a revised SR repeats
    thresholds: tuple[float, float] | None = None  # (high sensitivity, high specificity) of its grade


@dataclass(frozen=True)
class ScRef:
    sop_instance_uid: str
    series_instance_uid: str


@dataclass
class StudyOutputs:
    """What earlier runs of a study left behind, and the references of this run's images."""

    sc_count: int = 0
    sc_of: dict[int, ScRef] = field(default_factory=dict)  # by source instance id
    earlier: list[RecordedImage] = field(default_factory=list)
    refs: dict[int, ImageRef] = field(default_factory=dict)  # this run's images, by instance id
    previous_sr: tuple[int, str] | None = None  # id and path of the SR to supersede
    gsps_count: int = 0  # presentation states made by earlier runs
    kos_count: int = 0  # key object selections made by earlier runs


@dataclass(frozen=True)
class PlannedSc:
    """An SC whose UID was recorded with the SR but which was not made (an interrupted run)."""

    sop_instance_uid: str
    instance_number: int
    series_instance_uid: str
    source: ImageRef
    grade: Grade | None  # None: no grade recorded; never made up
    probability: float | None
    gradcam: GradcamGrid | None


@dataclass(frozen=True)
class ModelStamp:
    name: str
    version: str
    sha256: str
    high_sensitivity: float
    high_specificity: float


@dataclass(frozen=True)
class PredictionRecord:
    """One image's result as recorded."""

    instance_id: int
    sop_instance_uid: str
    grade: Grade
    probability: float | None
    reason: str | None
    window: Window | None
    gradcam: GradcamGrid | None
    points: OperatingPoints | None = None  # the thresholds of this image's grade, when not the model's
    decode_ms: float | None = None
    normalize_ms: float | None = None
    infer_ms: float | None = None
    stats: ImageStats | None = None


@dataclass(frozen=True)
class NewObject:
    """A result object written to disk, to be recorded (or, when planned, completed)."""

    kind: str  # "sc", "sr", "gsps" or "kos"
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    path: str  # relative to the data directory
    size_bytes: int
    sha256: str
    grade: Grade | None = None
    source_instance_id: int | None = None
    replaces_id: int | None = None


# -- JSON columns ----------------------------------------------------------------------------

def _encode_gradcam(grid: GradcamGrid | None) -> dict[str, Any]:
    if grid is None:
        return {"available": False}
    g = grid.geometry
    return {"available": True, "grid": np.round(grid.grid, 5).tolist(),
            "geometry": {"src": [g.src_h, g.src_w], "dst": [g.dst_h, g.dst_w],
                         "new": [g.new_h, g.new_w], "top": g.top, "left": g.left}}


def _decode_gradcam(value: dict[str, Any] | None) -> GradcamGrid | None:
    if not value or not value.get("available"):
        return None
    g = value["geometry"]
    geometry = Letterbox(g["src"][0], g["src"][1], g["dst"][0], g["dst"][1], g["new"][0], g["new"][1],
                         g["top"], g["left"])
    return GradcamGrid(np.asarray(value["grid"], dtype=np.float32), geometry)


# -- reading ---------------------------------------------------------------------------------

def latest_image_results(study_id: int) -> Any:
    """A subquery: the id of the latest image-level prediction of each instance of the study."""
    return select(func.max(Prediction.id)).where(
        Prediction.study_id == study_id, Prediction.level == "image", Prediction.instance_id.is_not(None),
    ).group_by(Prediction.instance_id)


def _refs(session: Session, where: Any) -> dict[int, ImageRef]:
    rows = session.execute(select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid,
                                  Series.series_instance_uid, Instance.spool_path)
                           .join(Series, Series.id == Instance.series_id).where(where)).all()
    return {r[0]: ImageRef(*r) for r in rows}


def gather(session: Session, study_id: int, this_run: Sequence[int]) -> StudyOutputs:
    """Earlier images with their latest results and SCs, the SC series, the last SR, and the
    references of this run's images. Only reads."""
    scs = session.execute(select(ResultObject.source_instance_id, ResultObject.sop_instance_uid,
                                 ResultObject.series_instance_uid).where(
        ResultObject.study_id == study_id, ResultObject.kind == "sc").order_by(ResultObject.id)).all()
    rows = session.execute(select(Prediction.instance_id, Prediction.grade, Prediction.probability,
                                  Prediction.reason, Prediction.gradcam, Prediction.high_sensitivity,
                                  Prediction.high_specificity)
                           .where(Prediction.id.in_(latest_image_results(study_id)))
                           .order_by(Prediction.instance_id)).all()
    exclude = set(this_run)
    ids = [r[0] for r in rows if r[0] is not None and r[0] not in exclude]
    refs = _refs(session, Instance.id.in_(ids + list(this_run)))
    previous = session.execute(select(ResultObject.id, ResultObject.path).where(
        ResultObject.study_id == study_id, ResultObject.kind == "sr", ResultObject.path.is_not(None),
    ).order_by(ResultObject.id.desc()).limit(1)).first()
    counts: dict[str, int] = {kind: n for kind, n in session.execute(
        select(ResultObject.kind, func.count()).where(ResultObject.study_id == study_id,
                                                      ResultObject.kind.in_(("gsps", "kos")))
        .group_by(ResultObject.kind))}
    return StudyOutputs(
        sc_count=len(scs),
        sc_of={src: ScRef(uid, series) for src, uid, series in scs if src is not None},
        earlier=[RecordedImage(refs[i], Grade(g), p, r, _decode_gradcam(cam),
                               (hs, hp) if hs is not None and hp is not None else None)
                 for i, g, p, r, cam, hs, hp in rows if i is not None and i not in exclude],
        refs={i: refs[i] for i in this_run if i in refs},
        previous_sr=(previous[0], str(previous[1])) if previous else None,
        gsps_count=counts.get("gsps", 0), kos_count=counts.get("kos", 0))


def planned_scs(session: Session, study_id: int) -> list[PlannedSc]:
    """SCs recorded as planned but never made, with what is needed to make them now."""
    rows = session.execute(select(ResultObject.sop_instance_uid, ResultObject.series_instance_uid,
                                  ResultObject.source_instance_id, ResultObject.path, ResultObject.grade)
                           .where(ResultObject.study_id == study_id, ResultObject.kind == "sc")
                           .order_by(ResultObject.id)).all()
    wanted = {src: (uid, n, series, grade) for n, (uid, series, src, path, grade) in enumerate(rows, start=1)
              if path is None and src is not None}
    if not wanted:
        return []
    refs = _refs(session, Instance.id.in_(list(wanted)))
    preds = {i: (p, g) for i, p, g in session.execute(
        select(Prediction.instance_id, Prediction.probability, Prediction.gradcam)
        .where(Prediction.id.in_(latest_image_results(study_id)), Prediction.instance_id.in_(list(wanted)))
    ).all()}
    planned = []
    for src, (uid, n, series, grade) in wanted.items():
        probability, gradcam = preds.get(src, (None, None))
        planned.append(PlannedSc(uid, n, series, refs[src], Grade(grade) if grade else None, probability,
                                 _decode_gradcam(gradcam)))
    return planned


# -- writing ---------------------------------------------------------------------------------

def record_predictions(session: Session, study_id: int, study_uid: str, run: int, model: ModelStamp,
                       images: Sequence[PredictionRecord], grade: Grade, probability: float | None,
                       total_images: int, now: dt.datetime) -> dict[int, int]:
    """Each image's prediction and event, the study's prediction and grade; returns the
    prediction id of each instance id."""
    common: dict[str, Any] = {
        "model_name": model.name, "model_version": model.version, "model_sha256": model.sha256,
        "high_sensitivity": model.high_sensitivity, "high_specificity": model.high_specificity,
        "run": run, "created_at": now}
    rows = []
    for r in images:
        window = ({"center": r.window.center, "width": r.window.width, "source": str(r.window.source)}
                  if r.window is not None else None)
        analysed = r.grade in (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE)
        own = {} if r.points is None else {"high_sensitivity": r.points.high_sensitivity,
                                           "high_specificity": r.points.high_specificity}
        row = Prediction(study_id=study_id, instance_id=r.instance_id, sop_instance_uid=r.sop_instance_uid,
                         level="image", probability=r.probability, grade=r.grade, reason=r.reason,
                         window=window,
                         gradcam=_encode_gradcam(r.gradcam) if analysed else None,
                         decode_ms=r.decode_ms, normalize_ms=r.normalize_ms, infer_ms=r.infer_ms,
                         image_stats=r.stats.as_dict() if analysed and r.stats is not None else None,
                         **{**common, **own})
        session.add(row)
        rows.append(row)
        event = f"image.{r.grade}" if r.grade in (Grade.FAILED, Grade.NOT_ANALYSED) else "image.classified"
        record_event(session, "classify", event,
                     level="error" if r.grade == Grade.FAILED else "info", study_instance_uid=study_uid,
                     sop_instance_uid=r.sop_instance_uid,
                     details={"grade": r.grade, "probability": r.probability},
                     error=r.reason if r.grade == Grade.FAILED else None)
    reason = {Grade.NOT_ANALYSED: "no image in scope", Grade.FAILED: "every image in scope failed"}.get(grade)
    session.add(Prediction(study_id=study_id, level="study", probability=probability, grade=grade,
                           reason=reason, **common))
    study = session.get_one(Study, study_id)
    study.grade, study.probability = grade, probability
    record_event(session, "classify", "study.classified", study_instance_uid=study_uid,
                 details={"grade": grade, "probability": probability, "images": total_images,
                          "model": f"{model.name} {model.version}"})
    session.flush()
    return {r.instance_id: row.id for r, row in zip(images, rows, strict=True)}


def add_planned_scs(session: Session, study_id: int, run: int, planned: dict[int, tuple[str, str, Grade]],
                    shadow: bool, now: dt.datetime) -> None:
    """A row per planned SC (source instance id -> (SOP Instance UID, series, grade)), no path yet."""
    for source_id, (uid, series_uid, grade) in planned.items():
        session.add(ResultObject(
            study_id=study_id, kind="sc", run=run, sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.7", series_instance_uid=series_uid,
            source_instance_id=source_id, grade=grade, shadow=shadow, created_at=now))


def add_objects(session: Session, study_id: int, study_uid: str, run: int, objects: Sequence[NewObject],
                destinations: dict[str, list[str]], shadow: bool, max_age: dt.timedelta,
                now: dt.datetime) -> int:
    """Record made objects (completing planned rows) and queue an outbox row for every
    destination that wants their kind (``destinations``: kind -> names); returns how many."""
    queued = 0
    for m in objects:
        row = session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == m.sop_instance_uid))
        if row is None:
            row = ResultObject(
                study_id=study_id, kind=m.kind, run=run, sop_instance_uid=m.sop_instance_uid,
                sop_class_uid=m.sop_class_uid, series_instance_uid=m.series_instance_uid,
                source_instance_id=m.source_instance_id, replaces_id=m.replaces_id, grade=m.grade,
                shadow=shadow, created_at=now)
            session.add(row)
        row.path, row.size_bytes, row.sha256 = m.path, m.size_bytes, m.sha256
        session.flush()
        targets = [] if shadow else destinations.get(m.kind, [])
        for name in targets:
            session.add(OutboxItem(result_id=row.id, destination=name, state=OutboxState.PENDING,
                                   attempts=0, created_at=now, next_attempt_at=now, expires_at=now + max_age))
        queued += len(targets)
        record_event(session, _STAGE, "result.created", study_instance_uid=study_uid,
                     sop_instance_uid=row.sop_instance_uid,
                     details={"kind": m.kind, "run": row.run, "grade": m.grade, "size_bytes": m.size_bytes,
                              "replaces": m.replaces_id, "destinations": targets, "shadow": shadow})
    return queued


def record_failure(session: Session, study_uid: str, kind: str, sop_instance_uid: str | None,
                   error: str) -> None:
    """An object that could not be made (``sop_instance_uid``: of its source image, if any)."""
    record_event(session, _STAGE, "result.failed", level="error", study_instance_uid=study_uid,
                 sop_instance_uid=sop_instance_uid, details={"kind": kind}, error=error)


def set_gradcam_path(session: Session, prediction_id: int, path: Path | str,
                     gradcam_ms: float | None) -> None:
    session.execute(update(Prediction).where(Prediction.id == prediction_id).values(
        gradcam_path=str(path), gradcam_ms=gradcam_ms))


def record_not_analysed(session: Session, study_id: int, study_uid: str, run: int,
                        instances: Sequence[tuple[int, str]], reason: str, now: dt.datetime) -> None:
    """Every image of the run (instance id, SOP Instance UID) and the study ``not_analysed``."""
    for instance_id, sop_uid in instances:
        session.add(Prediction(study_id=study_id, instance_id=instance_id, sop_instance_uid=sop_uid,
                               level="image", run=run, grade=Grade.NOT_ANALYSED, reason=reason,
                               created_at=now))
    session.add(Prediction(study_id=study_id, level="study", run=run, grade=Grade.NOT_ANALYSED,
                           reason=reason, created_at=now))
    study = session.get_one(Study, study_id)
    study.grade, study.probability = Grade.NOT_ANALYSED, None
    record_event(session, "classify", "study.not_analysed", level="warning", study_instance_uid=study_uid,
                 details={"reason": reason})
