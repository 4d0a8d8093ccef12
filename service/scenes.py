"""The service layer: enrollment, clips, scenes and classification, over the repository and index.

Every public method is a coroutine that hands its work to one thread, once: decode and embed work
(classify, enroll, add clips) to the inference pool, where the whole request runs; database-only work
to a worker thread. No thread ever blocks waiting on another. They raise ``SceneprintError``
subclasses only.
"""

from __future__ import annotations

import asyncio
import re
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import numpy as np
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from sceneprint.audio import AudioError, ClipLimits, DecodedClip, decode_clip
from sceneprint.manifest import Manifest
from sceneprint.prototypes import Decision, Match, decide, prototype
from sceneprint.runtime import OnnxEncoder
from sceneprint.service import repository as repo
from sceneprint.service.clipstore import ClipStore, content_hash
from sceneprint.service.errors import (
    ClipRejected,
    DuplicateClips,
    InvalidSceneName,
    QuotaExceeded,
    SceneExists,
    SceneNotFound,
    StorageUnavailable,
    WrongClipCount,
)
from sceneprint.service.index import SceneIndex
from sceneprint.service.schemas import SCENE_NAME_PATTERN, ScenePublic
from sceneprint.service.tables import Scene

T = TypeVar("T")

SCENE_NAME = re.compile(SCENE_NAME_PATTERN)
# Stored clips passed the limits in force when they were enrolled; re-embedding must not refuse them
# because the limits changed since.
STORED_CLIP_LIMITS = ClipLimits(min_seconds=0.0, max_seconds=24 * 3600.0)
MAX_DISPLAY_NAME = 255  # characters of a client file name kept for display (the clips.filename column)


def check_scene_name(name: str) -> str:
    """Return ``name`` if it is 1-64 characters of a-z, 0-9, '-', '_'; else raise InvalidSceneName."""
    if not SCENE_NAME.fullmatch(name):
        raise InvalidSceneName(
            f"scene name {name[:80]!r} is invalid: use 1-64 characters of lowercase letters, digits, '-' and '_'"
        )
    return name


def display_filename(name: str | None) -> str:
    """A client file name made safe for display and storage as text (never used as a path).

    Unprintable characters are dropped; a long name keeps its start and its end (the extension), joined
    by an ellipsis, in at most ``MAX_DISPLAY_NAME`` characters.
    """
    cleaned = "".join(ch for ch in unicodedata.normalize("NFC", name or "") if ch.isprintable())
    if len(cleaned) > MAX_DISPLAY_NAME:
        tail = MAX_DISPLAY_NAME // 4
        cleaned = cleaned[: MAX_DISPLAY_NAME - tail - 1] + "…" + cleaned[-tail:]
    return cleaned or "unnamed"


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the client's name for it (for display only) and its bytes."""

    filename: str
    data: bytes


@dataclass(frozen=True)
class Quotas:
    """What clients may store, in all."""

    max_scenes: int
    max_clips_per_scene: int
    max_stored_bytes: int


@dataclass(frozen=True)
class LoadedModel:
    """The running encoder and its manifest; replaced whole, never mutated."""

    encoder: OnnxEncoder
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.model_version

    def embed(self, clip: DecodedClip) -> np.ndarray:
        return self.encoder.embed_clip(clip.waveform)


@dataclass(frozen=True)
class Classification:
    decision: Decision
    model_version: str
    duration_s: float
    timings_ms: dict[str, float]  # queue, decode, embed, search: reported as a Server-Timing header


