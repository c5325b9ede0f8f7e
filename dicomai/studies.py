"""The one owner of study and instance states: an explicit state machine, and the monitor
that hands stable studies to the next stage.

A study moves through these states (:data:`TRANSITIONS` lists every legal move)::

    receiving --quiet period elapsed--> processing --stage done--> processed
        ^                                   |   \\--stage raised--> failed
        |                                   |                        |
        +---- late instance or restart -----+------------------------+

*Stable* is the moment a study has been quiet for the quiet period, or (with a settle delay)
quiet for the settle delay after every association that brought its instances was released:
a PACS that sends a study over one association and releases it gets its result seconds
after the last image instead of after the whole quiet period. The monitor claims a stable
study in one transaction, straight into ``processing`` (the ``study.stable`` event marks the
moment, and says which rule applied), so no study ever rests in a separate "stable" state.
The trade-off: an instance of the same study sent later over another association re-opens
the study, which is processed again and its SR superseded; the quiet period remains the
rule for associations left open.

Every change of a study's state goes through :func:`advance` (on a row of the caller's
transaction) or through :class:`StudyMonitor`, which uses the guarded updates of
:mod:`dicomai.store.studies`. The listener calls :func:`instance_arrived` in the transaction
that records an instance, so a late instance re-opens its study atomically with its row.

Instances are ``stored`` until the stage has recorded a result for them; the monitor marks
them ``processed`` (or ``failed`` when the stage raised) when it finishes the study, and
marks any that already have a recorded result when it claims the study again after a
restart, so that an image is never classified twice.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from sqlalchemy import bindparam, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.errors import DicomaiError
from dicomai.store import studies as store
from dicomai.store.events import record_event
from dicomai.store.models import Study, StudyState, utcnow

__all__ = ["TRANSITIONS", "StudyHook", "StudyMonitor", "StudyWork", "WorkInstance", "advance",
           "instance_arrived", "instance_arrived_at", "noop_hook"]

log = structlog.get_logger("dicomai.studies")
_STAGE = "studies"
#: A receiving study's quiet period restarts (built once: it runs for every received object).
_TOUCH = update(Study).where(Study.id == bindparam("study")).values(last_received_at=bindparam("at"))

#: Every legal change of a study's state.
TRANSITIONS: dict[StudyState, frozenset[StudyState]] = {
    StudyState.RECEIVING: frozenset({StudyState.PROCESSING}),
    StudyState.PROCESSING: frozenset({StudyState.PROCESSED, StudyState.FAILED, StudyState.RECEIVING}),
    StudyState.PROCESSED: frozenset({StudyState.RECEIVING}),
    StudyState.FAILED: frozenset({StudyState.RECEIVING}),
}


class StateError(DicomaiError):
    """A change of state that the state machine does not allow (a bug, never input)."""


def check(current: str, to: StudyState) -> None:
    """Raise :class:`StateError` unless ``current -> to`` is a legal transition."""
    if to not in TRANSITIONS.get(StudyState(current), frozenset()):
        raise StateError(f"study state {current} -> {to} is not allowed")


def advance(study: Study, to: StudyState, now: dt.datetime) -> None:
    """Move a study row of the caller's transaction to ``to``."""
    check(study.state, to)
    study.state = to
    study.state_changed_at = now


def instance_arrived(session: Session, study: Study, now: dt.datetime,
                     association_id: int | None) -> None:
    """An instance of ``study`` was recorded in ``session``: restart its quiet period, and
    re-open it when it was already processed (its results will be superseded)."""
    study.last_received_at = now
    if study.state == StudyState.RECEIVING:
        return
    previous = study.state
    if previous in (StudyState.PROCESSED, StudyState.FAILED):
        study.reopen_count += 1
        record_event(session, _STAGE, "study.reopened", association_id=association_id,
                     study_instance_uid=study.study_instance_uid,
                     details={"previous_state": previous, "reopen_count": study.reopen_count})
    # A study being processed goes back to receiving; the monitor then does not record
    # completion over it, and the late instances are picked up after the quiet period.
    advance(study, StudyState.RECEIVING, now)


