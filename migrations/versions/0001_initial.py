"""Initial audit schema: associations, studies, series, instances, quarantine, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("peer_host", sa.String(64), nullable=False),
        sa.Column("peer_port", sa.Integer, nullable=False),
        sa.Column("calling_ae", sa.String(16), nullable=False),
        sa.Column("called_ae", sa.String(16), nullable=False),
        sa.Column("accepted", sa.Boolean, nullable=False),
        sa.Column("reject_reason", sa.String(128)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
        sa.Column("end_state", sa.String(16)),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("bytes_received", sa.BigInteger, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
    )
    op.create_index("ix_associations_started_at", "associations", ["started_at"])
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("patient_name", sa.String(324)),
        sa.Column("accession_number", sa.String(16)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_description", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_received_at", TS, nullable=False),
        sa.Column("last_received_at", TS, nullable=False),
        sa.Column("state_changed_at", TS, nullable=False),
        sa.Column("processed_at", TS),
        sa.Column("reopen_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_first_received_at", "studies", ["first_received_at"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False, unique=True),
        sa.Column("modality", sa.String(16)),
        sa.Column("body_part", sa.String(64)),
        sa.Column("series_number", sa.Integer),
        sa.Column("series_description", sa.String(64)),
    )
    op.create_index("ix_series_study_id", "series", ["study_id"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("series_id", sa.Integer, sa.ForeignKey("series.id"), nullable=False),
        sa.Column("association_id", sa.Integer, sa.ForeignKey("associations.id")),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("spool_path", sa.String(512), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("received_at", TS, nullable=False),
        sa.UniqueConstraint("sop_instance_uid", "version", name="uq_instances_uid_version"),
    )
    op.create_index("ix_instances_study_id", "instances", ["study_id"])
    op.create_index("ix_instances_series_id", "instances", ["series_id"])
    op.create_index("ix_instances_state", "instances", ["state"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_instances_uid_sha", "instances", ["sop_instance_uid", "sha256"])
    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("received_at", TS, nullable=False),
        sa.Column("association_id", sa.Integer, sa.ForeignKey("associations.id")),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("sop_class_uid", sa.String(64)),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_index("ix_quarantine_received_at", "quarantine", ["received_at"])
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("event", sa.String(48), nullable=False),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("association_id", sa.Integer, sa.ForeignKey("associations.id")),
        sa.Column("study_instance_uid", sa.String(64)),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("details", sa.JSON),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_index("ix_events_event", "events", ["event"])
    op.create_index("ix_events_study_instance_uid", "events", ["study_instance_uid"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("quarantine")
    op.drop_table("instances")
    op.drop_table("series")
    op.drop_table("studies")
    op.drop_table("associations")
