"""Replicas in step: each service process follows the database's scene change log into its own FAISS index.

Every write (enroll, added clips, a threshold, a deletion) logs the scene's id in ``scene_changes`` in its own
transaction. Each replica remembers the last change it applied and, woken by PostgreSQL's ``NOTIFY`` (sent by
the writing transaction and delivered at its commit) or every ``sync_poll_s`` otherwise (SQLite, or a lost
listen connection), reads the changes past it and refreshes those scenes from the database
(``SceneService.sync_scenes``: idempotent, so a replica applying its own writes again is harmless).

Change ids come from a sequence, and on PostgreSQL two transactions can commit out of id order: a replica that
has read change 12 may not yet see change 11, still in flight. Ids skipped that way are remembered as gaps and
read again until they appear, or until ``GAP_WAIT_S`` has passed (the transaction rolled back: its id never
appears). Rows older than ``RETENTION`` are pruned; a replica that was down longer rebuilds its whole index at
start anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from sceneprint.service import repository as repo

if TYPE_CHECKING:
    from sceneprint.service.scenes import SceneService

log = logging.getLogger("sceneprint.service.sync")
GAP_WAIT_S = 60.0  # how long a skipped change id is waited for (a transaction open longer is not expected)
START_LOOKBACK = 256  # change ids below the start position read again once, in case one was still in flight
RETENTION = timedelta(hours=1)
PRUNE_EVERY_S = 600.0


# Who this process is, as a lease holder: unique per process, readable in the leases table.
REPLICA_ID = f"{socket.gethostname()[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
LEASE_TTL = timedelta(seconds=30)  # a holder that dies frees its lease after this long


@asynccontextmanager
async def lease(sessions: sessionmaker[Session], name: str, *, owner: str = REPLICA_ID, ttl: timedelta = LEASE_TTL,
                wait_s: float = 1.0, waiting: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Hold the database lease ``name`` for the body: wait (calling ``waiting`` each time) while another replica
    holds it, renew it every third of ``ttl`` meanwhile, give it up after. A holder that dies without giving it
    up (killed, cut off) loses it when ``ttl`` runs out, and another replica takes over.
    """

    def take() -> bool:
        with sessions() as session:
            return repo.take_lease(session, name=name, owner=owner, ttl=ttl)

    while not await run_in_threadpool(take):
        if waiting is not None:
            waiting()
        await asyncio.sleep(wait_s)

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl.total_seconds() / 3)
            try:
                if not await run_in_threadpool(take):
                    log.warning("lease %s was taken over by another replica", name)
            except Exception as exc:  # the database is away: the next renewal may still be in time
                log.warning("cannot renew lease %s (%s)", name, exc)

    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await renewing

        def give_up() -> None:
            with sessions() as session:
                repo.release_lease(session, name=name, owner=owner)

        with contextlib.suppress(Exception):  # it expires anyway
            await run_in_threadpool(give_up)


@contextlib.contextmanager
def lease_blocking(sessions: sessionmaker[Session], name: str, *, owner: str = REPLICA_ID,
                   ttl: timedelta = LEASE_TTL, wait_s: float = 1.0) -> Iterator[None]:
    """``lease`` for code on a thread of its own (start-up): waits by sleeping, renews from a timer thread."""

    def take() -> bool:
        with sessions() as session:
            return repo.take_lease(session, name=name, owner=owner, ttl=ttl)

    while not take():
        time.sleep(wait_s)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(ttl.total_seconds() / 3):
            try:
                take()
            except Exception as exc:  # the next renewal may still be in time
                log.warning("cannot renew lease %s (%s)", name, exc)

    renewing = threading.Thread(target=renew, name="sceneprint-lease", daemon=True)
    renewing.start()
    try:
        yield
    finally:
        done.set()
        renewing.join()
        with contextlib.suppress(Exception), sessions() as session:
            repo.release_lease(session, name=name, owner=owner)


