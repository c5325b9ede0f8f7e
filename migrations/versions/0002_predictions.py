"""Predictions: per-image and per-study results; study grade and probability.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_id", sa.Integer, sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id")),
        sa.Column("sop_instance_uid", sa.String(64)),
        sa.Column("level", sa.String(8), nullable=False),
        sa.Column("run", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(64)),
        sa.Column("model_version", sa.String(32)),
        sa.Column("model_sha256", sa.String(64)),
        sa.Column("probability", sa.Float),
        sa.Column("grade", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("high_sensitivity", sa.Float),
        sa.Column("high_specificity", sa.Float),
        sa.Column("window", sa.JSON),
        sa.Column("gradcam", sa.JSON),
        sa.Column("gradcam_path", sa.String(512)),
        sa.Column("decode_ms", sa.Float),
        sa.Column("normalize_ms", sa.Float),
        sa.Column("infer_ms", sa.Float),
        sa.Column("gradcam_ms", sa.Float),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_predictions_study_id", "predictions", ["study_id"])
    op.create_index("ix_predictions_instance_id", "predictions", ["instance_id"])
    op.create_index("ix_predictions_grade", "predictions", ["grade"])
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("grade", sa.String(16)))
        batch.add_column(sa.Column("probability", sa.Float))
        batch.create_index("ix_studies_grade", ["grade"])


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_grade")
        batch.drop_column("probability")
        batch.drop_column("grade")
    op.drop_table("predictions")
