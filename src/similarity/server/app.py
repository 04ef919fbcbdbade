"""The FastAPI app of ``similarity serve``: the Lambda API's routes and bodies, served by the same
``ApiService`` (validation, limits, deadlines, response shapes, error envelope), plus what a
long-running server adds: bearer auth, body limits while reading, request ids and JSON logs,
``/metrics``, and a canary behind ``/readyz``. The Open Inference Protocol's ``/v2`` routes
(KServe, Triton clients) are answered by ``similarity.api.oip`` over the same ``ApiService``.

Bodies are read raw and handed to ``ApiService`` as the Lambda hands them, never parsed by
FastAPI, so both answer the same bytes with the same status and body. The request bodies'
schemas go into the OpenAPI document from ``similarity.api.models``.

``create_app(services)`` is reusable by other fronts (Ray Serve, KServe): build a
``ServerServices`` and mount or wrap the app.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._version import __version__
from ..api import (
    INTERNAL_ERROR,
    ROUTES,
    ApiResponse,
    HttpError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Route,
    Unauthorized,
    error_body,
    error_response,
    match,
    oip,
)
from ..api import models as m
from ..api.routes import RouteName, find
from .batcher import Abandon
from .logs import REQUEST_ID, request_id
from .services import ABANDON, ServerServices

log = logging.getLogger("similarity.server")
access = logging.getLogger("similarity.server.access")

JSON = "application/json"
#: The status counted (metrics, access log) when the client closed its connection before the
#: answer: nginx's 499. Nothing is sent; it is not a server error.
CLIENT_CLOSED = 499
#: Threads of their own for /readyz (and /v2's readiness), so probes never wait behind clients.
PROBE_SLOTS = 4
#: The shortest fetch deadline ``ApiService.score_data`` gives a request. A request waits for a
#: client slot only while API_RESERVE_SECONDS plus this is left of its SERVER_REQUEST_TIMEOUT, so
#: one that gets a slot still answers in time; past that it is answered 503 overloaded.
MIN_FETCH_SECONDS = 1.0

T = TypeVar("T")


def _respond(r: ApiResponse) -> Response:
    return _response(r.status, r.json().encode(), JSON, r.headers)


def _respond_oip(r: oip.OipResponse) -> Response:
    return _response(r.status, r.body, r.content_type, r.headers)


def _response(status: int, body: bytes, media_type: str, given: dict[str, str]) -> Response:
    headers = dict(given)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "1"
    return Response(content=body, status_code=status, media_type=media_type, headers=headers)


def route_path(scope: Scope) -> str:
    """The path the routes see: without the ASGI ``root_path`` a mount or a proxy put in front
    (Ray Serve's ``route_prefix``; ASGI servers keep it in ``path`` too)."""
    path, root = str(scope["path"]), str(scope.get("root_path") or "")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


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


def _client_closed() -> Response:
    return Response(status_code=CLIENT_CLOSED)


async def _until_disconnect(receive: Receive, gone: Abandon) -> None:
    """Set ``gone`` when the client disconnects (the body is read by then: nothing else arrives)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a front whose receive fails cannot say: the request runs on
        return
    gone.set()


def _route(scope: Scope) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    if scope.get("endpoint") is not None:  # a fixed route without a template (/openapi.json)
        return str(scope["path"])
    return "unmatched"


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` (declared or counted
    while reading, so a huge body is never held), and 408 when the client is too slow to send it.
    A client that disconnects while sending it raises starlette's ``ClientDisconnect``."""
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
    slots = anyio.CapacityLimiter(s.server.max_concurrency)  # client requests handled at once
    # The threads of requests holding a slot (run_sync needs a limiter; anyio's default one, 40
    # threads, would cap SERVER_MAX_CONCURRENCY).
    threads = anyio.CapacityLimiter(s.server.max_concurrency)
    probes = anyio.CapacityLimiter(PROBE_SLOTS)
    slot_floor = s.api.reserve_seconds + MIN_FETCH_SECONDS

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
    app.router.redirect_slashes = False  # /score/ is no route, as in the Lambda (not a redirect)
    app.add_middleware(RequestContext, services=services)

    def authorize(request: Request) -> None:
        if services.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), services.token.encode()):
            raise Unauthorized("a valid bearer token is required (Authorization: Bearer <token>)")

    def time_left(request: Request) -> float:
        return s.server.request_timeout - (time.monotonic() - float(request.state.started))

    async def take_slot(request: Request) -> bool:
        """A client slot, waited for while the request would still have time to be scored after
        it (the wait counts against its deadline); False when it would not."""
        try:
            slots.acquire_nowait()
            return True
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(time_left(request) - slot_floor):
            await slots.acquire()
            return True
        return False

    def overloaded() -> Overloaded:
        return Overloaded(f"all {s.server.max_concurrency} request slots are taken; retry shortly")

    async def in_slot(request: Request, call: Callable[[float], T]) -> tuple[T, bool]:
        """``call(time_left)`` in a thread holding a client slot (the caller took it), and whether
        the client disconnected meanwhile. Then its rows are dropped (``ABANDON``), so the thread
        returns, and the slot goes back, at once rather than at the request's deadline."""
        gone = Abandon()
        token = ABANDON.set(gone)  # the thread runs in a copy of this context
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_disconnect, request.receive, gone)
                result = await anyio.to_thread.run_sync(call, time_left(request), limiter=threads)
                tg.cancel_scope.cancel()
        finally:
            ABANDON.reset(token)
            slots.release()
        return result, gone.is_set

    async def handle(route: Route, request: Request) -> Response:
        """What the server adds (auth, the body read under its limit and deadline, a client slot),
        then the Lambda's own path: ``ApiService.handle`` routes, validates, scores and maps every
        error."""
        try:
            if DOCS[route.name].auth:
                authorize(request)
            raw = await read_body(request, s.api.max_body_bytes, time_left(request)) if route.method == "POST" else None
        except HttpError as exc:
            return _respond(error_response(exc))
        except ClientDisconnect:
            return _client_closed()
        path = route_path(request.scope)
        if route.name == "healthz":  # liveness: static, answered here (no thread, no slot to wait for)
            return _respond(api.handle(route.method, path, raw).response)
        if route.name == "readyz":
            handled = await anyio.to_thread.run_sync(functools.partial(api.handle, route.method, path), limiter=probes)
            return _respond(handled.response)
        if not await take_slot(request):
            return _respond(error_response(overloaded()))
        handled, gone = await in_slot(request, lambda left: api.handle(route.method, path, raw, time_left=left))
        if handled.stats is not None:
            services.metrics.scored(handled.stats)
        return _client_closed() if gone else _respond(handled.response)

    async def handle_oip(route: oip.OipRoute, request: Request) -> Response:
        """The same for the Open Inference Protocol: auth and the body on infer, then ``OipService``
        (which translates into ``ApiService``'s scoring, limits and checks)."""
        try:
            if route.name == "infer":
                authorize(request)
            raw = await read_body(request, s.api.max_body_bytes, time_left(request)) if route.method == "POST" else None
        except HttpError as exc:
            return _respond_oip(oip.error_response(exc))
        except ClientDisconnect:
            return _client_closed()
        call = functools.partial(
            services.oip.handle,
            route.method,
            route_path(request.scope),
            raw,
            header_length=request.headers.get(oip.HEADER_LENGTH),
        )
        if route.name in ("server_metadata", "live", "model_metadata"):  # static answers: no thread
            return _respond_oip(call().response)
        if route.name != "infer":  # readiness
            return _respond_oip((await anyio.to_thread.run_sync(call, limiter=probes)).response)
        if not await take_slot(request):
            return _respond_oip(oip.error_response(overloaded()))
        handled, gone = await in_slot(request, lambda left: call(time_left=left))
        if handled.stats is not None:
            services.metrics.scored(handled.stats)
        return _client_closed() if gone else _respond_oip(handled.response)

    for route in ROUTES:  # exactly the Lambda's routes
        doc = DOCS[route.name]
        app.add_api_route(
            route.template,
            _endpoint(handle, route),
            methods=[route.method],
            operation_id=doc.operation_id,
            summary=doc.summary,
            status_code=doc.status,
            response_model=doc.model,
            responses={**{c: ERRORS[c] for c in doc.errors}, **doc.extra_responses},
            openapi_extra=doc.openapi_extra(route),
        )

    for oroute in oip.OIP_ROUTES:
        odoc = OIP_DOCS[oroute.name]
        app.add_api_route(
            oroute.template,
            _oip_endpoint(handle_oip, oroute),
            methods=[oroute.method],
            operation_id=odoc.operation_id,
            summary=odoc.summary,
            response_model=odoc.model,
            responses={**{c: OIP_ERRORS[c] for c in odoc.errors}, **odoc.extra_responses},
            openapi_extra=odoc.openapi_extra(oroute.template),
            tags=["Open Inference Protocol (KServe v2)"],
        )

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, ctype = services.metrics.render()
        return Response(content=body, media_type=ctype)

    # -- what the router answers itself (unknown path, wrong method): the Lambda's answer to it
    @app.exception_handler(StarletteHTTPException)
    async def _router(request: Request, exc: StarletteHTTPException) -> Response:
        path = route_path(request.scope)
        if oip.is_oip_path(path):  # the protocol's own error format under /v2
            if exc.status_code in (404, 405):
                try:
                    find(oip.ROUTE_TABLE, request.method, path)
                except HttpError as routing:
                    return _respond_oip(oip.error_response(routing))
            return _respond_oip(oip.json_response(exc.status_code, {"error": f"http_error: {str(exc.detail)[:200]}"}))
        if exc.status_code in (404, 405):
            try:
                match(request.method, path)
            except HttpError as routing:  # NotFound, or MethodNotAllowed with Allow
                return _respond(error_response(routing))
        return _respond(ApiResponse(exc.status_code, error_body("http_error", str(exc.detail)[:200])))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        if oip.is_oip_path(route_path(request.scope)):
            return _respond_oip(oip.INTERNAL_ERROR)
        return _respond(INTERNAL_ERROR)

    app.openapi = lambda: openapi(app)  # type: ignore[method-assign]
    return app


