"""The database schema (SQLAlchemy 2). Created and changed only by Alembic migrations.

The database is the truth: scenes, their clips (the audio itself lives content-addressed in the clip
store), and embeddings and prototypes per model, so a model change can re-embed from audio; the models
served (which one the service has fully switched to); and the API keys (hashed).

Embeddings and prototypes are keyed by the model's identity, ``<model_version>@<fingerprint16>``
(``sceneprint.manifest.model_key``), in their ``model_version`` columns: two bundles of one version
string but different weights never share vectors. Rows written before keys existed hold the bare
version string; no running model has that key, so they are re-embedded and then pruned.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Scene(Base):
    __tablename__ = "scenes"
    __table_args__ = (UniqueConstraint("name", name="uq_scenes_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    # Set by an operator (PATCH /scenes/{name}); None: the threshold the decision rule gives the scene.
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Enrolled (or given clips) with force=true past the quality checks.
    forced: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())

    clips: Mapped[list[Clip]] = relationship(back_populates="scene", cascade="all, delete-orphan",
                                             passive_deletes=True, order_by="Clip.id")


class Clip(Base):
    __tablename__ = "clips"
    __table_args__ = (UniqueConstraint("scene_id", "sha256", name="uq_clips_scene_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scene_id: Mapped[int] = mapped_column(ForeignKey("scenes.id", ondelete="CASCADE"), index=True, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), index=True, nullable=False)
    # The client's file name, for display only (never used as a path); truncated and cleaned.
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    byte_size: Mapped[int] = mapped_column(Integer, nullable=False)
    duration_s: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)

    scene: Mapped[Scene] = relationship(back_populates="clips")


class ClipEmbedding(Base):
    __tablename__ = "clip_embeddings"

    clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id", ondelete="CASCADE"), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # float32, embedding_dim values


class Prototype(Base):
    __tablename__ = "prototypes"

    scene_id: Mapped[int] = mapped_column(ForeignKey("scenes.id", ondelete="CASCADE"), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # float32, unit length
    n_clips: Mapped[int] = mapped_column(Integer, nullable=False)
    # Mean leave-one-out similarity of the scene's clips under this model (None for a single clip).
    cohesion: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)


class ServedModel(Base):
    """A model (by key) the service has embedded for; ``activated_at``: when it last went live, fully embedded."""

    __tablename__ = "served_models"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), nullable=False)
    # The registry version it was loaded from (None: a bundle given by path, outside a registry).
    registry_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)


# SQLite numbers only an INTEGER PRIMARY KEY from its row ids; PostgreSQL gets a 64-bit identity.
ChangeId = BigInteger().with_variant(Integer(), "sqlite")


class SceneChange(Base):
    """The change log that keeps every replica's index in step with the database: one row per committed
    enrollment, added clips, threshold change or deletion (written in the same transaction). Each replica reads
    the rows past the last it saw (woken by PostgreSQL's NOTIFY, else by polling); rows older than an hour are
    pruned (a replica down longer rebuilds its whole index at start anyway)."""

    __tablename__ = "scene_changes"

    id: Mapped[int] = mapped_column(ChangeId, primary_key=True, autoincrement=True)
    # Not a foreign key: a deleted scene's change outlives it.
    scene_id: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False, index=True)


class Lease(Base):
    """A named lease that one replica holds at a time, until ``expires_at`` unless renewed: the replica that holds
    ``reembed:<model key>`` re-embeds the stored audio for that model while the others wait for it."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(160), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class ApiKey(Base):
    """An API key: its public id and the SHA-256 of its secret, never the key itself."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("name", name="uq_api_keys_name"),
                      UniqueConstraint("key_id", name="uq_api_keys_key_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    scope: Mapped[str] = mapped_column(String(16), nullable=False)
    key_id: Mapped[str] = mapped_column(String(32), nullable=False)
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
