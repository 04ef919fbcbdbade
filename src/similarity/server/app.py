"""The FastAPI app of ``similarity serve``: the Lambda API's routes and bodies, served by the same
``ApiService`` (validation, limits, deadlines, response shapes, error envelope), plus what a
long-running server adds: bearer auth, body limits while reading, request ids and JSON logs,
``/metrics``, and a canary behind ``/readyz``.

Bodies are read raw and handed to ``ApiService`` as the Lambda hands them, never parsed by
FastAPI, so both answer the same bytes with the same status and body. The request bodies'
schemas go into the OpenAPI document from ``similarity.api.models``.

``create_app(services)`` is reusable by other fronts (Ray Serve, KServe): build a
``ServerServices`` and mount or wrap the app.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._version import __version__
from ..api import ApiResponse, HttpError, PayloadTooLarge, RequestTimeout, Unauthorized, error_body
from ..api import models as m
from .logs import REQUEST_ID, request_id
from .services import ServerServices

log = logging.getLogger("similarity.server")
access = logging.getLogger("similarity.server.access")

JSON = "application/json"
Handler = Callable[[], Awaitable[ApiResponse]]
T = TypeVar("T")


def _json(status: int, body: str, headers: dict[str, str] | None = None) -> Response:
    return Response(content=body, status_code=status, media_type=JSON, headers=headers)


def _error(exc: HttpError) -> Response:
    headers = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.status == 503:
        headers["Retry-After"] = "1"
    r = ApiResponse(exc.status, error_body(exc.code, exc.message, exc.fields))
    return _json(r.status, r.json(), headers)


class RequestContext:
    """Pure ASGI middleware: request id (``X-Request-Id`` in and out), the access log line, and the
    request metrics by route template (never the raw path: ids would explode the series)."""

    def __init__(self, app: ASGIApp, services: ServerServices) -> None:
        self.app = app
        self.metrics = services.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers.get(b"x-request-id", b"").decode("latin-1") or None)
        token = REQUEST_ID.set(rid)
        scope.setdefault("state", {})["started"] = time.monotonic()
        start = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        self.metrics.in_flight_requests.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - start
            self.metrics.in_flight_requests.dec()
            route = _route(scope)
            self.metrics.request(route, scope["method"], status, seconds)
            access.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"][:200],
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                },
            )
            REQUEST_ID.reset(token)


def _route(scope: Scope) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    if scope.get("endpoint") is not None:  # a fixed route without a template (/openapi.json)
        return str(scope["path"])
    return "unmatched"


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` (declared or counted
    while reading, so a huge body is never held), and 408 when the client is too slow to send it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body is {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(max(0.001, timeout)):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is more than {limit} bytes; the limit is {limit}")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive within the request's deadline") from None
    return b"".join(chunks)


def create_app(services: ServerServices, *, manage: bool = True) -> FastAPI:
    """The app over ``services``. ``manage``: the app's lifespan starts the background model load
    and closes everything at shutdown (after uvicorn has let in-flight requests finish)."""
    s = services.settings
    api = services.api
    limiter = anyio.CapacityLimiter(s.server.max_concurrency)
    probes = anyio.CapacityLimiter(4)  # /readyz never waits behind client load for a thread

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage:
            services.start()
        yield
        if manage:
            await anyio.to_thread.run_sync(services.close, s.server.graceful_timeout)

    app = FastAPI(
        title="text-image-similarity",
        version=__version__,
        summary="Scores how well a caption describes an image with CLIP.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.add_middleware(RequestContext, services=services)

    def authorize(request: Request) -> None:
        if services.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), services.token.encode()):
            raise Unauthorized("a valid bearer token is required (Authorization: Bearer <token>)")

    def time_left(request: Request) -> float:
        return s.server.request_timeout - (time.monotonic() - float(request.state.started))

    async def answer(call: Handler) -> Response:
        try:
            r = await call()
        except HttpError as exc:
            if exc.status >= 500:
                log.warning("request refused", extra={"code": exc.code, "reason": exc.message})
            return _error(exc)
        except Exception:
            log.exception("unhandled error")
            return _json(500, ApiResponse(500, error_body("internal_error", "internal error")).json())
        return _json(r.status, r.json())

    async def run(fn: Callable[..., T], *args: Any, pool: anyio.CapacityLimiter = limiter) -> T:
        return await anyio.to_thread.run_sync(fn, *args, limiter=pool)

    errors = {
        400: {
            "model": m.ErrorResponse,
            "description": "malformed JSON, a field that failed validation, or a malformed job id",
        },
        401: {"model": m.ErrorResponse, "description": "bearer token missing or wrong (when the server requires one)"},
        404: {"model": m.ErrorResponse, "description": "not found, or batch jobs are not configured here"},
        408: {"model": m.ErrorResponse, "description": "the body did not arrive within the request's deadline"},
        413: {"model": m.ErrorResponse, "description": "body over MAX_BODY_BYTES, or more than MAX_PAIRS pairs"},
        503: {"model": m.ErrorResponse, "description": "model not loaded yet, server at capacity, or shutting down"},
    }

    def pick(*codes: int) -> dict[int | str, dict[str, Any]]:
        return {c: errors[c] for c in codes}

    @app.post(
        "/score",
        operation_id="score",
        summary="Score (image, caption) pairs",
        response_model=m.ScoreResponse,
        responses=pick(400, 401, 408, 413, 503),
        openapi_extra={"requestBody": _body("ScoreRequest")},
    )
    async def score(request: Request) -> Response:
        async def call() -> ApiResponse:
            authorize(request)
            raw = await read_body(request, s.api.max_body_bytes, time_left(request))
            scored = await run(api.score, raw, time_left(request))
            services.metrics.scored(scored.stats)
            return scored.response

        return await answer(call)

    @app.post(
        "/jobs",
        operation_id="startJob",
        summary="Start a batch job on a CSV in the bucket",
        status_code=202,
        response_model=m.JobStatus,
        responses=pick(400, 401, 404, 408, 413),
        openapi_extra={"requestBody": _body("JobRequest")},
    )
    async def start_job(request: Request) -> Response:
        async def call() -> ApiResponse:
            authorize(request)
            raw = await read_body(request, s.api.max_body_bytes, time_left(request))
            return await run(api.start_job, raw)

        return await answer(call)

    @app.get(
        "/jobs/{job_id}",
        operation_id="jobStatus",
        summary="A batch job's status",
        response_model=m.JobStatus,
        responses=pick(400, 401, 404),
    )
    async def job_status(request: Request, job_id: str) -> Response:
        async def call() -> ApiResponse:
            authorize(request)
            return await run(api.job_status, job_id)

        return await answer(call)

    @app.get("/healthz", operation_id="healthz", summary="Liveness (no model needed)", response_model=m.Health)
    async def healthz() -> Response:
        async def call() -> ApiResponse:
            return api.healthz()

        return await answer(call)

    @app.get(
        "/readyz",
        operation_id="readyz",
        summary="Readiness: the model is loaded and its canary scores what it scored at load",
        response_model=m.Ready,
        responses={503: {"model": m.NotReady, "description": "model not loaded, or the canary failed or drifted"}},
    )
    async def readyz() -> Response:
        async def call() -> ApiResponse:
            return await run(api.readyz, pool=probes)

        return await answer(call)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, ctype = services.metrics.render()
        return Response(content=body, media_type=ctype)

    # -- the error envelope for what the router itself answers
    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            body = error_body("not_found", f"no route {request.method} {request.url.path[:200]}")
        elif exc.status_code == 405:
            body = error_body("method_not_allowed", f"{request.method} is not allowed on {request.url.path[:200]}")
        else:
            body = error_body("http_error", str(exc.detail))
        return _json(exc.status_code, ApiResponse(exc.status_code, body).json(), dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:  # path parameters only
        return _json(400, ApiResponse(400, error_body("bad_request", "request failed validation")).json())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return _json(500, ApiResponse(500, error_body("internal_error", "internal error")).json())

    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]
    return app


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies (read raw, so FastAPI does not see their models)
    and the optional bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (m.ScoreRequest, m.JobRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Pair"]["examples"] = [{"image": "https://example.com/cat.jpg", "caption": "a photo of a cat"}]
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "when SERVER_AUTH_TOKEN(_FILE) is set"}
    }
    for path in ("/score", "/jobs", "/jobs/{job_id}"):
        for op in doc["paths"][path].values():
            op["security"] = [{"bearer": []}, {}]  # {}: the server may run without a token
    # Path parameters are plain strings: FastAPI's 422 cannot happen (and would answer 400 here).
    for ops in doc["paths"].values():
        for op in ops.values():
            op["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    app.openapi_schema = doc
    return doc


def app_from_env() -> FastAPI:
    """For uvicorn's ``--factory`` (each worker process builds its own from the environment)."""
    return create_app(ServerServices())
