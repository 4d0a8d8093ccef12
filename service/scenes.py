"""The service layer: enrollment, clips, scenes and classification, over the repository and index.

Routes call these methods from a worker thread; they raise ``SceneprintError`` subclasses only.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TypeVar

import numpy as np
import torch
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sceneprint.audio import AudioError, ClipLimits, DecodedClip, decode_clip
from sceneprint.bundle import Manifest
from sceneprint.encoder import Encoder
from sceneprint.prototypes import Decision, Match, decide, prototype
from sceneprint.service import repository as repo
from sceneprint.service.clipstore import ClipStore, content_hash
from sceneprint.service.errors import (
    ClipRejected,
    DuplicateClips,
    InvalidSceneName,
    SceneExists,
    SceneNotFound,
    StorageUnavailable,
    TooLarge,
    WrongClipCount,
)
from sceneprint.service.index import SceneIndex
from sceneprint.service.tables import Scene

T = TypeVar("T")

SCENE_NAME = re.compile(r"[a-z0-9_-]{1,64}")
# Stored clips passed the limits in force when they were enrolled; re-embedding must not refuse them
# because the limits changed since.
STORED_CLIP_LIMITS = ClipLimits(min_seconds=0.0, max_seconds=24 * 3600.0)


def check_scene_name(name: str) -> str:
    """Return ``name`` if it is 1-64 characters of a-z, 0-9, '-', '_'; else raise InvalidSceneName."""
    if not SCENE_NAME.fullmatch(name):
        raise InvalidSceneName(
            f"scene name {name[:80]!r} is invalid: use 1-64 characters of lowercase letters, digits, '-' and '_'"
        )
    return name


def display_filename(name: str | None) -> str:
    """A client file name made safe for display and storage as text (never used as a path)."""
    cleaned = "".join(ch for ch in unicodedata.normalize("NFC", name or "") if ch.isprintable())
    return cleaned[:255] or "unnamed"


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


@dataclass(frozen=True)
class LoadedModel:
    """The running encoder and its manifest; replaced whole, never mutated."""

    encoder: Encoder
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.model_version

    def embed(self, clip: DecodedClip) -> np.ndarray:
        return self.encoder.embed_clip(clip.waveform)


@dataclass(frozen=True)
class SceneInfo:
    name: str
    clips: int
    model_version: str | None
    created_at: datetime


@dataclass(frozen=True)
class Classification:
    decision: Decision
    model_version: str
    duration_s: float
    timings_ms: dict[str, float]  # decode, embed, search: reported as a Server-Timing header


class SceneService:
    def __init__(self, *, sessions: sessionmaker[Session], store: ClipStore, index: SceneIndex, model: LoadedModel,
                 limits: ClipLimits, max_upload_bytes: int, clips_per_enrollment: int, unknown_threshold: float,
                 torch_threads: int, inference_slots: int) -> None:
        self.sessions = sessions
        self.store = store
        self.index = index
        self.model = model
        self.limits = limits
        self.max_upload_bytes = max_upload_bytes
        self.clips_per_enrollment = clips_per_enrollment
        self.unknown_threshold = unknown_threshold
        # Decode + embed run on a fixed pool, one thread per core by default: waiting requests queue in
        # order (FIFO) instead of time-slicing the cores, and only these threads ever hold torch's
        # per-thread buffers and malloc arenas.
        self._inference = ThreadPoolExecutor(max_workers=inference_slots, thread_name_prefix="inference",
                                             initializer=torch.set_num_threads, initargs=(torch_threads,))

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

    def enroll(self, name: str, uploads: Sequence[Upload]) -> SceneInfo:
        """Create a scene from exactly ``clips_per_enrollment`` clips, all or nothing."""
        check_scene_name(name)
        if len(uploads) != self.clips_per_enrollment:
            raise WrongClipCount(f"enrollment needs exactly {self.clips_per_enrollment} clips, got {len(uploads)}",
                                 expected=self.clips_per_enrollment, received=len(uploads))
        model = self.model
        with self._session() as session:
            if repo.get_scene(session, name=name) is not None:
                raise SceneExists(f"scene {name!r} already exists", scene=name)
        hashes = self._check_uploads(uploads, existing=set())
        decoded, embeddings = self._infer(lambda: self._decode_and_embed(model, uploads))
        proto = prototype(np.stack(embeddings))  # (clips, D) -> (D,)
        with self._storing(uploads), self._session() as session:
            try:
                scene = repo.create_scene(session, name=name)
            except IntegrityError:
                raise SceneExists(f"scene {name!r} already exists", scene=name) from None
            self._insert_clips(session, scene, uploads, hashes, decoded, embeddings, model)
            repo.put_prototype(session, scene_id=scene.id, model_version=model.version, vector=proto,
                               n_clips=len(uploads))
            session.commit()
            scene_id, created_at = scene.id, scene.created_at
        self._index_if_current(model, scene_id, name, proto)
        return SceneInfo(name=name, clips=len(uploads), model_version=model.version, created_at=created_at)

    def add_clips(self, name: str, uploads: Sequence[Upload]) -> SceneInfo:
        """Add 1..clips_per_enrollment clips to an existing scene and update its prototype."""
        check_scene_name(name)
        if not 1 <= len(uploads) <= self.clips_per_enrollment:
            raise WrongClipCount(f"send 1 to {self.clips_per_enrollment} clips, got {len(uploads)}",
                                 expected=self.clips_per_enrollment, received=len(uploads))
        model = self.model
        with self._session() as session:
            scene = self._get(session, name)
            existing = {c.sha256 for c in scene.clips}
        hashes = self._check_uploads(uploads, existing=existing)
        decoded, embeddings = self._infer(lambda: self._decode_and_embed(model, uploads))
        with self._storing(uploads), self._session() as session:
            scene = self._get(session, name)
            self._insert_clips(session, scene, uploads, hashes, decoded, embeddings, model)
            all_embeddings = repo.clip_embeddings(session, scene_id=scene.id, model_version=model.version)
            proto = prototype(all_embeddings)
            repo.put_prototype(session, scene_id=scene.id, model_version=model.version, vector=proto,
                               n_clips=len(all_embeddings))
            try:
                session.commit()
            except IntegrityError:
                raise DuplicateClips("a clip in this request was added to the scene concurrently") from None
            info = SceneInfo(name=name, clips=len(all_embeddings), model_version=model.version,
                             created_at=repo.as_utc(scene.created_at))
            scene_id = scene.id
        self._index_if_current(model, scene_id, name, proto)
        return info

    def list_scenes(self) -> list[SceneInfo]:
        with self._session() as session:
            rows = repo.scene_rows(session, model_version=self.model.version)
        return [SceneInfo(name=r.name, clips=r.clips, model_version=r.model_version, created_at=r.created_at)
                for r in rows]

    def get_scene(self, name: str) -> SceneInfo:
        check_scene_name(name)
        with self._session() as session:
            rows = repo.scene_rows(session, model_version=self.model.version, name=name)
        if not rows:
            raise SceneNotFound(f"scene {name!r} does not exist", scene=name)
        r = rows[0]
        return SceneInfo(name=r.name, clips=r.clips, model_version=r.model_version, created_at=r.created_at)

    def delete_scene(self, name: str) -> None:
        check_scene_name(name)
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

    # --- classification -------------------------------------------------------------------------

    def classify(self, upload: Upload, top_k: int) -> Classification:
        """Nearest scenes for one clip; unknown when the best score is below the threshold."""
        self._check_size(upload)
        model = self.model
        t_queue = time.perf_counter()

        def work() -> tuple[DecodedClip, list[Match], list[float]]:
            t0 = time.perf_counter()
            clip = self._decode(model, upload)
            t1 = time.perf_counter()
            query = model.embed(clip)
            t2 = time.perf_counter()
            matches = self.index.search(query, top_k)
            return clip, matches, [t0, t1, t2, time.perf_counter()]

        clip, matches, (t0, t1, t2, t3) = self._infer(work)
        timings = {"queue": (t0 - t_queue) * 1e3, "decode": (t1 - t0) * 1e3, "embed": (t2 - t1) * 1e3,
                   "search": (t3 - t2) * 1e3}
        return Classification(decision=decide(matches, self.unknown_threshold), model_version=model.version,
                              duration_s=round(clip.duration_s, 3), timings_ms=timings)

    def close(self) -> None:
        """Stop the inference threads (after the server stopped taking requests)."""
        self._inference.shutdown(wait=True)

    # --- internals ------------------------------------------------------------------------------

    def _infer(self, work: Callable[[], T]) -> T:
        """Run decode/embed work on the inference pool and wait for it (its exceptions re-raise here)."""
        return self._inference.submit(work).result()

    def _decode_and_embed(self, model: LoadedModel, uploads: Sequence[Upload]) -> tuple[list[DecodedClip],
                                                                                          list[np.ndarray]]:
        decoded = [self._decode(model, u) for u in uploads]
        return decoded, [model.embed(d) for d in decoded]

    def _check_uploads(self, uploads: Sequence[Upload], existing: set[str]) -> list[str]:
        for u in uploads:
            self._check_size(u)
        hashes = [content_hash(u.data) for u in uploads]
        seen: dict[str, str] = {}
        for u, h in zip(uploads, hashes, strict=True):
            if h in seen:
                raise DuplicateClips(f"clips {display_filename(seen[h])!r} and {display_filename(u.filename)!r} "
                                     "have identical content", file=display_filename(u.filename))
            if h in existing:
                raise DuplicateClips(f"clip {display_filename(u.filename)!r} is already in this scene",
                                     file=display_filename(u.filename))
            seen[h] = u.filename
        return hashes

    def _check_size(self, upload: Upload) -> None:
        if len(upload.data) > self.max_upload_bytes:
            raise TooLarge(f"clip {display_filename(upload.filename)!r} is {len(upload.data)} bytes; the limit is "
                           f"{self.max_upload_bytes}", file=display_filename(upload.filename))

    def _decode(self, model: LoadedModel, upload: Upload) -> DecodedClip:
        try:
            return decode_clip(upload.data, sample_rate=model.encoder.sample_rate, limits=self.limits)
        except AudioError as exc:
            raise ClipRejected(display_filename(upload.filename), exc) from exc

    @contextmanager
    def _storing(self, uploads: Sequence[Upload]) -> Iterator[None]:
        """Write the uploads' audio, then run the body (the database commit) under the store's lock.

        If anything fails, the audio files this request created are removed again, so a refused
        enrollment leaves nothing behind even before the start-up sweep.
        """
        with self.store.lock:
            created: list[str] = []
            try:
                for u in uploads:
                    sha = content_hash(u.data)
                    if not self.store.exists(sha):
                        self.store.put(u.data)
                        created.append(sha)
                yield
            except OSError as exc:
                self.store.remove(created)
                raise StorageUnavailable(f"the clip store cannot be written: {exc.strerror or exc}") from exc
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
            emb = self._infer(partial(embed, clip.sha256))  # on the inference pool, like every embed
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


