"""The service layer: enrollment, clips, scenes and classification, over the repository and index.

Every public method is a coroutine that hands its work to one thread, once: decode and embed work
(classify, enroll, add clips) to the inference pool, where the whole request runs; database-only work
to a worker thread. No thread ever blocks waiting on another. They raise ``SceneprintError``
subclasses only.

The running model, its index and its decision policy are one reference (``ActiveModel``), replaced whole
when the model changes: a request takes it once, when it starts, and finishes on it. Writes (enroll, add
clips, delete, a threshold) share a gate that a model switch holds alone for its last step, so every write
lands either before the switch (and is caught up under the new model) or after it (under the new model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import time
import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Literal, TypeVar

import numpy as np
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from sceneprint.audio import AudioError, ClipLimits, DecodedClip, decode_clip
from sceneprint.manifest import Manifest, model_key
from sceneprint.prototypes import (
    Decision,
    DecisionRule,
    EnrollmentQuality,
    Match,
    decide,
    enrollment_quality,
    per_scene_threshold,
    prototype,
)
from sceneprint.runtime import OnnxEncoder
from sceneprint.service import repository as repo
from sceneprint.service.clipstore import ClipStore, content_hash
from sceneprint.service.errors import (
    ClipRejected,
    DuplicateClips,
    IncoherentClips,
    InvalidSceneName,
    QuotaExceeded,
    SceneExists,
    SceneNotFound,
    StorageUnavailable,
    WrongClipCount,
)
from sceneprint.service.index import SceneIndex, SceneThreshold
from sceneprint.service.schemas import SCENE_NAME_PATTERN, ClipQuality, SceneDetail, ScenePublic, SceneQuality
from sceneprint.service.storage import storage_failure
from sceneprint.service.sync import lease_blocking
from sceneprint.service.tables import Scene

T = TypeVar("T")
log = logging.getLogger("sceneprint.service.scenes")

SCENE_NAME = re.compile(SCENE_NAME_PATTERN)
# Stored clips passed the limits in force when they were enrolled; re-embedding must not refuse them
# because the limits changed since.
STORED_CLIP_LIMITS = ClipLimits(min_seconds=0.0, max_seconds=24 * 3600.0)
MAX_DISPLAY_NAME = 255  # characters of a client file name kept for display (the clips.filename column)
WRITE_BATCH = 256  # re-embedded clips (or scenes' prototypes) written per transaction
WRITE_EVERY_S = 1.0  # ... or those embedded so far, at least this often (what a crash keeps, a restart resumes from)
WRITE_RETRIES = 5  # a batch that meets a concurrent delete (or another replica's rows) is filtered and written again
# Re-embedding runs on threads of its own at a low CPU priority (Linux: a nice value per thread), one per
# inference slot: the cores it finds idle are its, and a classify request, on the inference pool, gets a core
# first instead of queueing behind re-embedding jobs. Nice 10 rather than 19: on a saturated service a reload
# still gets about a tenth of the CPU (at 19, measured, it nearly stops); docs/benchmarks.md.
REEMBED_NICE = 10
# While the disk refuses writes (full, read-only), how often the service tries again (the pending start-up write,
# a probe, clip removals that failed); the next write tries too.
STORAGE_RETRY_S = 5.0


def _lower_thread_priority() -> None:
    """Run the calling thread at ``REEMBED_NICE`` (on Linux, a thread's nice value is its own)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, 0, REEMBED_NICE)


class ReembedFailed(RuntimeError):
    """Stored clips could not be embedded for another model (their audio is missing or unreadable)."""


class PrototypesIncomplete(ReembedFailed):
    """A switch found scenes without a prototype under the new model: written meanwhile through another replica
    (the write gate holds this replica's writes only). Catch up and switch again."""


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
class DecisionPolicy:
    """How enrollments are checked and classifications decided (settings over the bundle's calibration).

    ``min_clip_similarity`` / ``min_cohesion``: None where neither a setting nor the bundle gives one (then
    enrollments are measured and reported but never refused). ``rule``: ``global`` holds every scene to
    ``unknown_threshold``; ``per_scene`` gives each scene ``unknown_threshold + slope * (cohesion -
    reference_cohesion)``. A scene's hand-set threshold beats both; a request's beats everything.
    """

    unknown_threshold: float
    min_clip_similarity: float | None = None
    min_cohesion: float | None = None
    rule: DecisionRule = "global"
    slope: float = 0.0
    reference_cohesion: float = 0.0

    def scene_threshold(self, hand_set: float | None, cohesion: float | None) -> SceneThreshold | None:
        """A scene's own threshold and its source; None: the global threshold applies."""
        if hand_set is not None:
            return hand_set, "scene"
        if self.rule == "per_scene" and cohesion is not None:
            return per_scene_threshold(cohesion, self.unknown_threshold, slope=self.slope,
                                       reference_cohesion=self.reference_cohesion), "per_scene"
        return None


@dataclass(frozen=True)
class LoadedModel:
    """An encoder and its manifest; replaced whole, never mutated.

    ``registry_version``: the registry version it was loaded from (None: a bundle given by path).
    """

    encoder: OnnxEncoder
    manifest: Manifest
    registry_version: str | None = None

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @cached_property
    def key(self) -> str:
        """What its embeddings and prototypes are stored under: the version and a fingerprint of its weights."""
        return model_key(self.manifest)

    def embed(self, clip: DecodedClip) -> np.ndarray:
        return self.encoder.embed_clip(clip.waveform)


@dataclass(frozen=True)
class ActiveModel:
    """What serves requests, as one reference: the model, the index of its prototypes, its decision policy."""

    model: LoadedModel
    index: SceneIndex
    decisions: DecisionPolicy


@dataclass
class ReembedProgress:
    """What re-embedding for another model has done so far (``GET /admin/reload`` shows it)."""

    found: int = 0  # stored clips found without an embedding under the new model
    embedded: int = 0  # of those, embedded
    stored: int = 0  # and committed to the database: what a crash keeps and a restart resumes from


# The model the current request used (set by the service's methods; the telemetry middleware puts it in a
# response header and the access log).
MODEL_USED: ContextVar[LoadedModel | None] = ContextVar("sceneprint_model_used", default=None)


@dataclass
class WriteGate:
    """Writes share it; a model switch holds it alone. Once a switch waits, new writes wait behind it, so the
    switch waits only for the writes already running. Waiting happens on the event loop, never in a thread."""

    _writes: int = 0
    _switching: bool = False
    _waiting: int = 0
    _cond: asyncio.Condition = field(default_factory=asyncio.Condition)

    @asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._switching and not self._waiting)
            self._writes += 1
        try:
            yield
        finally:
            async with self._cond:
                self._writes -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            self._waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._switching and self._writes == 0)
            finally:
                self._waiting -= 1
            self._switching = True
        try:
            yield
        finally:
            async with self._cond:
                self._switching = False
                self._cond.notify_all()


