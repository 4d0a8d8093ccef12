"""The FAISS scene index."""

from __future__ import annotations

import threading

import numpy as np

from sceneprint.prototypes import l2_normalize
from sceneprint.service.index import SceneIndex


def unit(*values: float) -> np.ndarray:
    return l2_normalize(np.array(values, dtype=np.float32))


def test_search_ranks_by_cosine_and_caps_k() -> None:
    index = SceneIndex(2)
    index.rebuild([(1, "east", unit(1, 0)), (2, "north", unit(0, 1)), (3, "northeast", unit(1, 1))])
    matches = index.search(unit(1, 0.1), k=10)
    assert [m.scene for m in matches] == ["east", "northeast", "north"]
    assert matches[0].score == np.float32(unit(1, 0.1) @ unit(1, 0))


def test_upsert_replaces_and_remove_deletes() -> None:
    index = SceneIndex(2)
    index.upsert(7, "a", unit(1, 0))
    index.upsert(7, "a", unit(0, 1))
    assert len(index) == 1 and index.search(unit(0, 1), 1)[0].score == np.float32(1.0)
    index.remove(7)
    assert index.search(unit(0, 1), 1) == [] and len(index) == 0


def test_concurrent_searches_and_updates_stay_consistent() -> None:
    index = SceneIndex(8)
    rng = np.random.default_rng(0)
    index.rebuild([(i, f"s{i}", l2_normalize(rng.standard_normal(8))) for i in range(100)])
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(200):
                found = index.search(l2_normalize(rng.standard_normal(8)), 5)
                assert 1 <= len(found) <= 5
        except BaseException as exc:
            errors.append(exc)

    def writer() -> None:
        for i in range(100, 300):
            index.upsert(i, f"s{i}", l2_normalize(np.ones(8)))
            index.remove(i)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(index) == 100


def test_rebuild_in_chunks_keeps_every_row() -> None:
    rng = np.random.default_rng(3)
    rows = [(i * 3, f"s{i}", l2_normalize(rng.standard_normal(4))) for i in range(23)]
    index = SceneIndex(4)
    index.rebuild(iter(rows), chunk=5)
    assert len(index) == len(rows)
    for _, name, vector in rows:
        assert index.search(vector, 1)[0].scene == name


def test_float16_index_scores_within_1e_4_of_exact_and_supports_updates() -> None:
    rng = np.random.default_rng(5)
    vectors = l2_normalize(rng.standard_normal((2000, 128)))  # (N, D)
    exact, half = SceneIndex(128, "float32"), SceneIndex(128, "float16")
    for index in (exact, half):
        index.rebuild((i, f"s{i}", v) for i, v in enumerate(vectors))
    for query in l2_normalize(rng.standard_normal((20, 128))):
        a, b = exact.search(query, 10), half.search(query, 10)
        reference = {m.scene: m.score for m in a}
        assert abs(a[0].score - b[0].score) < 1e-4
        assert all(abs(m.score - float(vectors[int(m.scene[1:])] @ query)) < 1e-4 for m in b)
        assert b[0].scene in reference
    half.upsert(3, "moved", unit(*([1.0] + [0.0] * 127)))
    assert half.search(unit(*([1.0] + [0.0] * 127)), 1)[0].scene == "moved"
    half.remove(3)
    assert len(half) == 1999 and all(m.scene != "moved" for m in half.search(unit(*([1.0] + [0.0] * 127)), 5))
