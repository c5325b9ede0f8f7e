"""Image statistics per prediction (size, bit depth, windowed mean, manufacturer), for the
drift watch.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("image_stats", sa.JSON()))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("image_stats")
