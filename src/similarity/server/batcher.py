"""Micro-batching across concurrent requests, without a web framework.

Each request hands its rows to ``MicroBatcher.submit`` and gets a future. Image fetches (and their
decoding) run in one thread pool shared by every request; each fetched image and each caption
joins a queue. One inference thread takes up to ``batch_size`` inputs from a queue when that many
are waiting, or when the oldest has waited ``max_wait`` seconds, and embeds them together, whichever
requests they came from. A request's future resolves as soon as its own rows are done, so a slow
image delays only its own request, and only until the fetch deadline the request gave its fetcher
turns it into a ``timeout`` row.

Rows come out exactly as ``pipeline.Scorer`` makes them (same checks, same error codes and texts,
same cosine), so a server answers what the Lambda answers for the same body. A model call that
fails is retried one input at a time, so a poison input costs its own row, never its batch.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from ..cache import Hit, Miss, RunCache
from ..errors import (
    FetchTimeout,
    InferenceError,
    InternalError,
    InvalidCaption,
    MissingCaption,
    MissingUrl,
    RowError,
    SimilarityError,
)
from ..fetch import Fetcher
from ..model import ClipModel
from ..pipeline.scorer import _clean, _describe_invalid, _is_text  # the Scorer's own checks
from ..types import Record, ScoreResult

log = logging.getLogger(__name__)

Tower = Literal["image", "text"]


class QueueFull(SimilarityError):
    """More rows are in flight than the batcher admits."""

    code = "overloaded"


class BatcherClosed(SimilarityError):
    code = "shutting_down"


class ClientClosed(RowError):
    """The request's client went away before this row was scored; nobody reads the row."""

    code = "client_closed"


class Abandon:
    """Set by the front when a request's client has gone; the batcher then drops the request's
    rows (queued inputs are skipped, fetches not yet started never start) and its waiting thread
    returns at once, rather than at the request's deadline."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.is_set = False

    def set(self) -> None:
        with self._lock:
            self.is_set, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self.is_set:
                self._callbacks.append(callback)
                return
        callback()


class BatchObserver(Protocol):
    """What the batcher reports as it works (the server turns it into Prometheus metrics)."""

    def batch(self, tower: Tower, size: int, seconds: float) -> None: ...

    def fetched(self, seconds: float, error_code: str | None) -> None: ...

    def depth(self, waiting: int, in_flight: int) -> None: ...


class NullObserver:
    def batch(self, tower: Tower, size: int, seconds: float) -> None:
        pass

    def fetched(self, seconds: float, error_code: str | None) -> None:
        pass

    def depth(self, waiting: int, in_flight: int) -> None:
        pass


# ---------------------------------------------------------------------------------- one request
class _Ticket:
    """One request's rows; its future resolves when the last one is set (or at its deadline)."""

    def __init__(self, records: Sequence[Record]) -> None:
        self.records = records
        self.results: list[ScoreResult | None] = [None] * len(records)
        self.left = len(records)
        self.future: Future[list[ScoreResult]] = Future()
        self.lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self.future.done()

    def _resolve_if_complete(self) -> None:
        if self.left == 0 and not self.future.done():
            self.future.set_result([r for r in self.results if r is not None])


@dataclass(eq=False)
class _Row:
    ticket: _Ticket
    index: int
    record: Record
    image: np.ndarray | RowError | None = None  # unit embedding, or why there is none
    text: tuple[np.ndarray, bool] | RowError | None = None  # (unit embedding, truncated)


@dataclass(eq=False)
class _Item:
    """One input waiting for a tower, with the rows that need it (one request's duplicates)."""

    value: np.ndarray | Miss | str  # pixels (with the cache: a Miss holding them), or the caption
    rows: list[_Row]
    since: float = field(default_factory=time.monotonic)

    def wanted(self) -> bool:
        return any(not r.ticket.done for r in self.rows)


