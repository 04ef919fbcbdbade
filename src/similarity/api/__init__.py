"""The HTTP API (``POST /score``, ``POST /jobs``, ``GET /jobs/{id}``, ``/healthz``, ``/readyz``),
independent of the framework that serves it."""

from .errors import BadRequest, HttpError, NotFound, PayloadTooLarge, Unavailable, error_body
from .models import JobRequest, Pair, ScoreRequest
from .service import ApiResponse, ApiService, Scored

__all__ = [
    "ApiResponse",
    "ApiService",
    "BadRequest",
    "HttpError",
    "JobRequest",
    "NotFound",
    "Pair",
    "PayloadTooLarge",
    "ScoreRequest",
    "Scored",
    "Unavailable",
    "error_body",
]
