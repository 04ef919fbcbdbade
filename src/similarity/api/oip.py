"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) over ``ApiService``, without a
web framework: ``similarity serve`` and the Ray Serve deployment hand ``/v2/...`` requests here.

One model, named by ``SERVER_MODEL_NAME`` (``clip``). Inputs ``image`` and ``caption``: BYTES
tensors of shape ``[-1]``, one element per pair. Outputs ``similarity`` and ``cosine`` (FP32; null
in JSON, NaN in binary, where the row has an error), ``error`` (BYTES, ``code: detail`` or empty)
and ``truncated`` (BOOL). An infer request is translated into the ``POST /score`` body and goes
through ``ApiService.score_data``: the same pair limit, validation, deadlines and scoring (the
server's micro-batcher), so a pair scores here what it scores on ``/score``. Errors answer the
protocol's ``{"error": "code: message"}`` with the status ``/score`` would give.

Both encodings of the protocol are read and written: JSON (``data`` lists) and the binary tensor
extension (``Inference-Header-Content-Length``: the JSON header, then each binary tensor's bytes in
order; a BYTES element is a 4-byte little-endian length and its bytes), which Triton's clients use
by default.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .._version import __version__
from ..types import ScoreStats
from .body import Body, decode_body, parse_json, validate
from .errors import BadRequest, HttpError, MethodNotAllowed, NotFound, PayloadTooLarge, Unavailable
from .routes import find, template_pattern
from .service import ApiService

log = logging.getLogger(__name__)

JSON = "application/json"
OCTET = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
SERVER_NAME = "text-image-similarity"
PLATFORM = "text-image-similarity"
EXTENSIONS = ("binary_tensor_data",)
DEFAULT_MODEL_NAME = "clip"

INPUTS = ("image", "caption")
Datatype = Literal["BYTES", "FP32", "BOOL"]
OUTPUTS: dict[str, Datatype] = {"similarity": "FP32", "cosine": "FP32", "error": "BYTES", "truncated": "BOOL"}

OipRouteName = Literal["server_metadata", "live", "ready", "model_metadata", "model_ready", "infer"]


@dataclass(frozen=True)
class OipRoute:
    method: str
    template: str
    name: OipRouteName


OIP_ROUTES: tuple[OipRoute, ...] = (
    OipRoute("GET", "/v2", "server_metadata"),
    OipRoute("GET", "/v2/health/live", "live"),
    OipRoute("GET", "/v2/health/ready", "ready"),
    OipRoute("GET", "/v2/models/{name}", "model_metadata"),
    OipRoute("GET", "/v2/models/{name}/ready", "model_ready"),
    OipRoute("POST", "/v2/models/{name}/infer", "infer"),
)
ROUTE_TABLE = tuple((r, template_pattern(r.template)) for r in OIP_ROUTES)
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def is_oip_path(path: str) -> bool:
    """Paths the protocol owns: their errors answer in its format."""
    return path == "/v2" or path.startswith("/v2/")


# ------------------------------------------------------------------------------- request bodies
# Strict: a shape of "3" or a datatype of 5 is a 400, never coerced.
class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        default=None, description="row-major elements (nested lists allowed); BYTES as strings"
    )


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data: this output in binary")


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str | None = Field(default=None, description="echoed in the response")
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data_output: every output in binary")
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(default=None, description="which outputs, in this order (default all)")


# ------------------------------------------------------------------ response bodies (the document)
class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float | str | bool | None] | None = None
    parameters: dict[str, Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="model_id and model_revision")
    outputs: list[ResponseOutput]


class OipError(BaseModel):
    error: str = Field(description="`code: message`")


# ---------------------------------------------------------------------------------- responses
@dataclass(frozen=True)
class OipResponse:
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OipHandled:
    """One request's answer, and its scoring figures when it scored pairs (for metrics)."""

    response: OipResponse
    stats: ScoreStats | None = None


def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> OipResponse:
    return OipResponse(status, json.dumps(body).encode(), JSON, headers or {})  # ASCII: lone surrogates escaped


def error_response(exc: HttpError) -> OipResponse:
    """The protocol's error body; a validation error's fields are spelled out in the one string."""
    message = exc.message
    if exc.fields:
        message += ": " + "; ".join(f"{f['field']}: {f['message']}" for f in exc.fields)
    headers = {"Allow": ", ".join(exc.allowed)} if isinstance(exc, MethodNotAllowed) else {}
    return json_response(exc.status, {"error": f"{exc.code}: {message}"}, headers)


INTERNAL_ERROR = json_response(500, {"error": "internal_error: internal error"})  # no detail leaves


