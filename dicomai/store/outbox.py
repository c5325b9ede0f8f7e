"""SQL for the outbox: which rows are due, expiry, and settling an attempt.

Every state change of an outbox row is here (the sender's attempts and an admin's retry);
:mod:`dicomai.deliver.outbox` decides what an attempt's outcome is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.store.events import record_event
from dicomai.store.models import OutboxItem, OutboxState, ResultObject, Study

__all__ = ["Due", "Expired", "Retried", "due", "expire", "has_due", "retry", "settle"]

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


def due(session: Session, now: dt.datetime, batch_size: int) -> dict[str, list[Due]]:
    """Pending rows due now, oldest first, at most ``batch_size`` per destination."""
    rows = session.execute(
        _joined(OutboxItem.id, OutboxItem.destination, ResultObject.path, ResultObject.sop_class_uid,
                ResultObject.sop_instance_uid, ResultObject.kind, Study.study_instance_uid)
        .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now)
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
class Retried:
    queued: int
    missing: tuple[int, ...]  # ids asked for that do not exist (then nothing is changed)
    were_sent: tuple[int, ...]  # rows that had been delivered and are queued again on request


def retry(session: Session, ids: Sequence[int], dead: bool, now: dt.datetime,
          expires_at: dt.datetime) -> Retried:
    """Queue rows again now (the given ids, or every ``dead`` row), audited as an admin action."""
    q = _joined(OutboxItem, ResultObject.sop_instance_uid, Study.study_instance_uid)
    rows = session.execute(q.where(OutboxItem.state == OutboxState.DEAD) if dead
                           else q.where(OutboxItem.id.in_(list(ids)))).all()
    missing = tuple(sorted(set(ids) - {item.id for item, _, _ in rows}))
    if missing:
        return Retried(0, missing, ())
    were_sent = []
    for item, sop_uid, study_uid in rows:
        if item.state == OutboxState.SENT:
            were_sent.append(item.id)
        record_event(session, "admin", "outbox.retry_requested", study_instance_uid=study_uid,
                     sop_instance_uid=sop_uid, details={"item": item.id, "previous_state": item.state,
                                                        "destination": item.destination})
        item.state, item.next_attempt_at, item.expires_at = OutboxState.PENDING, now, expires_at
    return Retried(len(rows), (), tuple(were_sent))
