"""Model reloads: the service follows its registry's current version and switches to it without a failed request.

A reload loads the new bundle beside the running one and checks it (hashes, ONNX Runtime load, finite unit
embeddings of the manifest's size on a probe clip); a bundle that fails is refused and the running model
keeps serving. It then re-embeds every stored clip from its kept audio under the new model's key (jobs on
low-priority threads of their own, so classify requests keep their cores), catches up with the
enrollments, added clips and deletions made meanwhile, and finally, holding the write gate only for a last
catch-up, builds the new index and swaps model, index and decision policy as one reference. Until then the
old model serves everything; a request in flight finishes on the model it started with.

One reload at a time (a request during one is answered with its progress; a pointer moved meanwhile is
followed once it ends). Replicas on one database each follow the registry (a shared models volume), but the
re-embedding is done once: the replica holding the database lease ``reembed:<model key>`` does it while the
others wait (state ``waiting``), then each catches up with what is left and switches on its own.
The database records which model the service has fully switched to: a restart
serves that one and resumes the pending reload, keeping the embeddings already made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from starlette.concurrency import run_in_threadpool

from sceneprint.manifest import Manifest
from sceneprint.registry import Pointer, Registry, RegistryError, verify_bundle
from sceneprint.runtime import SessionConfig
from sceneprint.service.scenes import DecisionPolicy, LoadedModel, PrototypesIncomplete, ReembedProgress, SceneService
from sceneprint.service.sync import lease

if TYPE_CHECKING:
    from sceneprint.service.metrics import Metrics

log = logging.getLogger("sceneprint.service.reload")
ReloadState = Literal["idle", "loading", "waiting", "reembedding", "catching_up", "switching", "done", "failed"]
# Catch-up passes without the write gate before the last one under it; a pass that embeds this few clips
# is taken as quiet enough for the gate to be held only briefly.
MAX_OPEN_PASSES = 5
QUIET_PASS_CLIPS = 8
SWITCH_ATTEMPTS = 5  # a switch that finds scenes written meanwhile through another replica catches up and tries again


@dataclass(frozen=True)
class ReloadStatus:
    """Where the last (or running) reload stands; ``GET /admin/reload`` shows it."""

    state: ReloadState
    serving_version: str
    serving_key: str
    serving_registry_version: str | None
    registry: str | None
    target_version: str | None = None
    target_key: str | None = None
    reason: str | None = None
    clips_total: int = 0
    clips_done: int = 0
    clips_stored: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    seconds: float | None = None
    error: str | None = None


class Reloader:
    """Follows one registry for one scene service.

    Args:
        service: The scene service whose model is replaced.
        registry: The registry whose current version is served.
        policy: The decision policy for a bundle (settings over its calibration), rebuilt for every new model.
        session: ONNX Runtime options of a loaded encoder.
        keep_models: How many recent models' embeddings are kept after a switch (``kept_models``).
        poll_s: How often ``watch`` reads the pointer.
        metrics: Where reload durations and re-embedded clips are counted.
    """

    def __init__(self, service: SceneService, registry: Registry, *, policy: Callable[[Manifest], DecisionPolicy],
                 session: SessionConfig, keep_models: int, poll_s: float, metrics: Metrics | None = None) -> None:
        self.service = service
        self.registry = registry
        self.policy = policy
        self.session = session
        self.keep_models = keep_models
        self.poll_s = poll_s
        self.metrics = metrics
        self._task: asyncio.Task[None] | None = None
        self._again = False  # asked again while a reload ran: look at the pointer once more when it ends
        self._status = self._idle()
        self._progress = ReembedProgress()

    def _idle(self) -> ReloadStatus:
        model = self.service.model
        return ReloadStatus(state="idle", serving_version=model.version, serving_key=model.key,
                            serving_registry_version=model.registry_version, registry=str(self.registry.root))

    @property
    def status(self) -> ReloadStatus:
        model, done = self.service.model, self._progress
        return replace(self._status, serving_version=model.version, serving_key=model.key,
                       serving_registry_version=model.registry_version, clips_total=done.found,
                       clips_done=done.embedded, clips_stored=done.stored)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def request(self, reason: str) -> ReloadStatus:
        """Reload to the registry's current version unless the service serves it already; one reload at a time.

        Call it on the event loop. Returns the status (of the reload this starts, or of the one running).
        """
        if self.running:
            self._again = True
            return self.status
        pointer = self._pointer()
        if pointer is not None and pointer.version != self.service.model.registry_version:
            # Answered at once as started, so that a caller polling GET /admin/reload never reads the last one's end.
            self._status = replace(self._idle(), state="loading", target_version=pointer.version,
                                   target_key=pointer.key, reason=reason, started_at=datetime.now(UTC))
            self._progress = ReembedProgress()
        self._task = asyncio.get_running_loop().create_task(self._follow(reason), name="sceneprint-reload")
        return self.status

    def _pointer(self) -> Pointer | None:
        try:
            return self.registry.pointer()
        except RegistryError as exc:
            log.error("cannot reload: %s", exc)
            return None

    async def watch(self) -> None:
        """Reload whenever the registry's pointer is replaced (polled every ``poll_s``), for as long as the app runs."""
        seen = self.registry.stamp()
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                stamp = self.registry.stamp()
            except OSError as exc:
                log.warning("cannot read the registry's pointer (%s)", exc)
                continue
            if stamp != seen:
                seen = stamp
                self.request("pointer changed")

    async def close(self) -> None:
        """Cancel a reload in flight (what it embedded stays in the database; the next start resumes it)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self, reason: str) -> None:
        while True:
            self._again = False
            pointer = self._pointer()
            if pointer is not None and pointer.version != self.service.model.registry_version:
                await self._reload(pointer, reason)
            if not self._again:
                return
            reason = "asked again during a reload"

    async def _reload(self, pointer: Pointer, reason: str) -> None:
        started, t0 = datetime.now(UTC), time.perf_counter()
        self._status = replace(self._idle(), state="loading", target_version=pointer.version, target_key=pointer.key,
                               reason=reason, started_at=started)
        self._progress = progress = ReembedProgress()
        old = self.service.model
        log.info("reloading: %s -> registry version %s (%s)", old.key, pointer.version, reason)
        try:
            verified = await run_in_threadpool(lambda: verify_bundle(self.registry.path(pointer.version),
                                                                     session=self.session))
            model = LoadedModel(verified.encoder, verified.manifest, registry_version=pointer.version)
            decisions = self.policy(model.manifest)
            self._status = replace(self._status, target_key=model.key)

            def waiting() -> None:
                self._status = replace(self._status, state="waiting")

            # Replicas share the database: one re-embeds the stored audio for the new model while the others wait
            # for its lease, then find (nearly) everything embedded. One that dies midway frees the lease when it
            # expires; the next resumes from what was written.
            async with lease(self.service.sessions, f"reembed:{model.key}", waiting=waiting):
                self._status = replace(self._status, state="reembedding")
                await self.service.catch_up(model, progress)
            self._status = replace(self._status, state="catching_up")
            for _ in range(MAX_OPEN_PASSES):
                if await self.service.catch_up(model, progress) <= QUIET_PASS_CLIPS:
                    break
            self._status = replace(self._status, state="switching")
            async with self.service.writes.exclusive():
                for attempt in range(SWITCH_ATTEMPTS):
                    await self.service.catch_up(model, progress)  # no write of this replica can interleave
                    try:
                        await self.service.switch(model, decisions)
                        break
                    except PrototypesIncomplete:  # ... but another replica's can
                        if attempt == SWITCH_ATTEMPTS - 1:
                            raise
        except asyncio.CancelledError:
            self._status = replace(self._status, state="failed", error="cancelled (the service stopped)",
                                   finished_at=datetime.now(UTC), seconds=round(time.perf_counter() - t0, 3))
            raise
        except Exception as exc:  # a refused bundle, missing audio, a database error: the old model keeps serving
            self._status = replace(self._status, state="failed", error=str(exc) or type(exc).__name__,
                                   finished_at=datetime.now(UTC), seconds=round(time.perf_counter() - t0, 3))
            log.error("reload to registry version %s refused; %s keeps serving: %s", pointer.version, old.key,
                      self._status.error)
            if self.metrics is not None:
                self.metrics.reloads.labels(outcome="failed").inc()
            return
        finally:
            if self.metrics is not None:
                self.metrics.reembedded_clips.inc(progress.embedded)
        seconds = time.perf_counter() - t0
        self._status = replace(self._status, state="done", finished_at=datetime.now(UTC), seconds=round(seconds, 3))
        log.info("now serving %s (registry version %s): %d clips re-embedded in %.1f s", model.key, pointer.version,
                 progress.embedded, seconds)
        if self.metrics is not None:
            self.metrics.reloads.labels(outcome="done").inc()
            self.metrics.reload_seconds.observe(seconds)
        try:
            embeddings, prototypes = await run_in_threadpool(self.service.prune, self.keep_models)
        except Exception as exc:  # pruning is housekeeping: the switch stands
            log.warning("cannot prune old models' embeddings (%s)", exc)
        else:
            if embeddings or prototypes:
                log.info("pruned %d embeddings and %d prototypes of models no longer kept", embeddings, prototypes)
