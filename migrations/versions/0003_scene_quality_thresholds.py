"""Enrollment quality and per-scene thresholds: a scene's hand-set threshold and whether its enrollment was
forced past the quality checks; each prototype's cohesion (mean leave-one-out similarity of its clips).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scenes") as batch:
        batch.add_column(sa.Column("threshold", sa.Float(), nullable=True))
        batch.add_column(sa.Column("forced", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("prototypes") as batch:
        batch.add_column(sa.Column("cohesion", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prototypes") as batch:
        batch.drop_column("cohesion")
    with op.batch_alter_table("scenes") as batch:
        batch.drop_column("forced")
        batch.drop_column("threshold")
