"""HTTPS API (API Gateway HTTP API, payload 2.0): routes requests to ``similarity.api.ApiService``,
which validates, scores and shapes them, and maps errors to responses in one place."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit

from similarity.api import ApiResponse, HttpError, error_body

from . import runtime
from .observability import logger, metrics_for, tracer

metrics = metrics_for("api")
app = APIGatewayHttpResolver()


def _respond(r: ApiResponse) -> Response[str]:
    return Response(r.status, content_types.APPLICATION_JSON, r.json())


def _error(status: int, code: str, message: str, fields: list[dict[str, Any]] | None = None) -> Response[str]:
    return Response(status, content_types.APPLICATION_JSON, json.dumps(error_body(code, message, fields)))


def _time_left() -> float | None:
    return app.lambda_context.get_remaining_time_in_millis() / 1000 if app.lambda_context else None


@app.post("/score")
@tracer.capture_method(capture_response=False)
def score() -> Response[str]:
    event = app.current_event
    raw = event.decoded_body if event.body is not None else ""
    scored = runtime.services().api.score(raw, _time_left())
    metrics.add_metric(name="PairsScored", unit=MetricUnit.Count, value=scored.stats.scored)
    for code, n in scored.stats.errors.items():
        metrics.add_metric(name=f"RowError_{code}", unit=MetricUnit.Count, value=n)
    for name, n in runtime.services().run.cache_metrics().items():  # CacheImageHits, ..., CacheStoreErrors
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=n)
    return _respond(scored.response)


@app.post("/jobs")
@tracer.capture_method(capture_response=False)
def start_job() -> Response[str]:
    event = app.current_event
    return _respond(runtime.services().api.start_job(event.decoded_body if event.body is not None else ""))


@app.get("/jobs/<job_id>")
def job_status(job_id: str) -> Response[str]:
    return _respond(runtime.services().api.job_status(job_id))


@app.get("/healthz")
def healthz() -> Response[str]:
    return _respond(runtime.services().api.healthz())


@app.get("/readyz")
def readyz() -> Response[str]:
    return _respond(runtime.services().api.readyz())


# ----------------------------------------------------------------------------- error mapping
@app.exception_handler(HttpError)
def _http_error(exc: HttpError) -> Response[str]:
    if exc.status >= 500:
        logger.error("request failed", extra={"code": exc.code, "reason": exc.message})
    return _error(exc.status, exc.code, exc.message, exc.fields)


@app.not_found
def _not_found(exc: Exception) -> Response[str]:
    return _error(404, "not_found", f"no route {app.current_event.http_method} {app.current_event.path}")


@app.exception_handler(ServiceError)
def _service_error(exc: ServiceError) -> Response[str]:
    return _error(exc.status_code, "http_error", str(exc.msg))


@app.exception_handler(Exception)
def _unexpected(exc: Exception) -> Response[str]:
    logger.exception("unhandled error")
    return _error(500, "internal_error", "internal error")  # no internal detail in the body


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    response: dict[str, Any] = app.resolve(event, context)
    s = runtime.services()
    if not s.load_time_reported and s.run.loaded:  # once per environment, whether loaded at init or later
        metrics.add_metric(
            name="ModelLoadTime", unit=MetricUnit.Milliseconds, value=s.run.model.info.load_seconds * 1000
        )
        s.load_time_reported = True
    return response


if runtime.in_lambda():
    runtime.preload()
