"""Data access: keyword-only functions over a session. No business rules here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from sceneprint.service.tables import Clip, ClipEmbedding, Prototype, Scene, utcnow


@dataclass(frozen=True)
class SceneRow:
    id: int
    name: str
    created_at: datetime
    clips: int
    model_version: str | None  # the version of its prototype for the queried model, if any


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def bytes_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32)


def get_scene(session: Session, *, name: str) -> Scene | None:
    return session.scalars(select(Scene).where(Scene.name == name)).one_or_none()


def create_scene(session: Session, *, name: str) -> Scene:
    scene = Scene(name=name, created_at=utcnow())
    session.add(scene)
    session.flush()  # assigns the id; raises IntegrityError if the name exists
    return scene


def add_clip(session: Session, *, scene: Scene, sha256: str, filename: str, byte_size: int,
             duration_s: float) -> Clip:
    clip = Clip(scene_id=scene.id, sha256=sha256, filename=filename, byte_size=byte_size, duration_s=duration_s,
                created_at=utcnow())
    session.add(clip)
    session.flush()
    return clip


def put_clip_embedding(session: Session, *, clip_id: int, model_version: str, vector: np.ndarray) -> None:
    session.merge(ClipEmbedding(clip_id=clip_id, model_version=model_version, vector=vector_bytes(vector)))


def put_prototype(session: Session, *, scene_id: int, model_version: str, vector: np.ndarray, n_clips: int) -> None:
    session.merge(Prototype(scene_id=scene_id, model_version=model_version, vector=vector_bytes(vector),
                            n_clips=n_clips, updated_at=utcnow()))


def clip_embeddings(session: Session, *, scene_id: int, model_version: str) -> np.ndarray:
    """(N, D) embeddings of a scene's clips under ``model_version``."""
    rows = session.scalars(
        select(ClipEmbedding.vector).join(Clip, Clip.id == ClipEmbedding.clip_id)
        .where(Clip.scene_id == scene_id, ClipEmbedding.model_version == model_version).order_by(Clip.id)
    ).all()
    return np.stack([bytes_vector(r) for r in rows])


def scene_rows(session: Session, *, model_version: str, name: str | None = None) -> list[SceneRow]:
    clip_count = select(func.count(Clip.id)).where(Clip.scene_id == Scene.id).scalar_subquery()
    proto_version = (select(Prototype.model_version)
                     .where(Prototype.scene_id == Scene.id, Prototype.model_version == model_version)
                     .scalar_subquery())
    query = select(Scene.id, Scene.name, Scene.created_at, clip_count, proto_version).order_by(Scene.name)
    if name is not None:
        query = query.where(Scene.name == name)
    return [SceneRow(sid, scene_name, as_utc(created), clips, version)
            for sid, scene_name, created, clips, version in session.execute(query).all()]


def as_utc(moment: datetime) -> datetime:
    """SQLite returns stored timestamps without their zone; every timestamp here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def delete_scene(session: Session, *, scene: Scene) -> list[str]:
    """Delete a scene with its clips, embeddings and prototypes; return its clips' content hashes."""
    hashes = [c.sha256 for c in scene.clips]
    clip_ids = select(Clip.id).where(Clip.scene_id == scene.id)
    # Explicit deletes, so the result does not depend on the database enforcing ON DELETE CASCADE.
    session.execute(delete(ClipEmbedding).where(ClipEmbedding.clip_id.in_(clip_ids)))
    session.execute(delete(Prototype).where(Prototype.scene_id == scene.id))
    session.execute(delete(Clip).where(Clip.scene_id == scene.id))
    session.execute(delete(Scene).where(Scene.id == scene.id))
    return hashes


def prototypes(session: Session, *, model_version: str, batch: int = 4096) -> Iterator[tuple[int, str, np.ndarray]]:
    """(scene id, name, prototype) of every scene with a prototype under ``model_version``, streamed in
    batches so that 100,000 scenes never sit in memory as Python rows all at once."""
    result = session.execute(
        select(Scene.id, Scene.name, Prototype.vector).join(Prototype, Prototype.scene_id == Scene.id)
        .where(Prototype.model_version == model_version).order_by(Scene.id)
        .execution_options(yield_per=batch)
    )
    for sid, name, vec in result:
        yield sid, name, bytes_vector(vec)


def scenes_without_prototype(session: Session, *, model_version: str) -> list[Scene]:
    has = select(Prototype.scene_id).where(Prototype.model_version == model_version)
    return list(session.scalars(select(Scene).where(Scene.id.not_in(has)).order_by(Scene.id)).all())


def referenced_hashes(session: Session, *, among: list[str] | None = None) -> set[str]:
    query = select(Clip.sha256).distinct()
    if among is not None:
        query = query.where(Clip.sha256.in_(among))
    return set(session.scalars(query).all())


def clip_rows(session: Session, *, scene_id: int) -> list[Clip]:
    return list(session.scalars(select(Clip).where(Clip.scene_id == scene_id).order_by(Clip.id)).all())


def count_scenes(session: Session) -> int:
    return int(session.scalar(select(func.count(Scene.id))) or 0)