def _shown(value: str, limit: int = 64) -> str:
    """Client-chosen text in a message: short, and writable by any JSON encoder."""
    text = value if len(value) <= limit else value[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class OipService:
    """The protocol's routes for one model over ``api`` (whose settings hold the limits)."""

    def __init__(self, api: ApiService, model_name: str = DEFAULT_MODEL_NAME) -> None:
        if not MODEL_NAME.match(model_name):
            raise ValueError(f"model name {model_name!r}: 1-64 of A-Za-z0-9._- (a letter or digit first)")
        self.api = api
        self.model_name = model_name

    # -- one request, whole
    def handle(
        self,
        method: str,
        path: str,
        body: Body = None,
        *,
        header_length: str | None = None,
        time_left: float | None = None,
    ) -> OipHandled:
        """Route and answer one request; never raises. ``header_length``: the request's
        ``Inference-Header-Content-Length`` (binary tensor data follows the JSON header)."""
        try:
            route, params = find(ROUTE_TABLE, method, path)
            if route.name == "server_metadata":
                return OipHandled(json_response(200, self.server_metadata()))
            if route.name == "live":
                return OipHandled(json_response(200, {"live": True}))
            if route.name == "ready":
                self.check_ready()
                return OipHandled(json_response(200, {"ready": True}))
            self.check_model(params["name"])
            if route.name == "model_metadata":
                return OipHandled(json_response(200, self.model_metadata()))
            if route.name == "model_ready":
                self.check_ready()
                return OipHandled(json_response(200, {"name": self.model_name, "ready": True}))
            return self.infer(body, header_length, time_left)
        except HttpError as exc:
            if exc.status >= 500:
                log.error("request failed: %s: %s", exc.code, exc.message)
            return OipHandled(error_response(exc))
        except Exception:
            log.exception("unhandled error in %s %s", method[:20], path[:100])
            return OipHandled(INTERNAL_ERROR)

    # -- metadata and health
    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}

    def model_metadata(self) -> dict[str, Any]:
        return {
            "name": self.model_name,
            "platform": PLATFORM,
            "inputs": [{"name": n, "datatype": "BYTES", "shape": [-1]} for n in INPUTS],
            "outputs": [{"name": n, "datatype": t, "shape": [-1]} for n, t in OUTPUTS.items()],
        }

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model '{_shown(name)}'; this server serves '{self.model_name}'")

    def check_ready(self) -> None:
        """Ready as ``/readyz`` says: the model loaded and its canary scoring as at load."""
        ready = self.api.readyz()
        if ready.status != 200:
            raise Unavailable(f"the model is not ready: {ready.body.get('reason') or 'unknown'}")

    # -- inference
    def infer(self, body: Body, header_length: str | None, time_left: float | None) -> OipHandled:
        limit = self.api.settings.api.max_body_bytes
        raw = decode_body(body, False, limit)
        if len(raw) > limit:
            raise PayloadTooLarge(f"body is {len(raw)} bytes; the limit is {limit}")
        header, blob = split_binary(raw, header_length)
        if not header.strip():
            raise BadRequest('request body is empty; send an inference request: {"inputs": [...]}')
        req: InferenceRequest = validate(InferenceRequest, parse_json(header, limit))
        images, captions = read_inputs(req, blob)
        outputs = wanted_outputs(req)  # checked before anything is scored
        pairs = [{"image": i, "caption": c} for i, c in zip(images, captions, strict=True)]
        scored = self.api.score_data({"pairs": pairs}, time_left)
        return OipHandled(self.encode(req, outputs, scored.response.body), scored.stats)

    def encode(self, req: InferenceRequest, outputs: list[tuple[str, bool]], body: dict[str, Any]) -> OipResponse:
        """``POST /score``'s results as the requested output tensors (the same rounded values)."""
        results = body["results"]
        columns: dict[str, list[Any]] = {
            "similarity": [r["similarity"] for r in results],
            "cosine": [r["cosine"] for r in results],
            "error": [r["error"] or "" for r in results],
            "truncated": [r["truncated"] for r in results],
        }
        entries: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for name, binary in outputs:
            datatype = OUTPUTS[name]
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": [len(results)]}
            if binary:
                data = encode_tensor(datatype, columns[name])
                entry["parameters"] = {"binary_data_size": len(data)}
                blobs.append(data)
            else:
                entry["data"] = columns[name]
            entries.append(entry)
        out: dict[str, Any] = {"model_name": self.model_name}
        if req.id is not None:
            out["id"] = req.id
        out["parameters"] = {"model_id": body["model"]["id"], "model_revision": body["model"]["revision"]}
        out["outputs"] = entries
        head = json.dumps(out).encode()
        if not blobs:
            return OipResponse(200, head)
        return OipResponse(200, head + b"".join(blobs), OCTET, {HEADER_LENGTH: str(len(head))})


# ------------------------------------------------------------------------------ tensors in and out
def split_binary(raw: bytes, header_length: str | None) -> tuple[bytes, bytes | None]:
    """The JSON header and the binary tensor data after it (None: a plain JSON request)."""
    if header_length is None:
        return raw, None
    if not re.fullmatch(r"[0-9]{1,12}", header_length.strip()):
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, not {_shown(header_length, 20)!r}")
    n = int(header_length)
    if n > len(raw):
        raise BadRequest(f"{HEADER_LENGTH} is {n}; the body has {len(raw)} bytes")
    return raw[:n], raw[n:]


