"""HTTPS API (API Gateway HTTP API, payload 2.0): POST /score, GET /healthz, GET /readyz,
POST /jobs, GET /jobs/{id}. Thin: parse and validate, call ``similarity``, shape the response."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import ServiceError
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from similarity.csvio import split_s3
from similarity.records import Record
from similarity.scoring import ScoreStats, score_pairs

from . import runtime
from .errors import BadRequest, HttpError, NotFound, PayloadTooLarge, error_response

logger = Logger(service="text-image-similarity")
metrics = Metrics(namespace="TextImageSimilarity", service="api")
tracer = Tracer(service="text-image-similarity")
app = APIGatewayHttpResolver()


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="http(s) URL, s3:// URI or data: URI")
    caption: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Pair] = Field(min_length=1)


def _json_body(max_bytes: int) -> Any:
    event = app.current_event
    raw = event.decoded_body if event.body is not None else ""
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw)
    if size > max_bytes:
        raise PayloadTooLarge(f"body is {size} bytes; the limit is {max_bytes}")
    if not raw:
        raise BadRequest("request body is empty; send JSON like {\"pairs\": [{\"image\": ..., \"caption\": ...}]}")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None


def validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in exc.errors()]
        raise BadRequest("request failed validation", fields=fields) from None


def _record_metrics(results: list) -> None:
    stats = ScoreStats()
    for r in results:
        stats.add(r)
    metrics.add_metric(name="PairsScored", unit=MetricUnit.Count, value=stats.scored)
    for code, n in stats.errors.items():
        metrics.add_metric(name=f"RowError_{code}", unit=MetricUnit.Count, value=n)


@app.post("/score")
@tracer.capture_method(capture_response=False)
def score() -> dict[str, Any]:
    s = runtime.settings()
    data = _json_body(s.max_body_bytes)
    if isinstance(data, dict) and isinstance(data.get("pairs"), list) and len(data["pairs"]) > s.max_pairs:
        raise PayloadTooLarge(f"{len(data['pairs'])} pairs; at most {s.max_pairs} per request (use POST /jobs for files)")
    req = validate(ScoreRequest, data)
    model = runtime.model()
    # Every image must finish (or become a `timeout` row) inside API Gateway's 30 s limit.
    remaining = app.lambda_context.get_remaining_time_in_millis() / 1000 if app.lambda_context else 29.0
    deadline = max(1.0, min(s.api_fetch_deadline, remaining - s.api_reserve_seconds))
    fetcher = runtime.fetcher().with_settings(deadline=deadline, read_timeout=min(deadline, s.core.fetch.read_timeout))
    records = [Record(p.image, p.caption) for p in req.pairs]
    results = list(score_pairs(records, model, fetcher, batch_size=s.core.batch_size, workers=s.core.workers))
    _record_metrics(results)
    return {
        "results": [
            {"similarity": r.similarity, "cosine": r.cosine_rounded, "error": r.error_text or None,
             "error_code": r.error_code, "truncated": r.truncated}
            for r in results
        ],
        "model": {"id": model.info.model_id, "revision": model.info.revision},
    }


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(pattern=r"^s3://[^/]+/.+", description="s3://bucket/key of a CSV")
    output: str | None = Field(default=None, pattern=r"^s3://[^/]+/.+")


@app.post("/jobs")
@tracer.capture_method(capture_response=False)
def start_job() -> Response:
    s = runtime.settings()
    req = validate(JobRequest, _json_body(s.max_body_bytes))
    bucket, key = split_s3(req.input)
    out_bucket, out_key = split_s3(req.output) if req.output else (bucket, None)
    if s.bucket and (bucket != s.bucket or out_bucket != s.bucket):
        raise BadRequest(f"input and output must be in s3://{s.bucket}/", fields=[{"field": "input", "message": "other bucket"}])
    if out_key is not None and (out_key.startswith(s.input_prefix) or out_key.startswith(s.jobs_prefix)):
        raise BadRequest(f"output must not be under {s.input_prefix} or {s.jobs_prefix}",
                         fields=[{"field": "output", "message": "reserved prefix"}])
    from botocore.exceptions import ClientError

    from .jobs import Location

    jobs = runtime.jobs()
    try:
        m = jobs.start(bucket, key, output=Location(bucket=out_bucket, key=out_key) if out_key else None)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
            raise NotFound(f"{req.input} does not exist") from None
        raise
    return Response(202, content_types.APPLICATION_JSON, json.dumps(jobs.status(bucket, m.job_id)))


@app.get("/jobs/<job_id>")
def job_status(job_id: str) -> dict[str, Any]:
    s = runtime.settings()
    if not job_id.isalnum() or len(job_id) > 64:
        raise BadRequest("malformed job id", fields=[{"field": "id", "message": "letters and digits only"}])
    status = runtime.jobs().status(s.bucket, job_id)
    if status is None:
        raise NotFound(f"no job {job_id}")
    return status


@app.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@app.get("/readyz")
def readyz() -> Response:
    try:
        model = runtime.model()
    except runtime.ModelUnavailable as exc:
        return Response(503, content_types.APPLICATION_JSON, json.dumps({"status": "unavailable", "reason": str(exc)}))
    body = {"status": "ready", "model": model.info.as_dict()}
    return Response(200, content_types.APPLICATION_JSON, json.dumps(body))


# ----------------------------------------------------------------------------- error mapping
@app.exception_handler(HttpError)
def _http_error(exc: HttpError) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.fields)


@app.exception_handler(runtime.ModelUnavailable)
def _model_unavailable(exc: runtime.ModelUnavailable) -> Response:
    logger.error("model unavailable", extra={"reason": str(exc)})
    return error_response(503, "model_unavailable", "the model is not available yet; retry later")


@app.not_found
def _not_found(exc: Exception) -> Response:
    return error_response(404, "not_found", f"no route {app.current_event.http_method} {app.current_event.path}")


@app.exception_handler(ServiceError)
def _service_error(exc: ServiceError) -> Response:
    return error_response(exc.status_code, "http_error", exc.msg)


@app.exception_handler(Exception)
def _unexpected(exc: Exception) -> Response:
    logger.exception("unhandled error")
    return error_response(500, "internal_error", "internal error")  # no internal detail in the body


if runtime.settings().preload_model:
    try:  # load during init (cold start) so the first request does not pay for it
        runtime.model()
    except Exception:  # noqa: BLE001 - /readyz reports it; /healthz still answers
        logger.warning("model not loaded at init")


_load_time_reported = False


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict, context: Any) -> dict:
    global _load_time_reported
    response = app.resolve(event, context)
    seconds = runtime.model_load_seconds()
    if not _load_time_reported and seconds is not None:  # once per environment, whether loaded at init or later
        metrics.add_metric(name="ModelLoadTime", unit=MetricUnit.Milliseconds, value=seconds * 1000)
        _load_time_reported = True
    return response
