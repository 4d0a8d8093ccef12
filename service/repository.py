"""Data access: keyword-only functions over a session. No business rules here.

Constraint violations are turned into the domain errors they mean here, where the statement that
violates them runs, so callers never see ``IntegrityError``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import and_, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sceneprint.service.errors import DuplicateClips, KeyExists, SceneExists
from sceneprint.service.schemas import KeyPublic, ScenePublic
from sceneprint.service.tables import (
    ApiKey,
    Clip,
    ClipEmbedding,
    Lease,
    Prototype,
    Scene,
    SceneChange,
    ServedModel,
    utcnow,
)

# PostgreSQL's NOTIFY channel on which a committed scene change wakes every replica's change feed.
CHANGES_CHANNEL = "sceneprint_scene_changes"


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def bytes_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32)


def as_utc(moment: datetime) -> datetime:
    """SQLite returns stored timestamps without their zone; every timestamp here is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


# --- scenes and clips ---------------------------------------------------------------------------


def get_scene(session: Session, *, name: str) -> Scene | None:
    return session.scalars(select(Scene).where(Scene.name == name)).one_or_none()


def create_scene(session: Session, *, name: str) -> Scene:
    """Insert a scene. Raises SceneExists if the name is taken (also by a concurrent request)."""
    scene = Scene(name=name, created_at=utcnow())
    session.add(scene)
    try:
        session.flush()  # assigns the id
    except IntegrityError:
        session.rollback()
        raise SceneExists(f"scene {name!r} already exists", scene=name) from None
    return scene


def add_clip(session: Session, *, scene: Scene, sha256: str, filename: str, byte_size: int,
             duration_s: float) -> Clip:
    """Insert a clip. Raises DuplicateClips if the scene already holds this content."""
    clip = Clip(scene_id=scene.id, sha256=sha256, filename=filename, byte_size=byte_size, duration_s=duration_s,
                created_at=utcnow())
    session.add(clip)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise DuplicateClips(f"clip {filename!r} was added to scene {scene.name!r} concurrently",
                             file=filename) from None
    return clip


def put_clip_embedding(session: Session, *, clip_id: int, model_version: str, vector: np.ndarray) -> None:
    session.merge(ClipEmbedding(clip_id=clip_id, model_version=model_version, vector=vector_bytes(vector)))


def put_prototype(session: Session, *, scene_id: int, model_version: str, vector: np.ndarray, n_clips: int,
                  cohesion: float | None) -> None:
    session.merge(Prototype(scene_id=scene_id, model_version=model_version, vector=vector_bytes(vector),
                            n_clips=n_clips, cohesion=cohesion, updated_at=utcnow()))


def set_scene_threshold(session: Session, *, scene: Scene, threshold: float | None) -> None:
    scene.threshold = threshold
    session.flush()


def scene_decision_inputs(session: Session, *, model_version: str, scene_id: int | None = None
                          ) -> list[tuple[int, float | None, float | None]]:
    """(scene id, hand-set threshold, cohesion under ``model_version``) of every scene (or the one given)."""
    query = (select(Scene.id, Scene.threshold, Prototype.cohesion)
             .join(Prototype, (Prototype.scene_id == Scene.id) & (Prototype.model_version == model_version),
                   isouter=True))
    if scene_id is not None:
        query = query.where(Scene.id == scene_id)
    return [(sid, threshold, cohesion) for sid, threshold, cohesion in session.execute(query).all()]


def clip_similarity_rows(session: Session, *, scene_id: int, model_version: str) -> list[tuple[str, np.ndarray]]:
    """(display file name, embedding under ``model_version``) of a scene's clips, in their order."""
    rows = session.execute(
        select(Clip.filename, ClipEmbedding.vector).join(ClipEmbedding, Clip.id == ClipEmbedding.clip_id)
        .where(Clip.scene_id == scene_id, ClipEmbedding.model_version == model_version).order_by(Clip.id)
    ).all()
    return [(name, bytes_vector(vec)) for name, vec in rows]


def clip_embeddings(session: Session, *, scene_id: int, model_version: str) -> np.ndarray:
    """(N, D) embeddings of a scene's clips under ``model_version``."""
    rows = session.scalars(
        select(ClipEmbedding.vector).join(Clip, Clip.id == ClipEmbedding.clip_id)
        .where(Clip.scene_id == scene_id, ClipEmbedding.model_version == model_version).order_by(Clip.id)
    ).all()
    return np.stack([bytes_vector(r) for r in rows])


