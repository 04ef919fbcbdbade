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


class NotFound(HttpError):
    status = 404
    code = "not_found"


class MethodNotAllowed(HttpError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, allowed: list[str]) -> None:
        super().__init__(message)
        self.allowed = allowed


class PayloadTooLarge(HttpError):
    status = 413
    code = "payload_too_large"


class Unavailable(HttpError):
    status = 503
    code = "model_unavailable"


def error_body(code: str, message: str, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if fields:
        body["error"]["fields"] = fields
    return body
