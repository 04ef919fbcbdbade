"""Prometheus metrics of the server (``GET /metrics``).

With ``--workers N`` each worker process counts on its own; ``similarity serve`` then points
``PROMETHEUS_MULTIPROC_DIR`` at an empty directory before the workers start, and every scrape
adds the workers' files up (``render``). Gauges say how they add up across workers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as mp

from ..model import ModelInfo
from ..types import ScoreStats
from .batcher import Tower

# A *_created series beside every counter and histogram doubles what is scraped for nothing here.
disable_created_metrics()

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def multiprocess_mode() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    """Every metric in its own registry, so several apps can live in one process (tests)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "similarity_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "similarity_request_duration_seconds",
            "HTTP request latency (arrival to last byte sent)",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight_requests = Gauge(
            "similarity_requests_in_flight", "HTTP requests being handled", multiprocess_mode="livesum", registry=r
        )
        self.rows = Counter("similarity_rows_scored", "rows scored (a similarity came out)", registry=r)
        self.row_errors = Counter("similarity_row_errors", "rows answered with an error, by code", ["code"], registry=r)
        self.batch_size = Histogram(
            "similarity_batch_size",
            "inputs per model call (rows of several requests together)",
            ["tower"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "similarity_batch_seconds", "seconds per model call", ["tower"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "similarity_queue_depth",
            "inputs (images, captions) waiting for the model",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.rows_in_flight = Gauge(
            "similarity_rows_in_flight",
            "rows admitted and not yet answered (fetching or waiting for the model)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.fetch_seconds = Histogram(
            "similarity_image_fetch_seconds",
            "seconds per image download (retries and redirects included), by outcome",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.load_seconds = Gauge(
            "similarity_model_load_seconds", "seconds the model took to load", multiprocess_mode="max", registry=r
        )
        # An Info metric would do, but multiprocess mode cannot add Info up; a constant-1 gauge can.
        self.model_info = Gauge(
            "similarity_model_info",
            "the model being served (value 1)",
            ["model_id", "revision", "backend", "device", "dtype"],
            multiprocess_mode="max",
            registry=r,
        )
        self.ready = Gauge(
            "similarity_model_ready",
            "1 once the model is loaded and its canary recorded",
            multiprocess_mode="min",
            registry=r,
        )
        self.canary_drift = Gauge(
            "similarity_canary_drift",
            "|cosine change| of the last readiness canary",
            multiprocess_mode="max",
            registry=r,
        )

    # -- BatchObserver
    def batch(self, tower: Tower, size: int, seconds: float) -> None:
        self.batch_size.labels(tower).observe(size)
        self.batch_seconds.labels(tower).observe(seconds)

    def fetched(self, seconds: float, error_code: str | None) -> None:
        self.fetch_seconds.labels("ok" if error_code is None else "error").observe(seconds)

    def depth(self, waiting: int, in_flight: int) -> None:
        self.queue_depth.set(waiting)
        self.rows_in_flight.set(in_flight)

    # -- the server
    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def scored(self, stats: ScoreStats) -> None:
        self.rows.inc(stats.scored)
        for code, n in stats.errors.items():
            self.row_errors.labels(code).inc(n)

    def loaded(self, info: ModelInfo) -> None:
        self.load_seconds.set(info.load_seconds)
        self.model_info.labels(info.model_id, info.revision, info.backend, info.device, info.dtype).set(1)

    def render(self) -> tuple[bytes, str]:
        if multiprocess_mode():
            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
