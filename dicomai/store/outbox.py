"""SQL for the outbox: which rows are due, expiry, and settling an attempt.

Every state change of an outbox row is here (the sender's attempts and an admin's retry);
:mod:`dicomai.deliver.outbox` decides what an attempt's outcome is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.store.events import record_event
from dicomai.store.models import OutboxItem, OutboxState, ResultObject, Study

__all__ = ["Due", "Expired", "RetryResult", "drop_purged", "due", "expire", "has_due", "retry_outbox",
           "settle"]

_STAGE = "outbox"


@dataclass(frozen=True)
class Due:
    """An outbox row to send now, with what the sender needs of its object."""

    item_id: int
    destination: str
    path: str  # relative to the data directory
    sop_class_uid: str
    sop_instance_uid: str
    kind: str
    study_uid: str


@dataclass(frozen=True)
class Expired:
    item_id: int
    destination: str
    attempts: int


def has_due(session: Session, now: dt.datetime) -> bool:
    return session.scalar(select(OutboxItem.id).where(
        OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now).limit(1)) is not None


def _joined(*columns: Any) -> Any:
    return (select(*columns).join(ResultObject, ResultObject.id == OutboxItem.result_id)
            .join(Study, Study.id == ResultObject.study_id))


def expire(session: Session, now: dt.datetime) -> list[Expired]:
    """Pending rows past their ``expires_at`` become ``dead``; returns them."""
    q = _joined(OutboxItem, ResultObject.sop_instance_uid, Study.study_instance_uid)
    rows = session.execute(q.where(OutboxItem.state == OutboxState.PENDING,
                                   OutboxItem.expires_at <= now)).all()
    for item, sop_uid, study_uid in rows:
        item.state = OutboxState.DEAD
        item.last_error = f"not delivered before {item.expires_at.isoformat()}: {item.last_error}"
        record_event(session, _STAGE, "outbox.dead", level="error", study_instance_uid=study_uid,
                     sop_instance_uid=sop_uid, error=item.last_error,
                     details={"destination": item.destination, "attempts": item.attempts, "item": item.id})
    return [Expired(item.id, item.destination, item.attempts) for item, _, _ in rows]


def drop_purged(session: Session) -> list[Expired]:
    """Pending rows whose result file retention purged become ``dead``; returns them.

    Retention leaves a study's results alone while one waits in the outbox, but an admin may
    queue a row again (``outbox retry``) after its file went.
    """
    q = _joined(OutboxItem, ResultObject.sop_instance_uid, Study.study_instance_uid)
    rows = session.execute(q.where(OutboxItem.state == OutboxState.PENDING,
                                   ResultObject.purged_at.is_not(None))).all()
    for item, sop_uid, study_uid in rows:
        item.state = OutboxState.DEAD
        item.last_error = "result file purged"
        record_event(session, _STAGE, "outbox.dead", level="error", study_instance_uid=study_uid,
                     sop_instance_uid=sop_uid, error=item.last_error,
                     details={"destination": item.destination, "attempts": item.attempts, "item": item.id})
    return [Expired(item.id, item.destination, item.attempts) for item, _, _ in rows]


def due(session: Session, now: dt.datetime, batch_size: int) -> dict[str, list[Due]]:
    """Pending rows due now, oldest first, at most ``batch_size`` per destination."""
    rows = session.execute(
        _joined(OutboxItem.id, OutboxItem.destination, ResultObject.path, ResultObject.sop_class_uid,
                ResultObject.sop_instance_uid, ResultObject.kind, Study.study_instance_uid)
        .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now,
               ResultObject.purged_at.is_(None))  # see drop_purged
        .order_by(OutboxItem.id)).all()
    out: dict[str, list[Due]] = {}
    for item_id, dest, path, sop_class, sop_uid, kind, study_uid in rows:
        group = out.setdefault(dest, [])
        if len(group) < batch_size:
            group.append(Due(item_id, dest, path or "", sop_class, sop_uid, kind, study_uid))
    return out


def settle(session: Session, item: Due, outcome: str, status: int | None, error: str | None,
           now: dt.datetime, retry_at: Callable[[int], dt.datetime]) -> str:
    """Record one attempt: ``sent``, ``dead`` or ``retry`` at ``retry_at(attempts so far)``
    (``dead`` instead when that is past the row's expiry). Returns the outcome recorded."""
    row = session.get_one(OutboxItem, item.item_id)
    row.attempts += 1
    row.last_attempt_at = now
    row.last_status = status
    row.last_error = error
    details: dict[str, Any] = {"destination": item.destination, "attempt": row.attempts, "kind": item.kind,
                               "status": status, "item": row.id}
    if outcome == "retry":
        next_attempt_at = retry_at(row.attempts)
        row.next_attempt_at = next_attempt_at
        if next_attempt_at >= row.expires_at:
            outcome = "dead"
            row.last_error = f"not delivered before {row.expires_at.isoformat()}: {error}"
        else:
            details["next_attempt_at"] = next_attempt_at.isoformat()
    if outcome == "sent":
        row.state, row.sent_at = OutboxState.SENT, now
    elif outcome == "dead":
        row.state = OutboxState.DEAD
    record_event(session, _STAGE, f"outbox.{outcome}",
                 level={"sent": "info", "retry": "warning"}.get(outcome, "error"),
                 study_instance_uid=item.study_uid, sop_instance_uid=item.sop_instance_uid,
                 details=details, error=row.last_error)
    return outcome


@dataclass(frozen=True)
class RetryResult:
    """What :func:`retry_outbox` did.

    Attributes
    ----------
    queued:
        Ids of the rows queued again, in the order found.
    resent:
        The subset of ``queued`` that had been sent already.
    missing:
        Ids asked for that no row has; when not empty, nothing was changed.
    """

    queued: list[int]
    resent: list[int]
    missing: list[int]


def retry_outbox(sessions: sessionmaker[Session], ids: Collection[int] | None, now: dt.datetime,
                 expires_at: dt.datetime) -> RetryResult:
    """Queue outbox rows for delivery at ``now``, with a new expiry, recording one event per row.

    ``ids`` names the rows; ``None`` means every dead row. All or nothing: if an id has no
    row, no row is changed. A running node picks the rows up at its next poll.
    """
    with sessions() as session, session.begin():
        q = (select(OutboxItem, ResultObject.sop_instance_uid, Study.study_instance_uid)
             .join(ResultObject, ResultObject.id == OutboxItem.result_id)
             .join(Study, Study.id == ResultObject.study_id))
        q = q.where(OutboxItem.state == OutboxState.DEAD if ids is None else OutboxItem.id.in_(ids))
        rows = session.execute(q).all()
        missing = sorted(set(ids or ()) - {item.id for item, _, _ in rows})
        if missing:  # nothing changed yet: leaving the block commits nothing
            return RetryResult(queued=[], resent=[], missing=missing)
        resent = [item.id for item, _, _ in rows if item.state == OutboxState.SENT]
        for item, sop_uid, study_uid in rows:
            record_event(session, "admin", "outbox.retry_requested", study_instance_uid=study_uid,
                         sop_instance_uid=sop_uid, details={"item": item.id, "previous_state": item.state,
                                                            "destination": item.destination})
            item.state, item.next_attempt_at, item.expires_at = OutboxState.PENDING, now, expires_at
        return RetryResult(queued=[item.id for item, _, _ in rows], resent=resent, missing=[])
