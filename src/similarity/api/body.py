"""Request bodies from untrusted clients to validated models, with every failure a 4xx.

Whatever the transport hands over (bytes from a server, a ``str`` from the Lambda runtime, base64
when API Gateway says ``isBase64Encoded``) goes through ``decode_body`` and ``parse_json``, so the
Lambda handler and the server refuse the same bodies the same way: bad base64, bytes that are not
UTF-8, text with lone surrogates, JSON nested deeper than ``MAX_DEPTH``, or over the size limit.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from .errors import BadRequest, PayloadTooLarge

#: Request bodies are three levels deep ({"pairs": [{...}]}); anything far deeper is an attack on
#: the parser (json.loads recurses once per level and raises RecursionError near 1000).
MAX_DEPTH = 64

Body = bytes | bytearray | memoryview | str | None

# A JSON string, unrolled so the regex engine never backtracks: '"', runs of ordinary bytes, escapes.
# The closing quote is optional: a string that never closes is consumed once, to the end, instead
# of failing there and being scanned again from every later quote (quadratic: minutes for 1 MiB).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def decode_body(body: Body, base64_encoded: bool, max_bytes: int) -> bytes:
    """The body's bytes: base64 undone when the gateway marks it encoded, text encoded as UTF-8."""
    if body is None:
        return b""
    if base64_encoded:
        if len(body) > (max_bytes + 2) // 3 * 4 + 4:  # 4 characters per 3 bytes, and padding
            raise PayloadTooLarge(f"body is over {max_bytes} bytes once base64 is undone; the limit is {max_bytes}")
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:  # ValueError: a str with non-ASCII characters
            raise BadRequest(f"body is marked base64-encoded but is not valid base64: {exc}") from None
    if isinstance(body, str):
        try:
            return body.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(
                f"body is not valid Unicode text: lone surrogate U+{ord(body[exc.start]):04X} at character {exc.start}"
            ) from None
    return bytes(body)


def json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in ``data`` (strings skipped), in linear time and
    without recursion."""
    if b"[" not in data and b"{" not in data:
        return 0
    outside = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    if not outside.size:
        return 0
    return int(np.cumsum(_OPEN[outside], dtype=np.int64).max(initial=0))


def parse_json(raw: Body, max_bytes: int) -> Any:
    """JSON from a body: 413 over ``max_bytes``, 400 for anything that is not UTF-8 JSON of at most
    ``MAX_DEPTH`` levels."""
    data = decode_body(raw, False, max_bytes)
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"body is {len(data)} bytes; the limit is {max_bytes}")
    if not data.strip():
        raise BadRequest('request body is empty; send JSON like {"pairs": [{"image": ..., "caption": ...}]}')
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None
    if json_depth(data) > MAX_DEPTH:
        raise BadRequest(f"body nests arrays or objects more than {MAX_DEPTH} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer of more than 4300 digits (Python's conversion limit)
        raise BadRequest(f"body holds a value JSON cannot be read into: {str(exc)[:120]}") from None
    except RecursionError:  # a nesting the scan missed; never a 500
        raise BadRequest("body nests too deeply to parse") from None


def validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = [
            {"field": _printable(".".join(str(p) for p in e["loc"])) or "body", "message": _printable(e["msg"])}
            for e in exc.errors()
        ]
        raise BadRequest("request failed validation", fields=fields) from None
    except RecursionError:
        raise BadRequest("body nests too deeply to validate") from None


def _printable(text: str) -> str:
    """Client-chosen names (a field called "\\ud800") escaped so any JSON encoder can write them."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
