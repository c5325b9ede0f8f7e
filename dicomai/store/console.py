"""Read-only queries of the web console: dashboard totals, the worklist, a study's images.

Each query is bounded and uses an index, so a page costs the same with 100 000 studies as
with ten: the worklist pages by primary key (a study's id grows with its first arrival, so
newest first is ``id`` descending) and filters on indexed columns (grade, state, accession
number, Study Instance UID, first arrival). "Positive first" reads the grades one tier after
the other, each newest first, so it pages by key too instead of sorting every study.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, exists, func, or_, select, true
from sqlalchemy.orm import Session

from dicomai.model.grading import Grade
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
    "PageKey",
    "WorklistPage",
    "dashboard",
    "image_source",
    "study_images",
    "turnaround_seconds",
    "worklist",
]

#: "Positive first": the grades shown ahead of the rest, in this order.
FIRST_GRADES = (Grade.POSITIVE, Grade.DOUBTFUL)


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
        # Grouped by an expression, not the column: SQLite would otherwise walk the whole grade
        # index (sorted for the grouping) instead of the few days' range of first arrivals.
        grade = func.coalesce(Study.grade, "")
        q = select(grade, func.count()).where(Study.first_received_at >= since).group_by(grade)
        return {g: n for g, n in session.execute(q)}

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


def turnaround_seconds(session: Session, since: dt.datetime) -> list[float]:
    """Seconds from each study's last instance to its first result, for studies processed since.

    The result is the first object made (SC, SR) at or after the last instance arrived; a
    study that made none (nothing to deliver, not analysed) counts until it was processed.
    """
    first_result = (select(func.min(ResultObject.created_at))
                    .where(ResultObject.study_id == Study.id,
                           ResultObject.created_at >= Study.last_received_at)
                    .correlate(Study).scalar_subquery())
    rows = session.execute(select(Study.last_received_at, first_result, Study.processed_at)
                           .where(Study.processed_at >= since))
    spans: list[float] = []
    for last, result, processed in rows:
        done: dt.datetime | None = result or processed
        if done is not None:
            spans.append((done - last).total_seconds())
    return spans


@dataclass(frozen=True)
class PageKey:
    """Where a worklist page starts: in which grade tier, below which study id."""

    tier: int
    before: int


@dataclass(frozen=True)
class WorklistPage:
    """One page of the worklist, newest first, with the key of the next (older) page."""

    studies: Sequence[Study]
    instances: dict[int, int]  # study id -> instances received
    older: PageKey | None  # the next page's start; None on the last page


def _tiers(positive_first: bool) -> list[ColumnElement[bool]]:
    if not positive_first:
        return [true()]
    first = [str(g) for g in FIRST_GRADES]
    return [*(Study.grade == g for g in first), or_(Study.grade.is_(None), Study.grade.not_in(first))]


def worklist(session: Session, *, grade: str | None = None, state: str | None = None,
             search: str | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None,
             destination: str | None = None, positive_first: bool = False, start: PageKey | None = None,
             size: int = 50) -> WorklistPage:
    """Studies newest first (positive, then doubtful, then the rest with ``positive_first``),
    ``size`` at a time from ``start``.

    ``search`` matches an accession number or a Study Instance UID exactly (both indexed);
    ``since``/``until`` bound the first arrival; ``destination`` keeps the studies with a
    result queued for it.
    """
    where: list[ColumnElement[bool]] = []
    if grade:
        where.append(Study.grade == grade)
    if state:
        where.append(Study.state == state)
    if search:
        where.append(or_(Study.accession_number == search, Study.study_instance_uid == search))
    if since is not None:
        where.append(Study.first_received_at >= since)
    if until is not None:
        where.append(Study.first_received_at < until)
    if destination:
        # Correlated: checked per study while walking newest first, through indexed keys.
        where.append(exists().where(ResultObject.study_id == Study.id,
                                    OutboxItem.result_id == ResultObject.id,
                                    OutboxItem.destination == destination))
    tiers = _tiers(positive_first and not grade)
    start = start or PageKey(0, 0)
    rows: list[tuple[int, Study]] = []
    for tier in range(min(start.tier, len(tiers)), len(tiers)):
        q = (select(Study).where(tiers[tier], *where).order_by(Study.id.desc())
             .limit(size + 1 - len(rows)))
        if tier == start.tier and start.before:
            q = q.where(Study.id < start.before)
        rows.extend((tier, st) for st in session.scalars(q))
        if len(rows) > size:
            break
    page = rows[:size]
    counts: dict[int, int] = {}
    if page:
        counts = {sid: n for sid, n in session.execute(
            select(Instance.study_id, func.count()).where(Instance.study_id.in_([s.id for _, s in page]))
            .group_by(Instance.study_id))}
    older = PageKey(page[-1][0], page[-1][1].id) if len(rows) > size else None
    return WorklistPage([s for _, s in page], counts, older)


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
