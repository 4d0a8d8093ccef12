"""Create scenes, clips, clip embeddings and prototypes.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scenes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("name", name="uq_scenes_name"),
    )
    op.create_table(
        "clips",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("scene_id", sa.Integer(), sa.ForeignKey("scenes.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("byte_size", sa.Integer(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("scene_id", "sha256", name="uq_clips_scene_sha256"),
    )
    op.create_index("ix_clips_scene_id", "clips", ["scene_id"])
    op.create_index("ix_clips_sha256", "clips", ["sha256"])
    op.create_table(
        "clip_embeddings",
        sa.Column("clip_id", sa.Integer(), sa.ForeignKey("clips.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_version", sa.String(128), primary_key=True),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "prototypes",
        sa.Column("scene_id", sa.Integer(), sa.ForeignKey("scenes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("model_version", sa.String(128), primary_key=True),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("n_clips", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_prototypes_model_version", "prototypes", ["model_version"])


def downgrade() -> None:
    op.drop_index("ix_prototypes_model_version", "prototypes")
    op.drop_table("prototypes")
    op.drop_table("clip_embeddings")
    op.drop_index("ix_clips_sha256", "clips")
    op.drop_index("ix_clips_scene_id", "clips")
    op.drop_table("clips")
    op.drop_table("scenes")
