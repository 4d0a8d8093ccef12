"""The pieces replicas coordinate with: the change feed (including ids committed out of order) and leases."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from sceneprint.service import repository as repo
from sceneprint.service.db import make_engine, make_session_factory
from sceneprint.service.migrate import upgrade
from sceneprint.service.sync import GAP_WAIT_S, ChangeFeed, lease
from sceneprint.service.tables import SceneChange, utcnow


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    return make_session_factory(make_engine(url))


def log(sessions: sessionmaker[Session], change_id: int, scene_id: int) -> None:
    """A change committed with a given id (as a transaction that took its id earlier commits later)."""
    with sessions() as session:
        session.execute(insert(SceneChange).values(id=change_id, scene_id=scene_id, created_at=utcnow()))
        session.commit()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_feed_returns_each_changed_scene_once_from_where_it_started(sessions: sessionmaker[Session]) -> None:
    log(sessions, 1, 10)
    feed = ChangeFeed(sessions)
    assert feed.start() == 1 and feed.fetch() == []  # what was there at start is in the index already
    log(sessions, 2, 11)
    log(sessions, 3, 11)
    log(sessions, 4, 12)
    assert feed.fetch() == [11, 12]
    assert feed.fetch() == []


def test_a_change_committed_after_a_later_one_is_not_missed(sessions: sessionmaker[Session]) -> None:
    clock = Clock()
    feed = ChangeFeed(sessions, clock=clock)
    feed.start()
    log(sessions, 2, 20)  # id 1 is taken by a transaction still open
    assert feed.fetch() == [20] and set(feed.gaps) == {1}
    clock.now += 1.0
    log(sessions, 1, 21)  # ... which commits now
    assert feed.fetch() == [21] and feed.gaps == {}


def test_an_id_that_never_appears_is_given_up_after_a_while(sessions: sessionmaker[Session]) -> None:
    clock = Clock()
    feed = ChangeFeed(sessions, clock=clock)
    feed.start()
    log(sessions, 3, 30)  # ids 1 and 2: rolled back, never to appear
    assert feed.fetch() == [30] and set(feed.gaps) == {1, 2}
    clock.now += GAP_WAIT_S + 1
    assert feed.fetch() == [] and feed.gaps == {}


def test_ids_just_below_the_start_that_are_absent_are_watched(sessions: sessionmaker[Session]) -> None:
    log(sessions, 1, 1)
    log(sessions, 3, 3)  # 2 still in flight when the replica starts
    feed = ChangeFeed(sessions)
    assert feed.start() == 3 and set(feed.gaps) == {2}
    log(sessions, 2, 2)
    assert feed.fetch() == [2]


def test_old_changes_are_pruned(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.execute(insert(SceneChange).values(id=1, scene_id=1, created_at=utcnow() - timedelta(hours=2)))
        session.commit()
    log(sessions, 2, 2)
    assert ChangeFeed(sessions).prune() == 1


def test_a_lease_has_one_holder_until_it_is_given_up_or_expires(sessions: sessionmaker[Session]) -> None:
    ttl = timedelta(seconds=30)
    with sessions() as s:
        assert repo.take_lease(s, name="reembed:m@1", owner="a", ttl=ttl)
    with sessions() as s:
        assert not repo.take_lease(s, name="reembed:m@1", owner="b", ttl=ttl)
    with sessions() as s:
        assert repo.take_lease(s, name="reembed:m@1", owner="a", ttl=ttl)  # renewed by its holder
    with sessions() as s:
        repo.release_lease(s, name="reembed:m@1", owner="b")  # not b's to give up: nothing happens
    with sessions() as s:
        assert not repo.take_lease(s, name="reembed:m@1", owner="b", ttl=ttl)
    with sessions() as s:
        repo.release_lease(s, name="reembed:m@1", owner="a")
    with sessions() as s:
        assert repo.take_lease(s, name="reembed:m@1", owner="b", ttl=timedelta(seconds=-1))  # already expired ...
    with sessions() as s:
        assert repo.take_lease(s, name="reembed:m@1", owner="c", ttl=ttl)  # ... so a dead holder's is taken over


def test_the_second_replica_waits_for_the_lease_until_the_first_is_done(sessions: sessionmaker[Session]) -> None:
    order: list[str] = []

    async def replica(owner: str, delay: float) -> None:
        await asyncio.sleep(delay)
        async with lease(sessions, "reembed:m@2", owner=owner, wait_s=0.02,
                         waiting=lambda: order.append(f"{owner} waits") if f"{owner} waits" not in order else None):
            order.append(f"{owner} holds")
            await asyncio.sleep(0.2)
            order.append(f"{owner} done")

    async def both() -> None:
        await asyncio.gather(replica("a", 0.0), replica("b", 0.05))

    asyncio.run(both())
    assert order == ["a holds", "b waits", "a done", "b holds", "b done"]
