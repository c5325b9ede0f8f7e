"""SQL of the retention purge: which files may go, marking their rows purged, and what a
purge stopped midway left to delete.

A study's files may go once the study is *finished*: ``processed`` or ``failed``, and no
outbox row of its results ``pending``. Ages count from the study's *completion*: the later
of its ``processed_at`` and its last delivery (sent; or last attempted, else expired, when
dead). Quarantined objects have no study: their age counts from ``received_at``.

Rows are never deleted: ``purged_at`` and ``purge_reason`` (``gradcam_purged_at`` and
``gradcam_purge_reason`` for a prediction's map) say when and why the file went. The caller
commits the marks before deleting any file, and records :data:`DONE` once every marked file
is gone, so :func:`marked_since` finds the files a killed purge left behind.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, case, exists, func, null, or_, select, true, type_coerce, update
from sqlalchemy.orm import Session

from dicomai.store.events import record_event
from dicomai.store.models import (
    Event,
    Instance,
    InstanceState,
    OutboxItem,
    OutboxState,
    Prediction,
    Quarantined,
    ResultObject,
    Study,
    StudyState,
    UTCDateTime,
)

__all__ = ["DONE", "FileKind", "Finished", "PurgeFile", "aged_files", "finished_studies", "last_done",
           "mark_purged", "marked_since", "oldest_quarantined", "record_done", "study_files"]

#: The event recorded when every file a purge marked is deleted.
DONE = "retention.purged"
_STAGE = "retention"


class FileKind(StrEnum):
    """The files retention deletes, each named by one kind of row."""

    INSTANCE = "instance"  # a received instance in spool/ (instances.spool_path)
    RESULT = "result"  # an SC or SR the node made (results.path)
    MAP = "map"  # a Grad-CAM map (predictions.gradcam_path)
    QUARANTINE = "quarantine"  # a rejected object and its JSON sidecar (quarantine.path)


@dataclass(frozen=True)
class PurgeFile:
    """One file that may go, and the row that names it."""

    kind: FileKind
    row_id: int
    path: str  # relative to the data directory
    study_instance_uid: str | None  # None for a quarantined object
    size_bytes: int | None  # as recorded (maps: not recorded)
    since: dt.datetime  # the study's completion; a quarantined object's arrival


@dataclass(frozen=True)
class Finished:
    """A finished study with files left, and when it was completed."""

    study_id: int
    study_instance_uid: str
    completed_at: dt.datetime


def _pending() -> Any:
    """True for a study with a result still waiting in the outbox."""
    return exists().where(ResultObject.study_id == Study.id, OutboxItem.result_id == ResultObject.id,
                          OutboxItem.state == OutboxState.PENDING)


def _finished() -> Any:
    return and_(Study.state.in_([StudyState.PROCESSED, StudyState.FAILED]), ~_pending())


def _completed_at() -> Any:
    """The later of the study's processing and its last delivery (processing when none)."""
    last = (select(func.max(func.coalesce(OutboxItem.sent_at, OutboxItem.last_attempt_at,
                                          OutboxItem.expires_at)))
            .join(ResultObject, ResultObject.id == OutboxItem.result_id)
            .where(ResultObject.study_id == Study.id).correlate(Study).scalar_subquery())
    processed = func.coalesce(Study.processed_at, Study.state_changed_at)
    at = case((last > processed, last), else_=processed)
    return type_coerce(at, UTCDateTime())


# kind -> (row class, path column, purged_at column, purge_reason column, size column)
_COLUMNS: dict[FileKind, tuple[Any, Any, Any, Any, Any]] = {
    FileKind.INSTANCE: (Instance, Instance.spool_path, Instance.purged_at, Instance.purge_reason,
                        Instance.size_bytes),
    FileKind.RESULT: (ResultObject, ResultObject.path, ResultObject.purged_at, ResultObject.purge_reason,
                      ResultObject.size_bytes),
    FileKind.MAP: (Prediction, Prediction.gradcam_path, Prediction.gradcam_purged_at,
                   Prediction.gradcam_purge_reason, None),
    FileKind.QUARANTINE: (Quarantined, Quarantined.path, Quarantined.purged_at, Quarantined.purge_reason,
                          Quarantined.size_bytes),
}
STUDY_KINDS = (FileKind.INSTANCE, FileKind.RESULT, FileKind.MAP)


def _left(kind: FileKind) -> Any:
    """The condition on a row of ``kind`` whose file is still there to purge."""
    table, path, purged, _, _ = _COLUMNS[kind]
    condition = and_(path.is_not(None), purged.is_(None))
    if kind is FileKind.INSTANCE:  # a stored instance is not processed yet, whatever its study says
        condition = and_(condition, table.state != InstanceState.STORED)
    return condition


def _study_kind(session: Session, kind: FileKind, where: Any, limit: int | None) -> list[PurgeFile]:
    table, path, _, _, size = _COLUMNS[kind]
    completed = _completed_at().label("completed_at")
    q = (select(table.id, path, Study.study_instance_uid, size if size is not None else null(), completed)
         .join(Study, Study.id == table.study_id)
         .where(_finished(), _left(kind), where).order_by(completed, table.id).limit(limit))
    return [PurgeFile(kind, i, p, uid, n, at) for i, p, uid, n, at in session.execute(q).all()]


