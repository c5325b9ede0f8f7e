"""Typed ORM models of the audit database.

The schema is changed only by Alembic migrations in ``migrations/``; these classes
mirror the head revision. ``docs/audit.md`` documents it for admins who query it.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Association",
    "Base",
    "Event",
    "Feedback",
    "FeedbackRead",
    "Instance",
    "InstanceState",
    "OutboxItem",
    "OutboxState",
    "Prediction",
    "Quarantined",
    "ResultObject",
    "Series",
    "Study",
    "StudyState",
    "UTCDateTime",
    "User",
    "UserRole",
    "WebSession",
    "utcnow",
]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timestamps are stored in UTC and always come back timezone-aware (SQLite drops it)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class StudyState(StrEnum):
    RECEIVING = "receiving"  # instances arriving; not yet quiet for the quiet period
    # (there is no resting "stable" state: a study quiet for the quiet period is claimed
    # straight into processing, see dicomai.studies)
    PROCESSING = "processing"  # handed to the next stage
    PROCESSED = "processed"  # next stage finished for every instance received so far
    FAILED = "failed"  # next stage raised; see the event log


class InstanceState(StrEnum):
    STORED = "stored"  # durable in the spool, not yet processed
    PROCESSED = "processed"
    FAILED = "failed"


class OutboxState(StrEnum):
    PENDING = "pending"  # to be sent (again) at next_attempt_at
    SENT = "sent"  # the destination confirmed storage
    DEAD = "dead"  # given up: a permanent rejection or older than the maximum age


class FeedbackRead(StrEnum):
    """The radiologist's final read of a study, as far as fracture triage is concerned."""

    FRACTURE = "fracture"  # a fracture confirmed
    NO_FRACTURE = "no_fracture"
    OTHER = "other"  # another finding, no fracture


class UserRole(StrEnum):
    """What a web console user may do."""

    ADMIN = "admin"  # everything a viewer may, and act on the node (retry deliveries)
    VIEWER = "viewer"  # read the dashboard, worklist, studies and outbox


class Base(DeclarativeBase):
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON}


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    accepted: Mapped[bool] = mapped_column(Boolean)
    reject_reason: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[dt.datetime] = mapped_column(index=True)
    ended_at: Mapped[dt.datetime | None]
    end_state: Mapped[str | None] = mapped_column(String(16))
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(index=True)
    last_received_at: Mapped[dt.datetime]
    state_changed_at: Mapped[dt.datetime]
    processed_at: Mapped[dt.datetime | None]
    reopen_count: Mapped[int] = mapped_column(Integer, default=0)
    grade: Mapped[str | None] = mapped_column(String(16), index=True)
    probability: Mapped[float | None]

    series: Mapped[list[Series]] = relationship(back_populates="study")
    instances: Mapped[list[Instance]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version", name="uq_instances_uid_version"),
        Index("ix_instances_uid_sha", "sop_instance_uid", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer, default=1)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(index=True)
    # Set when retention deletes the spool file (the row stays for the audit), with why.
    purged_at: Mapped[dt.datetime | None] = mapped_column(index=True)
    purge_reason: Mapped[str | None] = mapped_column(String(128))

    study: Mapped[Study] = relationship(back_populates="instances")


class Quarantined(Base):
    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[dt.datetime] = mapped_column(index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    path: Mapped[str] = mapped_column(String(512))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    purged_at: Mapped[dt.datetime | None] = mapped_column(index=True)  # the file and its sidecar
    purge_reason: Mapped[str | None] = mapped_column(String(128))


class Prediction(Base):
    """One result: per image (``level='image'``) or the study summary (``level='study'``)."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(8))
    run: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(32))
    model_sha256: Mapped[str | None] = mapped_column(String(64))
    probability: Mapped[float | None]
    grade: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    high_sensitivity: Mapped[float | None]
    high_specificity: Mapped[float | None]
    window: Mapped[dict[str, Any] | None]
    gradcam: Mapped[dict[str, Any] | None]
    gradcam_path: Mapped[str | None] = mapped_column(String(512))
    gradcam_purged_at: Mapped[dt.datetime | None] = mapped_column(index=True)  # the map's file
    gradcam_purge_reason: Mapped[str | None] = mapped_column(String(128))
    decode_ms: Mapped[float | None]
    normalize_ms: Mapped[float | None]
    infer_ms: Mapped[float | None]
    gradcam_ms: Mapped[float | None]
    image_stats: Mapped[dict[str, Any] | None]  # ImageStats of an analysed image, for the drift watch
    created_at: Mapped[dt.datetime]


class ResultObject(Base):
    """A DICOM object the node made: a Secondary Capture (``sc``) or a Structured Report (``sr``).

    An SC row is written when its UID is assigned (the study's SR references it) and gets its
    ``path`` once the object is made; an empty ``path`` means "planned, not made yet".
    """

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(4))
    run: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    source_instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"), index=True)
    replaces_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"))
    grade: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str | None] = mapped_column(String(512))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    shadow: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime]
    # Set when retention deletes the file; ``path`` keeps naming it for the audit.
    purged_at: Mapped[dt.datetime | None] = mapped_column(index=True)
    purge_reason: Mapped[str | None] = mapped_column(String(128))


class OutboxItem(Base):
    """One result object for one destination, until it is delivered or given up."""

    __tablename__ = "outbox"
    __table_args__ = (UniqueConstraint("result_id", "destination", name="uq_outbox_result_destination"),
                      Index("ix_outbox_state_next", "state", "next_attempt_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime]
    next_attempt_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    last_attempt_at: Mapped[dt.datetime | None]
    sent_at: Mapped[dt.datetime | None]
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)

    result: Mapped[ResultObject] = relationship()


class Event(Base):
    """Append-only log: what happened to which object, when, by which stage."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(index=True)
    stage: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(48), index=True)
    level: Mapped[str] = mapped_column(String(8))
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)


class Feedback(Base):
    """A radiologist's final read of a study (the latest row of a study counts)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    read: Mapped[str] = mapped_column(String(16))
    read_by: Mapped[str] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(Text)
    recorded_at: Mapped[dt.datetime] = mapped_column(index=True)


# The worklist's search by accession number (migration 0005).
Index("ix_studies_accession_number", Study.accession_number)


class User(Base):
    """A person who may log in to the web console; the password only as its argon2 hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(8))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[dt.datetime]


class WebSession(Base):
    """A logged-in browser: the cookie's token only as its SHA-256, so a copy of the database
    does not log anyone in."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime] = mapped_column(index=True)
