"""The HTTP API (``POST /score``, ``POST /jobs``, ``GET /jobs/{id}``, ``/healthz``, ``/readyz``),
independent of the framework that serves it."""

from .errors import (
    BadRequest,
    HttpError,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    error_body,
)
from .models import JobRequest, Pair, ScoreRequest
from .service import ApiResponse, ApiService, Readiness, Scored, ScoreRows

__all__ = [
    "ApiResponse",
    "ApiService",
    "BadRequest",
    "HttpError",
    "JobRequest",
    "NotFound",
    "Overloaded",
    "Pair",
    "PayloadTooLarge",
    "Readiness",
    "RequestTimeout",
    "ScoreRequest",
    "ScoreRows",
    "Scored",
    "Unauthorized",
    "Unavailable",
    "error_body",
]