def scenes(session: Session, *, model_version: str, name: str | None = None,
           shown_version: str | None = None) -> list[ScenePublic]:
    """Scenes by name (or the one named), as the API shows them; ``model_version`` is set where the scene has
    a prototype for the queried model (stored under the model's key ``model_version``; shown as
    ``shown_version``, the model's version string, where given)."""
    clip_count = select(func.count(Clip.id)).where(Clip.scene_id == Scene.id).scalar_subquery()
    proto_version = (select(Prototype.model_version)
                     .where(Prototype.scene_id == Scene.id, Prototype.model_version == model_version)
                     .scalar_subquery())
    query = select(Scene.name, clip_count, proto_version, Scene.created_at).order_by(Scene.name)
    if name is not None:
        query = query.where(Scene.name == name)
    return [ScenePublic(name=scene_name, clips=clips,
                        model_version=(shown_version or version) if version is not None else None,
                        created_at=as_utc(created))
            for scene_name, clips, version, created in session.execute(query).all()]


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


def count_clips(session: Session, *, scene_id: int) -> int:
    return int(session.scalar(select(func.count(Clip.id)).where(Clip.scene_id == scene_id)) or 0)


def stored_bytes(session: Session) -> int:
    """Bytes of audio in the clip store: each distinct clip content counted once, as it is stored once."""
    per_blob = select(Clip.sha256, func.max(Clip.byte_size).label("size")).group_by(Clip.sha256).subquery()
    return int(session.scalar(select(func.coalesce(func.sum(per_blob.c.size), 0))) or 0)


def count_all_clips(session: Session) -> int:
    return int(session.scalar(select(func.count(Clip.id))) or 0)


# --- re-embedding for another model -------------------------------------------------------------


def clips_missing_embedding(session: Session, *, model_version: str, scene_ids: Collection[int] | None = None
                            ) -> list[tuple[int, int, str]]:
    """(clip id, scene id, sha256) of every clip (of the scenes ``scene_ids``, where given) without an embedding
    under the model key ``model_version``, by scene."""
    if scene_ids is None:
        return clips_missing_embedding_among(session, model_version=model_version, ids=None)
    clip_ids = list(session.scalars(select(Clip.id).where(Clip.scene_id.in_(list(scene_ids)))).all())
    return clips_missing_embedding_among(session, model_version=model_version, ids=clip_ids)


def clips_missing_embedding_among(session: Session, *, model_version: str, ids: list[int] | None
                                  ) -> list[tuple[int, int, str]]:
    """As ``clips_missing_embedding``, among the clips ``ids`` (those that still exist) where given."""
    has = select(ClipEmbedding.clip_id).where(ClipEmbedding.clip_id == Clip.id,
                                              ClipEmbedding.model_version == model_version).exists()
    query = select(Clip.id, Clip.scene_id, Clip.sha256).where(~has).order_by(Clip.scene_id, Clip.id)
    if ids is not None:
        query = query.where(Clip.id.in_(ids))
    return [(clip_id, scene_id, sha) for clip_id, scene_id, sha in session.execute(query).all()]


def insert_clip_embeddings(session: Session, *, model_version: str, rows: list[tuple[int, np.ndarray]]) -> None:
    """Insert (clip id, embedding) rows under ``model_version`` (clips that have none under it yet)."""
    if rows:
        session.execute(insert(ClipEmbedding), [{"clip_id": clip_id, "model_version": model_version,
                                                 "vector": vector_bytes(vec)} for clip_id, vec in rows])


def scenes_needing_prototype(session: Session, *, model_version: str, scene_ids: Collection[int] | None = None
                             ) -> list[int]:
    """Ids of scenes (among ``scene_ids``, where given) whose prototype under ``model_version`` is missing or made
    from another number of clips than they hold (clips were added while another model served)."""
    clip_count = select(func.count(Clip.id)).where(Clip.scene_id == Scene.id).scalar_subquery()
    query = (select(Scene.id)
             .join(Prototype, (Prototype.scene_id == Scene.id) & (Prototype.model_version == model_version),
                   isouter=True)
             .where(or_(Prototype.scene_id.is_(None), and_(clip_count > 0, Prototype.n_clips != clip_count)))
             .order_by(Scene.id))
    if scene_ids is not None:
        query = query.where(Scene.id.in_(list(scene_ids)))
    return list(session.scalars(query).all())


