"""Writing to the audit database: the event log and the association rows.

Every function takes the caller's session and does not commit, so the caller decides
what one unit of work is (a stored instance and its event commit together).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from dicomai.store.models import Event, utcnow

__all__ = ["record_event"]

_INSERT = insert(Event)


def record_event(
    session: Session,
    stage: str,
    event: str,
    *,
    level: str = "info",
    association_id: int | None = None,
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    details: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Append one row to the event log, in the caller's transaction.

    A statement on the session's connection rather than an ORM object: nothing reads the row
    back, and on the ingest path (an event per received object) the unit of work's
    bookkeeping cost more than the INSERT.
    """
    session.connection().execute(_INSERT, dict(
        at=utcnow(),
        stage=stage,
        event=event,
        level=level,
        association_id=association_id,
        study_instance_uid=study_instance_uid,
        sop_instance_uid=sop_instance_uid,
        details=details,
        error=error,
    ))
