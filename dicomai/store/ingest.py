"""SQL of the listener: association rows, received instances, quarantine and refusals.

Every function takes the caller's session and does not commit, so the listener decides what
one unit of work is (an instance row, its study and its event commit together). Which state
a study moves to when an instance arrives is decided by :func:`dicomai.studies.instance_arrived`,
called here in the same transaction (:func:`~dicomai.studies.instance_arrived_at`).
"""

from __future__ import annotations

import datetime as dt
import errno
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from dicomai.store.events import record_event
from dicomai.store.models import (
    Association,
    Instance,
    InstanceState,
    Quarantined,
    Series,
    Study,
    StudyState,
)
from dicomai.studies import instance_arrived_at

__all__ = [
    "Outcome",
    "Peer",
    "Received",
    "Recorded",
    "ReceivedInstance",
    "association_aborted",
    "association_closed",
    "association_rejected",
    "association_requested",
    "instance_failed",
    "instance_refused",
    "is_out_of_space",
    "quarantined",
    "record_instance",
]

_STAGE = "ingest"
#: PostgreSQL's class 53, insufficient resources (disk full, out of memory, too many
#: connections): the C-STORE answer is 0xA700 "out of resources", worth a retry later.
_PG_OUT_OF_RESOURCES = "53"


@dataclass(frozen=True)
class ReceivedInstance:
    """What the node keeps about one received instance (parsed once, at receipt)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    series_number: int | None
    series_description: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None


@dataclass(frozen=True)
class Peer:
    """Who asked for an association."""

    host: str
    port: int
    calling_ae: str
    called_ae: str

    @property
    def details(self) -> dict[str, str]:
        return {"peer": f"{self.host}:{self.port}", "calling_ae": self.calling_ae,
                "called_ae": self.called_ae}


class Outcome(StrEnum):
    STORED = "stored"  # first version of the SOP instance
    CONFLICT = "conflict"  # same SOP Instance UID, other content: kept as a new version
    DUPLICATE = "duplicate"  # same SOP Instance UID, same content: nothing recorded but the event


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_instance` did; ``version`` is the instance's (None for a duplicate)."""

    outcome: Outcome
    version: int | None


@dataclass(frozen=True)
class Received:
    """One received instance as the spool holds it."""

    info: ReceivedInstance
    sha256: str
    size: int
    spool_path: str  # relative to the data directory


def association_requested(session: Session, peer: Peer, reject_reason: str | None,
                          now: dt.datetime) -> int:
    """Record an association request, accepted (``reject_reason`` None) or rejected; its row id."""
    row = Association(
        peer_host=peer.host, peer_port=peer.port, calling_ae=peer.calling_ae[:16],
        called_ae=peer.called_ae[:16], accepted=reject_reason is None,
        reject_reason=reject_reason, started_at=now, instances=0, bytes_received=0, failures=0,
        end_state="rejected" if reject_reason else None,
        ended_at=now if reject_reason else None,
    )
    session.add(row)
    session.flush()
    if reject_reason:
        record_event(session, _STAGE, "association.rejected", level="warning", association_id=row.id,
                     details={**peer.details, "reason": reject_reason})
    return row.id


def association_rejected(session: Session, association_id: int, reason: str) -> None:
    """Mark an accepted-looking association as rejected after all (by the DICOM layer)."""
    row = session.get(Association, association_id)
    if row is None:
        return
    row.accepted = False
    row.reject_reason = reason
    record_event(session, _STAGE, "association.rejected", level="warning", association_id=row.id,
                 details={"reason": reason})


def association_closed(session: Session, association_id: int, end_state: str, instances: int,
                       bytes_received: int, failures: int, now: dt.datetime) -> None:
    """Close an association row with its totals."""
    row = session.get(Association, association_id)
    if row is None:
        return
    row.ended_at = now
    row.end_state = end_state
    row.instances = instances
    row.bytes_received = bytes_received
    row.failures = failures


def association_aborted(session: Session, association_id: int | None, reason: str,
                        peer: str) -> None:
    """Record that the node aborted an association to protect itself."""
    record_event(session, _STAGE, "association.aborted", level="warning",
                 association_id=association_id, error=reason, details={"peer": peer})


# The statements of the per-instance path, built once: building them costs more than
# running them (SQLAlchemy caches the compiled form, not the construction).
_VERSIONS = select(Instance.version, Instance.sha256).where(
    Instance.sop_instance_uid == bindparam("uid"))
_STUDY = select(Study.id, Study.state).where(Study.study_instance_uid == bindparam("uid"))
_SERIES = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = insert(Instance)


