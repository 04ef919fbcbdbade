"""The HTTP API without a web framework: bodies in, (status, JSON) out. The Lambda handler and the
server route requests here, so validation, limits, deadlines and response shapes are written once.

Everything a request needs travels in its arguments and return value, never on shared objects, so
one ``ApiService`` serves any number of requests at once (a server's threads) and each gets its
own results.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..bootstrap import Runtime
from ..config import ServiceSettings
from ..errors import InputNotFound, SimilarityError
from ..fetch import Fetcher
from ..io.streams import split_s3
from ..jobs import JobService, Location, SplitNotStarted
from ..model import ClipModel
from ..types import Record, ScoreResult, ScoreStats
from .body import Body, decode_body, parse_json, validate
from .errors import BadRequest, HttpError, MethodNotAllowed, NotFound, PayloadTooLarge, Unavailable, error_body
from .models import JobRequest, ScoreRequest
from .routes import match

__all__ = ["ApiResponse", "ApiService", "Handled", "Scored", "parse_json", "validate"]

log = logging.getLogger(__name__)

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
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> str:
        return json.dumps(self.body)  # ASCII: client text with lone surrogates comes out escaped


@dataclass(frozen=True)
class Scored:
    response: ApiResponse
    stats: ScoreStats


@dataclass(frozen=True)
class Handled:
    """One request's answer, and its scoring figures when it scored pairs (for metrics)."""

    response: ApiResponse
    stats: ScoreStats | None = None


def error_response(exc: HttpError) -> ApiResponse:
    headers = {"Allow": ", ".join(exc.allowed)} if isinstance(exc, MethodNotAllowed) else {}
    return ApiResponse(exc.status, error_body(exc.code, exc.message, exc.fields), headers)


class SplitterUnavailable(HttpError):
    """``POST /jobs`` could not hand the job to the splitter function; the same request again may."""

    status = 503
    code = "splitter_unavailable"


INTERNAL_ERROR = ApiResponse(500, error_body("internal_error", "internal error"))  # no detail leaves


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

    # -- one request, whole
    def handle(
        self,
        method: str,
        path: str,
        body: Body = None,
        *,
        base64_encoded: bool = False,
        time_left: float | None = None,
    ) -> Handled:
        """Route and answer one request; never raises. Client errors are 4xx with the error
        envelope, anything unexpected a bare 500 (logged here)."""
        try:
            route, params = match(method, path)
            if route.name == "score":
                raw = decode_body(body, base64_encoded, self.settings.api.max_body_bytes)
                scored = self.score(raw, time_left)
                return Handled(scored.response, scored.stats)
            if route.name == "start_job":
                return Handled(self.start_job(decode_body(body, base64_encoded, self.settings.api.max_body_bytes)))
            if route.name == "job_status":
                return Handled(self.job_status(params["id"]))
            if route.name == "healthz":
                return Handled(self.healthz())
            return Handled(self.readyz())
        except HttpError as exc:
            if exc.status >= 500:
                log.error("request failed: %s: %s", exc.code, exc.message)
            return Handled(error_response(exc))
        except Exception:
            log.exception("unhandled error in %s %s", method[:20], path[:100])
            return Handled(INTERNAL_ERROR)

    # -- routes
    def score(self, raw: Body, time_left: float | None) -> Scored:
        return self.score_data(parse_json(raw, self.settings.api.max_body_bytes), time_left)

    def score_data(self, data: Any, time_left: float | None) -> Scored:
        """``POST /score`` on a parsed body: the pair limit, validation, the deadline and the
        scoring. Other protocols (``similarity.api.oip``) translate their requests into this body,
        so limits and checks are written once."""
        api = self.settings.api
        if isinstance(data, dict) and isinstance(data.get("pairs"), list) and len(data["pairs"]) > api.max_pairs:
            raise PayloadTooLarge(
                f"{len(data['pairs'])} pairs; at most {api.max_pairs} per request (use POST /jobs for files)"
            )
        req: ScoreRequest = validate(ScoreRequest, data)
        model = self.model()
        # Every image must finish (or become a `timeout` row) inside the caller's deadline, less the
        # reserve for inference and the answer. Each fetch's own deadline starts only when a pool
        # thread takes it up, so the request's end bounds them all: images still waiting for a
        # thread when it passes become `timeout` rows at once.
        remaining = 29.0 if time_left is None else time_left
        budget = remaining - api.reserve_seconds
        end = time.monotonic() + max(budget, 0.0)
        deadline = max(1.0, min(api.fetch_deadline, budget))
        base = self.runtime.fetcher
        fetcher = base.with_settings(deadline=deadline, read_timeout=min(deadline, base.settings.read_timeout))
        fetcher = fetcher.until(end)
        records = [Record(p.image, p.caption) for p in req.pairs]
        results = self._score_rows(records, fetcher)
        body = {
            "results": [r.as_dict() for r in results],
            "model": {"id": model.info.model_id, "revision": model.info.revision},
        }
        return Scored(ApiResponse(200, body), ScoreStats.of(results))

    def start_job(self, raw: Body) -> ApiResponse:
        s = self.settings
        req: JobRequest = validate(JobRequest, parse_json(raw, s.api.max_body_bytes))
        jobs = self.jobs()
        try:
            bucket, key = split_s3(req.input)
            out_bucket, out_key = split_s3(req.output) if req.output else (bucket, None)
        except InputNotFound as exc:  # e.g. s3://bucket// : the pattern passes, no key is left
            raise BadRequest(str(exc), fields=[{"field": "input/output", "message": "not s3://bucket/key"}]) from None
        if bucket != s.jobs.bucket or out_bucket != s.jobs.bucket:
            raise BadRequest(
                f"input and output must be in s3://{s.jobs.bucket}/",
                fields=[{"field": "input", "message": "other bucket"}],
            )
        if not key.lower().endswith(".csv"):
            # The jobs read CSV (as the S3 drop, which only .csv keys trigger); any other file failed
            # later with a misleading reason (an encoding, a URL column).
            raise BadRequest(
                f"input must be a .csv file, not {key.rsplit('/', 1)[-1][:100]!r}: score JSONL, Parquet or "
                "compressed files with the CLI or an engine adapter",
                fields=[{"field": "input", "message": "not .csv"}],
            )
        if out_key is not None and out_key.lstrip("/") == key.lstrip("/"):
            raise BadRequest(
                "output must not be the input: the scored file would replace it",
                fields=[{"field": "output", "message": "same as input"}],
            )
        if out_key is not None and (out_key.startswith(s.jobs.input_prefix) or out_key.startswith(s.jobs.jobs_prefix)):
            raise BadRequest(
                f"output must not be under {s.jobs.input_prefix} or {s.jobs.jobs_prefix}",
                fields=[{"field": "output", "message": "reserved prefix"}],
            )
        try:
            # With a splitter function this answers at once (`splitting`); the split runs there.
            m = jobs.submit(
                bucket,
                key,
                output=Location(bucket=out_bucket, key=out_key) if out_key else None,
                excel_safe=s.score.excel_safe if req.excel_safe is None else req.excel_safe,
            )
        except InputNotFound:
            raise NotFound(f"{req.input} does not exist") from None
        except SplitNotStarted:
            raise SplitterUnavailable("the job could not be handed to the splitter; retry later") from None
        return ApiResponse(202, jobs.status(bucket, m.job_id) or {})

    def job_status(self, job_id: str) -> ApiResponse:
        if not (job_id.isascii() and job_id.isalnum()) or len(job_id) > 64:
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
