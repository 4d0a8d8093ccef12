"""Served models: every model (by identity key) the service has embedded for, and when each last went live,
so that a restart serves the model the service had fully switched to and resumes a pending reload.

Embeddings and prototypes keep their ``model_version`` columns, which from now on hold the model's key
(``<model_version>@<fingerprint16>``); rows written under a bare version string are re-embedded under
the key at start and pruned after.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_models",
        sa.Column("key", sa.String(128), primary_key=True),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("registry_version", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_served_models_activated_at", "served_models", ["activated_at"])


def downgrade() -> None:
    op.drop_index("ix_served_models_activated_at", table_name="served_models")
    op.drop_table("served_models")
