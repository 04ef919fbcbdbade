"""HTTPS API (API Gateway HTTP API, payload 2.0): the event becomes one call of
``similarity.api.ApiService.handle``, which routes, validates, scores and maps every error.

Nothing about a request is kept on module-level objects (powertools' resolver keeps the current
event on itself, so threads calling one resolver could read each other's requests): the event,
the context and the answer stay in this call's locals, and metrics are written under a lock.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit

from similarity.api import INTERNAL_ERROR, ApiResponse, Handled

from . import runtime
from .observability import logger, metrics_for, tracer

metrics = metrics_for("api")
_metrics_lock = threading.Lock()
_cold_start = True


def _request(event: dict[str, Any]) -> tuple[str, str, Any, bool]:
    http = (event.get("requestContext") or {}).get("http") or {}
    method = str(http.get("method") or event.get("httpMethod") or "GET")
    path = str(event.get("rawPath") or http.get("path") or event.get("path") or "/")
    return method, path, event.get("body"), bool(event.get("isBase64Encoded"))


def _time_left(context: Any) -> float | None:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    return remaining() / 1000 if callable(remaining) else None


def _lambda_response(r: ApiResponse) -> dict[str, Any]:
    return {
        "statusCode": r.status,
        "headers": {"Content-Type": "application/json", **r.headers},
        "body": json.dumps(r.body),
        "isBase64Encoded": False,
    }


def _publish(handled: Handled, context: Any) -> None:
    """This invocation's metrics, flushed as one EMF record (one invocation at a time may touch
    the shared ``Metrics``)."""
    global _cold_start
    with _metrics_lock:
        if _cold_start:
            _cold_start = False
            metrics.provider.add_cold_start_metric(context)
        stats = handled.stats
        added = False
        if stats is not None:
            metrics.add_metric(name="PairsScored", unit=MetricUnit.Count, value=stats.scored)
            for code, n in stats.errors.items():
                metrics.add_metric(name=f"RowError_{code}", unit=MetricUnit.Count, value=n)
            added = True
        s = runtime.services()
        for name, n in s.run.cache_metrics().items():  # CacheImageHits, ..., CacheStoreErrors
            metrics.add_metric(name=name, unit=MetricUnit.Count, value=n)
            added = True
        if not s.load_time_reported and s.run.loaded:  # once per environment, whether loaded at init or later
            metrics.add_metric(
                name="ModelLoadTime", unit=MetricUnit.Milliseconds, value=s.run.model.info.load_seconds * 1000
            )
            s.load_time_reported = True
            added = True
        if added:
            metrics.flush_metrics()


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler(capture_response=False)
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    try:
        method, path, body, encoded = _request(event if isinstance(event, dict) else {})
        handled = runtime.services().api.handle(
            method, path, body, base64_encoded=encoded, time_left=_time_left(context)
        )
        _publish(handled, context)
    except Exception:  # noqa: BLE001 - settings that do not load, a metrics failure: still the envelope
        logger.exception("unhandled error")
        handled = Handled(INTERNAL_ERROR)
    return _lambda_response(handled.response)


if runtime.in_lambda():
    runtime.preload()