def record_instance(session: Session, received: Received, association_id: int | None,
                    now: dt.datetime) -> Recorded:
    """Record one received instance, its series and its study.

    An identical re-send (same SOP Instance UID and content) only adds an event; other content
    under a known SOP Instance UID is kept as the next version and recorded as a conflict.

    Runs once per received object before it is acknowledged, so the usual case (known study
    and series) is plain SQL statements on the session's connection: the ORM's unit of work
    cost more than the statements themselves.
    """
    info = received.info
    conn = session.connection()
    versions = conn.execute(_VERSIONS, {"uid": info.sop_instance_uid}).all()
    if any(v.sha256 == received.sha256 for v in versions):
        record_event(session, _STAGE, "instance.duplicate", association_id=association_id,
                     study_instance_uid=info.study_instance_uid,
                     sop_instance_uid=info.sop_instance_uid, details={"sha256": received.sha256})
        return Recorded(Outcome.DUPLICATE, None)
    study_id = _study(session, info, association_id, now)
    series_id = _series(conn, info, study_id)
    version = max((v.version for v in versions), default=0) + 1
    conn.execute(_INSERT_INSTANCE, dict(
        study_id=study_id, series_id=series_id, association_id=association_id,
        sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
        transfer_syntax_uid=info.transfer_syntax_uid, version=version, size_bytes=received.size,
        sha256=received.sha256, spool_path=received.spool_path, state=InstanceState.STORED,
        received_at=now,
    ))
    if versions:
        record_event(session, _STAGE, "instance.conflict", level="warning",
                     association_id=association_id, study_instance_uid=info.study_instance_uid,
                     sop_instance_uid=info.sop_instance_uid,
                     details={"version": version, "sha256": received.sha256,
                              "previous_sha256": [v.sha256 for v in versions]})
        return Recorded(Outcome.CONFLICT, version)
    record_event(session, _STAGE, "instance.stored", association_id=association_id,
                 study_instance_uid=info.study_instance_uid, sop_instance_uid=info.sop_instance_uid,
                 details={"sha256": received.sha256, "size": received.size,
                          "transfer_syntax": info.transfer_syntax_uid})
    return Recorded(Outcome.STORED, version)


def _study(session: Session, info: ReceivedInstance, association_id: int | None,
           now: dt.datetime) -> int:
    """The id of the study row of ``info``, created (``receiving``) on its first instance;
    the arrival is recorded on it (:func:`dicomai.studies.instance_arrived`)."""
    known = session.connection().execute(_STUDY, {"uid": info.study_instance_uid}).first()
    if known is not None:
        instance_arrived_at(session, known.id, known.state, now, association_id)
        return int(known.id)
    study = Study(
        study_instance_uid=info.study_instance_uid, patient_id=info.patient_id,
        patient_name=info.patient_name, accession_number=info.accession_number,
        study_date=info.study_date, study_description=info.study_description,
        state=StudyState.RECEIVING, first_received_at=now, last_received_at=now,
        state_changed_at=now, reopen_count=0,
    )
    session.add(study)
    session.flush()
    record_event(session, _STAGE, "study.created", association_id=association_id,
                 study_instance_uid=info.study_instance_uid)
    return study.id


def _series(conn: Connection, info: ReceivedInstance, study_id: int) -> int:
    """The id of the series row of ``info``, created on its first instance."""
    known = conn.execute(_SERIES, {"uid": info.series_instance_uid}).scalar()
    if known is not None:
        return int(known)
    created = conn.execute(insert(Series), dict(
        study_id=study_id, series_instance_uid=info.series_instance_uid, modality=info.modality,
        body_part=info.body_part, series_number=info.series_number,
        series_description=info.series_description,
    ))
    key = created.inserted_primary_key
    assert key is not None  # a single-row INSERT always has one
    return int(key[0])


def quarantined(session: Session, *, association_id: int | None, status: int, reason: str,
                path: str, sop_class_uid: str | None, sop_instance_uid: str | None, size: int,
                sha256: str, now: dt.datetime) -> None:
    """Record an object refused as unreadable or inconsistent and kept in the quarantine."""
    session.add(Quarantined(
        received_at=now, association_id=association_id, path=path, status=status, reason=reason,
        sop_class_uid=sop_class_uid, sop_instance_uid=sop_instance_uid, size_bytes=size,
        sha256=sha256,
    ))
    record_event(session, _STAGE, "instance.quarantined", level="error", association_id=association_id,
                 sop_instance_uid=sop_instance_uid, error=reason,
                 details={"status": f"0x{status:04X}", "path": path})


def instance_refused(session: Session, association_id: int | None, sop_instance_uid: str | None,
                     reason: str) -> None:
    """Record an instance refused before it was kept (no space, cannot write)."""
    record_event(session, _STAGE, "instance.refused", level="error", association_id=association_id,
                 sop_instance_uid=sop_instance_uid, error=reason)


def instance_failed(session: Session, association_id: int | None, error: str) -> None:
    """Record an unexpected failure while receiving an instance."""
    record_event(session, _STAGE, "instance.failed", level="error", association_id=association_id,
                 error=error)


def is_out_of_space(exc: BaseException) -> bool:
    """Whether a failed write was the database (or the disk under it) out of resources."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(seen, DBAPIError):
            sqlstate = getattr(seen.orig, "sqlstate", None) or ""
            if sqlstate.startswith(_PG_OUT_OF_RESOURCES):
                return True
            # SQLite: SQLITE_FULL, "database or disk is full".
            if "disk is full" in str(seen.orig):
                return True
        seen = seen.__cause__ or seen.__context__
    return False