# ---------------------------------------------------------------------------------- the batcher
class MicroBatcher:
    """Thread-safe; one per model. ``start()`` before use, ``close()`` to drain and stop.

    ``max_rows``: rows admitted at once (fetching or waiting); ``submit`` raises ``QueueFull``
    beyond it so an overloaded server sheds load instead of queueing past every deadline."""

    def __init__(
        self,
        model: ClipModel,
        *,
        batch_size: int = 32,
        max_wait: float = 0.005,
        workers: int = 16,
        max_rows: int = 1024,
        observer: BatchObserver | None = None,
        cache: RunCache | None = None,
    ) -> None:
        self.model = model
        #: The embedding cache, consulted as the Scorer does: an image by its URL record and content
        #: hash before it is embedded, a caption before it is encoded; new embeddings stored.
        self.cache = cache
        self.batch_size = max(1, batch_size)
        self.max_wait = max(0.0, max_wait)
        self.max_rows = max(1, max_rows)
        self.observer: BatchObserver = observer or NullObserver()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="batch-fetch")
        self._cond = threading.Condition()
        self._queues: dict[Tower, deque[_Item]] = {"image": deque(), "text": deque()}
        self._in_flight = 0  # rows admitted and not yet finished
        self._tickets: set[_Ticket] = set()  # requests not yet answered
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="batch-inference", daemon=True)

    # -- lifecycle
    def start(self) -> MicroBatcher:
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new rows, let the admitted ones finish (up to ``timeout``), then stop.
        True when everything admitted finished."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closed = True
            while self._in_flight and (end is None or time.monotonic() < end):
                self._cond.wait(0.05 if end is None else max(0.0, min(0.05, end - time.monotonic())))
            drained = self._in_flight == 0
            self._stopping = True
            self._cond.notify_all()
            left = list(self._tickets)
        for ticket in left:  # nobody waits forever on a batcher that is gone
            self._expire(ticket, lambda: FetchTimeout("the server shut down before this row was scored"))
        if self._thread.is_alive():
            self._thread.join(None if end is None else max(0.1, end - time.monotonic()))
        self._pool.shutdown(wait=drained, cancel_futures=True)
        return drained

    @property
    def queue_depth(self) -> int:
        """Inputs (images and captions) waiting for the model."""
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    @property
    def rows_in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    # -- requests
    def score(
        self,
        records: Sequence[Record],
        fetcher: Fetcher,
        timeout: float | None = None,
        *,
        abandon: Abandon | None = None,
    ) -> list[ScoreResult]:
        """Score ``records`` in order. Rows still unfinished after ``timeout`` seconds become
        ``timeout`` rows, so the caller always answers within its own deadline; once ``abandon``
        is set, ``client_closed`` rows."""
        ticket = self._admit(records, fetcher, admit_always=False)
        if abandon is not None:
            abandon.on_set(lambda: self._expire(ticket, lambda: ClientClosed("the client closed the connection")))
        return self._wait(ticket, timeout)

    def submit(
        self, records: Sequence[Record], fetcher: Fetcher, *, admit_always: bool = False, inline: bool = False
    ) -> Future[list[ScoreResult]]:
        """The future of ``records``' results, in order. ``admit_always``: never ``QueueFull``
        (the readiness canary must not be shed with client load). ``inline``: images are loaded
        in the calling thread, not the shared fetch pool (the canary's data: URI must not wait
        behind slow client image hosts; it still goes through the inference thread)."""
        return self._admit(records, fetcher, admit_always=admit_always, inline=inline).future

    def _wait(self, ticket: _Ticket, timeout: float | None) -> list[ScoreResult]:
        try:
            return ticket.future.result(timeout)
        except FutureTimeout:
            self._expire(ticket, lambda: FetchTimeout("the request's deadline passed before this row was scored"))
            return ticket.future.result()

    def _admit(
        self, records: Sequence[Record], fetcher: Fetcher, *, admit_always: bool, inline: bool = False
    ) -> _Ticket:
        ticket = _Ticket(records)
        images: dict[str, list[_Row]] = {}  # one fetch per distinct URL of this request
        captions: dict[str, list[_Row]] = {}
        for i, rec in enumerate(records):
            early = _precheck(rec)
            if early is not None:
                ticket.results[i] = early
                ticket.left -= 1
                continue
            row = _Row(ticket, i, rec)
            images.setdefault(_clean(rec.url), []).append(row)
            caption = _clean(rec.caption)
            if _is_text(caption):
                captions.setdefault(caption, []).append(row)
            else:  # no tokenizer can encode it; the image still decides first, as in the Scorer
                row.text = InvalidCaption(_describe_invalid(caption))
        work = ticket.left
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            if work and not admit_always and self._in_flight + work > self.max_rows:
                raise QueueFull(f"{self._in_flight} rows are in flight; at most {self.max_rows} are admitted")
            ticket._resolve_if_complete()  # every row answered already (empty URLs, captions)
            if not work:
                return ticket
            self._in_flight += work
            self._tickets.add(ticket)
            ticket.future.add_done_callback(lambda _: self._forget(ticket))
            now = time.monotonic()
            for caption, rows in captions.items():
                self._queues["text"].append(_Item(caption, rows, now))
            self._cond.notify_all()
            self._report()
        for url, rows in images.items():
            if inline:
                self._load_safely(url, rows, fetcher)
                continue
            # The request's log context follows its fetches (one copy each: a context cannot be
            # entered by two threads at once).
            self._pool.submit(contextvars.copy_context().run, self._load_safely, url, rows, fetcher)
        return ticket

    def _forget(self, ticket: _Ticket) -> None:
        with self._cond:
            self._tickets.discard(ticket)

    # -- fetch threads
    def _load_safely(self, url: str, rows: list[_Row], fetcher: Fetcher) -> None:
        try:
            self._load(url, rows, fetcher)
        except Exception:  # a bug here must not leave the rows waiting until their deadline
            log.exception("image load failed")
            self._set_image(rows, InternalError("image load failed"))

    def _load(self, url: str, rows: list[_Row], fetcher: Fetcher) -> None:
        if all(r.ticket.done for r in rows):
            return  # answered already (its deadline passed while this waited for a fetch thread)
        start = time.perf_counter()
        data: bytes | None = None
        error: RowError | None = None
        loaded: np.ndarray | Miss | None = None
        try:
            if self.cache is not None:  # the lookup, the (conditional) download and the decode
                found = self.cache.load_image(url, fetcher, self.model.pixels)
                if isinstance(found, Hit):
                    self.observer.fetched(time.perf_counter() - start, None)
                    self._set_image(rows, found.embedding)
                    return
                loaded = found
            else:
                data = fetcher.fetch(url)
        except RowError as exc:
            error = exc
        except Exception as exc:
            log.exception("unexpected error fetching %s", url[:200])
            error = InternalError(f"{type(exc).__name__} while loading image")
        self.observer.fetched(time.perf_counter() - start, error.code if error else None)
        if error is None and data is not None:
            try:
                loaded = self.model.pixels(data)
            except RowError as exc:
                error = exc
            except Exception as exc:
                log.exception("unexpected error decoding %s", url[:200])
                error = InternalError(f"{type(exc).__name__} while loading image")
        if error is not None or loaded is None:
            self._set_image(rows, error or InternalError("image load failed"))
            return
        with self._cond:
            self._queues["image"].append(_Item(loaded, rows))
            self._cond.notify_all()
            self._report()

    # -- the inference thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not any(self._queues.values()):
                    if self._stopping:
                        return
                    self._cond.wait()
                oldest = min(q[0].since for q in self._queues.values() if q)
                while not self._stopping and all(len(q) < self.batch_size for q in self._queues.values()):
                    left = oldest + self.max_wait - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                texts = self._take("text")
                images = self._take("image")
                self._report()
            try:
                if texts:
                    self._embed_texts(texts)
                if images:
                    self._embed_images(images)
            except Exception:  # a bug here must not stop the thread every request waits on
                log.exception("batch delivery failed")
                for item in (*texts, *images):
                    for row in item.rows:
                        self._finish(row, InternalError("batch delivery failed"))

    def _take(self, tower: Tower) -> list[_Item]:
        q, out = self._queues[tower], list[_Item]()
        while q and len(out) < self.batch_size:
            item = q.popleft()
            if item.wanted():  # rows already answered (their deadline passed) are not embedded
                out.append(item)
        return out

    def _embed_texts(self, items: list[_Item]) -> None:
        captions = list(dict.fromkeys(str(i.value) for i in items))  # one caption, many requests
        known: dict[str, tuple[np.ndarray, bool] | RowError] = {}
        if self.cache is not None:
            known.update(self.cache.captions(captions))
        todo = [c for c in captions if c not in known]
        if todo:
            out = self._call("text", todo, lambda chunk: _texts(self.model, chunk))
            known.update(zip(todo, out, strict=True))
            if self.cache is not None:  # stored, and answered as stored (as the Scorer does)
                new = [(c, v) for c, v in zip(todo, out, strict=True) if not isinstance(v, RowError)]
                if new:
                    embs = np.stack([v[0] for _, v in new])
                    stored = self.cache.store_captions([c for c, _ in new], embs, [v[1] for _, v in new])
                    known.update({c: (e, v[1]) for (c, v), e in zip(new, stored, strict=True)})
        for item in items:
            value = known[str(item.value)]
            for row in item.rows:
                self._set_text(row, value)

    def _embed_images(self, items: list[_Item]) -> None:
        pixels = [i.value.pixels if isinstance(i.value, Miss) else i.value for i in items]
        out = self._call("image", pixels, lambda chunk: list(self.model.embed_images(np.stack(chunk))))
        if self.cache is not None:  # stored, and answered as stored (as the Scorer does)
            new = [k for k, v in enumerate(out) if isinstance(items[k].value, Miss) and not isinstance(v, RowError)]
            if new:
                misses = [items[k].value for k in new]
                stored = self.cache.store_images(misses, np.stack([out[k] for k in new]))  # type: ignore[arg-type]
                for k, emb in zip(new, stored, strict=True):
                    out[k] = emb
        for item, value in zip(items, out, strict=True):
            self._set_image(item.rows, value)

    def _call(self, tower: Tower, inputs: list[Any], fn: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """``fn`` over ``inputs`` as one batch; when it fails, one input at a time, so only the
        inputs that fail alone become ``inference_error``."""
        start = time.perf_counter()
        try:
            out = fn(inputs)
            self.observer.batch(tower, len(inputs), time.perf_counter() - start)
            return out
        except Exception as exc:
            if len(inputs) == 1:
                log.exception("%s tower failed on one input", tower)
                return [InferenceError(f"{type(exc).__name__} in {tower} tower")]
            log.warning("%s batch of %d failed (%s); retrying one at a time", tower, len(inputs), type(exc).__name__)
        return [self._call(tower, [x], fn)[0] for x in inputs]

    # -- results
    def _set_image(self, rows: list[_Row], value: np.ndarray | RowError) -> None:
        for row in rows:
            with row.ticket.lock:
                row.image = value
                ready = row.text is not None
            if ready:
                self._finish(row)

    def _set_text(self, row: _Row, value: tuple[np.ndarray, bool] | RowError) -> None:
        with row.ticket.lock:
            row.text = value
            ready = row.image is not None
        if ready:
            self._finish(row)

    def _finish(self, row: _Row, error: RowError | None = None) -> None:
        result = ScoreResult(row.record, error=error) if error is not None else _result(row)
        t = row.ticket
        with t.lock:
            if t.done or t.results[row.index] is not None:
                return
            t.results[row.index] = result
            t.left -= 1
            t._resolve_if_complete()
        with self._cond:
            self._in_flight -= 1
            self._report()
            if self._closed:
                self._cond.notify_all()

    def _expire(self, ticket: _Ticket, make_error: Callable[[], RowError]) -> None:
        with ticket.lock:
            if ticket.done:
                return
            missing = [i for i, r in enumerate(ticket.results) if r is None]
            for i in missing:
                ticket.results[i] = ScoreResult(ticket.records[i], error=make_error())
            ticket.left = 0
            ticket._resolve_if_complete()
        with self._cond:
            self._in_flight -= len(missing)
            self._report()
            if self._closed:
                self._cond.notify_all()

    def _report(self) -> None:
        """Called with ``_cond`` held, so gauges are set in the order the counts changed."""
        self.observer.depth(sum(len(q) for q in self._queues.values()), self._in_flight)


def _texts(model: ClipModel, captions: list[str]) -> list[tuple[np.ndarray, bool]]:
    embs, truncated = model.embed_texts(captions)
    return list(zip(embs, truncated, strict=True))


def _precheck(rec: Record) -> ScoreResult | None:
    """What ``pipeline.Scorer`` answers without fetching or embedding anything."""
    if rec.error is not None:
        return ScoreResult(rec, error=rec.error)
    if not _clean(rec.url):
        return ScoreResult(rec, error=MissingUrl("the image URL is empty"))
    if not _clean(rec.caption):
        return ScoreResult(rec, error=MissingCaption("the caption is empty"))
    return None


def _result(row: _Row) -> ScoreResult:
    if isinstance(row.image, RowError):
        return ScoreResult(row.record, error=row.image)
    if isinstance(row.text, RowError):
        return ScoreResult(row.record, error=row.text)
    if row.image is None or row.text is None:  # cannot happen; never let a row vanish if it does
        return ScoreResult(row.record, error=InternalError("embedding missing"))
    img, (txt, truncated) = row.image, row.text
    cos = float(np.clip(np.dot(img.astype(np.float64), txt.astype(np.float64)), -1.0, 1.0))
    return ScoreResult(row.record, cosine=cos, truncated=bool(truncated))
