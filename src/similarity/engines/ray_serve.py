"""``similarity serve``'s app as a Ray Serve deployment (``pip install 'text-image-similarity[ray-serve]'``).

    serve run examples/ray_serve.yaml                        # or serve deploy it to a running cluster
    serve.run(build({"model": "s3://bucket/models/clip/"}))  # from Python

Each replica builds its own ``ServerServices`` (one model, its micro-batcher, canary and metrics)
and serves ``create_app``'s FastAPI app over it: the Lambda API's routes and bodies (``/score``,
``/jobs``, ``/healthz``, ``/readyz``), the Open Inference Protocol under ``/v2``, and ``/metrics``
(the replica's own). Serve spreads requests over the replicas and scales them: ``num_replicas``, or
``autoscaling_config`` (``min_replicas``, ``max_replicas``, ``target_ongoing_requests``), in the
deployment's options or the config file. Settings are the server's variables, read in each replica
(the config's ``runtime_env.env_vars``); ``model`` may be a directory on every node or an
``s3://`` prefix, copied once per node as for the other engine adapters.

Why not ``@serve.batch``: it batches calls of one method, each call a whole request. The server's
micro-batcher batches below that: images fetched concurrently across requests, then images and
captions embedded in separate model calls, each request answered when its own rows are done and
its slow images cut at its own deadline. ``@serve.batch`` would wait for a whole group of requests
and give up the per-request deadline, so each replica keeps the micro-batcher.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from ..config import EngineSettings, ServeSettings, load, validated
from ..errors import ConfigError, SimilarityError
from .core import record_load
from .models import default_cache_root, resolve_model

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

    from ..server.services import ServerServices


class ReplicaNotReady(SimilarityError):
    """The replica's readiness (``/readyz``) failed: Serve restarts it."""

    code = "replica_not_ready"


class AppArgs(BaseModel):
    """The application builder's ``args`` (in a Serve config file)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(default=None, description="model directory or s3:// prefix (default: CLIP_MODEL_DIR)")


def assigned_cpus() -> float | None:
    """The CPUs Ray gave this replica (its ``ray_actor_options.num_cpus``)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return float(cpus) if cpus else None


def replica_settings(model: str | None) -> ServeSettings:
    """The server's settings from this replica's environment, the model made a local directory,
    and unless ``SIMILARITY_THREADS`` says otherwise one inference thread per CPU it was given."""
    settings = load(ServeSettings)
    source = model or settings.model.dir
    engine = validated(EngineSettings)
    local = resolve_model(source, Path(engine.model_cache_dir) if engine.model_cache_dir else default_cache_root())
    given: dict[str, Any] = {"dir": str(local.path)}
    cpus = assigned_cpus()
    if settings.model.threads is None and cpus:
        given["threads"] = max(1, int(cpus))
    return cast(ServeSettings, settings.with_overrides("model", given, {"dir": "model"}))


def start_services(model: str | None) -> ServerServices:
    """One replica's services with the model loaded and its canary recorded (blocking)."""
    from ..server.services import ServerServices

    start = time.perf_counter()
    services = ServerServices(replica_settings(model))
    services.load()
    info = services.runtime.model.info
    record_load(
        {
            "pid": os.getpid(),
            "model": model or services.settings.model.dir,
            "local_dir": services.settings.model.dir,
            "backend": info.backend,
            "device": info.device,
            "dtype": info.dtype,
            "seconds": round(time.perf_counter() - start, 3),
        }
    )
    return services


def check_ready(services: ServerServices) -> None:
    ready = services.api.readyz()
    if ready.status != 200:
        raise ReplicaNotReady(str(ready.body.get("reason") or "not ready"))


@serve.deployment(
    name="similarity",
    # Concurrent requests are what the micro-batcher batches: Serve's default (5) would starve it.
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class SimilarityDeployment:
    """One replica: one model, and the server's app over it."""

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.services: ServerServices | None = None

    async def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this once, after the constructor and before the replica takes traffic: the
        model loads here (in a thread, the replica's event loop stays free)."""
        from ..server.app import create_app

        self.services = await asyncio.to_thread(start_services, self.model)
        return create_app(self.services, manage=False)  # this class starts and closes the services

    async def check_health(self) -> None:
        """Serve's periodic health check: ``/readyz``'s (the canary scores as at load, the
        inference thread answers); a failure makes Serve replace the replica."""
        if self.services is not None:
            await asyncio.to_thread(check_ready, self.services)

    def __del__(self) -> None:
        """At shutdown, after Serve has let the ongoing requests finish: the batcher drains."""
        services, self.services = self.services, None
        if services is not None:
            services.close(services.settings.server.graceful_timeout)


def build(args: dict[str, Any]) -> Application:
    """Serve's application builder: ``import_path: similarity.engines.ray_serve:build`` with
    ``args: {model: ...}`` in a Serve config file (``examples/ray_serve.yaml``)."""
    try:
        parsed = AppArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"ray_serve.build args: {problems}") from None
    return cast("Application", SimilarityDeployment.bind(parsed.model))  # type: ignore[attr-defined]
