"""Prometheus metrics of one app, in a registry of its own (tests build many apps in one process).

What the service does is counted as it happens: requests (by method, route template and status, so
``/scenes/{name}`` is one series however many scenes exist), their latency, classify outcomes and
re-embedding times. What it holds is read when scraped, from the running objects: scenes in the
database, scenes in the index, the model version and the inference queue's depth.

``/metrics`` needs no API key, like ``/healthz`` and ``/readyz`` (which already show the model version
and the index size): it carries counts only, never a scene name, a client or a key. The proxy of the
Compose ``scale`` profile does not forward it; Prometheus scrapes each replica on the internal network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from sceneprint.service import repository as repo
from sceneprint.service.connections import RateLimitedLog
from sceneprint.service.scenes import Classification, SceneService

log = logging.getLogger("sceneprint.service.metrics")
# Requests: from a health probe (ms) to a long enrollment (tens of seconds).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Re-embedding one scene: its clips decoded and embedded again (a few clips, up to hundreds).
REEMBED_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A whole model reload: every stored clip re-embedded (seconds for hundreds of clips, an hour for millions).
RELOAD_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
RELOAD_OUTCOMES = ("done", "failed")
OUTCOMES = ("named", "unknown")
UNMATCHED_ROUTE = "<unmatched>"  # a path no route template matches: one label, whatever the path


class Metrics:
    """The app's registry and the counters the service updates as it works."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("sceneprint_http_requests", "HTTP requests answered, by route template and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.request_seconds = Histogram("sceneprint_http_request_duration_seconds",
                                         "Time from a request's arrival to its last response byte.",
                                         ["method", "route", "status"], buckets=LATENCY_BUCKETS_S,
                                         registry=self.registry)
        self.classifications = Counter("sceneprint_classifications",
                                       "Clips classified, by outcome: named (a scene at or above the unknown "
                                       "threshold) or unknown.", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.classifications.labels(outcome=outcome)  # both series exist from the start, at 0
        self.reembed_seconds = Histogram("sceneprint_reembed_duration_seconds",
                                         "Time to re-embed one scene's clips for the running model (at start-up "
                                         "or after a model change).", buckets=REEMBED_BUCKETS_S,
                                         registry=self.registry)
        self.reload_seconds = Histogram("sceneprint_reload_duration_seconds",
                                        "Time from a model reload's start to the switch (bundle checked, every "
                                        "stored clip re-embedded, index built).", buckets=RELOAD_BUCKETS_S,
                                        registry=self.registry)
        self.reloads = Counter("sceneprint_reloads", "Model reloads, by outcome: done (switched) or failed (refused; "
                                                     "the old model kept serving).", ["outcome"],
                               registry=self.registry)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome=outcome)
        self.reembedded_clips = Counter("sceneprint_reload_reembedded_clips",
                                        "Stored clips re-embedded from their audio by model reloads.",
                                        registry=self.registry)
        self.synced_scenes = Counter("sceneprint_replica_synced_scenes",
                                     "Scenes brought in line with the database's change log (enrolled, changed or "
                                     "deleted, through this replica or another).", registry=self.registry)
        ProcessCollector(registry=self.registry)  # memory, CPU time, open file descriptors

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        labels = {"method": method, "route": route, "status": str(status)}
        self.requests.labels(**labels).inc()
        self.request_seconds.labels(**labels).observe(seconds)

    def watch(self, scenes: Callable[[], SceneService | None], inference_slots: int) -> None:
        """Read the service's state (once it is loaded) whenever the registry is scraped."""
        self.registry.register(ServiceCollector(scenes, inference_slots))


class ServiceCollector(Collector):
    """What the running service holds, read at scrape time. Nothing is reported before it has loaded."""

    def __init__(self, scenes: Callable[[], SceneService | None], inference_slots: int) -> None:
        self._scenes = scenes
        self._inference_slots = inference_slots
        self._limited = RateLimitedLog(log)

    def describe(self) -> list[Metric]:
        return []  # the families depend on the service's state: collected, not described, at registration

    def collect(self) -> Iterator[Metric]:
        service = self._scenes()
        if service is None:
            return
        info = InfoMetricFamily("sceneprint_model", "The encoder bundle being served.")
        info.add_metric([], {"model_version": service.model.version})
        yield info
        yield GaugeMetricFamily("sceneprint_index_scenes", "Scene prototypes in this process's index (running "
                                                           "model).", value=len(service.index))
        yield GaugeMetricFamily("sceneprint_inference_slots", "Threads that decode and embed clips.",
                                value=self._inference_slots)
        yield GaugeMetricFamily("sceneprint_storage_writable", "1 while the data directory takes writes, 0 while "
                                                               "it refuses them (full, read-only).",
                                value=0 if service.storage_error is not None else 1)
        yield CounterMetricFamily("sceneprint_clip_removal_failures", "Clip blobs whose removal the disk refused "
                                                                      "(retried later).",
                                  value=service.store.removal_failures)
        yield GaugeMetricFamily("sceneprint_clip_removals_pending", "Clip blobs waiting for a removal to be retried.",
                                value=len(service.store.pending))
        depth = inference_queue_depth(service)
        if depth is not None:
            yield GaugeMetricFamily("sceneprint_inference_queue_depth", "Decode-and-embed jobs waiting for an "
                                                                        "inference slot.", value=depth)
        try:
            with service.sessions() as session:
                scenes = repo.count_scenes(session)
        except Exception as exc:  # a database outage must not fail the scrape of everything else
            self._limited.warning("scenes", "cannot count the enrolled scenes for /metrics (%s)", type(exc).__name__)
        else:
            yield GaugeMetricFamily("sceneprint_scenes", "Enrolled scenes, in the database (shared by every "
                                                         "replica).", value=scenes)


def inference_queue_depth(service: SceneService) -> int | None:
    """Jobs queued on the service's inference pool (a ThreadPoolExecutor), or None if it cannot be read."""
    queue = getattr(getattr(service, "_inference", None), "_work_queue", None)
    return queue.qsize() if queue is not None else None


class MeteredSceneService(SceneService):
    """The scene service, with its classify outcomes and re-embedding times counted.

    Args:
        metrics: Where to count.
        **kwargs: ``SceneService``'s arguments.
    """

    def __init__(self, *, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics

    # The arguments pass through as they are: this class counts, it does not re-state SceneService's signatures.
    async def classify(self, *args: Any, **kwargs: Any) -> Classification:
        result = await super().classify(*args, **kwargs)
        self.metrics.classifications.labels(outcome="unknown" if result.decision.unknown else "named").inc()
        return result

    async def sync_scenes(self, *args: Any, **kwargs: Any) -> int:
        result = await super().sync_scenes(*args, **kwargs)
        self.metrics.synced_scenes.inc(len(args[0]) if args else len(kwargs["scene_ids"]))
        return result

    # SceneService re-embeds one scene at a time here, at start-up and after a model change; a test
    # (test_reembedding_after_a_model_change_is_timed) fails if that stops being so.
    def _reembed(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return super()._reembed(*args, **kwargs)
        finally:
            self.metrics.reembed_seconds.observe(time.perf_counter() - started)
