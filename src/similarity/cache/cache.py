"""``EmbeddingCache``: what the scorer consults before it fetches or encodes, and fills after.

The cache is never needed for correctness. A store call that fails or times out counts as a miss
(and a ``store_errors`` count), logs one warning, and the store is left alone for ``retry_after``
seconds, so an unreachable or hung server costs at most one timeout per call in flight and then
nothing until the next try. An entry that does not decode (truncated, corrupt, another layout) is a
miss too, and the fresh embedding overwrites it.

A hit gives the result the fetch and decode would have given under this run's limits: an image
entry keeps the image's byte size and dimensions, checked against the fetcher's byte cap and the
decoder's pixel limit on every hit, and a URL trusted within the TTL has its host, and each host
its last fetch was redirected to, checked against the fetcher's address policy first (resolved,
never connected to).
"""

from __future__ import annotations

import dataclasses
import io
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

from ..errors import RowError, TooLarge, TooManyPixels
from ..fetch import Fetcher, Validators
from ..model.preprocess import ACCEPTED_FORMATS, decode_limits
from .codec import (
    FLAG_TRUNCATED,
    EntryDtype,
    ImageInfo,
    UrlRecord,
    decode_embedding,
    decode_image,
    decode_url,
    encode_embedding,
    encode_image,
    encode_url,
    is_embedding,
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


#: Seconds a host that passed the address guard on the TTL path is not resolved again (per run).
ADDRESS_CHECK_EVERY = 60.0


@dataclass(frozen=True)
class Hit:
    """An image embedding found in the cache: nothing to decode or embed."""

    embedding: np.ndarray


@dataclass(frozen=True)
class Miss:
    """Pixels to embed, and where the embedding goes afterwards. ``info``: the image's size and
    dimensions, stored with its embedding (None: its header could not be read again, and the
    embedding is not stored)."""

    pixels: np.ndarray
    sha256: str
    url_key: str | None = None
    record: UrlRecord | None = None
    info: ImageInfo | None = None


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


def _image_info(data: bytes) -> ImageInfo | None:
    """The byte size and the header's width and height of bytes that just decoded, else None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - they decoded once; Pillow raises many types for headers
        return None
    if width <= 0 or height <= 0:
        return None
    return ImageInfo(len(data), int(width), int(height))


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
    def __init__(
        self, cache: EmbeddingCache, model: ClipModel | None, fp: Fingerprint, dim: int, max_pixels: int | None = None
    ) -> None:
        """``max_pixels``: the decoder's pixel limit where there is no ``model`` to read it from
        (a loader process decodes with the run's ``PreprocessConfig``)."""
        self.cache = cache
        self.model = model
        self.max_pixels = max_pixels
        self.fingerprint = fp
        self.dim = dim
        self.counts = Counts(cache.totals)
        self._hosts: dict[tuple[Any, str, int], float] = {}  # (policy, host, port): when it passed
        self._host_locks: dict[tuple[Any, str, int], threading.Lock] = {}
        self._hosts_lock = threading.Lock()

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
    def _image(self, sha: str) -> tuple[np.ndarray, ImageInfo] | None:
        [raw] = self.cache.get([image_key(self.fingerprint, sha)], self.counts)
        decoded = decode_image(raw, self.dim) if raw is not None else None
        if raw is not None and decoded is None and not is_embedding(raw):
            self.counts.add("corrupt")  # an entry stored before sizes were kept is a plain miss
        return decoded

    def _pixel_limit(self) -> int:
        """The decoder's pixel limit (``preprocess.open_image``): the run's, else the process's."""
        limit = self.max_pixels
        if limit is None:
            limit = getattr(getattr(self.model, "preprocess", None), "max_pixels", None)
        return int(limit) if limit is not None else decode_limits().max_pixels

    def _check(self, info: ImageInfo, fetcher: Fetcher, url: str = "") -> None:
        """Raise what fetching and decoding the image would under this run's limits (the byte
        cap's message as the fetch words it when the size is declared: Content-Length, S3's)."""
        cap = fetcher.settings.max_bytes
        if info.nbytes > cap:
            if url.strip().lower().startswith("s3:"):
                raise TooLarge(f"object is {info.nbytes} bytes, cap {cap}")
            raise TooLarge(f"Content-Length {info.nbytes} exceeds {cap} bytes")
        limit = self._pixel_limit()
        if info.pixels > limit:
            raise TooManyPixels(f"{info.width}x{info.height} pixels exceeds the limit of {limit}")

    def _address_allowed(self, url: str, fetcher: Fetcher) -> bool:
        """Whether the fetcher's address guard would let a request for ``url`` through to its
        host: the name resolved (never connected to) and every address checked, as a fetch does.
        False for anything it refuses or cannot tell (the fetch then gives the row its error)."""
        policy = fetcher.policy
        try:
            parts = urlsplit(url.strip())
            scheme = parts.scheme.lower()
            if scheme not in ("http", "https"):
                return True  # s3: no address guard (the client's endpoint is configuration)
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return False
        if not policy.enabled:
            return True
        if not host:
            return False
        memo = (policy, host, port)
        with self._hosts_lock:
            if len(self._host_locks) > 4096:  # a long-lived session (the API's) meets many hosts
                self._host_locks.clear()
                self._hosts.clear()
            one = self._host_locks.setdefault(memo, threading.Lock())
        with one:  # the threads asking about one host at once: one lookup
            passed = self._hosts.get(memo)
            if passed is not None and time.monotonic() - passed < ADDRESS_CHECK_EVERY:
                return True
            try:
                policy.resolve(host, port, timeout=fetcher.settings.connect_timeout)
            except RowError:
                return False
            self._hosts[memo] = time.monotonic()
        return True

    def _hops_allowed(self, url: str, rec: UrlRecord, fetcher: Fetcher) -> bool:
        """The address guard admits the URL's host and every host its last fetch was redirected
        to (a record that does not say where it was redirected is not trusted)."""
        return rec.via is not None and all(self._address_allowed(u, fetcher) for u in (url, *rec.via))

    def _url(self, key: str) -> UrlRecord | None:
        [raw] = self.cache.get([key], self.counts)
        rec = decode_url(raw)
        if raw is not None and rec is None:
            self.counts.add("corrupt")
        return rec

    def load_image(self, url: str, fetcher: Fetcher, pixels: Callable[[bytes], np.ndarray]) -> Hit | Miss:
        """The image's embedding from the cache, or its pixels to embed. For http(s) and s3 URLs
        the URL record is consulted first: trusted within the TTL (when the address guard admits
        its host and those it was redirected to), else revalidated with a conditional request (a
        304 downloads nothing). Fetch and decode errors propagate as the ``RowError`` they are; a
        hit over this run's byte cap or pixel limit raises the ``TooLarge`` or ``TooManyPixels``
        the fetch or decode would."""
        if not _remote(url):
            return self._by_content(fetcher.fetch(url), fetcher, pixels)
        now = self.cache.now()
        key = url_key(url)
        rec = self._url(key)
        entry = self._image(rec.sha256) if rec is not None else None
        known = entry[0] if entry is not None else None
        if rec is not None and entry is not None:
            ttl = self.cache.url_ttl
            if ttl is not None and 0 <= now - rec.checked_at <= ttl and self._hops_allowed(url, rec, fetcher):
                self._check(entry[1], fetcher, url)
                self.counts.add("url_hits")
                self.counts.add("url_trusted")
                self.counts.add("image_hits")
                return Hit(entry[0])
        # Validators only when a 304 would be usable: the embedding they stand for is still there.
        validators = Validators(rec.etag, rec.last_modified) if rec is not None and known is not None else None
        got = fetcher.fetch_conditional(url, validators or None)
        if got.data is None and rec is not None and entry is not None:
            self._check(entry[1], fetcher, url)  # before the renewal: a refused row leaves no trace
            self.counts.add("url_hits")
            self.counts.add("url_not_modified")
            self.counts.add("image_hits")
            renewed = dataclasses.replace(
                rec,
                checked_at=now,
                etag=got.etag or rec.etag,
                last_modified=got.last_modified or rec.last_modified,
                via=got.via,
            )
            self.cache.put({key: encode_url(renewed)}, self.counts)
            return Hit(entry[0])
        data = got.data or b""
        self.counts.add("url_misses")
        record = UrlRecord(
            sha256=content_hash(data), checked_at=now, etag=got.etag, last_modified=got.last_modified, via=got.via
        )
        same = rec is not None and rec.sha256 == record.sha256
        return self._by_content(data, fetcher, pixels, key, record, entry if same else None, looked_up=same)

    def _by_content(
        self,
        data: bytes,
        fetcher: Fetcher,
        pixels: Callable[[bytes], np.ndarray],
        key: str | None = None,
        record: UrlRecord | None = None,
        known: tuple[np.ndarray, ImageInfo] | None = None,
        looked_up: bool = False,
    ) -> Hit | Miss:
        sha = record.sha256 if record is not None else content_hash(data)
        entry = known if looked_up else self._image(sha)
        if entry is not None:
            self._check(entry[1], fetcher)  # the fetch applied the byte cap; the pixel limit is ours
            self.counts.add("image_hits")
            if key is not None and record is not None:
                self.cache.put({key: encode_url(record)}, self.counts)
            return Hit(entry[0])
        px = pixels(data)  # decode errors leave no URL record behind: the next run tries again
        self.counts.add("image_misses")
        return Miss(px, sha, key, record, _image_info(data))

    def store_images(self, misses: Sequence[Miss], embs: np.ndarray) -> np.ndarray:
        """Store embedded images, then their URL records (in that order: a record never points at
        an embedding that was not written first); returns the embeddings as stored."""
        stored = quantise(embs, self.cache.dtype)
        items = {
            image_key(self.fingerprint, m.sha256): encode_image(e, m.info, self.cache.dtype)
            for m, e in zip(misses, stored, strict=True)
            if m.info is not None  # a hit must be checkable against a later run's limits
        }
        for m in misses:
            if m.url_key is not None and m.record is not None and m.info is not None:
                items[m.url_key] = encode_url(m.record)
        self.cache.put(items, self.counts)
        return stored
