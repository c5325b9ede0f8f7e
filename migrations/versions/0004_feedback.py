"""Feedback: the radiologist's final read of a study, for the node's running performance.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("read", sa.String(16), nullable=False),
        sa.Column("read_by", sa.String(64), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_feedback_study_id", "feedback", ["study_id"])
    op.create_index("ix_feedback_recorded_at", "feedback", ["recorded_at"])


def downgrade() -> None:
    op.drop_table("feedback")
