"""The HTTP API without a web framework: bodies in, (status, JSON) out. The Lambda handler and the
server route requests here, so validation, limits, deadlines and response shapes are written once."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..bootstrap import Runtime
from ..config import ServiceSettings
from ..errors import SimilarityError
from ..fetch import Fetcher
from ..io.streams import split_s3
from ..jobs import JobService, Location
from ..model import ClipModel
from ..types import Record, ScoreResult, ScoreStats
from .errors import BadRequest, NotFound, PayloadTooLarge, Unavailable
from .models import JobRequest, ScoreRequest

#: How one request's rows are scored. By default the service scores them itself
#: (``Runtime.score_pairs``, what the Lambda does); ``similarity serve`` passes its micro-batcher,
#: which embeds them together with other requests' rows.
ScoreRows = Callable[[list[Record], Fetcher], list[ScoreResult]]

#: A readiness check beyond "the model is loaded" (the server's canary inference): ``(ok, detail)``;
#: ``detail`` goes into the ``/readyz`` body as ``canary``, and its ``reason`` when not ok.
Readiness = Callable[[], tuple[bool, dict[str, Any]]]


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: dict[str, Any]

    def json(self) -> str:
        return json.dumps(self.body)


@dataclass(frozen=True)
class Scored:
    response: ApiResponse
    stats: ScoreStats


def parse_json(raw: bytes | str | None, max_bytes: int) -> Any:
    size = len(raw.encode("utf-8")) if isinstance(raw, str) else len(raw or b"")
    if size > max_bytes:
        raise PayloadTooLarge(f"body is {size} bytes; the limit is {max_bytes}")
    if not raw:
        raise BadRequest('request body is empty; send JSON like {"pairs": [{"image": ..., "caption": ...}]}')
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


class ApiService:
    """``jobs`` is a callable so a deployment without a bucket never builds AWS clients.

    A long-running server passes the rest: ``score_rows`` (its micro-batcher), ``readiness`` (its
    canary), and ``model_state``, which says why the model cannot be used yet (loading in the
    background, or the load failed) so requests and ``/readyz`` answer 503 at once instead of
    waiting on the load."""

    def __init__(
        self,
        settings: ServiceSettings,
        runtime: Runtime,
        jobs: Callable[[], JobService] | None = None,
        *,
        score_rows: ScoreRows | None = None,
        readiness: Readiness | None = None,
        model_state: Callable[[], SimilarityError | None] | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self._jobs = jobs
        self._score_rows = score_rows or (lambda records, fetcher: list(runtime.score_pairs(records, fetcher)))
        self._readiness = readiness
        self._model_state = model_state

    def model(self) -> ClipModel:
        problem = self._model_state() if self._model_state is not None else None
        if problem is not None:
            raise Unavailable(f"the model is not available yet; retry later ({problem.code})")
        try:
            return self.runtime.model
        except SimilarityError as exc:
            raise Unavailable(f"the model is not available yet; retry later ({exc.code})") from None

    def jobs(self) -> JobService:
        if self._jobs is None or not self.settings.jobs.bucket:
            raise NotFound("batch jobs are not configured here (no BUCKET)")
        return self._jobs()

    # -- routes
    def score(self, raw: bytes | str | None, time_left: float | None) -> Scored:
        api = self.settings.api
        data = parse_json(raw, api.max_body_bytes)
        if isinstance(data, dict) and isinstance(data.get("pairs"), list) and len(data["pairs"]) > api.max_pairs:
            raise PayloadTooLarge(
                f"{len(data['pairs'])} pairs; at most {api.max_pairs} per request (use POST /jobs for files)"
            )
        req: ScoreRequest = validate(ScoreRequest, data)
        model = self.model()
        # Every image must finish (or become a `timeout` row) inside the caller's deadline.
        remaining = 29.0 if time_left is None else time_left
        deadline = max(1.0, min(api.fetch_deadline, remaining - api.reserve_seconds))
        base = self.runtime.fetcher
        fetcher = base.with_settings(deadline=deadline, read_timeout=min(deadline, base.settings.read_timeout))
        records = [Record(p.image, p.caption) for p in req.pairs]
        results = self._score_rows(records, fetcher)
        body = {
            "results": [r.as_dict() for r in results],
            "model": {"id": model.info.model_id, "revision": model.info.revision},
        }
        return Scored(ApiResponse(200, body), ScoreStats.of(results))

    def start_job(self, raw: bytes | str | None) -> ApiResponse:
        s = self.settings
        req: JobRequest = validate(JobRequest, parse_json(raw, s.api.max_body_bytes))
        jobs = self.jobs()
        bucket, key = split_s3(req.input)
        out_bucket, out_key = split_s3(req.output) if req.output else (bucket, None)
        if bucket != s.jobs.bucket or out_bucket != s.jobs.bucket:
            raise BadRequest(
                f"input and output must be in s3://{s.jobs.bucket}/",
                fields=[{"field": "input", "message": "other bucket"}],
            )
        if out_key is not None and (out_key.startswith(s.jobs.input_prefix) or out_key.startswith(s.jobs.jobs_prefix)):
            raise BadRequest(
                f"output must not be under {s.jobs.input_prefix} or {s.jobs.jobs_prefix}",
                fields=[{"field": "output", "message": "reserved prefix"}],
            )
        from botocore.exceptions import ClientError

        from ..fetch.sources import S3_MISSING

        try:
            m = jobs.start(
                bucket,
                key,
                output=Location(bucket=out_bucket, key=out_key) if out_key else None,
                excel_safe=req.excel_safe,
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] in S3_MISSING:
                raise NotFound(f"{req.input} does not exist") from None
            raise
        return ApiResponse(202, jobs.status(bucket, m.job_id) or {})

    def job_status(self, job_id: str) -> ApiResponse:
        if not job_id.isalnum() or len(job_id) > 64:
            raise BadRequest("malformed job id", fields=[{"field": "id", "message": "letters and digits only"}])
        status = self.jobs().status(self.settings.jobs.bucket, job_id)
        if status is None:
            raise NotFound(f"no job {job_id}")
        return ApiResponse(200, status)

    @staticmethod
    def healthz() -> ApiResponse:
        return ApiResponse(200, {"status": "ok"})

    def readyz(self) -> ApiResponse:
        problem = self._model_state() if self._model_state is not None else None
        if problem is not None:
            return ApiResponse(503, {"status": "unavailable", "reason": str(problem)})
        try:
            info = self.runtime.model.info
        except SimilarityError as exc:
            return ApiResponse(503, {"status": "unavailable", "reason": str(exc)})
        if self._readiness is not None:
            ok, detail = self._readiness()
            if not ok:
                return ApiResponse(503, {"status": "unavailable", "reason": detail.get("reason", ""), "canary": detail})
            return ApiResponse(200, {"status": "ready", "model": info.as_dict(), "canary": detail})
        return ApiResponse(200, {"status": "ready", "model": info.as_dict()})