def _endpoint(handle: Callable[[Route, Request], Awaitable[Response]], route: Route) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        return await handle(route, request)

    endpoint.__name__ = route.name
    return endpoint


def _oip_endpoint(
    handle: Callable[[oip.OipRoute, Request], Awaitable[Response]], route: oip.OipRoute
) -> Callable[..., Any]:
    async def endpoint(request: Request) -> Response:
        return await handle(route, request)

    endpoint.__name__ = f"v2_{route.name}"
    return endpoint


ERRORS: dict[int | str, dict[str, Any]] = {
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


@dataclass(frozen=True)
class RouteDoc:
    operation_id: str
    summary: str
    model: type[BaseModel]
    errors: tuple[int, ...] = ()
    status: int = 200
    auth: bool = False
    body: str | None = None  # the request body's schema (read raw, so FastAPI does not see it)
    extra_responses: dict[int | str, dict[str, Any]] = field(default_factory=dict)

    def openapi_extra(self, route: Route) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.body:
            extra["requestBody"] = _body(self.body)
        params = re.findall(r"\{(\w+)\}", route.template)
        if params:
            extra["parameters"] = [
                {"name": p, "in": "path", "required": True, "schema": {"type": "string", "examples": ["0" * 20]}}
                for p in params
            ]
        return extra


DOCS: dict[RouteName, RouteDoc] = {
    "score": RouteDoc(
        "score",
        "Score (image, caption) pairs",
        m.ScoreResponse,
        (400, 401, 408, 413, 503),
        auth=True,
        body="ScoreRequest",
    ),
    "start_job": RouteDoc(
        "startJob",
        "Start a batch job on a CSV in the bucket",
        m.JobStatus,
        (400, 401, 404, 408, 413),
        status=202,
        auth=True,
        body="JobRequest",
    ),
    "job_status": RouteDoc("jobStatus", "A batch job's status", m.JobStatus, (400, 401, 404), auth=True),
    "healthz": RouteDoc("healthz", "Liveness (no model needed)", m.Health),
    "readyz": RouteDoc(
        "readyz",
        "Readiness: the model is loaded and its canary scores what it scored at load",
        m.Ready,
        extra_responses={
            503: {"model": m.NotReady, "description": "model not loaded, or the canary failed or drifted"}
        },
    ),
}


OIP_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": oip.OipError, "description": "a malformed request or a tensor the model does not take"},
    401: {"model": oip.OipError, "description": "bearer token missing or wrong (when the server requires one)"},
    404: {"model": oip.OipError, "description": "no model of that name here"},
    408: {"model": oip.OipError, "description": "the body did not arrive within the request's deadline"},
    413: {"model": oip.OipError, "description": "body over MAX_BODY_BYTES, or more than MAX_PAIRS pairs"},
    503: {"model": oip.OipError, "description": "model not loaded or its canary failed, at capacity, or shutting down"},
}