def embeddings_by_scene(session: Session, *, model_version: str, scene_ids: list[int]
                        ) -> dict[int, tuple[int, np.ndarray]]:
    """Per scene: (its clip count, its clips' embeddings under ``model_version`` (N, D), in clip order)."""
    counts = {sid: n for sid, n in session.execute(select(Clip.scene_id, func.count(Clip.id))
                                                   .where(Clip.scene_id.in_(scene_ids)).group_by(Clip.scene_id)).all()}
    rows = session.execute(
        select(Clip.scene_id, ClipEmbedding.vector).join(ClipEmbedding, Clip.id == ClipEmbedding.clip_id)
        .where(Clip.scene_id.in_(scene_ids), ClipEmbedding.model_version == model_version)
        .order_by(Clip.scene_id, Clip.id)).all()
    vectors: dict[int, list[np.ndarray]] = {}
    for scene_id, vec in rows:
        vectors.setdefault(scene_id, []).append(bytes_vector(vec))
    return {sid: (int(counts.get(sid, 0)), np.stack(vecs)) for sid, vecs in vectors.items()}


def replace_prototypes(session: Session, *, model_version: str,
                       rows: list[tuple[int, np.ndarray, int, float | None]]) -> None:
    """Write (scene id, prototype, clip count, cohesion) rows under ``model_version``, replacing those there."""
    if not rows:
        return
    session.execute(delete(Prototype).where(Prototype.model_version == model_version,
                                            Prototype.scene_id.in_([r[0] for r in rows])))
    now = utcnow()
    session.execute(insert(Prototype), [{"scene_id": sid, "model_version": model_version, "vector": vector_bytes(v),
                                         "n_clips": n, "cohesion": cohesion, "updated_at": now}
                                        for sid, v, n, cohesion in rows])


# --- served models ------------------------------------------------------------------------------


def record_model(session: Session, *, key: str, model_version: str, registry_version: str | None) -> None:
    """Note a model the service embeds for (once; a known key keeps its row and activation time). Call it first
    in its session: a row inserted meanwhile by another replica rolls the session back and is updated instead."""
    row = session.get(ServedModel, key)
    if row is None:
        session.add(ServedModel(key=key, model_version=model_version, registry_version=registry_version,
                                created_at=utcnow()))
        try:
            session.flush()
            return
        except IntegrityError:
            session.rollback()
            row = session.get(ServedModel, key)
    if row is not None and registry_version is not None:
        row.registry_version = registry_version
    session.flush()


def activate_model(session: Session, *, key: str) -> None:
    """Record that ``key`` went live: every scene has its prototype under it."""
    session.execute(update(ServedModel).where(ServedModel.key == key).values(activated_at=utcnow()))


def last_activated_model(session: Session) -> ServedModel | None:
    """The model the service most recently switched to, fully."""
    return session.scalars(select(ServedModel).where(ServedModel.activated_at.is_not(None))
                           .order_by(ServedModel.activated_at.desc()).limit(1)).one_or_none()


def recent_model_keys(session: Session, *, count: int) -> list[str]:
    """The keys of the ``count`` models most recently live, newest first."""
    return list(session.scalars(select(ServedModel.key).where(ServedModel.activated_at.is_not(None))
                                .order_by(ServedModel.activated_at.desc()).limit(count)).all())


def prune_embeddings(session: Session, *, keep: set[str]) -> tuple[int, int]:
    """Delete embeddings and prototypes of every model key not in ``keep``; (embeddings, prototypes) deleted."""
    clips = session.execute(delete(ClipEmbedding).where(ClipEmbedding.model_version.not_in(keep)))
    protos = session.execute(delete(Prototype).where(Prototype.model_version.not_in(keep)))
    return int(getattr(clips, "rowcount", 0) or 0), int(getattr(protos, "rowcount", 0) or 0)


# --- API keys -----------------------------------------------------------------------------------


def add_key(session: Session, *, name: str, scope: str, key_id: str, secret_sha256: str) -> KeyPublic:
    """Insert a key. Raises KeyExists if the name is taken (revoked keys keep their names)."""
    row = ApiKey(name=name, scope=scope, key_id=key_id, secret_sha256=secret_sha256, created_at=utcnow())
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise KeyExists(f"an API key named {name!r} exists (revoked keys keep their names)", key=name) from None
    return key_public(row)


