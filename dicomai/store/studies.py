"""SQL for the study lifecycle: finding, claiming and finishing studies.

Which state a study moves to is decided by :mod:`dicomai.studies`; these functions only run
the statements, each guarded by the state it expects, so that a concurrent change (a late
instance re-opening the study) wins over a stale one. None of them commits.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import CursorResult, exists, func, or_, select, update
from sqlalchemy.orm import Session

from dicomai.store.models import Association, Instance, InstanceState, Prediction, Study, StudyState

__all__ = ["ClaimedInstance", "ClaimedStudy", "claim", "finish", "quiet_since", "unfinished"]


@dataclass(frozen=True)
class ClaimedInstance:
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    spool_path: str


@dataclass(frozen=True)
class ClaimedStudy:
    study_id: int
    study_instance_uid: str
    reopen_count: int
    last_received_at: dt.datetime
    total: int  # instances of the study, all versions
    new: tuple[ClaimedInstance, ...]  # stored and without a recorded result


def _has_result() -> Any:
    return exists().where(Prediction.instance_id == Instance.id, Prediction.level == "image")


def unfinished(session: Session) -> Sequence[Study]:
    """Studies in flight when the node stopped, and finished studies with stored instances."""
    stored = select(Instance.study_id).where(Instance.state == InstanceState.STORED)
    return session.scalars(select(Study).where(or_(
        Study.state == StudyState.PROCESSING,
        Study.state.in_([StudyState.PROCESSED, StudyState.FAILED]) & Study.id.in_(stored),
    ))).all()


def _sending() -> Any:
    """True for a study with an instance brought by an association that is still open."""
    return exists().where(Instance.study_id == Study.id, Instance.association_id == Association.id,
                          Association.ended_at.is_(None))


def _stable(cutoff: dt.datetime, settled: dt.datetime | None) -> Any:
    """Quiet since ``cutoff``; or, with ``settled``, quiet since then and no longer being sent."""
    quiet = Study.last_received_at <= cutoff
    if settled is None:
        return quiet
    return or_(quiet, (Study.last_received_at <= settled) & ~_sending())


def quiet_since(session: Session, cutoff: dt.datetime, settled: dt.datetime | None = None) -> Sequence[int]:
    """Ids of receiving studies that are stable (see :func:`_stable`), oldest first."""
    return session.scalars(select(Study.id).where(
        Study.state == StudyState.RECEIVING, _stable(cutoff, settled),
    ).order_by(Study.last_received_at)).all()


def claim(session: Session, study_id: int, cutoff: dt.datetime, now: dt.datetime,
          settled: dt.datetime | None = None) -> ClaimedStudy | None:
    """``receiving`` -> ``processing`` if the study is still stable (see :func:`_stable`).

    Instances that already have a recorded result (a run interrupted after recording it) are
    marked ``processed`` here and not handed out again.
    """
    result: CursorResult[Any] = session.execute(update(Study).where(  # type: ignore[assignment]
        Study.id == study_id, Study.state == StudyState.RECEIVING, _stable(cutoff, settled),
    ).values(state=StudyState.PROCESSING, state_changed_at=now))
    if not result.rowcount:
        return None
    session.execute(update(Instance).where(
        Instance.study_id == study_id, Instance.state == InstanceState.STORED, _has_result(),
    ).values(state=InstanceState.PROCESSED).execution_options(synchronize_session=False))
    study = session.get_one(Study, study_id)
    rows = session.scalars(select(Instance).where(
        Instance.study_id == study_id, Instance.state == InstanceState.STORED,
    ).order_by(Instance.id)).all()
    total = session.scalar(select(func.count()).select_from(Instance).where(
        Instance.study_id == study_id)) or 0
    return ClaimedStudy(
        study.id, study.study_instance_uid, study.reopen_count, study.last_received_at, total,
        tuple(ClaimedInstance(r.id, r.sop_instance_uid, r.sop_class_uid, r.spool_path) for r in rows))


def finish(session: Session, study_id: int, instance_ids: Sequence[int], *, failed: bool,
           to: StudyState, now: dt.datetime) -> bool:
    """Mark the run's instances, and the study ``processing`` -> ``to``; returns False when the
    study was re-opened meanwhile (its state is then left to the late instances)."""
    session.execute(update(Instance).where(Instance.id.in_(list(instance_ids))).values(
        state=InstanceState.FAILED if failed else InstanceState.PROCESSED))
    result: CursorResult[Any] = session.execute(update(Study).where(  # type: ignore[assignment]
        Study.id == study_id, Study.state == StudyState.PROCESSING,
    ).values(state=to, state_changed_at=now, processed_at=now))
    return bool(result.rowcount)
