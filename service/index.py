"""The scene index: FAISS inner-product search over scene prototypes, keyed by scene id.

It is a cache of the prototypes table for the running model version: rebuilt from the database at
start-up and updated after each commit. Prototypes are unit vectors, so inner product = cosine.

The prototypes are held as float32 (exact) or float16 (``index_precision``): a query reads every
prototype, so at 100,000 scenes the search is bound by memory bandwidth, and float16 halves what it reads
(docs/benchmarks.md); a float16 score is within 1e-4 of the float32 one for unit vectors (tests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import faiss
import numpy as np

from sceneprint.prototypes import Match, SceneThresholdSource

IndexPrecision = Literal["float32", "float16"]
# A scene's own acceptance threshold and where it comes from ("scene": set by hand; "per_scene": the
# decision rule's, from its enrollment); scenes without one are held to the global threshold.
SceneThreshold = tuple[float, SceneThresholdSource]


class ReadWriteLock:
    """Many concurrent readers (FAISS search is thread-safe) or one writer (add/remove are not)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def _empty_index(dim: int, precision: IndexPrecision) -> faiss.IndexIDMap2:
    if precision == "float16":
        return faiss.IndexIDMap2(faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                                            faiss.METRIC_INNER_PRODUCT))
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class SceneIndex:
    def __init__(self, dim: int, precision: IndexPrecision = "float32") -> None:
        self.dim = dim
        self.precision = precision
        self._index = _empty_index(dim, precision)
        self._names: dict[int, str] = {}
        self._thresholds: dict[int, SceneThreshold] = {}
        self._lock = ReadWriteLock()

    def __len__(self) -> int:
        return len(self._names)

    def rebuild(self, rows: Iterable[tuple[int, str, np.ndarray]], chunk: int = 8192,
                thresholds: dict[int, SceneThreshold] | None = None) -> None:
        """Replace the whole content with (scene id, name, prototype) rows, added in chunks, and the scenes'
        own thresholds (by scene id; others keep the global one).

        The new index is built aside and swapped in, so searches keep using the old one meanwhile.
        """
        index = _empty_index(self.dim, self.precision)
        names: dict[int, str] = {}
        vectors = np.empty((chunk, self.dim), dtype=np.float32)  # (chunk, D), reused
        ids = np.empty(chunk, dtype=np.int64)
        n = 0
        for scene_id, name, vector in rows:
            vectors[n], ids[n] = vector, scene_id
            names[scene_id] = name
            n += 1
            if n == chunk:
                index.add_with_ids(vectors, ids)
                n = 0
        if n:
            index.add_with_ids(vectors[:n], ids[:n])
        kept = {i: t for i, t in (thresholds or {}).items() if i in names}
        with self._lock.writing():
            self._index = index
            self._names = names
            self._thresholds = kept

    def upsert(self, scene_id: int, name: str, prototype: np.ndarray, threshold: SceneThreshold | None = None
               ) -> None:
        ids = np.array([scene_id], dtype=np.int64)
        with self._lock.writing():
            self._index.remove_ids(ids)  # type: ignore[arg-type]  # the wrapper takes id arrays
            self._index.add_with_ids(prototype.reshape(1, -1).astype(np.float32), ids)
            self._names[scene_id] = name
            self._set_threshold(scene_id, threshold)

    def set_threshold(self, scene_id: int, threshold: SceneThreshold | None) -> None:
        """A scene's own threshold (None: the global one applies to it)."""
        with self._lock.writing():
            if scene_id in self._names:
                self._set_threshold(scene_id, threshold)

    def threshold(self, scene_id: int) -> SceneThreshold | None:
        with self._lock.reading():
            return self._thresholds.get(scene_id)

    def _set_threshold(self, scene_id: int, threshold: SceneThreshold | None) -> None:
        if threshold is None:
            self._thresholds.pop(scene_id, None)
        else:
            self._thresholds[scene_id] = threshold

    def remove(self, scene_id: int) -> None:
        with self._lock.writing():
            self._index.remove_ids(np.array([scene_id], dtype=np.int64))  # type: ignore[arg-type]
            self._names.pop(scene_id, None)
            self._thresholds.pop(scene_id, None)

    def search(self, query: np.ndarray, k: int) -> list[Match]:
        """The ``k`` best scenes for a unit query vector, best first."""
        # One query: intra-query threads only add overhead while other requests use the cores. The
        # OpenMP thread count is per calling thread, so it is set here, in the thread that searches.
        faiss.omp_set_num_threads(1)
        with self._lock.reading():
            k = min(k, len(self._names))
            if k == 0:
                return []
            scores, ids = self._index.search(query.reshape(1, -1).astype(np.float32), k)
            matches = []
            for s, i in zip(scores[0], ids[0], strict=True):
                if i < 0:
                    continue
                own = self._thresholds.get(int(i))
                matches.append(Match(scene=self._names[int(i)], score=float(s),
                                     threshold=own[0] if own else None, threshold_source=own[1] if own else None))
            return matches
