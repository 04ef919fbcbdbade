"""The HTTP API (``POST /score``, ``POST /jobs``, ``GET /jobs/{id}``, ``/healthz``, ``/readyz``),
independent of the framework that serves it."""

from .body import MAX_DEPTH, decode_body, parse_json, validate
from .errors import BadRequest, HttpError, MethodNotAllowed, NotFound, PayloadTooLarge, Unavailable, error_body
from .models import JobRequest, Pair, ScoreRequest
from .routes import ROUTES, Route, match
from .service import INTERNAL_ERROR, ApiResponse, ApiService, Handled, Scored, error_response

__all__ = [
    "INTERNAL_ERROR",
    "MAX_DEPTH",
    "ROUTES",
    "ApiResponse",
    "ApiService",
    "BadRequest",
    "Handled",
    "HttpError",
    "JobRequest",
    "MethodNotAllowed",
    "NotFound",
    "Pair",
    "PayloadTooLarge",
    "Route",
    "ScoreRequest",
    "Scored",
    "Unavailable",
    "decode_body",
    "error_body",
    "error_response",
    "match",
    "parse_json",
    "validate",
]
