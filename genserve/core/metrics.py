"""Service metrics: Ray's Prometheus endpoint for every process, and the ingress's own page.

Every process (ingress, worker replicas, training jobs) records into the same names; Ray's
per-node metrics agent serves them, and `/v1/metrics` on the ingress relays that page.
Outside a Ray worker (plain scripts, unit tests) recording is a no-op, so callers never branch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000]
STAGES = ("audit", "queue", "diffusion", "scan", "store")

# name -> (kind, description, tag keys)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "genserve_requests_total": ("counter", "HTTP requests by route and status code", ("route", "status")),
    "genserve_jobs_total": ("counter", "Generation jobs by final status", ("family", "status")),
    "genserve_queue_depth": ("gauge", "Jobs accepted and not yet finished", ("family",)),
    "genserve_request_latency_ms": ("histogram", "End-to-end generation latency", ("family",)),
    "genserve_stage_latency_ms": ("histogram", "Latency of one stage of a generation", ("stage", "family")),
    "genserve_images_generated_total": ("counter", "Images produced by the diffusion pipeline", ("family",)),
    "genserve_images_withheld_total": ("counter", "Images not delivered, by rule", ("rule",)),
    "genserve_prompts_blocked_total": ("counter", "Requests refused by the safety precheck, by rule", ("rule",)),
    "genserve_lora_cache_total": ("counter", "LoRA adapter cache lookups", ("result",)),
    "genserve_buzz_total": ("counter", "Buzz moved by billing operation", ("operation", "destination")),
    "genserve_training_steps_total": ("counter", "Optimiser steps run by training jobs", ("family",)),
}


class _Registry:
    """Creates each Ray metric once per process, on first use inside Ray."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, object] = {}

    def get(self, name: str):  # noqa: ANN201
        metric = self._metrics.get(name)
        if metric is not None:
            return metric
        if not _ray_ready():
            return None
        with self._lock:
            if name not in self._metrics:
                self._metrics[name] = _build(name)
        return self._metrics[name]


def _ray_ready() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a hard dependency
        return False
    return ray.is_initialized()


def _build(name: str):  # noqa: ANN202
    from ray.util import metrics

    kind, desc, tags = DEFINITIONS[name]
    if kind == "counter":
        return metrics.Counter(name, description=desc, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description=desc, tag_keys=tags)
    return metrics.Histogram(name, description=desc, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags)


_registry = _Registry()


def _tags(name: str, tags: dict[str, str]) -> dict[str, str]:
    expected = DEFINITIONS[name][2]
    return {k: str(tags.get(k, "")) for k in expected}


def inc(name: str, value: float = 1.0, **tags: str) -> None:
    metric = _registry.get(name)
    if metric is not None and value:
        metric.inc(value, tags=_tags(name, tags))


def observe(name: str, value: float, **tags: str) -> None:
    metric = _registry.get(name)
    if metric is not None:
        metric.observe(value, tags=_tags(name, tags))


def set_gauge(name: str, value: float, **tags: str) -> None:
    metric = _registry.get(name)
    if metric is not None:
        metric.set(value, tags=_tags(name, tags))


@contextmanager
def stage_timer(stage: str, family: str = "") -> Iterator[None]:
    """Time one stage of a generation into `genserve_stage_latency_ms`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        observe("genserve_stage_latency_ms", (time.perf_counter() - start) * 1000.0, stage=stage, family=family)


class ServicePage:
    """The ingress's `/v1/metrics` page, written by `prometheus_client`.

    The job figures are read from the database when the page is scraped, so every replica shows the
    whole service's jobs by status and its queue depth by family (a gauge that falls as jobs end).
    The HTTP request counters are the answering replica's own; Ray's metrics endpoint
    (`ray_genserve_requests_total`) sums them over replicas.
    """

    def __init__(self, read_jobs: Callable[[], tuple[dict[str, int], dict[str, int]]]):
        disable_created_metrics()  # `_created` timestamps per series only double the page
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests = PromCounter("genserve_http_requests", "HTTP requests by route and status code",
                                     ["route", "status"], registry=self.registry)
        self.registry.register(_JobFigures(read_jobs))

    def count_request(self, route: str, status: int) -> None:
        self._requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _JobFigures(Collector):
    def __init__(self, read_jobs: Callable[[], tuple[dict[str, int], dict[str, int]]]):
        self._read = read_jobs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        by_status, active_by_family = self._read()
        jobs = GaugeMetricFamily("genserve_generation_jobs", "Generation jobs in the database by status",
                                 labels=["status"])
        for status, n in sorted(by_status.items()):
            jobs.add_metric([status], n)
        depth = GaugeMetricFamily("genserve_generation_queue_depth",
                                  "Generation jobs queued or running, by family", labels=["family"])
        for family, n in sorted(active_by_family.items()):
            depth.add_metric([family], n)
        yield jobs
        yield depth
