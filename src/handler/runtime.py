"""What lives for the whole execution environment, built once on first use: the settings, the AWS
clients, the configured run (``similarity.bootstrap``), the job service and the API.

Nothing is built at import; ``reset()`` lets tests start again from a changed environment.
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from similarity.api import ApiService
from similarity.aws import make_client
from similarity.bootstrap import Runtime, build
from similarity.config import ServiceSettings, load
from similarity.jobs import JobService, make_service

from .observability import logger, trace_aws_sdk


@dataclass
class Clients:
    """AWS clients, each made on first use by ``similarity.aws`` (the one place they are made),
    their calls traced from the first."""

    _made: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, service: str) -> Any:
        with self._lock:
            if service not in self._made:
                trace_aws_sdk()
                self._made[service] = make_client(service)
            return self._made[service]


@dataclass
class Services:
    settings: ServiceSettings
    clients: Clients
    run: Runtime
    load_time_reported: bool = False

    @functools.cached_property
    def jobs(self) -> JobService:
        jobs = self.settings.jobs
        # The Lambda client only where POST /jobs hands splits off (SPLITTER_FUNCTION).
        lambda_client = self.clients.get("lambda") if jobs.splitter_function else None
        return make_service(
            jobs, self.clients.get("s3"), self.clients.get("sqs"), self.clients.get("ecs"), lambda_client
        )

    @functools.cached_property
    def api(self) -> ApiService:
        return ApiService(self.settings, self.run, lambda: self.jobs)


_lock = threading.Lock()
_services: Services | None = None


def services() -> Services:
    global _services
    with _lock:
        if _services is None:
            settings = load(ServiceSettings)
            clients = Clients()
            # Services never read local files named in requests, unless SIMILARITY_ALLOW_LOCAL_PATHS says so.
            run = build(settings, s3=lambda: clients.get("s3"), local_paths=False)
            _services = Services(settings, clients, run)
        return _services


def in_lambda() -> bool:
    return bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))


def preload() -> None:
    """Load the model during the Lambda init phase (cold start) so the first request does not pay
    for it. Failures are left for /readyz and the first request to report."""
    try:
        s = services()
        if s.settings.api.preload_model:
            s.run.load()
    except Exception:  # noqa: BLE001 - /readyz reports it; /healthz still answers
        logger.warning("model not loaded at init", exc_info=True)


def reset() -> None:
    """Tests only: forget everything so the next call reads the environment again."""
    global _services
    with _lock:
        if _services is not None:
            _services.run.close()
        _services = None