def read_inputs(req: InferenceRequest, blob: bytes | None) -> tuple[list[str], list[str]]:
    """The ``image`` and ``caption`` elements, each tensor checked against the model's inputs."""
    found: dict[str, list[str]] = {}
    offset = 0
    for t in req.inputs:
        name = _shown(t.name)
        if t.name not in INPUTS:
            raise BadRequest(f"unknown input '{name}'; the model takes 'image' and 'caption'")
        if t.name in found:
            raise BadRequest(f"input '{name}' is given twice")
        if t.datatype != "BYTES":
            raise BadRequest(f"input '{name}' has datatype {_shown(t.datatype, 20)}; the model takes BYTES")
        if len(t.shape) != 1:
            raise BadRequest(f"input '{name}' has shape {t.shape[:8]}; the model takes one dimension (a pair each)")
        if t.shape[0] < 0:
            raise BadRequest(f"input '{name}' has shape {t.shape}; a request's shape counts its elements")
        size = (t.parameters or {}).get("binary_data_size")
        if size is not None:
            if t.data is not None:
                raise BadRequest(f"input '{name}' has both data and binary_data_size")
            if blob is None:
                raise BadRequest(f"input '{name}' has binary_data_size but the request has no {HEADER_LENGTH}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a byte count")
            if offset + size > len(blob):
                raise BadRequest(f"input '{name}' has {size} bytes of binary data; {len(blob) - offset} follow")
            values = decode_bytes(blob[offset : offset + size], name, t.shape[0])
            offset += size
        elif t.data is None:
            raise BadRequest(f"input '{name}' has no data")
        else:
            values = json_elements(t.data, name)
        if len(values) != t.shape[0]:
            raise BadRequest(f"input '{name}' has {len(values)} elements; its shape says {t.shape[0]}")
        found[t.name] = values
    if blob is not None and offset != len(blob):
        raise BadRequest(f"{len(blob) - offset} bytes of binary data after the inputs belong to none")
    missing = [n for n in INPUTS if n not in found]
    if missing:
        raise BadRequest(
            f"missing input {' and '.join(repr(n) for n in missing)}; the model takes 'image' and 'caption'"
        )
    images, captions = found["image"], found["caption"]
    if len(images) != len(captions):
        raise BadRequest(
            f"inputs 'image' and 'caption' have {len(images)} and {len(captions)} elements; one of each per pair"
        )
    if not images:
        raise BadRequest("inputs 'image' and 'caption' have no elements; send at least one pair")
    return images, captions


def _flat(data: list[Any]) -> Iterator[Any]:
    for value in data:
        if isinstance(value, list):
            yield from _flat(value)  # nesting is bounded by the body's depth limit
        else:
            yield value


def json_elements(data: list[Any], name: str) -> list[str]:
    """BYTES elements in JSON: strings, flat or nested in row-major order."""
    out = list(_flat(data))
    for i, value in enumerate(out):
        if not isinstance(value, str):
            raise BadRequest(f"input '{name}' element {i} is {type(value).__name__}; BYTES elements are strings")
    return out


def decode_bytes(raw: bytes, name: str, expected: int) -> list[str]:
    """Binary BYTES elements: a 4-byte little-endian length, then that many bytes, UTF-8 here."""
    out: list[str] = []
    i = 0
    while i < len(raw) and len(out) <= expected:  # stop once over the shape: the count check says so
        if i + 4 > len(raw):
            raise BadRequest(f"input '{name}': binary data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise BadRequest(f"input '{name}': element {len(out)} says {n} bytes; {len(raw) - i} follow")
        try:
            out.append(raw[i : i + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequest(f"input '{name}' element {len(out)} is not UTF-8 text") from None
        i += n
    return out


def encode_tensor(datatype: Datatype, values: list[Any]) -> bytes:
    """One output in the binary extension's layout (little-endian; a null score is NaN)."""
    if datatype == "FP32":
        return np.array([math.nan if v is None else v for v in values], dtype="<f4").tobytes()
    if datatype == "BOOL":
        return np.array(values, dtype=np.bool_).tobytes()
    encoded = [str(v).encode("utf-8", "backslashreplace") for v in values]
    return b"".join(struct.pack("<I", len(e)) + e for e in encoded)


def wanted_outputs(req: InferenceRequest) -> list[tuple[str, bool]]:
    """(name, binary) for each output to send, in the order asked (default: all, declared order)."""
    default = _flag(req.parameters, "binary_data_output", False)
    if not req.outputs:
        return [(name, default) for name in OUTPUTS]
    out: list[tuple[str, bool]] = []
    for o in req.outputs:
        name = _shown(o.name)
        if o.name not in OUTPUTS:
            raise BadRequest(f"unknown output '{name}'; the model has {', '.join(OUTPUTS)}")
        if any(o.name == seen for seen, _ in out):
            raise BadRequest(f"output '{name}' is asked for twice")
        if "classification" in (o.parameters or {}):
            raise BadRequest("the classification extension is not supported")
        out.append((o.name, _flag(o.parameters, "binary_data", default)))
    return out


def _flag(parameters: dict[str, Any] | None, key: str, default: bool) -> bool:
    value = (parameters or {}).get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"parameter {key} must be true or false")
    return value
