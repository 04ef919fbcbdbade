"""How entries are laid out in a store: a small header, the payload, and a CRC-32 of both.

Caption embedding: ``TIS`` | version | ``E`` | dtype (``f`` float32, ``e`` float16) | flags | dim
(uint32 LE) | dim values (little-endian) | crc32. Image embedding: the same with kind ``I`` and,
after dim, what the limits of a later run are checked against: the image's byte size (uint64 LE),
width and height (uint32 LE each, from its header). URL record: ``TIS`` | version | ``U`` | JSON |
crc32. (Image embeddings stored before the ``I`` kind are ``E`` entries: ``decode_image`` reads
them as None, so they are looked up as misses and overwritten.)

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
_IMG = b"I"
_URL = b"U"
_HEAD = struct.Struct("<3sBccBI")  # magic, version, kind, dtype, flags, dim
_IMG_INFO = struct.Struct("<QII")  # image entries, after the head: byte size, width, height
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


def _encode(kind: bytes, vec: np.ndarray, dtype: EntryDtype, flags: int, extra: bytes = b"") -> bytes:
    code = _CODES[dtype]
    values = np.ascontiguousarray(vec, dtype=_DTYPES[code]).ravel()
    return _seal(_HEAD.pack(MAGIC, VERSION, kind, code, flags, values.size) + extra + values.tobytes())


def _decode(body: bytes | None, dim: int | None, extra: int = 0) -> tuple[np.ndarray, int] | None:
    if body is None or len(body) < _HEAD.size + extra:
        return None
    _, _, _, code, flags, size = _HEAD.unpack_from(body)
    dt = _DTYPES.get(code)
    start = _HEAD.size + extra
    if dt is None or size == 0 or len(body) != start + size * dt.itemsize or (dim is not None and size != dim):
        return None
    vec = np.frombuffer(body, dtype=dt, offset=start).astype(np.float32)
    if not np.isfinite(vec).all():
        return None
    return vec, int(flags)


def encode_embedding(vec: np.ndarray, dtype: EntryDtype = "float32", flags: int = 0) -> bytes:
    return _encode(_EMB, vec, dtype, flags)


def decode_embedding(data: bytes | None, dim: int | None = None) -> tuple[np.ndarray, int] | None:
    """(float32 vector, flags), or None when the entry is not intact (or not ``dim`` long)."""
    return _decode(_open(data, _EMB), dim)


@dataclass(frozen=True)
class ImageInfo:
    """What an image embedding's limits are checked against on a hit: the image's size in bytes
    (what a fetch's byte cap measures) and its width and height (what the decoder's pixel limit
    measures, from the header)."""

    nbytes: int
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def encode_image(vec: np.ndarray, info: ImageInfo, dtype: EntryDtype = "float32") -> bytes:
    return _encode(_IMG, vec, dtype, 0, _IMG_INFO.pack(info.nbytes, info.width, info.height))


def decode_image(data: bytes | None, dim: int | None = None) -> tuple[np.ndarray, ImageInfo] | None:
    """(float32 vector, image info), or None when the entry is not an intact image entry (a
    caption-layout ``E`` entry, as image embeddings were stored before, included)."""
    body = _open(data, _IMG)
    decoded = _decode(body, dim, _IMG_INFO.size)
    if body is None or decoded is None:
        return None
    nbytes, width, height = _IMG_INFO.unpack_from(body, _HEAD.size)
    if width == 0 or height == 0:
        return None
    return decoded[0], ImageInfo(int(nbytes), int(width), int(height))


def is_embedding(data: bytes | None) -> bool:
    """Whether ``data`` is an intact caption-layout (``E``) entry: for an image key, one stored
    before image entries kept their size (a miss, but not a damaged entry)."""
    return decode_embedding(data) is not None


@dataclass(frozen=True)
class UrlRecord:
    """What the last fetch of a URL said: its validators, the sha256 of its bytes, and when."""

    sha256: str
    checked_at: float
    etag: str | None = None
    last_modified: str | None = None
    #: The URLs that fetch was redirected to; None when not known (a record written before they
    #: were kept), which the TTL never trusts.
    via: tuple[str, ...] | None = ()


def encode_url(rec: UrlRecord) -> bytes:
    payload = {
        "sha256": rec.sha256,
        "at": rec.checked_at,
        "etag": rec.etag,
        "modified": rec.last_modified,
        "via": None if rec.via is None else list(rec.via),
    }
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
    via = raw.get("via")
    if via is not None and not (isinstance(via, list) and all(isinstance(v, str) for v in via)):
        return None
    return UrlRecord(
        sha256=sha, checked_at=float(at), etag=etag, last_modified=modified, via=None if via is None else tuple(via)
    )
