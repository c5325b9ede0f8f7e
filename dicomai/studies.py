"""Grouping instances into studies and handing stable studies to the next stage.

A study is *stable* once no instance arrived for the quiet period. A scheduled job
(:meth:`StudyMonitor.poll`, run by APScheduler) finds stable studies, marks them
``processing`` and calls the next stage's hook with the instances not yet processed.
An instance arriving meanwhile sets the study back to ``receiving`` (ingest does it);
completion is then not recorded over it, so the late instances are picked up on a later
poll. After a restart, :meth:`StudyMonitor.recover` re-queues whatever was in flight.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.store import Instance, InstanceState, Study, StudyState, record_event
from dicomai.store.models import utcnow

__all__ = ["StudyHook", "StudyMonitor", "StudyWork", "noop_hook"]

log = structlog.get_logger("dicomai.studies")
_STAGE = "studies"


@dataclass(frozen=True)
class WorkInstance:
    instance_id: int
    sop_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass(frozen=True)
class StudyWork:
    """A stable study handed to the next stage: only the instances not processed yet."""

    study_id: int
    study_instance_uid: str
    reopen_count: int
    instances: tuple[WorkInstance, ...]


StudyHook = Callable[[StudyWork], None]


def noop_hook(work: StudyWork) -> None:
    """Placeholder next stage: accepts the study as processed."""


class StudyMonitor:
    """Finds stable studies and runs the next stage on them."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        data_dir: Path,
        quiet_period_s: float,
        hook: StudyHook = noop_hook,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.data_dir = data_dir
        self.quiet = dt.timedelta(seconds=quiet_period_s)
        self.hook = hook
        self.clock = clock

    def recover(self) -> int:
        """Re-queue studies left ``stable``/``processing`` by a previous run."""
        now = self.clock()
        with self.sessions.begin() as s:
            # In flight when the node stopped, or with instances stored after a study was last
            # processed: both go back to receiving and are picked up after the quiet period.
            unprocessed = select(Instance.study_id).where(Instance.state == InstanceState.STORED)
            studies = s.scalars(select(Study).where(or_(
                Study.state.in_([StudyState.STABLE, StudyState.PROCESSING]),
                Study.state.in_([StudyState.PROCESSED, StudyState.FAILED]) & Study.id.in_(unprocessed),
            ))).all()
            for study in studies:
                details: dict[str, object] = {"previous_state": study.state}
                if study.state in (StudyState.PROCESSED, StudyState.FAILED):
                    details["unprocessed"] = True
                record_event(s, _STAGE, "study.recovered", study_instance_uid=study.study_instance_uid,
                             details=details)
                study.state = StudyState.RECEIVING
                study.state_changed_at = now
        count = len(studies)
        if count:
            log.info("studies.recovered", studies=count)
        return count

    def poll(self) -> int:
        """Process every study that is stable now; returns how many were handed on."""
        cutoff = self.clock() - self.quiet
        with self.sessions() as s:
            ids = s.scalars(select(Study.id).where(
                Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff,
            ).order_by(Study.last_received_at)).all()
            s.rollback()
        done = 0
        for study_id in ids:
            if self._process(study_id, cutoff):
                done += 1
        return done

    def _claim(self, study_id: int, cutoff: dt.datetime) -> StudyWork | None:
        now = self.clock()
        with self.sessions.begin() as s:
            result: CursorResult[Any] = s.execute(update(Study).where(  # type: ignore[assignment]
                Study.id == study_id, Study.state == StudyState.RECEIVING,
                Study.last_received_at <= cutoff,
            ).values(state=StudyState.PROCESSING, state_changed_at=now))
            claimed = result.rowcount
            if not claimed:
                return None
            study = s.get_one(Study, study_id)
            rows = s.scalars(select(Instance).where(
                Instance.study_id == study_id, Instance.state == InstanceState.STORED,
            ).order_by(Instance.id)).all()
            total = s.scalar(select(func.count()).select_from(Instance).where(
                Instance.study_id == study_id)) or 0
            quiet_for = (now - study.last_received_at).total_seconds()
            record_event(s, _STAGE, "study.stable", study_instance_uid=study.study_instance_uid,
                         details={"instances": total, "new_instances": len(rows),
                                  "quiet_for_s": round(quiet_for, 3),
                                  "reopen_count": study.reopen_count})
            work = StudyWork(
                study_id=study.id, study_instance_uid=study.study_instance_uid,
                reopen_count=study.reopen_count,
                instances=tuple(WorkInstance(r.id, r.sop_instance_uid, r.sop_class_uid,
                                             self.data_dir / r.spool_path) for r in rows),
            )
        log.info("study.stable", study_uid=work.study_instance_uid, instances=total,
                 new_instances=len(rows), reopen_count=work.reopen_count)
        return work

    def _process(self, study_id: int, cutoff: dt.datetime) -> bool:
        work = self._claim(study_id, cutoff)
        if work is None:
            return False
        started = time.monotonic()
        error: str | None = None
        try:
            self.hook(work)
        except Exception as exc:  # the next stage failed: record it, keep the node running
            error = repr(exc)
            log.exception("study.failed", study_uid=work.study_instance_uid)
        now = self.clock()
        seconds = round(time.monotonic() - started, 3)
        ids = [i.instance_id for i in work.instances]
        with self.sessions.begin() as s:
            s.execute(update(Instance).where(Instance.id.in_(ids)).values(
                state=InstanceState.FAILED if error else InstanceState.PROCESSED))
            new_state = StudyState.FAILED if error else StudyState.PROCESSED
            result: CursorResult[Any] = s.execute(update(Study).where(  # type: ignore[assignment]
                Study.id == study_id, Study.state == StudyState.PROCESSING,
            ).values(state=new_state, state_changed_at=now, processed_at=now))
            finished = result.rowcount
            record_event(
                s, _STAGE, "study.failed" if error else "study.processed",
                level="error" if error else "info", study_instance_uid=work.study_instance_uid,
                details={"instances": len(ids), "seconds": seconds,
                         "reopened_meanwhile": not finished},
                error=error,
            )
        log.info("study.processed" if not error else "study.failed",
                 study_uid=work.study_instance_uid, instances=len(ids), seconds=seconds,
                 reopened_meanwhile=not finished)
        return True
