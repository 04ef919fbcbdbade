"""Batched, de-duplicated, pipelined scoring: records in, results out in the same order.

Rows are taken a window at a time (bounded memory). While the model embeds window *k*, the thread
pool is already fetching and decoding window *k+1*. Identical URLs are fetched and embedded once and
identical captions encoded once per run (LRU caches sized well above two windows). With an
``EmbeddingCache`` the same holds across runs: embeddings are looked up before anything is fetched
or encoded, and stored after.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import numpy as np

from ..cache import EmbeddingCache, Hit, Miss, RunCache
from ..errors import ConfigError, InferenceError, InternalError, InvalidCaption, MissingCaption, MissingUrl, RowError
from ..fetch import Fetcher
from ..model import ClipModel
from ..types import Record, ScoreResult, ScoreStats
from .loading import Loaded, load_image
from .processes import CacheSpec, Handle, LoaderSpec, ProcessLoader

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value


class Scorer:
    """Holds the model, the fetcher, the pool and the caches for one run."""

    def __init__(
        self,
        model: ClipModel,
        fetcher: Fetcher,
        batch_size: int = 32,
        workers: int = 16,
        window: int | None = None,
        cache_size: int = 20_000,
        cache: EmbeddingCache | None = None,
        processes: int = 0,
    ) -> None:
        """``processes``: fetch and decode in that many worker processes (``pipeline.processes``)
        instead of this process's threads; 0, the default, keeps them here. Each worker opens the
        embedding cache again (a cache built from a store object rather than by ``open_cache``
        cannot be, and keeps loading in threads, with a warning)."""
        self.model = model
        self.fetcher = fetcher
        self.batch_size = max(1, batch_size)
        self.window = window or max(4 * self.batch_size, 64)
        self.workers = max(1, workers)
        self.stats = ScoreStats()
        cache_size = max(cache_size, 4 * self.window)
        self._images: Lru[str, np.ndarray] = Lru(cache_size)  # url -> unit embedding
        self._image_errors: Lru[str, RowError] = Lru(cache_size)
        self._captions: Lru[str, tuple[np.ndarray, bool]] = Lru(cache_size)  # caption -> (embedding, truncated)
        self._caption_errors: Lru[str, RowError] = Lru(cache_size)
        self._pending: dict[str, Future[Loaded] | Handle] = {}
        if processes and model.pixel_path != "pillow":
            raise ConfigError(
                f"SIMILARITY_PROCESSES={processes} with SIMILARITY_PIXELS={model.pixel_path}: the worker processes "
                "decode and resize with Pillow, the device pixel path runs in this process; choose one"
            )
        self.cache: RunCache | None = cache.session(model) if cache is not None else None
        self._cache_spec: CacheSpec | None = None
        if processes and cache is not None and self.cache is not None:
            if cache.origin is None:
                log.warning("SIMILARITY_PROCESSES=%d: this embedding cache cannot be opened again in worker "
                            "processes (not made by open_cache): images load in threads", processes)  # fmt: skip
                processes = 0
            else:
                self._cache_spec = CacheSpec(cache.origin, self.cache.fingerprint, self.cache.dim)
        self.processes = processes
        self._loader: ProcessLoader | None = None

    def _known_image(self, url: str) -> bool:
        return url in self._images or url in self._image_errors

    # -- worker side: runs in the pool
    def _load(self, url: str) -> Loaded:
        return load_image(url, self.fetcher, self.model.pixels, self.cache)

    # -- model side
    def _submit(self, pool: ThreadPoolExecutor, records: list[Record]) -> None:
        new: dict[str, None] = {}  # for the worker processes, sent together below
        for rec in records:
            url = _clean(rec.url)
            if rec.error is None and url and _clean(rec.caption):
                if url not in self._pending and url not in new and not self._known_image(url):
                    if self._loader is None:
                        self._pending[url] = pool.submit(self._load, url)
                    else:
                        new[url] = None
                elif self._images.get(url) is None:  # either way, keep it recent: this window needs it
                    self._image_errors.get(url)
        if self._loader is not None and new:
            self._pending.update(zip(new, self._loader.load(list(new)), strict=True))

    def _wait(self, pending: Future[Loaded] | Handle) -> Loaded:
        if isinstance(pending, Handle):
            assert self._loader is not None
            return self._loader.result(pending)
        return pending.result()

    def _embed_images(self, records: list[Record]) -> None:
        # Batches form in the window's row order, not in the order downloads finish: a row's
        # embedding depends (in the 7th digit) on its batch-mates, so the same input gives the same
        # bytes in every run, and a resumed run (commits fall on window boundaries) the clean one's.
        wanted: dict[str, Future[Loaded] | Handle] = {}
        for rec in records:
            url = _clean(rec.url)
            if url and url in self._pending:
                wanted.setdefault(url, self._pending[url])
        batch: list[tuple[str, np.ndarray | Miss]] = []
        for url, pending in wanted.items():
            value = self._wait(pending)
            if isinstance(value, RowError):
                self._image_errors.put(url, value)
                self._pending.pop(url, None)
                continue
            if isinstance(value, Hit):
                self._images.put(url, value.embedding)
                self._pending.pop(url, None)
                continue
            self.stats.images_fetched += 1
            batch.append((url, value))
            if len(batch) >= self.batch_size:
                self._run_image_batch(batch)
                batch = []
        if batch:
            self._run_image_batch(batch)

    def _run_image_batch(self, batch: list[tuple[str, np.ndarray | Miss]]) -> None:
        try:
            embs = self.model.embed_images(np.stack([v.pixels if isinstance(v, Miss) else v for _, v in batch]))
        except Exception as exc:
            if len(batch) > 1:
                # One poison input must cost its own row only: find it by running each alone.
                log.warning("image batch of %d failed (%s); retrying one by one", len(batch), type(exc).__name__)
                for item in batch:
                    self._run_image_batch([item])
                return
            log.exception("image failed in the image tower: %s", batch[0][0][:200])
            self._image_errors.put(batch[0][0], InferenceError(f"{type(exc).__name__} in image tower"))
            self._pending.pop(batch[0][0], None)
            return
        self.stats.images_embedded += len(batch)
        misses = [v for _, v in batch if isinstance(v, Miss)]
        if self.cache is not None and len(misses) == len(batch):
            embs = self.cache.store_images(misses, embs)
        for (url, _), emb in zip(batch, embs, strict=True):
            self._images.put(url, emb)
            self._pending.pop(url, None)

    def _embed_captions(self, records: list[Record]) -> None:
        todo = []
        for c in dict.fromkeys(_clean(r.caption) for r in records if r.error is None and _clean(r.url)):
            if not c or self._captions.get(c) is not None or self._caption_errors.get(c) is not None:
                continue
            if not _is_text(c):
                self._caption_errors.put(c, InvalidCaption(_describe_invalid(c)))
                continue
            todo.append(c)
        todo.sort(key=len)  # similar lengths together: less padding per batch
        if self.cache is not None and todo:
            for c, value in self.cache.captions(todo).items():
                self._captions.put(c, value)
            todo = [c for c in todo if c not in self._captions]
        for i in range(0, len(todo), self.batch_size):
            self._run_text_batch(todo[i : i + self.batch_size])

    def _run_text_batch(self, chunk: list[str]) -> None:
        try:
            embs, truncated = self.model.embed_texts(chunk)
        except Exception as exc:
            if len(chunk) > 1:
                log.warning("text batch of %d failed (%s); retrying one by one", len(chunk), type(exc).__name__)
                for c in chunk:
                    self._run_text_batch([c])
                return
            log.exception("caption failed in the text tower")
            self._caption_errors.put(chunk[0], InferenceError(f"{type(exc).__name__} in text tower"))
            return
        self.stats.captions_encoded += len(chunk)
        if self.cache is not None:
            embs = self.cache.store_captions(chunk, embs, truncated)
        for c, e, t in zip(chunk, embs, truncated, strict=True):
            self._captions.put(c, (e, t))

    def _result(self, rec: Record) -> ScoreResult:
        if rec.error is not None:
            return ScoreResult(rec, error=rec.error)
        url, caption = _clean(rec.url), _clean(rec.caption)
        if not url:
            return ScoreResult(rec, error=MissingUrl("the image URL is empty"))
        if not caption:
            return ScoreResult(rec, error=MissingCaption("the caption is empty"))
        error = self._image_errors.get(url) or self._caption_errors.get(caption)
        if error is not None:
            return ScoreResult(rec, error=error)
        img, txt = self._images.get(url), self._captions.get(caption)
        if img is None or txt is None:  # cannot happen; never let a row vanish if it does
            return ScoreResult(rec, error=InternalError("embedding missing"))
        cos = float(np.clip(np.dot(img.astype(np.float64), txt[0].astype(np.float64)), -1.0, 1.0))
        return ScoreResult(rec, cosine=cos, truncated=bool(txt[1]))

    def score(self, records: Iterable[Record]) -> Iterator[ScoreResult]:
        if self.processes:
            spec = LoaderSpec.of(
                self.fetcher,
                self.model.preprocess,
                self.model.uint8_pixels,
                self.workers,
                self.processes,
                cache=self._cache_spec,
            )
            self._loader = ProcessLoader(spec, self.processes, counts=self.cache.counts if self.cache else None)
        try:
            yield from self._score(records)
        finally:
            if self._loader is not None:
                self._loader.close()
                self._loader = None

    def _score(self, records: Iterable[Record]) -> Iterator[ScoreResult]:
        it = iter(records)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="fetch") as pool:
            current = list(itertools.islice(it, self.window))
            self._submit(pool, current)
            while current:
                upcoming = list(itertools.islice(it, self.window))
                self._submit(pool, upcoming)  # fetched while `current` is embedded
                self._embed_captions(current)
                self._embed_images(current)
                if self.cache is not None:
                    self.stats.cache = self.cache.counts.as_dict()
                for rec in current:
                    result = self._result(rec)
                    self.stats.add(result)
                    yield result
                current = upcoming


def score_pairs(
    records: Iterable[Record],
    model: ClipModel,
    fetcher: Fetcher | None = None,
    *,
    batch_size: int = 32,
    workers: int = 16,
    window: int | None = None,
    stats_out: Callable[[ScoreStats], None] | None = None,
    cache: EmbeddingCache | None = None,
    processes: int = 0,
) -> Iterator[ScoreResult]:
    """Score (image, caption) records in input order with bounded memory. ``processes``: fetch
    and decode in that many worker processes (see ``Scorer``).

    >>> model = load_model("models/clip-vit-base-patch32")            # doctest: +SKIP
    >>> for r in score_pairs([Record("https://x/cat.jpg", "a cat")], model):  # doctest: +SKIP
    ...     print(r.similarity, r.error_text)
    """
    own_fetcher = fetcher is None
    fetcher = fetcher or Fetcher()
    scorer = Scorer(
        model, fetcher, batch_size=batch_size, workers=workers, window=window, cache=cache, processes=processes
    )
    try:
        yield from scorer.score(records)
    finally:
        if stats_out is not None:
            stats_out(scorer.stats)
        if own_fetcher:
            fetcher.close()


def _clean(value: str | None) -> str:
    return value.strip() if isinstance(value, str) else ""


def _is_text(value: str) -> bool:
    """Whether ``value`` is valid Unicode: a lone surrogate (a JSON ``\\ud800`` escape, bytes a
    CSV decoder kept as surrogates) makes every tokenizer fail."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _describe_invalid(value: str) -> str:
    pos = next(i for i, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF)
    return f"lone surrogate U+{ord(value[pos]):04X} at character {pos}"
