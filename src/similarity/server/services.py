"""What one server process holds: the settings, the run (``bootstrap.build``), the AWS clients,
the job service, the micro-batcher, the canary and the metrics, the ``ApiService`` (the same one
the Lambda routes to) wired to them, and ``OipService`` (the Open Inference Protocol) over that.
Framework-free: the FastAPI app, and any other front (Ray Serve), call ``start()``/``close()``
(or ``load()``) and route to ``api`` and ``oip``."""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from typing import Any

from ..api import ApiService, Overloaded, Unavailable
from ..api.oip import OipService
from ..aws import make_client
from ..bootstrap import Runtime, build
from ..config import ServeSettings, load
from ..errors import SimilarityError
from ..fetch import Fetcher
from ..jobs import JobService, make_service
from ..types import Record, ScoreResult
from .batcher import Abandon, BatcherClosed, MicroBatcher, QueueFull
from .canary import Canary
from .metrics import Metrics

log = logging.getLogger("similarity.server")

#: Set by the front around a request's thread (anyio copies it in): set when the client has gone,
#: so the batcher drops the request's rows instead of scoring them for nobody.
ABANDON: contextvars.ContextVar[Abandon | None] = contextvars.ContextVar("similarity_abandon", default=None)


class ModelLoading(SimilarityError):
    code = "model_loading"


class Clients:
    """AWS clients, each made on first use by ``similarity.aws``."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, service: str) -> Any:
        with self._lock:
            if service not in self._made:
                self._made[service] = make_client(service)
            return self._made[service]


class ServerServices:
    def __init__(
        self,
        settings: ServeSettings | None = None,
        *,
        runtime: Runtime | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings or load(ServeSettings)
        self.clients = Clients()
        # Services never read local files named in requests, unless SIMILARITY_ALLOW_LOCAL_PATHS says so.
        self.runtime = runtime or build(self.settings, s3=lambda: self.clients.get("s3"), local_paths=False)
        self.metrics = metrics or Metrics()
        self.token = self.settings.server.token()  # read once: a bad file stops the start
        self.batcher: MicroBatcher | None = None
        self.canary: Canary | None = None
        self._state: SimilarityError | None = ModelLoading("the model is loading")
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None
        self.api = ApiService(
            self.settings,
            self.runtime,
            lambda: self.jobs,
            score_rows=self._score_rows,
            readiness=self._readiness,
            model_state=lambda: self._state,
        )
        # The Open Inference Protocol's routes, translated into ``api``'s (one set of limits).
        self.oip = OipService(self.api, self.settings.server.model_name)

    @functools.cached_property
    def jobs(self) -> JobService:
        c = self.clients
        return make_service(self.settings.jobs, c.get("s3"), c.get("sqs"), c.get("ecs"))

    # -- lifecycle
    def load(self) -> None:
        """Load the model, start the batcher and record the canary (blocking)."""
        s = self.settings
        model = self.runtime.load()
        batcher = MicroBatcher(
            model,
            batch_size=s.score.batch_size,
            max_wait=s.server.batch_wait_ms / 1000,
            workers=s.score.workers,
            max_rows=s.server.max_queue_rows,
            observer=self.metrics,
            cache=self.runtime.cache.session(model) if self.runtime.cache is not None else None,
        ).start()
        canary = Canary(
            lambda records, timeout: self._canary_rows(batcher, records, timeout),
            tolerance=s.server.canary_tolerance,
            interval=s.server.canary_interval,
        )
        try:
            expected = canary.record()
        except Exception:
            batcher.close(timeout=1)
            raise
        self.batcher, self.canary = batcher, canary
        self.metrics.loaded(model.info)
        self.metrics.ready.set(1)
        self._state = None
        log.info(
            "model loaded",
            extra={
                "model": model.info.as_dict(),
                "canary_cosine": round(expected, 6),
                "batch_size": s.score.batch_size,
            },
        )

    def start(self) -> threading.Thread:
        """Load in the background, retrying until it works or ``close()``: /healthz answers at
        once, /readyz and /score answer 503 (with the reason) until the model is usable."""

        def run() -> None:
            while not self._stop.is_set():
                try:
                    self.load()
                    return
                except Exception as exc:
                    self._state = exc if isinstance(exc, SimilarityError) else ModelLoading(f"load failed: {exc}")
                    log.error("model not loaded; retrying", extra={"reason": str(self._state)}, exc_info=True)
                self._stop.wait(self.settings.server.load_retry_seconds)

        self._loader = threading.Thread(target=run, name="model-load", daemon=True)
        self._loader.start()
        return self._loader

    def close(self, timeout: float | None = None) -> None:
        self._stop.set()
        self.metrics.ready.set(0)
        if self.batcher is not None:
            drained = self.batcher.close(timeout)
            log.info("batcher closed", extra={"drained": drained})
        self.runtime.close()

    @property
    def ready(self) -> bool:
        return self._state is None

    # -- hooks for ApiService
    def _score_rows(self, records: list[Record], fetcher: Fetcher) -> list[ScoreResult]:
        batcher = self.batcher
        if batcher is None:
            raise Unavailable("the model is not available yet; retry later (model_loading)")
        # Fetches end by the fetcher's deadline; the reserve covers waiting for and running the model.
        wait = fetcher.settings.deadline + self.settings.api.reserve_seconds
        try:
            return batcher.score(records, fetcher, timeout=wait, abandon=ABANDON.get())
        except QueueFull as exc:
            raise Overloaded(f"the server is at capacity ({exc.detail}); retry shortly") from None
        except BatcherClosed:
            raise Unavailable("the server is shutting down; retry on another instance") from None

    def _canary_rows(self, batcher: MicroBatcher, records: list[Record], timeout: float) -> list[ScoreResult]:
        # Decoded in this (probe) thread: readiness is about the model, not client image hosts.
        return batcher.submit(records, self.runtime.fetcher, admit_always=True, inline=True).result(timeout)

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        if self._stop.is_set():  # closing: the batcher takes no canary
            return False, {"reason": "the server is shutting down"}
        if self.canary is None:  # not reached: the state turns ready only once the canary is recorded
            return False, {"reason": "no canary recorded"}
        result = self.canary.check()
        if result.drift is not None:
            self.metrics.canary_drift.set(result.drift)
        self.metrics.ready.set(1 if result.ok else 0)
        return result.ok, result.as_dict()


def wait_ready(services: ServerServices, timeout: float) -> bool:
    """For fronts that must not take traffic before the model is usable."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if services.ready:
            return True
        time.sleep(0.05)
    return services.ready