@dataclass(frozen=True)
class Classification:
    decision: Decision
    model_version: str
    model_key: str
    duration_s: float
    timings_ms: dict[str, float]  # queue, decode, embed, search: reported as a Server-Timing header


class SceneService:
    def __init__(self, *, sessions: sessionmaker[Session], store: ClipStore, index: SceneIndex, model: LoadedModel,
                 limits: ClipLimits, clips_per_enrollment: int, quotas: Quotas, decisions: DecisionPolicy,
                 inference_slots: int, reembed_batch_clips: int = 2) -> None:
        self.sessions = sessions
        self.store = store
        self.active = ActiveModel(model=model, index=index, decisions=decisions)
        self.limits = limits
        self.clips_per_enrollment = clips_per_enrollment
        self.quotas = quotas
        self.inference_slots = inference_slots
        self.reembed_batch_clips = reembed_batch_clips
        self.writes = WriteGate()
        self._syncing = asyncio.Lock()  # index syncs (other replicas' changes) and model switches, one at a time
        # Decode + embed run on a fixed pool, one thread per core by default: waiting requests queue in
        # order (FIFO) instead of time-slicing the cores. Each slot runs the shared ONNX Runtime session on
        # its own thread with the session's intra-op threads (``inference_threads``, 1 by default).
        self._inference = ThreadPoolExecutor(max_workers=inference_slots, thread_name_prefix="inference")
        self._reembedding = ThreadPoolExecutor(max_workers=inference_slots, thread_name_prefix="reembed",
                                               initializer=_lower_thread_priority)
        # Why the disk or database refuses writes now (None: they work). Set by a write that failed so (or by the
        # start-up write); writes answer 503 meanwhile, reads go on; ``recover_storage`` clears it.
        self.storage_error: str | None = None
        self._startup_pending = False  # the start-up write (the served model's row) is still to be made
        self._recovering = threading.Lock()

    @property
    def model(self) -> LoadedModel:
        """The model serving now (a request takes ``active`` once instead, and keeps it)."""
        return self.active.model

    @property
    def index(self) -> SceneIndex:
        return self.active.index

    @property
    def decisions(self) -> DecisionPolicy:
        return self.active.decisions

    @property
    def unknown_threshold(self) -> float:
        """The global threshold: for scenes without one of their own."""
        return self.decisions.unknown_threshold

    # --- start-up -------------------------------------------------------------------------------

    def start(self) -> dict[str, int]:
        """Embed scenes that lack a (current) prototype for the running model, sweep orphan audio, rebuild the
        index, and record the model as the one the service has switched to."""
        model = self.model
        try:
            self._record_model(model, activate=False)
        except Exception as exc:  # a read-only or full disk: start anyway, serve reads, retry the write
            self._storage_failed(exc)
            self._startup_pending = True
        with self._session() as session:
            missing = repo.scenes_needing_prototype(session, model_version=model.key)
        if missing:
            # Replicas started together on a new model: one embeds, the others then find the work done.
            with lease_blocking(self.sessions, f"reembed:{model.key}"), self._session() as session:
                missing = repo.scenes_needing_prototype(session, model_version=model.key)
                for scene_id in missing:
                    self._reembed(session, scene_id=scene_id, model=model)
                session.commit()
        with self.store.lock:
            with self._session() as session:
                referenced = repo.referenced_hashes(session)
            swept = self.store.sweep(referenced, self._references)
        self.rebuild_index()
        if not self._startup_pending:
            try:
                self._record_model(model, activate=True)
            except Exception as exc:
                self._storage_failed(exc)
                self._startup_pending = True
        return {"reembedded": len(missing), "swept": swept, "indexed": len(self.index)}

    def _record_model(self, model: LoadedModel, *, activate: bool) -> None:
        """The start-up write: record ``model`` (and, with ``activate``, that it went live)."""
        with self._session() as session:
            repo.record_model(session, key=model.key, model_version=model.version,
                              registry_version=model.registry_version)
            if activate:
                repo.activate_model(session, key=model.key)
            session.commit()

    # --- storage that refuses writes ------------------------------------------------------------

    def _storage_failed(self, exc: BaseException) -> None:
        """Note that the disk refuses writes, if that is what ``exc`` says (else raise it again)."""
        reason = storage_failure(exc)
        if reason is None:
            raise exc
        if self.storage_error is None:
            log.warning("storage unavailable (%s): writes answer 503 storage_unavailable, reads go on; retrying "
                        "every %.0f s", reason, STORAGE_RETRY_S)
        self.storage_error = reason

    def recover_storage(self) -> bool:
        """Try again what the disk refused: the start-up write (or, if made, the same write as a probe of the
        database), a probe of the clip store, clip removals that failed; whether storage works now."""
        with self._recovering:
            if self.storage_error is not None:
                try:
                    self._record_model(self.model, activate=True)
                    self.store.probe()
                except Exception as exc:
                    self._storage_failed(exc)
                    return False
                self._startup_pending = False
                self.storage_error = None
                log.warning("storage writable again: writes accepted")
            self._retry_removals()
            return True

    def _retry_removals(self) -> None:
        if self.store.pending:
            try:
                self.store.retry_pending(self._references)
            except Exception as exc:  # the database read failed: the next try reads again
                log.warning("cannot retry clip removals (%s)", type(exc).__name__)

    def _guarded(self, work: Callable[[], T]) -> T:
        """Run a write: refused at once (503) while storage is down and still refuses; a storage failure during it
        is answered 503 and noted; after it, clip removals that failed are tried again."""
        if self.storage_error is not None and not self.recover_storage():
            raise StorageUnavailable(f"the data directory cannot be written ({self.storage_error}); reads still "
                                     "work, writes are retried")
        retry = bool(self.store.pending)  # removals that failed before this write (not the ones it just failed)
        try:
            result = work()
        except StorageUnavailable as exc:
            self._storage_failed(exc)
            raise
        except (OSError, DBAPIError) as exc:
            if storage_failure(exc) is None:
                raise
            self._storage_failed(exc)
            raise StorageUnavailable(f"the data directory cannot be written ({self.storage_error})") from exc
        if retry:
            self._retry_removals()
        return result

    def rebuild_index(self) -> None:
        """Rebuild the index from the database and check that the two agree."""
        self._fill_index(self.active)

    def _fill_index(self, active: ActiveModel) -> None:
        """Fill ``active``'s index from the database (prototypes under its model's key) and check the two agree."""
        with self._session() as session:
            key = active.model.key
            own = {sid: t for sid, hand, cohesion in repo.scene_decision_inputs(session, model_version=key)
                   if (t := active.decisions.scene_threshold(hand, cohesion)) is not None}
            active.index.rebuild(repo.prototypes(session, model_version=key), thresholds=own)
            total = repo.count_scenes(session)
        if len(active.index) != total:
            raise RuntimeError(f"index holds {len(active.index)} scenes, the database {total}")

    # --- scenes ---------------------------------------------------------------------------------

    async def enroll(self, name: str, uploads: Sequence[Upload], force: bool = False) -> SceneDetail:
        """Create a scene from exactly ``clips_per_enrollment`` clips, all or nothing.

        Clips that disagree with the others (an outlier, or a scene whose clips disagree overall) are refused
        with ``IncoherentClips`` unless ``force``; nothing is stored then.
        """
        check_scene_name(name)
        if len(uploads) != self.clips_per_enrollment:
            raise WrongClipCount(f"enrollment needs exactly {self.clips_per_enrollment} clips, got {len(uploads)}",
                                 expected=self.clips_per_enrollment, received=len(uploads))
        async with self.writes.shared():
            active = self._use(self.active)
            return await self._infer(partial(self._guarded, partial(self._enroll, name, uploads, active, force)))

    async def add_clips(self, name: str, uploads: Sequence[Upload], force: bool = False) -> SceneDetail:
        """Add 1..clips_per_enrollment clips to an existing scene and update its prototype (checked as
        ``enroll`` checks: a new clip that is an outlier, or a scene made incoherent, is refused unless ``force``)."""
        check_scene_name(name)
        if not 1 <= len(uploads) <= self.clips_per_enrollment:
            raise WrongClipCount(f"send 1 to {self.clips_per_enrollment} clips, got {len(uploads)}",
                                 expected=self.clips_per_enrollment, received=len(uploads))
        async with self.writes.shared():
            active = self._use(self.active)
            return await self._infer(partial(self._guarded, partial(self._add_clips, name, uploads, active, force)))

    async def set_threshold(self, name: str, threshold: float | None) -> SceneDetail:
        """Set a scene's threshold by hand (None: back to the one its enrollment and the rule give)."""
        check_scene_name(name)

        def work(active: ActiveModel) -> SceneDetail:
            with self._session() as session:
                scene = self._get(session, name)
                repo.set_scene_threshold(session, scene=scene, threshold=threshold)
                repo.note_scene_change(session, scene_id=scene.id)
                session.commit()
                scene_id = scene.id
            self._refresh_threshold(active, scene_id)
            return self._detail(name, active)

        async with self.writes.shared():
            return await run_in_threadpool(self._guarded, partial(work, self._use(self.active)))

    async def list_scenes(self) -> list[ScenePublic]:
        active = self._use(self.active)

        def work() -> list[ScenePublic]:
            with self._session() as session:
                return repo.scenes(session, model_version=active.model.key, shown_version=active.model.version)

        return await run_in_threadpool(work)

    async def get_scene(self, name: str) -> SceneDetail:
        """One scene with its enrollment quality and the threshold in force for it."""
        check_scene_name(name)
        return await run_in_threadpool(self._detail, name, self._use(self.active))

    async def delete_scene(self, name: str) -> None:
        check_scene_name(name)
        async with self.writes.shared():
            await run_in_threadpool(self._guarded, partial(self._delete, name, self._use(self.active)))

    # --- classification -------------------------------------------------------------------------

    async def classify(self, upload: Upload, top_k: int, threshold: float | None = None) -> Classification:
        """Nearest scenes for one clip; unknown when the best score is below the threshold in force: ``threshold``
        where given (this call only), else the best scene's own, else the global one."""
        active, queued = self._use(self.active), time.perf_counter()
        model = active.model

        def work() -> tuple[DecodedClip, list[Match], list[float]]:
            t0 = time.perf_counter()
            clip = self._decode(model, upload)
            t1 = time.perf_counter()
            query = self._embed(model, upload, clip)
            t2 = time.perf_counter()
            matches = active.index.search(query, top_k)
            return clip, matches, [t0, t1, t2, time.perf_counter()]

        clip, matches, (t0, t1, t2, t3) = await self._infer(work)
        timings = {"queue": (t0 - queued) * 1e3, "decode": (t1 - t0) * 1e3, "embed": (t2 - t1) * 1e3,
                   "search": (t3 - t2) * 1e3}
        return Classification(decision=decide(matches, active.decisions.unknown_threshold, override=threshold),
                              model_version=model.version, model_key=model.key,
                              duration_s=round(clip.duration_s, 3), timings_ms=timings)

    # --- model changes --------------------------------------------------------------------------

    async def catch_up(self, model: LoadedModel, progress: ReembedProgress | None = None,
                       scene_ids: Sequence[int] | None = None) -> int:
        """Embed, from its kept audio, every stored clip without an embedding under ``model``'s key, and make every
        prototype that is missing or stale under it; return how many clips were embedded (``progress`` counts them
        as they are found, embedded and stored).

        Jobs of ``reembed_batch_clips`` clips run on low-priority threads of their own (``REEMBED_NICE``), one
        per inference slot, at most one job each at a time: an idle service re-embeds on every core, and a
        classify request never waits for re-embedding, whose threads yield their cores to it.
        Safe beside concurrent writes (a clip deleted meanwhile is skipped, one added meanwhile is left for the
        next call); calling it again resumes where it stopped. ``scene_ids``: only those scenes' clips and prototypes.

        Raises:
            ReembedFailed: A stored clip's audio is missing or cannot be decoded.
        """
        progress = progress if progress is not None else ReembedProgress()
        missing = await run_in_threadpool(self._missing_clips, model.key, scene_ids)
        progress.found += len(missing)
        size = self.reembed_batch_clips
        jobs = [missing[i : i + size] for i in range(0, len(missing), size)]
        running: set[asyncio.Future[list[tuple[int, np.ndarray | None]]]] = set()
        done_rows: list[tuple[int, np.ndarray | None]] = []
        embedded, written = 0, time.monotonic()
        writing: asyncio.Future[None] | None = None  # one write at a time, beside the embedding

        async def write(rows: list[tuple[int, np.ndarray | None]]) -> None:
            await run_in_threadpool(self._store_embeddings, model.key, rows)
            progress.stored += len(rows)

        async def store(force: bool = False) -> None:
            nonlocal done_rows, written, writing
            if not done_rows or not (force or len(done_rows) >= WRITE_BATCH
                                     or time.monotonic() - written >= WRITE_EVERY_S):
                return
            if writing is not None:
                await writing  # (its errors are raised here)
            rows, done_rows, written = done_rows, [], time.monotonic()
            writing = asyncio.ensure_future(write(rows))

        def collect(finished: set[asyncio.Future[list[tuple[int, np.ndarray | None]]]]) -> None:
            nonlocal embedded
            for job in finished:
                rows = job.result()
                done_rows.extend(rows)
                embedded += len(rows)
                progress.embedded += len(rows)

        try:
            for clips in jobs:
                while len(running) >= self.inference_slots:
                    finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    collect(finished)
                running.add(asyncio.wrap_future(self._reembedding.submit(self._embed_stored, model, clips)))
                await store()
            while running:
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                collect(finished)
            await store(force=True)
            if writing is not None:
                await writing
        finally:
            for job in running:
                job.cancel()
        await run_in_threadpool(self._make_prototypes, model.key, scene_ids)
        return embedded

    async def sync_scenes(self, scene_ids: Sequence[int]) -> int:
        """Bring the index in line with the database for ``scene_ids`` (changed, maybe by another replica): a scene
        that exists gets its prototype and threshold from the database, one that is gone leaves the index.

        A scene written by a replica that serves another model (one replica switched before the others) has no
        prototype under this one's model yet: its clips are embedded here first, from the clip store. Idempotent;
        returns how many scenes are in the index of those given.
        """
        async with self._syncing:
            active = self.active
            await self.catch_up(active.model, scene_ids=scene_ids)

            def refresh() -> int:
                with self._session() as session:
                    rows = repo.index_entries(session, model_version=active.model.key, scene_ids=scene_ids)
                present = set()
                for scene_id, name, proto, hand_set, cohesion in rows:
                    active.index.upsert(scene_id, name, proto, active.decisions.scene_threshold(hand_set, cohesion))
                    present.add(scene_id)
                for scene_id in set(scene_ids) - present:
                    active.index.remove(scene_id)
                return len(present)

            return await run_in_threadpool(refresh)

    async def switch(self, model: LoadedModel, decisions: DecisionPolicy) -> None:
        """Make ``model`` (with ``decisions``) the one that serves, once every scene has its prototype under it.

        Call it holding ``writes.exclusive()``, after a last ``catch_up``. Its index is built from the database
        beside the old one, the switch recorded in the database, then model, index and policy replace the old
        ones as one reference; requests in flight finish on the old ones.
        """
        active = ActiveModel(model=model, index=SceneIndex(model.manifest.embedding_dim, self.index.precision),
                             decisions=decisions)

        def build() -> None:
            with self._session() as session:
                repo.record_model(session, key=model.key, model_version=model.version,
                                  registry_version=model.registry_version)
                incomplete = repo.scenes_needing_prototype(session, model_version=model.key)
                session.commit()
            if incomplete:
                raise PrototypesIncomplete(f"{len(incomplete)} scene(s) have no prototype under {model.key} yet")
            self._fill_index(active)
            with self._session() as session:
                repo.activate_model(session, key=model.key)
                session.commit()

        async with self._syncing:  # a scene synced meanwhile went to the old index: the new one is read after it
            await run_in_threadpool(build)
            self.active = active

    def prune(self, keep_models: int) -> tuple[int, int]:
        """Delete embeddings and prototypes of all but the ``keep_models`` models most recently live (and the one
        serving); return (embeddings, prototypes) deleted."""
        with self._session() as session:
            keep = {*repo.recent_model_keys(session, count=keep_models), self.model.key}
            deleted = repo.prune_embeddings(session, keep=keep)
            session.commit()
        return deleted

    def _missing_clips(self, key: str, scene_ids: Sequence[int] | None = None) -> list[tuple[int, int, str]]:
        with self._session() as session:
            return repo.clips_missing_embedding(session, model_version=key, scene_ids=scene_ids)

    def _embed_stored(self, model: LoadedModel, clips: Sequence[tuple[int, int, str]]
                      ) -> list[tuple[int, np.ndarray | None]]:
        """(clip id, embedding) of stored clips, from their kept audio; None where the audio is gone (its scene
        may have been deleted meanwhile: the caller decides)."""
        out: list[tuple[int, np.ndarray | None]] = []
        for clip_id, _scene_id, sha in clips:
            try:
                data = self.store.read(sha)
            except FileNotFoundError:
                out.append((clip_id, None))
                continue
            try:
                decoded = decode_clip(data, sample_rate=model.encoder.sample_rate, limits=STORED_CLIP_LIMITS)
                vector = model.embed(decoded)
            except AudioError as exc:
                raise ReembedFailed(f"stored clip {sha[:12]}... cannot be embedded: {exc.reason}") from exc
            out.append((clip_id, vector))
        return out

    def _store_embeddings(self, key: str, rows: list[tuple[int, np.ndarray | None]]) -> None:
        """Insert re-embedded clips under ``key``: those that still exist and have none under it yet."""
        if not rows:
            return
        for attempt in range(WRITE_RETRIES):
            with self._session() as session:
                ids = [clip_id for clip_id, _ in rows]
                missing = {c for c, _, _ in repo.clips_missing_embedding_among(session, model_version=key, ids=ids)}
                lost = [clip_id for clip_id, vec in rows if vec is None and clip_id in missing]
                if lost:
                    raise ReembedFailed(f"the audio of {len(lost)} stored clip(s) is missing from the clip store "
                                        f"(clip ids {lost[:5]})")
                try:
                    repo.insert_clip_embeddings(session, model_version=key,
                                                rows=[(c, v) for c, v in rows if v is not None and c in missing])
                    session.commit()
                    return
                except IntegrityError:  # a clip deleted, or the row written by another replica, meanwhile
                    session.rollback()
                    if attempt == WRITE_RETRIES - 1:
                        raise

    def _make_prototypes(self, key: str, scene_ids: Sequence[int] | None = None) -> None:
        """Make each prototype under ``key`` (of ``scene_ids``, where given) that is missing or older than its scene's
        clips, from the embeddings under ``key``; scenes with clips still missing an embedding are left for the next
        catch-up."""
        with self._session() as session:
            needing = repo.scenes_needing_prototype(session, model_version=key, scene_ids=scene_ids)
        for start in range(0, len(needing), WRITE_BATCH):
            chunk = needing[start : start + WRITE_BATCH]
            for attempt in range(WRITE_RETRIES):
                with self._session() as session:
                    rows = []
                    for scene_id, (count, vectors) in repo.embeddings_by_scene(session, model_version=key,
                                                                             scene_ids=chunk).items():
                        if len(vectors) == count:  # (clips, D) -> (D,)
                            rows.append((scene_id, prototype(vectors), count, enrollment_quality(vectors).cohesion))
                    try:
                        repo.replace_prototypes(session, model_version=key, rows=rows)
                        session.commit()
                        break
                    except IntegrityError:  # a scene deleted meanwhile: read the chunk again
                        session.rollback()
                        if attempt == WRITE_RETRIES - 1:
                            raise

    def close(self) -> None:
        """Stop the inference threads (after the server stopped taking requests)."""
        self._reembedding.shutdown(wait=True, cancel_futures=True)
        self._inference.shutdown(wait=True)

    # --- the work, on one thread ----------------------------------------------------------------

    async def _infer(self, work: Callable[[], T]) -> T:
        """Run ``work`` on the inference pool; the event loop awaits it (its exceptions re-raise here)."""
        return await asyncio.wrap_future(self._inference.submit(work))

    @staticmethod
    def _use(active: ActiveModel) -> ActiveModel:
        """Note that this request runs on ``active`` (for its response header and access event)."""
        MODEL_USED.set(active.model)
        return active

    def _enroll(self, name: str, uploads: Sequence[Upload], active: ActiveModel, force: bool) -> SceneDetail:
        model, decisions = active.model, active.decisions
        hashes = [content_hash(u.data) for u in uploads]  # each upload is hashed here, once
        self._check_duplicates(uploads, hashes, existing=set())
        with self._session() as session:
            if repo.get_scene(session, name=name) is not None:
                raise SceneExists(f"scene {name!r} already exists", scene=name)
            self._check_quotas(session, None, uploads, hashes)
        decoded = [self._decode(model, u) for u in uploads]
        embeddings = [self._embed(model, u, d) for u, d in zip(uploads, decoded, strict=True)]
        quality = self._check_quality(decisions, [display_filename(u.filename) for u in uploads],
                                      np.stack(embeddings), new=range(len(uploads)), force=force)
        forced = force and self._refused(decisions, quality, range(len(uploads)))
        proto = prototype(np.stack(embeddings))  # (clips, D) -> (D,)
        with self._storing(uploads, hashes), self._session() as session:
            self._check_quotas(session, None, uploads, hashes)  # again, now that no other write can interleave
            scene = repo.create_scene(session, name=name)
            scene.forced = forced
            self._insert_clips(session, scene, uploads, hashes, decoded, embeddings, model)
            repo.put_prototype(session, scene_id=scene.id, model_version=model.key, vector=proto,
                               n_clips=len(uploads), cohesion=quality.cohesion)
            repo.note_scene_change(session, scene_id=scene.id)
            session.commit()
            scene_id = scene.id
        self._index_if_current(active, scene_id, name, proto, decisions.scene_threshold(None, quality.cohesion))
        return self._detail(name, active)

    def _add_clips(self, name: str, uploads: Sequence[Upload], active: ActiveModel, force: bool) -> SceneDetail:
        model, decisions = active.model, active.decisions
        hashes = [content_hash(u.data) for u in uploads]
        with self._session() as session:
            scene = self._get(session, name)
            self._check_duplicates(uploads, hashes, existing={c.sha256 for c in scene.clips})
            self._check_quotas(session, scene, uploads, hashes)
            stored = repo.clip_similarity_rows(session, scene_id=scene.id, model_version=model.key)
        decoded = [self._decode(model, u) for u in uploads]
        embeddings = [self._embed(model, u, d) for u, d in zip(uploads, decoded, strict=True)]
        names = [n for n, _ in stored] + [display_filename(u.filename) for u in uploads]
        together = np.stack([v for _, v in stored] + embeddings)
        new = range(len(stored), len(together))
        quality = self._check_quality(decisions, names, together, new=new, force=force)
        forced = force and self._refused(decisions, quality, new)
        with self._storing(uploads, hashes), self._session() as session:
            scene = self._get(session, name)
            self._check_quotas(session, scene, uploads, hashes)
            self._insert_clips(session, scene, uploads, hashes, decoded, embeddings, model)
            all_embeddings = repo.clip_embeddings(session, scene_id=scene.id, model_version=model.key)
            proto = prototype(all_embeddings)
            cohesion = enrollment_quality(all_embeddings).cohesion  # with any clip added meanwhile
            repo.put_prototype(session, scene_id=scene.id, model_version=model.key, vector=proto,
                               n_clips=len(all_embeddings), cohesion=cohesion)
            scene.forced = scene.forced or forced
            repo.note_scene_change(session, scene_id=scene.id)
            session.commit()
            scene_id, hand_set = scene.id, scene.threshold
        self._index_if_current(active, scene_id, name, proto, decisions.scene_threshold(hand_set, cohesion))
        return self._detail(name, active)

    @staticmethod
    def _refused(d: DecisionPolicy, quality: EnrollmentQuality, new: Sequence[int]) -> bool:
        """Whether the checks would refuse these clips: a new clip below the clip bound, or the scene below the
        cohesion bound."""
        outliers = set(quality.outliers(d.min_clip_similarity)) & set(new) if d.min_clip_similarity is not None \
            else set()
        incoherent = (d.min_cohesion is not None and quality.cohesion is not None
                      and quality.cohesion < d.min_cohesion)
        return bool(outliers) or incoherent

    def _check_quality(self, d: DecisionPolicy, names: Sequence[str], embeddings: np.ndarray, *, new: Sequence[int],
                       force: bool) -> EnrollmentQuality:
        """The scene's quality with the new clips; ``IncoherentClips`` where the checks refuse it and not ``force``."""
        quality = enrollment_quality(embeddings)
        if force or not self._refused(d, quality, new):
            return quality
        bad = [i for i in (quality.outliers(d.min_clip_similarity) if d.min_clip_similarity is not None else [])
               if i in set(new)]
        clips = [{"file": names[i], "similarity": quality.similarities[i]} for i in range(len(names))]
        if bad:
            named = ", ".join(f"{names[i]!r} ({quality.similarities[i]:.2f})" for i in bad)
            detail = (f"clip{'s' if len(bad) > 1 else ''} {named} disagree{'s' if len(bad) == 1 else ''} with the "
                      f"others (leave-one-out similarity below {d.min_clip_similarity:.2f}); nothing was stored. "
                      "Replace the clip, or send force=true to keep it anyway.")
        else:
            detail = (f"the clips disagree with each other (cohesion {quality.cohesion:.2f}, below "
                      f"{d.min_cohesion:.2f}); nothing was stored. Send clips of one scene, or force=true.")
        raise IncoherentClips(detail, outliers=[names[i] for i in bad], clips=clips, cohesion=quality.cohesion,
                              min_clip_similarity=d.min_clip_similarity, min_cohesion=d.min_cohesion)

    def _detail(self, name: str, active: ActiveModel) -> SceneDetail:
        """A scene as ``GET /scenes/{name}`` shows it: with its quality under ``active``'s model and its threshold."""
        model, decisions = active.model, active.decisions
        with self._session() as session:
            found = repo.scenes(session, model_version=model.key, name=name, shown_version=model.version)
            if not found:
                raise SceneNotFound(f"scene {name!r} does not exist", scene=name)
            scene = self._get(session, name)
            rows = repo.clip_similarity_rows(session, scene_id=scene.id, model_version=model.key)
            hand_set, forced = scene.threshold, scene.forced
        quality = enrollment_quality(np.stack([v for _, v in rows])) if rows else None
        own = decisions.scene_threshold(hand_set, quality.cohesion if quality else None)
        threshold = own[0] if own is not None else decisions.unknown_threshold
        source: Literal["scene", "per_scene", "global"] = own[1] if own is not None else "global"
        return SceneDetail(
            **found[0].model_dump(), threshold=round(threshold, 4), threshold_source=source,
            quality=SceneQuality(
                cohesion=quality.cohesion if quality else None, spread=quality.spread if quality else None,
                clips=[ClipQuality(file=n, similarity=s) for (n, _), s in
                       zip(rows, quality.similarities if quality and quality.similarities else [None] * len(rows),
                           strict=True)],
                forced=forced, min_clip_similarity=decisions.min_clip_similarity,
                min_cohesion=decisions.min_cohesion))

    def _refresh_threshold(self, active: ActiveModel, scene_id: int) -> None:
        """Bring the index's copy of one scene's threshold in line with the database."""
        if active is not self.active:
            return
        with self._session() as session:
            rows = repo.scene_decision_inputs(session, model_version=active.model.key, scene_id=scene_id)
        if rows:
            _, hand_set, cohesion = rows[0]
            active.index.set_threshold(scene_id, active.decisions.scene_threshold(hand_set, cohesion))

    def _delete(self, name: str, active: ActiveModel) -> None:
        with self.store.lock:
            with self._session() as session:
                scene = self._get(session, name)
                scene_id = scene.id
                hashes = repo.delete_scene(session, scene=scene)
                repo.note_scene_change(session, scene_id=scene_id)
                session.commit()
            active.index.remove(scene_id)
            try:  # committed: the delete is done whatever the disk says (a blob refused is retried later)
                self.store.discard(set(hashes), self._references)
            except Exception as exc:
                self.store.pending.update(hashes)
                log.warning("cannot remove the deleted scene's audio now (%s); retrying later", type(exc).__name__)

    def _references(self, among: list[str]) -> set[str]:
        """Which of ``among`` committed clip rows reference, read now (the clip store's second read)."""
        with self._session() as session:
            return repo.referenced_hashes(session, among=among)

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

    def _embed(self, model: LoadedModel, upload: Upload, clip: DecodedClip) -> np.ndarray:
        """The clip's embedding; a clip whose features or embedding are not finite is refused (the core decides)."""
        try:
            return model.embed(clip)
        except AudioError as exc:
            raise ClipRejected(display_filename(upload.filename), exc) from exc

    @contextmanager
    def _storing(self, uploads: Sequence[Upload], hashes: Sequence[str]) -> Iterator[None]:
        """Write the uploads' audio, then run the body (the database commit) under the store's lock.

        If anything fails, the audio files this request created are removed again (unless a clip committed
        meanwhile, through another replica, references the same content), so a refused enrollment leaves nothing
        behind even before the start-up sweep. After the commit, each blob is checked to be there still: another
        replica may have removed it just before (the clip store's protocol), and it is written again then.
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
                self.store.discard(created, self._references)
                raise StorageUnavailable(f"the clip store cannot be written: {exc.strerror or 'I/O error'}") from exc
            except BaseException:
                self.store.discard(created, self._references)
                raise
            try:  # committed: the blobs must be there
                for u, sha in zip(uploads, hashes, strict=True):
                    self.store.ensure(u.data, sha)
            except OSError as exc:
                raise StorageUnavailable(f"the clip store cannot be written: {exc.strerror or 'I/O error'}") from exc

    @staticmethod
    def _insert_clips(session: Session, scene: Scene, uploads: Sequence[Upload], hashes: Sequence[str],
                      decoded: Sequence[DecodedClip], embeddings: Sequence[np.ndarray], model: LoadedModel) -> None:
        for upload, sha, clip, emb in zip(uploads, hashes, decoded, embeddings, strict=True):
            row = repo.add_clip(session, scene=scene, sha256=sha, filename=display_filename(upload.filename),
                                byte_size=len(upload.data), duration_s=clip.duration_s)
            repo.put_clip_embedding(session, clip_id=row.id, model_version=model.key, vector=emb)

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
            repo.put_clip_embedding(session, clip_id=clip.id, model_version=model.key, vector=emb)
            embeddings.append(emb)
        stacked = np.stack(embeddings)
        repo.put_prototype(session, scene_id=scene_id, model_version=model.key, vector=prototype(stacked),
                           n_clips=len(embeddings), cohesion=enrollment_quality(stacked).cohesion)

    def _index_if_current(self, active: ActiveModel, scene_id: int, name: str, proto: np.ndarray,
                          threshold: SceneThreshold | None) -> None:
        if active is self.active:
            active.index.upsert(scene_id, name, proto, threshold)

    def _get(self, session: Session, name: str) -> Scene:
        scene = repo.get_scene(session, name=name)
        if scene is None:
            raise SceneNotFound(f"scene {name!r} does not exist", scene=name)
        return scene

    def _session(self) -> Session:
        return self.sessions()
