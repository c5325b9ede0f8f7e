"""Aggregate reads of the audit database for the metrics endpoint.

The node's counters are the audit rows themselves (retention keeps them), so a scrape reads
totals here instead of every stage keeping counters of its own; a restart loses nothing.
Each function is one aggregate query.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Float, case, cast, func, literal, select
from sqlalchemy.orm import Session

from dicomai.store.models import Association, Event, Instance, OutboxItem, Prediction, Quarantined, Study

__all__ = ["Buckets", "Counts", "classify_seconds", "counts", "delivery_seconds"]


@dataclass(frozen=True)
class Counts:
    """Totals and current sizes read in one scrape."""

    associations: dict[bool, int]  # accepted -> total
    associations_open: int  # accepted, not yet ended, started since ``since``
    instances: int
    received_bytes: int
    duplicates: int
    rejected: dict[str, int]  # DIMSE status ("0xC210") or "refused: 0xA700" -> total
    studies: dict[tuple[str, str], int]  # (state, grade or "") -> studies
    outbox: dict[tuple[str, str], int]  # (destination, state) -> rows


@dataclass(frozen=True)
class Buckets:
    """A histogram: cumulative counts at each upper bound, the count and the sum."""

    bounds: Sequence[float]
    cumulative: Sequence[int]
    count: int
    total: float


def counts(session: Session, since: dt.datetime) -> Counts:
    """The audit database's totals; ``since`` bounds the open associations (this process's)."""
    assoc = dict(session.execute(select(Association.accepted, func.count())
                                 .group_by(Association.accepted)).all())
    open_ = session.scalar(select(func.count()).where(
        Association.accepted.is_(True), Association.ended_at.is_(None), Association.started_at >= since))
    n, size = session.execute(select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
                              ).one()
    duplicates = session.scalar(select(func.count()).where(Event.event == "instance.duplicate"))
    rejected: dict[str, int] = {}
    for status, k in session.execute(select(Quarantined.status, func.count()).group_by(Quarantined.status)):
        rejected[f"0x{status:04X}"] = k
    # A refusal's error starts with its status ("0xA700: out of resources ...").
    code = func.substr(Event.error, 1, 6)
    for status, k in session.execute(select(code, func.count()).where(Event.event == "instance.refused")
                                     .group_by(code)):
        rejected[str(status)] = rejected.get(str(status), 0) + k
    studies = {(state, grade or ""): k for state, grade, k in session.execute(
        select(Study.state, Study.grade, func.count()).group_by(Study.state, Study.grade))}
    outbox = {(dest, state): k for dest, state, k in session.execute(
        select(OutboxItem.destination, OutboxItem.state, func.count())
        .group_by(OutboxItem.destination, OutboxItem.state))}
    return Counts(associations={bool(a): k for a, k in assoc.items()}, associations_open=open_ or 0,
                  instances=n, received_bytes=int(size), duplicates=duplicates or 0, rejected=rejected,
                  studies=studies, outbox=outbox)


def _histogram(session: Session, value: ColumnElement[float], where: Sequence[ColumnElement[bool]],
               bounds: Sequence[float]) -> Buckets:
    below = [func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in bounds]
    row = session.execute(select(*below, func.count(), func.coalesce(func.sum(value), literal(0.0)))
                          .where(*where)).one()
    return Buckets(bounds=bounds, cumulative=[int(x) for x in row[:-2]], count=int(row[-2]),
                   total=float(row[-1]))


def classify_seconds(session: Session, bounds: Sequence[float]) -> Buckets:
    """Per analysed image: decode, normalise, inference and Grad-CAM time, in seconds."""
    parts = [Prediction.decode_ms, Prediction.normalize_ms, Prediction.infer_ms, Prediction.gradcam_ms]
    ms = sum((func.coalesce(p, 0.0) for p in parts[1:]), start=func.coalesce(parts[0], 0.0))
    value: ColumnElement[float] = cast(ms / 1000.0, Float)
    return _histogram(session, value, [Prediction.level == "image", Prediction.infer_ms.is_not(None)], bounds)


def delivery_seconds(session: Session, bounds: Sequence[float]) -> Buckets:
    """Per delivered object: from queued to confirmed by the destination, in seconds."""
    if session.get_bind().dialect.name == "sqlite":
        days = func.julianday(OutboxItem.sent_at) - func.julianday(OutboxItem.created_at)
        value: ColumnElement[float] = cast(days * 86400.0, Float)
    else:
        value = cast(func.extract("epoch", OutboxItem.sent_at - OutboxItem.created_at), Float)
    return _histogram(session, value, [OutboxItem.sent_at.is_not(None)], bounds)
