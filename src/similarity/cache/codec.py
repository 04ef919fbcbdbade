"""How entries are laid out in a store: a small header, the payload, and a CRC-32 of both.

Embedding: ``TIS`` | version | ``E`` | dtype (``f`` float32, ``e`` float16) | flags | dim (uint32 LE)
| dim values (little-endian) | crc32. URL record: ``TIS`` | version | ``U`` | JSON | crc32.

Nothing is ever unpickled. ``decode_*`` return None for anything that is not a whole, intact entry
of the expected kind (truncated, bit-flipped, another version, non-finite values): the caller
treats it as a miss and the next store overwrites it.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

MAGIC = b"TIS"
VERSION = 1
_EMB = b"E"
_URL = b"U"
_HEAD = struct.Struct("<3sBccBI")  # magic, version, kind, dtype, flags, dim
_CRC = struct.Struct("<I")
_SHA256 = re.compile(r"[0-9a-f]{64}")

EntryDtype = Literal["float32", "float16"]
_DTYPES: dict[bytes, np.dtype[np.floating]] = {b"f": np.dtype("<f4"), b"e": np.dtype("<f2")}
_CODES: dict[str, bytes] = {"float32": b"f", "float16": b"e"}

FLAG_TRUNCATED = 1  # a caption cut at the model's token limit


def _seal(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _open(data: bytes | None, kind: bytes) -> bytes | None:
    """The body of an intact entry of ``kind``, else None."""
    if not data or len(data) < 5 + _CRC.size:
        return None
    body, crc = data[: -_CRC.size], data[-_CRC.size :]
    if _CRC.unpack(crc)[0] != zlib.crc32(body) or body[:3] != MAGIC or body[3] != VERSION or body[4:5] != kind:
        return None
    return body


def quantise(vec: np.ndarray, dtype: EntryDtype) -> np.ndarray:
    """What ``decode_embedding(encode_embedding(vec, dtype))`` gives back, as float32."""
    return np.asarray(np.asarray(vec, dtype=_DTYPES[_CODES[dtype]]), dtype=np.float32)


def encode_embedding(vec: np.ndarray, dtype: EntryDtype = "float32", flags: int = 0) -> bytes:
    code = _CODES[dtype]
    values = np.ascontiguousarray(vec, dtype=_DTYPES[code]).ravel()
    return _seal(_HEAD.pack(MAGIC, VERSION, _EMB, code, flags, values.size) + values.tobytes())


def decode_embedding(data: bytes | None, dim: int | None = None) -> tuple[np.ndarray, int] | None:
    """(float32 vector, flags), or None when the entry is not intact (or not ``dim`` long)."""
    body = _open(data, _EMB)
    if body is None or len(body) < _HEAD.size:
        return None
    _, _, _, code, flags, size = _HEAD.unpack_from(body)
    dt = _DTYPES.get(code)
    if dt is None or size == 0 or len(body) != _HEAD.size + size * dt.itemsize or (dim is not None and size != dim):
        return None
    vec = np.frombuffer(body, dtype=dt, offset=_HEAD.size).astype(np.float32)
    if not np.isfinite(vec).all():
        return None
    return vec, int(flags)


@dataclass(frozen=True)
class UrlRecord:
    """What the last fetch of a URL said: its validators, the sha256 of its bytes, and when."""

    sha256: str
    checked_at: float
    etag: str | None = None
    last_modified: str | None = None


def encode_url(rec: UrlRecord) -> bytes:
    payload = {"sha256": rec.sha256, "at": rec.checked_at, "etag": rec.etag, "modified": rec.last_modified}
    head = MAGIC + bytes([VERSION]) + _URL
    return _seal(head + json.dumps(payload, separators=(",", ":")).encode())


def decode_url(data: bytes | None) -> UrlRecord | None:
    body = _open(data, _URL)
    if body is None:
        return None
    try:
        raw = json.loads(body[5:])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(raw, dict):
        return None
    sha, at, etag, modified = raw.get("sha256"), raw.get("at"), raw.get("etag"), raw.get("modified")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha) or not isinstance(at, (int, float)):
        return None
    if not all(v is None or isinstance(v, str) for v in (etag, modified)):
        return None
    return UrlRecord(sha256=sha, checked_at=float(at), etag=etag, last_modified=modified)