class SceneService:
    def __init__(self, *, sessions: sessionmaker[Session], store: ClipStore, index: SceneIndex, model: LoadedModel,
                 limits: ClipLimits, clips_per_enrollment: int, quotas: Quotas, unknown_threshold: float,
                 inference_slots: int) -> None:
        self.sessions = sessions
        self.store = store
        self.index = index
        self.model = model
        self.limits = limits
        self.clips_per_enrollment = clips_per_enrollment
        self.quotas = quotas
        self.unknown_threshold = unknown_threshold
        # Decode + embed run on a fixed pool, one thread per core by default: waiting requests queue in
        # order (FIFO) instead of time-slicing the cores. Each slot runs the shared ONNX Runtime session on
        # its own thread with the session's intra-op threads (``inference_threads``, 1 by default).
        self._inference = ThreadPoolExecutor(max_workers=inference_slots, thread_name_prefix="inference")

    # --- start-up -------------------------------------------------------------------------------

    def start(self) -> dict[str, int]:
        """Embed scenes that lack a prototype for the running model, sweep orphan audio, rebuild the index."""
        model = self.model
        with self._session() as session:
            missing = repo.scenes_without_prototype(session, model_version=model.version)
            for scene in missing:
                self._reembed(session, scene_id=scene.id, model=model)
            session.commit()
        with self.store.lock, self._session() as session:
            swept = self.store.sweep(repo.referenced_hashes(session))
        self.rebuild_index()
        return {"reembedded": len(missing), "swept": swept, "indexed": len(self.index)}

    def rebuild_index(self) -> None:
        """Rebuild the index from the database and check that the two agree."""
        with self._session() as session:
            self.index.rebuild(repo.prototypes(session, model_version=self.model.version))
            total = repo.count_scenes(session)
        if len(self.index) != total:
            raise RuntimeError(f"index holds {len(self.index)} scenes, the database {total}")

    # --- scenes ---------------------------------------------------------------------------------

    async def enroll(self, name: str, uploads: Sequence[Upload]) -> ScenePublic:
        """Create a scene from exactly ``clips_per_enrollment`` clips, all or nothing."""
        check_scene_name(name)
        if len(uploads) != self.clips_per_enrollment:
            raise WrongClipCount(f"enrollment needs exactly {self.clips_per_enrollment} clips, got {len(uploads)}",
                                 expected=self.clips_per_enrollment, received=len(uploads))
        return await self._infer(partial(self._enroll, name, uploads, self.model))

    async def add_clips(self, name: str, uploads: Sequence[Upload]) -> ScenePublic:
        """Add 1..clips_per_enrollment clips to an existing scene and update its prototype."""
        check_scene_name(name)
        if not 1 <= len(uploads) <= self.clips_per_enrollment:
            raise WrongClipCount(f"send 1 to {self.clips_per_enrollment} clips, got {len(uploads)}",
                                 expected=self.clips_per_enrollment, received=len(uploads))
        return await self._infer(partial(self._add_clips, name, uploads, self.model))

    async def list_scenes(self) -> list[ScenePublic]:
        def work() -> list[ScenePublic]:
            with self._session() as session:
                return repo.scenes(session, model_version=self.model.version)

        return await run_in_threadpool(work)

    async def get_scene(self, name: str) -> ScenePublic:
        check_scene_name(name)

        def work() -> list[ScenePublic]:
            with self._session() as session:
                return repo.scenes(session, model_version=self.model.version, name=name)

        found = await run_in_threadpool(work)
        if not found:
            raise SceneNotFound(f"scene {name!r} does not exist", scene=name)
        return found[0]

    async def delete_scene(self, name: str) -> None:
        check_scene_name(name)
        await run_in_threadpool(self._delete, name)

    # --- classification -------------------------------------------------------------------------

    async def classify(self, upload: Upload, top_k: int) -> Classification:
        """Nearest scenes for one clip; unknown when the best score is below the threshold."""
        model, queued = self.model, time.perf_counter()

        def work() -> tuple[DecodedClip, list[Match], list[float]]:
            t0 = time.perf_counter()
            clip = self._decode(model, upload)
            t1 = time.perf_counter()
            query = model.embed(clip)
            t2 = time.perf_counter()
            matches = self.index.search(query, top_k)
            return clip, matches, [t0, t1, t2, time.perf_counter()]

        clip, matches, (t0, t1, t2, t3) = await self._infer(work)
        timings = {"queue": (t0 - queued) * 1e3, "decode": (t1 - t0) * 1e3, "embed": (t2 - t1) * 1e3,
                   "search": (t3 - t2) * 1e3}
        return Classification(decision=decide(matches, self.unknown_threshold), model_version=model.version,
                              duration_s=round(clip.duration_s, 3), timings_ms=timings)

    def close(self) -> None:
        """Stop the inference threads (after the server stopped taking requests)."""
        self._inference.shutdown(wait=True)

    # --- the work, on one thread ----------------------------------------------------------------

    async def _infer(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the inference pool; the event loop awaits it (its exceptions re-raise here)."""
        return await asyncio.wrap_future(self._inference.submit(work))

    def _enroll(self, name: str, uploads: Sequence[Upload], model: LoadedModel) -> ScenePublic:
        hashes = [content_hash(u.data) for u in uploads]  # each upload is hashed here, once
        self._check_duplicates(uploads, hashes, existing=set())
        with self._session() as session:
            if repo.get_scene(session, name=name) is not None:
                raise SceneExists(f"scene {name!r} already exists", scene=name)
            self._check_quotas(session, None, uploads, hashes)
        decoded = [self._decode(model, u) for u in uploads]
        embeddings = [model.embed(d) for d in decoded]
        proto = prototype(np.stack(embeddings))  # (clips, D) -> (D,)
        with self._storing(uploads, hashes), self._session() as session:
            self._check_quotas(session, None, uploads, hashes)  # again, now that no other write can interleave
            scene = repo.create_scene(session, name=name)
            self._insert_clips(session, scene, uploads, hashes, decoded, embeddings, model)
            repo.put_prototype(session, scene_id=scene.id, model_version=model.version, vector=proto,
                               n_clips=len(uploads))
            session.commit()
            scene_id, created_at = scene.id, scene.created_at
        self._index_if_current(model, scene_id, name, proto)
        return ScenePublic(name=name, clips=len(uploads), model_version=model.version,
                           created_at=repo.as_utc(created_at))

    def _add_clips(self, name: str, uploads: Sequence[Upload], model: LoadedModel) -> ScenePublic:
        hashes = [content_hash(u.data) for u in uploads]
        with self._session() as session:
            scene = self._get(session, name)
            self._check_duplicates(uploads, hashes, existing={c.sha256 for c in scene.clips})
            self._check_quotas(session, scene, uploads, hashes)
        decoded = [self._decode(model, u) for u in uploads]
        embeddings = [model.embed(d) for d in decoded]
        with self._storing(uploads, hashes), self._session() as session:
            scene = self._get(session, name)
            self._check_quotas(session, scene, uploads, hashes)
            self._insert_clips(session, scene, uploads, hashes, decoded, embeddings, model)
            all_embeddings = repo.clip_embeddings(session, scene_id=scene.id, model_version=model.version)
            proto = prototype(all_embeddings)
            repo.put_prototype(session, scene_id=scene.id, model_version=model.version, vector=proto,
                               n_clips=len(all_embeddings))
            session.commit()
            result = ScenePublic(name=name, clips=len(all_embeddings), model_version=model.version,
                                 created_at=repo.as_utc(scene.created_at))
            scene_id = scene.id
        self._index_if_current(model, scene_id, name, proto)
        return result

    def _delete(self, name: str) -> None:
        with self.store.lock:
            with self._session() as session:
                scene = self._get(session, name)
                scene_id = scene.id
                hashes = repo.delete_scene(session, scene=scene)
                session.commit()
            self.index.remove(scene_id)
            with self._session() as session:
                still_used = repo.referenced_hashes(session, among=hashes)
            self.store.remove(set(hashes) - still_used)

    # --- internals ------------------------------------------------------------------------------

    def _check_duplicates(self, uploads: Sequence[Upload], hashes: Sequence[str], existing: set[str]) -> None:
        seen: dict[str, str] = {}
        for u, h in zip(uploads, hashes, strict=True):
            shown = display_filename(u.filename)
            if h in seen:
                raise DuplicateClips(f"clips {seen[h]!r} and {shown!r} have identical content", file=shown)
            if h in existing:
                raise DuplicateClips(f"clip {shown!r} is already in this scene", file=shown)
            seen[h] = shown

    def _check_quotas(self, session: Session, scene: Scene | None, uploads: Sequence[Upload],
                      hashes: Sequence[str]) -> None:
        q = self.quotas
        if scene is None and repo.count_scenes(session) >= q.max_scenes:
            raise QuotaExceeded(f"the service holds its maximum of {q.max_scenes} scenes; delete one first",
                                quota="max_scenes", limit=q.max_scenes)
        clips = (repo.count_clips(session, scene_id=scene.id) if scene is not None else 0) + len(uploads)
        if clips > q.max_clips_per_scene:
            raise QuotaExceeded(f"a scene holds at most {q.max_clips_per_scene} clips; this request would make "
                                f"{clips}", quota="max_clips_per_scene", limit=q.max_clips_per_scene)
        already = repo.referenced_hashes(session, among=list(hashes))
        new = {h: len(u.data) for u, h in zip(uploads, hashes, strict=True) if h not in already}
        total = repo.stored_bytes(session) + sum(new.values())
        if total > q.max_stored_bytes:
            raise QuotaExceeded(f"the clip store holds at most {q.max_stored_bytes} bytes of audio; this request "
                                f"would make {total}", quota="max_stored_bytes", limit=q.max_stored_bytes)

    def _decode(self, model: LoadedModel, upload: Upload) -> DecodedClip:
        try:
            return decode_clip(upload.data, sample_rate=model.encoder.sample_rate, limits=self.limits)
        except AudioError as exc:
            raise ClipRejected(display_filename(upload.filename), exc) from exc

    @contextmanager
    def _storing(self, uploads: Sequence[Upload], hashes: Sequence[str]) -> Iterator[None]:
        """Write the uploads' audio, then run the body (the database commit) under the store's lock.

        If anything fails, the audio files this request created are removed again, so a refused
        enrollment leaves nothing behind even before the start-up sweep.
        """
        with self.store.lock:
            created: list[str] = []
            try:
                for u, sha in zip(uploads, hashes, strict=True):
                    if not self.store.exists(sha):
                        self.store.put(u.data, sha)
                        created.append(sha)
                yield
            except OSError as exc:
                self.store.remove(created)
                raise StorageUnavailable(f"the clip store cannot be written: {exc.strerror or 'I/O error'}") from exc
            except BaseException:
                self.store.remove(created)
                raise

    @staticmethod
    def _insert_clips(session: Session, scene: Scene, uploads: Sequence[Upload], hashes: Sequence[str],
                      decoded: Sequence[DecodedClip], embeddings: Sequence[np.ndarray], model: LoadedModel) -> None:
        for upload, sha, clip, emb in zip(uploads, hashes, decoded, embeddings, strict=True):
            row = repo.add_clip(session, scene=scene, sha256=sha, filename=display_filename(upload.filename),
                                byte_size=len(upload.data), duration_s=clip.duration_s)
            repo.put_clip_embedding(session, clip_id=row.id, model_version=model.version, vector=emb)

    def _reembed(self, session: Session, *, scene_id: int, model: LoadedModel) -> None:
        clips = repo.clip_rows(session, scene_id=scene_id)

        def embed(sha256: str) -> np.ndarray:
            decoded = decode_clip(self.store.read(sha256), sample_rate=model.encoder.sample_rate,
                                  limits=STORED_CLIP_LIMITS)
            return model.embed(decoded)

        embeddings = []
        for clip in clips:
            # On the inference pool, like every embed; start-up runs in a thread of its own, so waiting is fine.
            emb = self._inference.submit(partial(embed, clip.sha256)).result()
            repo.put_clip_embedding(session, clip_id=clip.id, model_version=model.version, vector=emb)
            embeddings.append(emb)
        repo.put_prototype(session, scene_id=scene_id, model_version=model.version,
                           vector=prototype(np.stack(embeddings)), n_clips=len(embeddings))

    def _index_if_current(self, model: LoadedModel, scene_id: int, name: str, proto: np.ndarray) -> None:
        if model is self.model:
            self.index.upsert(scene_id, name, proto)

    def _get(self, session: Session, name: str) -> Scene:
        scene = repo.get_scene(session, name=name)
        if scene is None:
            raise SceneNotFound(f"scene {name!r} does not exist", scene=name)
        return scene

    def _session(self) -> Session:
        return self.sessions()
