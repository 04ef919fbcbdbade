"""HTTP errors and the one function that turns them into responses."""

from __future__ import annotations

import json
from typing import Any

from aws_lambda_powertools.event_handler import Response, content_types


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


class PayloadTooLarge(HttpError):
    status = 413
    code = "payload_too_large"


def error_response(status: int, code: str, message: str, fields: list[dict[str, Any]] | None = None) -> Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if fields:
        body["error"]["fields"] = fields
    return Response(status_code=status, content_type=content_types.APPLICATION_JSON, body=json.dumps(body))
