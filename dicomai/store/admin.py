"""State transitions an administrator asks for, each one unit of work with its audit events."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.store.events import record_event
from dicomai.store.models import OutboxItem, OutboxState, ResultObject, Study

__all__ = ["RetryResult", "retry_outbox"]


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
