"""Radiologists' final reads of studies, and the studies they make a labelled sample of.

Every function takes the caller's session and does not commit: a read and its audit event
commit together.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, case, exists, func, select
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from dicomai.errors import DicomaiError
from dicomai.model.calibration import Confusion, confusion
from dicomai.model.grading import Grade
from dicomai.store.events import record_event
from dicomai.store.models import Feedback, FeedbackRead, Instance, Prediction, Series, Study, utcnow

__all__ = [
    "FLAGGED",
    "ReviewedStudy",
    "StudyScore",
    "UnknownStudyError",
    "graded_by",
    "performance",
    "record_calibration",
    "record_feedback",
    "reviewed_studies",
    "study_reads",
    "study_scores",
]

#: Grades of a study the model analysed (the others have no probability to judge).
ANALYSED = (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE)


class UnknownStudyError(DicomaiError):
    """The audit database has no study with this Study Instance UID."""

    exit_code = 1

    def __init__(self, study_instance_uid: str) -> None:
        super().__init__(f"no study {study_instance_uid} in the audit database")
        self.study_instance_uid = study_instance_uid


@dataclass(frozen=True)
class ReviewedStudy:
    """A study the model graded, with its latest final read."""

    study_instance_uid: str
    grade: Grade
    probability: float | None
    body_part: str | None
    read: FeedbackRead
    model_sha256: str | None  # of the model that gave the grade (its latest analysis)

    @property
    def fractured(self) -> bool:
        """The truth for fracture triage: another finding counts as no fracture."""
        return self.read == FeedbackRead.FRACTURE


def _study(session: Session, study_instance_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise UnknownStudyError(study_instance_uid)
    return study


def record_feedback(session: Session, study_instance_uid: str, read: FeedbackRead, by: str,
                    note: str | None = None) -> Feedback:
    """Store a final read of a known study and its audit event; a later read supersedes it."""
    study = _study(session, study_instance_uid)
    row = Feedback(study_id=study.id, read=str(read), read_by=by, note=note, recorded_at=utcnow())
    session.add(row)
    # The note stays in the feedback table: free text may name the patient.
    record_event(session, "feedback", "feedback.recorded", study_instance_uid=study_instance_uid,
                 details={"read": str(read), "by": by, "model_grade": study.grade})
    return row


def _scored_image() -> Select[Any]:
    """For a query on Study: the analysed image its score came from (the highest probability
    among each instance's latest result), joined to its series."""
    later = aliased(Prediction)
    superseded = exists().where(later.instance_id == Prediction.instance_id, later.level == "image",
                                later.id > Prediction.id)
    return (select(Prediction).join(Instance, Instance.id == Prediction.instance_id)
            .join(Series, Series.id == Instance.series_id)
            .where(Prediction.study_id == Study.id, Prediction.level == "image",
                   Prediction.grade.in_([str(g) for g in ANALYSED]), ~superseded)
            .order_by(Prediction.probability.desc(), Prediction.id.desc()).limit(1).correlate(Study))


def _body_part() -> ColumnElement[str | None]:
    """A study's Body Part Examined, for a query on Study: that of the image its score came
    from (:func:`_scored_image`; none when its series names none), else, for a study without
    image results, its first series naming one."""
    scored = _scored_image()
    first = (select(Series.body_part).where(Series.study_id == Study.id, Series.body_part.is_not(None))
             .order_by(Series.id).limit(1).correlate(Study).scalar_subquery())
    return case((scored.exists(), scored.with_only_columns(Series.body_part).scalar_subquery()), else_=first)


def _grading_model() -> ColumnElement[str | None]:
    """The sha256 of the model behind a study's score: that of the image it came from, else the
    latest study-level result's."""
    study_level = (select(Prediction.model_sha256)
                   .where(Prediction.study_id == Study.id, Prediction.level == "study")
                   .order_by(Prediction.run.desc(), Prediction.id.desc()).limit(1)
                   .correlate(Study).scalar_subquery())
    return func.coalesce(_scored_image().with_only_columns(Prediction.model_sha256).scalar_subquery(),
                         study_level)


def reviewed_studies(session: Session, since: dt.datetime | None = None) -> list[ReviewedStudy]:
    """Studies graded by the model and read by a radiologist, received at or after ``since``."""
    latest = (select(Feedback.study_id, func.max(Feedback.id).label("fid"))
              .group_by(Feedback.study_id).subquery())
    q = (select(Study, Feedback.read, _body_part(), _grading_model())
         .join(latest, latest.c.study_id == Study.id)
         .join(Feedback, Feedback.id == latest.c.fid)
         .where(Study.grade.in_([str(g) for g in ANALYSED]))
         .order_by(Study.id))
    if since is not None:
        q = q.where(Study.first_received_at >= since)
    # str(): the query keeps graded studies only, whose grade is never null
    return [ReviewedStudy(study.study_instance_uid, Grade(str(study.grade)), study.probability,
                          body_part, FeedbackRead(read), sha)
            for study, read, body_part, sha in session.execute(q).all()]


def graded_by(studies: Sequence[ReviewedStudy], model_sha256: str) -> tuple[list[ReviewedStudy], int]:
    """The studies graded by this model, and how many others were left out: another model's
    grades (before an upgrade) say nothing of the model in use."""
    kept = [r for r in studies if r.model_sha256 == model_sha256]
    return kept, len(studies) - len(kept)


#: The grades a study is flagged with at each operating point: ``doubtful`` and ``positive``
#: are at or above the high-sensitivity threshold, ``positive`` above the high-specificity one.
FLAGGED: dict[str, tuple[Grade, ...]] = {
    "high_sensitivity": (Grade.DOUBTFUL, Grade.POSITIVE),
    "high_specificity": (Grade.POSITIVE,),
}


def performance(studies: Sequence[ReviewedStudy]) -> dict[str, Confusion]:
    """The node's grades against the final reads, at each operating point (:data:`FLAGGED`)."""
    truth = [r.fractured for r in studies]
    return {point: confusion([r.grade in grades for r in studies], truth)
            for point, grades in FLAGGED.items()}


def study_reads(session: Session, study_id: int) -> list[Feedback]:
    """The final reads recorded for a study, latest first (the first is the one in force)."""
    return list(session.scalars(select(Feedback).where(Feedback.study_id == study_id)
                                .order_by(Feedback.id.desc())))


@dataclass(frozen=True)
class StudyScore:
    """A graded study's recorded probability, body part and grading model."""

    probability: float | None
    body_part: str | None
    model_sha256: str | None


def study_scores(session: Session, study_instance_uids: Sequence[str]) -> dict[str, StudyScore]:
    """The recorded score of each study graded by the model, by UID."""
    q = (select(Study.study_instance_uid, Study.probability, _body_part(), _grading_model())
         .where(Study.study_instance_uid.in_(list(study_instance_uids)),
                Study.grade.in_([str(g) for g in ANALYSED])))
    return {uid: StudyScore(p, bp, sha) for uid, p, bp, sha in session.execute(q).all()}


def record_calibration(session: Session, by: str, details: dict[str, Any]) -> None:
    """Audit a new site profile: who, on how many cases, with which thresholds."""
    record_event(session, "calibrate", "site.calibrated", details={"by": by, **details})
