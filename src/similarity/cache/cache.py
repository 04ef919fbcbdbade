"""``EmbeddingCache``: what the scorer consults before it fetches or encodes, and fills after.

The cache is never needed for correctness. A store call that fails or times out counts as a miss
(and a ``store_errors`` count), logs one warning, and the store is left alone for ``retry_after``
seconds, so an unreachable or hung server costs at most one timeout per call in flight and then
nothing until the next try. An entry that does not decode (truncated, corrupt, another layout) is a
miss too, and the fresh embedding overwrites it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from ..fetch import Fetcher, Validators
from .codec import (
    FLAG_TRUNCATED,
    EntryDtype,
    UrlRecord,
    decode_embedding,
    decode_url,
    encode_embedding,
    encode_url,
    quantise,
)
from .keys import Fingerprint, caption_key, content_hash, fingerprint, image_key, url_key
from .store import Store, StoreUnavailable

if TYPE_CHECKING:
    from ..model import ClipModel

log = logging.getLogger(__name__)

#: The per-run counts, in the order the summary shows them.
COUNTS = (
    "image_hits",
    "image_misses",
    "url_hits",  # not downloaded: answered 304, or trusted within the TTL
    "url_misses",  # downloaded (new URL, changed, no validators, or its embedding gone)
    "url_not_modified",
    "url_trusted",
    "caption_hits",
    "caption_misses",
    "corrupt",
    "store_errors",
)


@dataclass(frozen=True)
class Hit:
    """An image embedding found in the cache: nothing to decode or embed."""

    embedding: np.ndarray


@dataclass(frozen=True)
class Miss:
    """Pixels to embed, and where the embedding goes afterwards."""

    pixels: np.ndarray
    sha256: str
    url_key: str | None = None
    record: UrlRecord | None = None


class Counts:
    """Thread-safe counters of one run, added to the cache's lifetime totals as they go."""

    def __init__(self, parent: Counts | None = None) -> None:
        self._c: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._parent = parent

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._c[name] += n
            if self._parent is not None:
                self._parent.add(name, n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: self._c.get(k, 0) for k in COUNTS}

    def take(self) -> dict[str, int]:
        """The counts, reset to zero (for metrics published per invocation)."""
        with self._lock:
            out = {k: self._c.get(k, 0) for k in COUNTS}
            self._c.clear()
            return out


def _remote(url: str) -> bool:
    try:
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    except ValueError:  # "http://[::1/": the fetcher names it (unsupported_source)
        return False
    return scheme in ("http", "https", "s3")


def _projection_dim(model: ClipModel) -> int:
    try:
        cfg = json.loads((Path(model.info.path) / "config.json").read_text(encoding="utf-8"))
        return int(cfg.get("projection_dim", 512))
    except (OSError, ValueError, TypeError, AttributeError):
        return 512