def keys(session: Session) -> list[KeyPublic]:
    return [key_public(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.name)).all()]


def get_key(session: Session, *, name: str) -> ApiKey | None:
    return session.scalars(select(ApiKey).where(ApiKey.name == name)).one_or_none()


def active_keys(session: Session) -> list[tuple[str, str, str, str]]:
    """(key id, name, scope, secret sha256) of every key not revoked."""
    rows = session.execute(select(ApiKey.key_id, ApiKey.name, ApiKey.scope, ApiKey.secret_sha256)
                           .where(ApiKey.revoked_at.is_(None))).all()
    return [(key_id, name, scope, digest) for key_id, name, scope, digest in rows]


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic(name=row.name, scope=row.scope, created_at=as_utc(row.created_at),
                     revoked_at=as_utc(row.revoked_at) if row.revoked_at is not None else None)


# --- replicas: the scene change log and leases --------------------------------------------------


def note_scene_change(session: Session, *, scene_id: int) -> None:
    """Log that ``scene_id`` changed, in the caller's transaction (call it last before the commit). On
    PostgreSQL, also NOTIFY the replicas: the notification is delivered when, and only if, the commit succeeds."""
    session.add(SceneChange(scene_id=scene_id, created_at=utcnow()))
    session.flush()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": CHANGES_CHANNEL, "payload": str(scene_id)})


def last_scene_change(session: Session) -> int:
    """The highest change id logged (0: none)."""
    return int(session.scalar(select(func.max(SceneChange.id))) or 0)


def scene_changes(session: Session, *, after: int, also: Collection[int] = (), limit: int = 10_000
                  ) -> list[tuple[int, int]]:
    """(change id, scene id) of the changes past ``after`` and of the ids ``also``, by id."""
    cond = SceneChange.id > after
    if also:
        cond = or_(cond, SceneChange.id.in_(list(also)))
    return [(cid, sid) for cid, sid in session.execute(
        select(SceneChange.id, SceneChange.scene_id).where(cond).order_by(SceneChange.id).limit(limit)).all()]


def prune_scene_changes(session: Session, *, older_than: timedelta) -> int:
    """Delete changes logged more than ``older_than`` ago; how many."""
    result = session.execute(delete(SceneChange).where(SceneChange.created_at < utcnow() - older_than))
    return int(getattr(result, "rowcount", 0) or 0)


def index_entries(session: Session, *, model_version: str, scene_ids: Collection[int]
                  ) -> list[tuple[int, str, np.ndarray, float | None, float | None]]:
    """(scene id, name, prototype, hand-set threshold, cohesion) under ``model_version`` of those of ``scene_ids``
    that exist and have a prototype under it."""
    rows = session.execute(
        select(Scene.id, Scene.name, Prototype.vector, Scene.threshold, Prototype.cohesion)
        .join(Prototype, Prototype.scene_id == Scene.id)
        .where(Prototype.model_version == model_version, Scene.id.in_(list(scene_ids)))).all()
    return [(sid, name, bytes_vector(vec), threshold, cohesion) for sid, name, vec, threshold, cohesion in rows]


def take_lease(session: Session, *, name: str, owner: str, ttl: timedelta) -> bool:
    """Take (or renew) the lease ``name`` for ``owner`` until now + ``ttl``, unless another owner holds it unexpired.

    Commits. Returns whether ``owner`` holds it now.
    """
    now = utcnow()
    taken = session.execute(update(Lease).where(Lease.name == name, or_(Lease.owner == owner, Lease.expires_at < now))
                            .values(owner=owner, expires_at=now + ttl))
    if int(getattr(taken, "rowcount", 0) or 0) == 1:
        session.commit()
        return True
    if session.get(Lease, name) is not None:
        session.rollback()
        return False
    session.add(Lease(name=name, owner=owner, expires_at=now + ttl))
    try:
        session.commit()
        return True
    except IntegrityError:  # another replica inserted it first
        session.rollback()
        return False


def release_lease(session: Session, *, name: str, owner: str) -> None:
    """Give the lease ``name`` up, if ``owner`` holds it. Commits."""
    session.execute(delete(Lease).where(Lease.name == name, Lease.owner == owner))
    session.commit()
