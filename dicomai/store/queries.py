"""Read-only queries of the audit database for the admin commands.

Each function takes an open session and returns ORM rows grouped in small frozen
dataclasses; the rows' columns are loaded, so they stay readable after the session closes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomai.store.models import Event, Instance, OutboxItem, Prediction, ResultObject, Series, Study

__all__ = [
    "OutboxListing",
    "StudyListing",
    "StudyRecord",
    "list_outbox",
    "list_studies",
    "study_record",
]


@dataclass(frozen=True)
class StudyListing:
    """A study and the number of instances received for it."""

    study: Study
    instances: int


@dataclass(frozen=True)
class StudyRecord:
    """Everything the audit database holds about one study, each list in insertion order."""

    study: Study
    instances: Sequence[tuple[Instance, Series]]
    predictions: Sequence[Prediction]
    results: Sequence[ResultObject]
    deliveries: Sequence[OutboxItem]
    events: Sequence[Event]


@dataclass(frozen=True)
class OutboxListing:
    """An outbox row with the result object it delivers and that object's study."""

    item: OutboxItem
    result: ResultObject
    study_instance_uid: str


def list_studies(session: Session, *, since: dt.datetime | None = None, state: str | None = None,
                 grade: str | None = None, limit: int = 100) -> list[StudyListing]:
    """Studies, newest first; ``since`` compares with the last instance's arrival."""
    count = (select(func.count(Instance.id)).where(Instance.study_id == Study.id)
             .correlate(Study).scalar_subquery())
    q = select(Study, count.label("n")).order_by(Study.first_received_at.desc()).limit(limit)
    if since is not None:
        q = q.where(Study.last_received_at >= since)
    if state:
        q = q.where(Study.state == state)
    if grade:
        q = q.where(Study.grade == grade)
    return [StudyListing(study, n) for study, n in session.execute(q).all()]


def study_record(session: Session, study_instance_uid: str) -> StudyRecord | None:
    """The study with its instances, predictions, result objects, deliveries and events."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        return None
    instances = session.execute(select(Instance, Series).join(Series, Instance.series_id == Series.id)
                                .where(Instance.study_id == study.id).order_by(Instance.id)).all()
    return StudyRecord(
        study=study,
        instances=[(i, se) for i, se in instances],
        predictions=session.scalars(select(Prediction).where(Prediction.study_id == study.id)
                                    .order_by(Prediction.id)).all(),
        results=session.scalars(select(ResultObject).where(ResultObject.study_id == study.id)
                                .order_by(ResultObject.id)).all(),
        deliveries=session.scalars(select(OutboxItem)
                                   .join(ResultObject, ResultObject.id == OutboxItem.result_id)
                                   .where(ResultObject.study_id == study.id).order_by(OutboxItem.id)).all(),
        events=session.scalars(select(Event).where(Event.study_instance_uid == study.study_instance_uid)
                               .order_by(Event.id)).all(),
    )


def list_outbox(session: Session, *, state: str | None = None, destination: str | None = None,
                study_instance_uid: str | None = None, limit: int = 100) -> list[OutboxListing]:
    """Outbox rows, newest first."""
    q = (select(OutboxItem, ResultObject, Study.study_instance_uid)
         .join(ResultObject, ResultObject.id == OutboxItem.result_id)
         .join(Study, Study.id == ResultObject.study_id)
         .order_by(OutboxItem.id.desc()).limit(limit))
    if state:
        q = q.where(OutboxItem.state == state)
    if destination:
        q = q.where(OutboxItem.destination == destination)
    if study_instance_uid:
        q = q.where(Study.study_instance_uid == study_instance_uid)
    return [OutboxListing(item, result, uid) for item, result, uid in session.execute(q).all()]