class EmbeddingCache:
    """Shared by every run of a process (thread-safe). ``url_ttl``: seconds a URL's last check is
    trusted without asking its server again (None: always ask, conditionally). ``dtype``: how
    embeddings are stored; with float16 the embeddings a run computes are rounded the same way, so
    a rerun from the cache gives the same bytes."""

    def __init__(
        self,
        store: Store,
        *,
        url_ttl: float | None = None,
        dtype: EntryDtype = "float32",
        retry_after: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.url_ttl = url_ttl
        self.dtype: EntryDtype = dtype
        self.retry_after = retry_after
        self.totals = Counts()
        self._clock = clock
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._fingerprints: weakref.WeakKeyDictionary[ClipModel, tuple[Fingerprint, int]] = weakref.WeakKeyDictionary()
        #: How to open this cache again in another process (``open_cache``'s arguments), or None
        #: for a cache built from a store object: worker processes (pipeline.processes) need it.
        self.origin: tuple[Any, str] | None = None

    def __repr__(self) -> str:
        return f"EmbeddingCache({self.store.name}, dtype={self.dtype}, url_ttl={self.url_ttl})"

    def session(self, model: ClipModel) -> RunCache:
        """What one run (one ``Scorer``) uses: the model's keys and the run's own counts."""
        with self._lock:
            known = self._fingerprints.get(model)
            if known is None:
                known = self._fingerprints[model] = (fingerprint(model), _projection_dim(model))
        return RunCache(self, model, *known)

    def now(self) -> float:
        return self._clock()

    # -- guarded store calls: never raise, never wait past the store's timeout
    def _available(self) -> bool:
        return self._clock() >= self._down_until

    def _failed(self, exc: StoreUnavailable, counts: Counts) -> None:
        counts.add("store_errors")
        with self._lock:
            was_up = self._available()
            self._down_until = self._clock() + self.retry_after
        if was_up:
            log.warning(
                "embedding cache unavailable (%s); scoring goes on without it, next try in %.0fs", exc, self.retry_after
            )

    def get(self, keys: Sequence[str], counts: Counts) -> list[bytes | None]:
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            values = self.store.get_many(keys)
        except StoreUnavailable as exc:
            self._failed(exc, counts)
            return [None] * len(keys)
        if len(values) != len(keys):
            return [None] * len(keys)
        return values

    def put(self, items: Mapping[str, bytes], counts: Counts) -> None:
        if not items or not self._available():
            return
        try:
            self.store.put_many(items)
        except StoreUnavailable as exc:
            self._failed(exc, counts)

    def metrics(self) -> dict[str, int]:
        """Counts since the last call, by metric name (``CacheImageHits``, ...), those above zero."""
        return {"Cache" + "".join(p.title() for p in k.split("_")): v for k, v in self.totals.take().items() if v}

    def close(self) -> None:
        try:
            self.store.close()
        except StoreUnavailable:
            pass


class RunCache:
    def __init__(self, cache: EmbeddingCache, model: ClipModel | None, fp: Fingerprint, dim: int) -> None:
        self.cache = cache
        self.model = model
        self.fingerprint = fp
        self.dim = dim
        self.counts = Counts(cache.totals)

    # -- captions
    def captions(self, texts: Sequence[str]) -> dict[str, tuple[np.ndarray, bool]]:
        values = self.cache.get([caption_key(self.fingerprint, t) for t in texts], self.counts)
        found: dict[str, tuple[np.ndarray, bool]] = {}
        for text, raw in zip(texts, values, strict=True):
            decoded = decode_embedding(raw, self.dim) if raw is not None else None
            if decoded is None:
                self.counts.add("corrupt", int(raw is not None))
                self.counts.add("caption_misses")
                continue
            found[text] = (decoded[0], bool(decoded[1] & FLAG_TRUNCATED))
            self.counts.add("caption_hits")
        return found

    def store_captions(self, texts: Sequence[str], embs: np.ndarray, truncated: Sequence[bool]) -> np.ndarray:
        """Store the run's new caption embeddings; returns them as stored (see ``quantise``)."""
        stored = quantise(embs, self.cache.dtype)
        self.cache.put(
            {
                caption_key(self.fingerprint, t): encode_embedding(e, self.cache.dtype, FLAG_TRUNCATED if tr else 0)
                for t, e, tr in zip(texts, stored, truncated, strict=True)
            },
            self.counts,
        )
        return stored

    # -- images
    def _image(self, sha: str) -> np.ndarray | None:
        [raw] = self.cache.get([image_key(self.fingerprint, sha)], self.counts)
        decoded = decode_embedding(raw, self.dim) if raw is not None else None
        if raw is not None and decoded is None:
            self.counts.add("corrupt")
        return decoded[0] if decoded is not None else None

    def _url(self, key: str) -> UrlRecord | None:
        [raw] = self.cache.get([key], self.counts)
        rec = decode_url(raw)
        if raw is not None and rec is None:
            self.counts.add("corrupt")
        return rec

    def load_image(self, url: str, fetcher: Fetcher, pixels: Callable[[bytes], np.ndarray]) -> Hit | Miss:
        """The image's embedding from the cache, or its pixels to embed. For http(s) and s3 URLs
        the URL record is consulted first: trusted within the TTL, else revalidated with a
        conditional request (a 304 downloads nothing). Fetch and decode errors propagate as the
        ``RowError`` they are."""
        if not _remote(url):
            return self._by_content(fetcher.fetch(url), pixels)
        now = self.cache.now()
        key = url_key(url)
        rec = self._url(key)
        known = self._image(rec.sha256) if rec is not None else None
        if rec is not None and known is not None:
            ttl = self.cache.url_ttl
            if ttl is not None and 0 <= now - rec.checked_at <= ttl:
                self.counts.add("url_hits")
                self.counts.add("url_trusted")
                self.counts.add("image_hits")
                return Hit(known)
        # Validators only when a 304 would be usable: the embedding they stand for is still there.
        validators = Validators(rec.etag, rec.last_modified) if rec is not None and known is not None else None
        got = fetcher.fetch_conditional(url, validators or None)
        if got.data is None and rec is not None and known is not None:
            self.counts.add("url_hits")
            self.counts.add("url_not_modified")
            self.counts.add("image_hits")
            renewed = dataclasses.replace(
                rec, checked_at=now, etag=got.etag or rec.etag, last_modified=got.last_modified or rec.last_modified
            )
            self.cache.put({key: encode_url(renewed)}, self.counts)
            return Hit(known)
        data = got.data or b""
        self.counts.add("url_misses")
        record = UrlRecord(sha256=content_hash(data), checked_at=now, etag=got.etag, last_modified=got.last_modified)
        same = rec is not None and rec.sha256 == record.sha256
        return self._by_content(data, pixels, key, record, known if same else None, looked_up=same)

    def _by_content(
        self,
        data: bytes,
        pixels: Callable[[bytes], np.ndarray],
        key: str | None = None,
        record: UrlRecord | None = None,
        known: np.ndarray | None = None,
        looked_up: bool = False,
    ) -> Hit | Miss:
        sha = record.sha256 if record is not None else content_hash(data)
        emb = known if looked_up else self._image(sha)
        if emb is not None:
            self.counts.add("image_hits")
            if key is not None and record is not None:
                self.cache.put({key: encode_url(record)}, self.counts)
            return Hit(emb)
        px = pixels(data)  # decode errors leave no URL record behind: the next run tries again
        self.counts.add("image_misses")
        return Miss(px, sha, key, record)

    def store_images(self, misses: Sequence[Miss], embs: np.ndarray) -> np.ndarray:
        """Store embedded images, then their URL records (in that order: a record never points at
        an embedding that was not written first); returns the embeddings as stored."""
        stored = quantise(embs, self.cache.dtype)
        items = {
            image_key(self.fingerprint, m.sha256): encode_embedding(e, self.cache.dtype)
            for m, e in zip(misses, stored, strict=True)
        }
        for m in misses:
            if m.url_key is not None and m.record is not None:
                items[m.url_key] = encode_url(m.record)
        self.cache.put(items, self.counts)
        return stored