def instance_arrived_at(session: Session, study_id: int, state: str, now: dt.datetime,
                        association_id: int | None) -> None:
    """:func:`instance_arrived` for a study known by its id and the ``state`` just read in
    ``session`` (the listener's path, once per received object): a study still receiving
    costs one UPDATE instead of loading its row."""
    if state == StudyState.RECEIVING:
        session.connection().execute(_TOUCH, {"study": study_id, "at": now})
        return
    study = session.get(Study, study_id)
    if study is None:  # read in this very transaction: a bug, never input
        raise StateError(f"study {study_id} vanished while recording an instance")
    instance_arrived(session, study, now, association_id)


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
        settle_s: float | None = None,
    ) -> None:
        self.sessions = sessions
        self.data_dir = data_dir
        self.quiet = dt.timedelta(seconds=quiet_period_s)
        self.settle = None if settle_s is None else dt.timedelta(seconds=settle_s)
        self.hook = hook
        self.clock = clock

    def recover(self) -> int:
        """Re-queue studies left ``processing`` by a previous run, and finished studies with
        instances stored after they were last processed; both go back to ``receiving`` and
        are picked up after the quiet period."""
        now = self.clock()
        with self.sessions.begin() as s:
            studies = store.unfinished(s)
            for study in studies:
                details: dict[str, object] = {"previous_state": study.state}
                if study.state in (StudyState.PROCESSED, StudyState.FAILED):
                    details["unprocessed"] = True
                record_event(s, _STAGE, "study.recovered", study_instance_uid=study.study_instance_uid,
                             details=details)
                advance(study, StudyState.RECEIVING, now)
        count = len(studies)
        if count:
            log.info("studies.recovered", studies=count)
        return count

    def poll(self) -> int:
        """Process every study that is stable now; returns how many were handed on."""
        now = self.clock()
        cutoff = now - self.quiet
        settled = None if self.settle is None else now - self.settle
        with self.sessions() as s:
            ids = store.quiet_since(s, cutoff, settled)
            s.rollback()
        done = 0
        for study_id in ids:
            if self._process(study_id, cutoff, settled):
                done += 1
        return done

    def _claim(self, study_id: int, cutoff: dt.datetime, settled: dt.datetime | None) -> StudyWork | None:
        now = self.clock()
        check(StudyState.RECEIVING, StudyState.PROCESSING)
        with self.sessions.begin() as s:
            claimed = store.claim(s, study_id, cutoff, now, settled)
            if claimed is None:
                return None
            quiet_for = (now - claimed.last_received_at).total_seconds()
            record_event(s, _STAGE, "study.stable", study_instance_uid=claimed.study_instance_uid,
                         details={"instances": claimed.total, "new_instances": len(claimed.new),
                                  "quiet_for_s": round(quiet_for, 3),
                                  "rule": "quiet period" if claimed.last_received_at <= cutoff
                                  else "associations released",
                                  "reopen_count": claimed.reopen_count})
            work = StudyWork(
                study_id=claimed.study_id, study_instance_uid=claimed.study_instance_uid,
                reopen_count=claimed.reopen_count,
                instances=tuple(WorkInstance(i.instance_id, i.sop_instance_uid, i.sop_class_uid,
                                             self.data_dir / i.spool_path) for i in claimed.new),
            )
        log.info("study.stable", study_uid=work.study_instance_uid, instances=claimed.total,
                 new_instances=len(work.instances), reopen_count=work.reopen_count)
        return work

    def _process(self, study_id: int, cutoff: dt.datetime, settled: dt.datetime | None) -> bool:
        work = self._claim(study_id, cutoff, settled)
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
        new_state = StudyState.FAILED if error else StudyState.PROCESSED
        check(StudyState.PROCESSING, new_state)
        with self.sessions.begin() as s:
            finished = store.finish(s, study_id, [i.instance_id for i in work.instances],
                                    failed=error is not None, to=new_state, now=now)
            record_event(
                s, _STAGE, "study.failed" if error else "study.processed",
                level="error" if error else "info", study_instance_uid=work.study_instance_uid,
                details={"instances": len(work.instances), "seconds": seconds,
                         "reopened_meanwhile": not finished},
                error=error,
            )
        log.info("study.processed" if not error else "study.failed",
                 study_uid=work.study_instance_uid, instances=len(work.instances), seconds=seconds,
                 reopened_meanwhile=not finished)
        return True