@dataclass(frozen=True)
class OipDoc:
    operation_id: str
    summary: str
    model: type[BaseModel]
    errors: tuple[int, ...] = ()
    extra_responses: dict[int | str, dict[str, Any]] = field(default_factory=dict)
    body: bool = False

    def openapi_extra(self, template: str) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.body:
            extra["requestBody"] = _body("InferenceRequest")
            extra["description"] = (
                "JSON tensors, or the binary tensor extension (an `Inference-Header-Content-Length` "
                "header: that many bytes of JSON, then the binary tensors; BYTES elements as a 4-byte "
                "little-endian length and the bytes)."
            )
        if "{name}" in template:
            extra["parameters"] = [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "examples": [oip.DEFAULT_MODEL_NAME]},
                }
            ]
        return extra


OIP_DOCS: dict[oip.OipRouteName, OipDoc] = {
    "server_metadata": OipDoc("v2ServerMetadata", "Server metadata", oip.ServerMetadata),
    "live": OipDoc("v2Live", "Liveness (no model needed)", oip.Live),
    "ready": OipDoc(
        "v2Ready", "Readiness, as /readyz: the model loaded and its canary as at load", oip.ServerReady, (503,)
    ),
    "model_metadata": OipDoc("v2ModelMetadata", "The model's inputs and outputs", oip.ModelMetadata, (404,)),
    "model_ready": OipDoc("v2ModelReady", "The model's readiness, as /readyz", oip.ModelReady, (404, 503)),
    "infer": OipDoc(
        "v2Infer",
        "Score (image, caption) pairs given as BYTES tensors",
        oip.InferenceResponse,
        (400, 401, 404, 408, 413, 503),
        extra_responses={
            200: {
                "description": "the output tensors; with binary outputs asked for, the JSON header and the tensors' bytes",
                "content": {oip.OCTET: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
        body=True,
    ),
}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the request bodies (read raw, so FastAPI does not see their models)
    and the optional bearer scheme."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for model in (m.ScoreRequest, m.JobRequest, oip.InferenceRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Pair"]["examples"] = [{"image": "https://example.com/cat.jpg", "caption": "a photo of a cat"}]
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "when SERVER_AUTH_TOKEN(_FILE) is set"}
    }
    for route in ROUTES:
        if DOCS[route.name].auth:
            doc["paths"][route.template][route.method.lower()]["security"] = [{"bearer": []}, {}]  # {}: no token set
    doc["paths"]["/v2/models/{name}/infer"]["post"]["security"] = [{"bearer": []}, {}]
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
