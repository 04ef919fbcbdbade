"""HTTP errors of the API and the error envelope every 4xx/5xx answers with:
``{"error": {"code": ..., "message": ..., "fields": [...]}}``."""

from __future__ import annotations

from typing import Any


class HttpError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, fields: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class BadRequest(HttpError):
    status = 400
    code = "bad_request"


class Unauthorized(HttpError):
    """No or a wrong bearer token, where the server requires one (``similarity serve``)."""

    status = 401
    code = "unauthorized"


class NotFound(HttpError):
    status = 404
    code = "not_found"


class MethodNotAllowed(HttpError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed


class RequestTimeout(HttpError):
    """The client did not send its whole body within the request's deadline."""

    status = 408
    code = "request_timeout"


class PayloadTooLarge(HttpError):
    status = 413
    code = "payload_too_large"


class Unavailable(HttpError):
    status = 503
    code = "model_unavailable"


class Overloaded(HttpError):
    """More rows are waiting for the model than the server admits; retry (``Retry-After``)."""

    status = 503
    code = "overloaded"


def error_body(code: str, message: str, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if fields:
        body["error"]["fields"] = fields
    return body
