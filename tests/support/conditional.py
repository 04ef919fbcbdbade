"""Image routes for the loopback ImageServer that behave like a real static host: ETag and
Last-Modified on every 200, 304 to a matching If-None-Match / If-Modified-Since, and a log of
every request (path, the validators it sent, the status answered) for the cache tests."""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

from similarity.cache import EmbeddingCache
from similarity.cache.sqlite_store import SqliteStore
from support.imageserver import Handler, ImageServer


@dataclass(frozen=True)
class Seen:
    path: str
    if_none_match: str | None
    if_modified_since: str | None
    status: int


class ConditionalImages:
    """``put(path, data)`` serves ``data`` at ``path``; putting new bytes changes its ETag and
    Last-Modified. ``etag=False`` / ``last_modified=False`` leave a validator out."""

    def __init__(self, server: ImageServer, etag: bool = True, last_modified: bool = True) -> None:
        self.server = server
        self.with_etag = etag
        self.with_last_modified = last_modified
        self.log: list[Seen] = []
        self._lock = threading.Lock()
        self._files: dict[str, tuple[bytes, str, float]] = {}
        self._clock = 1_700_000_000.0

    def put(self, path: str, data: bytes) -> str:
        with self._lock:
            self._clock += 10  # a later, whole-second modification time for every new version
            self._files[path] = (data, '"' + hashlib.sha256(data).hexdigest()[:16] + '"', self._clock)
        self.server.routes[path] = self._route
        return self.server.url(path)

    def _route(self, h: Handler) -> None:
        path = h.path.split("?", 1)[0]
        data, etag, mtime = self._files[path]
        inm, ims = h.headers.get("If-None-Match"), h.headers.get("If-Modified-Since")
        headers = {}
        if self.with_etag:
            headers["ETag"] = etag
        if self.with_last_modified:
            headers["Last-Modified"] = formatdate(mtime, usegmt=True)
        fresh = False
        if inm is not None and self.with_etag:
            fresh = etag in [t.strip() for t in inm.split(",")]
        elif ims is not None and self.with_last_modified:
            try:
                fresh = parsedate_to_datetime(ims).timestamp() >= mtime
            except (TypeError, ValueError):
                fresh = False
        status = 304 if fresh else 200
        with self._lock:
            self.log.append(Seen(path, inm, ims, status))
        if fresh:
            h.send_response(304)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            h.send_plain(200, data, "image/png", headers)

    def statuses(self) -> list[int]:
        with self._lock:
            return [s.status for s in self.log]

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()


_paths = itertools.count()


def true_pairs(images: ConditionalImages, n: int, folder: str, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct shape images served under ``/<folder>/``, each with its true caption."""
    from support.imageserver import png_bytes
    from support.shapes import COLOURS, SHAPES, draw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        c, s = list(COLOURS)[i % 4], SHAPES[i % 3]
        out.append((images.put(f"/{folder}/{next(_paths)}.png", png_bytes(draw(c, s, rng))), f"a {c} {s}"))
    return out


def sqlite_cache(tmp_path: Path, **kw: Any) -> EmbeddingCache:
    """An embedding cache on a SQLite file in ``tmp_path`` (100 MB)."""
    return EmbeddingCache(SqliteStore(tmp_path / "cache.db", 10**8), **kw)