def aged_files(session: Session, kind: FileKind, cutoff: dt.datetime | None,
               limit: int | None = None) -> list[PurgeFile]:
    """Files of ``kind`` completed (quarantine: received) at or before ``cutoff`` (any time
    when None), oldest first."""
    if kind is FileKind.QUARANTINE:
        old = true() if cutoff is None else Quarantined.received_at <= cutoff
        q = (select(Quarantined.id, Quarantined.path, Quarantined.size_bytes, Quarantined.received_at)
             .where(_left(kind), old)
             .order_by(Quarantined.received_at, Quarantined.id).limit(limit))
        return [PurgeFile(kind, i, p, None, n, at) for i, p, n, at in session.execute(q).all()]
    return _study_kind(session, kind, _completed_at() <= cutoff, limit)


def finished_studies(session: Session, limit: int | None = None) -> list[Finished]:
    """Finished studies that still have files, oldest completion first."""
    completed = _completed_at().label("completed_at")
    has_files = or_(*(exists().where(_COLUMNS[k][0].study_id == Study.id, _left(k)) for k in STUDY_KINDS))
    q = (select(Study.id, Study.study_instance_uid, completed).where(_finished(), has_files)
         .order_by(completed, Study.id).limit(limit))
    return [Finished(i, uid, at) for i, uid, at in session.execute(q).all()]


def study_files(session: Session, study_ids: Sequence[int]) -> list[PurgeFile]:
    """Every file left of these studies, if they are still finished."""
    return [f for kind in STUDY_KINDS
            for f in _study_kind(session, kind, Study.id.in_(list(study_ids)), None)]


def oldest_quarantined(session: Session, limit: int) -> list[PurgeFile]:
    """Quarantined objects still on disk, oldest first."""
    return aged_files(session, FileKind.QUARANTINE, None, limit)


def mark_purged(session: Session, files: Sequence[PurgeFile], reason: str,
                now: dt.datetime) -> list[PurgeFile]:
    """Mark the rows of ``files`` purged, for ``reason``; returns those marked.

    The rule is checked again under a lock of the studies (PostgreSQL; SQLite's write
    transaction serialises anyway): a study re-opened or queued for delivery since the files
    were selected keeps them. One ``study.purged`` event per study. The caller commits before
    deleting any file.
    """
    marked: list[PurgeFile] = []
    by_id = {(f.kind, f.row_id): f for f in files}
    for kind, (table, _, purged, why, _) in _COLUMNS.items():
        ids = [row_id for k, row_id in by_id if k is kind]
        if not ids:
            continue
        q = select(table.id).where(table.id.in_(ids), _left(kind))
        if kind is not FileKind.QUARANTINE:
            studies = (select(Study.id).where(Study.id.in_(select(table.study_id).where(table.id.in_(ids))),
                                              _finished()).with_for_update(of=Study))
            q = q.where(table.study_id.in_(list(session.scalars(studies))))
        ok = list(session.scalars(q))
        if ok:
            session.execute(update(table).where(table.id.in_(ok)).values({purged: now, why: reason})
                            .execution_options(synchronize_session=False))
        marked += [by_id[(kind, i)] for i in ok]
    counts: dict[str, dict[str, int]] = {}
    for f in marked:
        if f.study_instance_uid is not None:
            per = counts.setdefault(f.study_instance_uid, {})
            per[f.kind.value] = per.get(f.kind.value, 0) + 1
    for uid, files_by_kind in counts.items():
        record_event(session, _STAGE, "study.purged", study_instance_uid=uid,
                     details={"files": files_by_kind, "reason": reason})
    quarantined = sum(f.kind is FileKind.QUARANTINE for f in marked)
    if quarantined:
        record_event(session, _STAGE, "quarantine.purged", details={"files": quarantined, "reason": reason})
    return marked


def last_done(session: Session) -> dt.datetime | None:
    """When the last purge that deleted every file it marked ended; None if none did."""
    return session.scalar(select(Event.at).where(Event.event == DONE).order_by(Event.id.desc()).limit(1))


def marked_since(session: Session, since: dt.datetime | None) -> list[PurgeFile]:
    """Rows marked purged after ``since`` (every marked row when None): a purge stopped after
    marking them may have left their files."""
    out: list[PurgeFile] = []
    for kind, (table, path, purged, _, size) in _COLUMNS.items():
        when = purged.is_not(None) if since is None else purged > since
        study = kind is not FileKind.QUARANTINE
        q = select(table.id, path, Study.study_instance_uid if study else null(),
                   size if size is not None else null(), purged).where(when, path.is_not(None))
        if study:
            q = q.join(Study, Study.id == table.study_id)
        rows = session.execute(q.order_by(table.id)).all()
        out += [PurgeFile(kind, i, p, u, n, at) for i, p, u, n, at in rows]
    return out


def record_done(session: Session, details: dict[str, Any]) -> None:
    """Every file marked so far is deleted (see :func:`marked_since`)."""
    record_event(session, _STAGE, DONE, details=details)
