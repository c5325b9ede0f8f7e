"""Read-only queries of the web console: dashboard totals, the worklist, a study's images.

Each query is bounded and uses an index, so a page costs the same with 100 000 studies as
with ten: the worklist pages by primary key (a study's id grows with its first arrival, so
newest first is ``id`` descending) and filters on indexed columns (grade, state, accession
number, Study Instance UID).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from dicomai.store.models import (
    Instance,
    OutboxItem,
    OutboxState,
    Prediction,
    ResultObject,
    Series,
    Study,
)

__all__ = [
    "Dashboard",
    "ImageRow",
    "ImageSource",
    "WorklistPage",
    "dashboard",
    "image_source",
    "study_images",
    "worklist",
]


@dataclass(frozen=True)
class Dashboard:
    """Totals since two moments (``today`` and ``week``) and the outbox now."""

    studies_today: dict[str, int]  # grade ("" while not graded) -> studies first received since
    studies_week: dict[str, int]
    instances_today: int
    instances_week: int
    outbox: dict[str, dict[str, int]]  # destination -> {"pending": n, "dead": n}


def dashboard(session: Session, today: dt.datetime, week: dt.datetime) -> Dashboard:
    """The dashboard's totals: studies by grade and instances since ``today`` and ``week``."""

    def by_grade(since: dt.datetime) -> dict[str, int]:
        q = (select(Study.grade, func.count()).where(Study.first_received_at >= since)
             .group_by(Study.grade))
        return {grade or "": n for grade, n in session.execute(q)}

    def instances(since: dt.datetime) -> int:
        return session.scalar(select(func.count(Instance.id)).where(Instance.received_at >= since)) or 0

    outbox: dict[str, dict[str, int]] = {}
    for dest, state, n in session.execute(
            select(OutboxItem.destination, OutboxItem.state, func.count())
            .where(OutboxItem.state.in_([OutboxState.PENDING, OutboxState.DEAD]))
            .group_by(OutboxItem.destination, OutboxItem.state)):
        outbox.setdefault(dest, {"pending": 0, "dead": 0})[state] = n
    return Dashboard(by_grade(today), by_grade(week), instances(today), instances(week),
                     dict(sorted(outbox.items())))


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist, newest first, with the ``before`` key of the next (older) page."""

    studies: Sequence[Study]
    instances: dict[int, int]  # study id -> instances received
    older: int | None  # pass as ``before`` for the next page; None on the last page


def worklist(session: Session, *, grade: str | None = None, state: str | None = None,
             search: str | None = None, before: int | None = None, size: int = 50) -> WorklistPage:
    """Studies newest first, ``size`` at a time, older than the study id ``before``.

    ``search`` matches an accession number or a Study Instance UID exactly (both indexed).
    """
    q = select(Study).order_by(Study.id.desc()).limit(size + 1)
    if grade:
        q = q.where(Study.grade == grade)
    if state:
        q = q.where(Study.state == state)
    if search:
        q = q.where(or_(Study.accession_number == search, Study.study_instance_uid == search))
    if before is not None:
        q = q.where(Study.id < before)
    rows = list(session.scalars(q))
    page, more = rows[:size], len(rows) > size
    counts: dict[int, int] = {}
    if page:
        counts = {sid: n for sid, n in session.execute(
            select(Instance.study_id, func.count()).where(Instance.study_id.in_([s.id for s in page]))
            .group_by(Instance.study_id))}
    return WorklistPage(page, counts, page[-1].id if more else None)


@dataclass(frozen=True)
class ImageRow:
    """A received image of a study with its latest image-level prediction, if any."""

    instance: Instance
    series: Series
    prediction: Prediction | None
    sc: ResultObject | None  # the Secondary Capture made from it, latest run


def study_images(session: Session, study_id: int) -> list[ImageRow]:
    """The study's images in arrival order, each with its latest prediction and SC."""
    rows = session.execute(select(Instance, Series).join(Series, Series.id == Instance.series_id)
                           .where(Instance.study_id == study_id).order_by(Instance.id)).all()
    # Oldest first: each image keeps the row of its latest run.
    latest = {p.instance_id: p for p in session.scalars(
        select(Prediction).where(Prediction.study_id == study_id, Prediction.level == "image")
        .order_by(Prediction.run, Prediction.id)) if p.instance_id is not None}
    scs = {r.source_instance_id: r for r in session.scalars(
        select(ResultObject).where(ResultObject.study_id == study_id, ResultObject.kind == "sc")
        .order_by(ResultObject.run, ResultObject.id)) if r.source_instance_id is not None}
    return [ImageRow(i, se, latest.get(i.id), scs.get(i.id)) for i, se in rows]


@dataclass(frozen=True)
class ImageSource:
    """What an overlay picture is drawn from: the spooled image and its latest map, if any."""

    spool_path: str  # relative to the data directory
    gradcam_path: str | None  # likewise; None when the image has no map
    prediction_id: int | None


def image_source(session: Session, study_instance_uid: str, instance_id: int) -> ImageSource | None:
    """The files of one image of the study; ``None`` when the study has no such image."""
    inst = session.scalar(select(Instance).join(Study, Study.id == Instance.study_id)
                          .where(Study.study_instance_uid == study_instance_uid, Instance.id == instance_id))
    if inst is None:
        return None
    p = session.scalar(select(Prediction)
                       .where(Prediction.instance_id == inst.id, Prediction.level == "image")
                       .order_by(Prediction.run.desc(), Prediction.id.desc()).limit(1))
    return ImageSource(inst.spool_path, p.gradcam_path if p else None, p.id if p else None)