class ChangeFeed:
    """The change log as one replica reads it: the scene ids changed since the last ``fetch``."""

    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions = sessions
        self.clock = clock
        self.position = 0
        self.gaps: dict[int, float] = {}  # change id -> when it was first missed

    def start(self) -> int:
        """Start at the newest change (call it before the index is built from the database); the ids just below
        it that are absent are watched as gaps, in case their transactions had not committed yet."""
        with self.sessions() as session:
            self.position = repo.last_scene_change(session)
            low = max(0, self.position - START_LOOKBACK)
            seen = {cid for cid, _ in repo.scene_changes(session, after=low)}
        now = self.clock()
        self.gaps = {cid: now for cid in range(low + 1, self.position + 1) if cid not in seen}
        return self.position

    def fetch(self) -> list[int]:
        """The scenes changed since the last call (each once), advancing the position."""
        now = self.clock()
        self.gaps = {cid: t for cid, t in self.gaps.items() if now - t < GAP_WAIT_S}
        with self.sessions() as session:
            rows = repo.scene_changes(session, after=self.position, also=self.gaps)
        scenes: dict[int, None] = {}
        for cid, scene_id in rows:
            scenes[scene_id] = None
            if cid in self.gaps:
                del self.gaps[cid]
            elif cid > self.position:
                self.gaps.update((missed, now) for missed in range(self.position + 1, cid))
                self.position = cid
        return list(scenes)

    def prune(self) -> int:
        with self.sessions() as session:
            n = repo.prune_scene_changes(session, older_than=RETENTION)
            session.commit()
        return n


class NotifyListener:
    """LISTENs on PostgreSQL's change channel in a thread of its own and sets ``wake`` (thread-safely, on the event
    loop) for each notification. It reconnects after a lost connection; polling covers the time it is down."""

    def __init__(self, engine: Engine, wake: Callable[[], None], reconnect_s: float = 2.0) -> None:
        self.conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.wake = wake
        self.reconnect_s = reconnect_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sceneprint-listen", daemon=True)
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {repo.CHANGES_CHANNEL}")
                    self.listening.set()
                    self.wake()  # anything committed while not listening
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.wake()
            except Exception as exc:  # a lost connection: polling carries on meanwhile
                self.listening.clear()
                log.warning("change notifications lost (%s); polling until reconnected", exc)
                self._stop.wait(self.reconnect_s)


class ReplicaSync:
    """Runs the feed for one scene service: applies other replicas' changes as they are committed.

    Args:
        service: The scene service whose index follows the database.
        feed: The change feed, started before the service built its index.
        engine: The database's engine (PostgreSQL: notifications are listened to on a connection of their own).
        poll_s: The longest a change waits when no notification comes (the bound on visibility without NOTIFY).
    """

    def __init__(self, service: SceneService, feed: ChangeFeed, engine: Engine, poll_s: float) -> None:
        self.service = service
        self.feed = feed
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.listener = (NotifyListener(engine, self._wake_threadsafe) if engine.dialect.name == "postgresql"
                         else None)
        self.applied = 0  # scene changes applied, for tests and metrics

    def _wake_threadsafe(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Follow the change log for as long as the app runs (cancel it to stop)."""
        self._loop = asyncio.get_running_loop()
        if self.listener is not None:
            self.listener.start()
        pruned_at = time.monotonic()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_s)
                self._wake.clear()
                try:
                    await self.step()
                    if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                        pruned_at = time.monotonic()
                        await run_in_threadpool(self.feed.prune)
                except Exception as exc:  # a database hiccup: the next pass retries from the same position
                    log.warning("cannot apply scene changes (%s); retrying", exc)
        finally:
            if self.listener is not None:
                await run_in_threadpool(self.listener.stop)

    async def step(self) -> int:
        """Apply the changes logged since the last step; how many scenes they touched."""
        position, gaps = self.feed.position, dict(self.feed.gaps)
        scene_ids = await run_in_threadpool(self.feed.fetch)
        if not scene_ids:
            return 0
        try:
            await self.service.sync_scenes(scene_ids)
        except BaseException:
            self.feed.position, self.feed.gaps = position, gaps  # not applied: read them again next time
            raise
        self.applied += len(scene_ids)
        return len(scene_ids)
