"""Retention: when and why a row's file was purged (instances, results, quarantine, maps).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# table -> (column prefix); predictions keep their own row and lose only the Grad-CAM map.
_TABLES = {"instances": "", "results": "", "quarantine": "", "predictions": "gradcam_"}


def upgrade() -> None:
    for table, prefix in _TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(f"{prefix}purged_at", sa.DateTime(timezone=True)))
            batch.add_column(sa.Column(f"{prefix}purge_reason", sa.String(128)))
            # The next purge looks up rows marked since the last complete one.
            batch.create_index(f"ix_{table}_{prefix}purged_at", [f"{prefix}purged_at"])


def downgrade() -> None:
    for table, prefix in _TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_{prefix}purged_at")
            batch.drop_column(f"{prefix}purge_reason")
            batch.drop_column(f"{prefix}purged_at")
