"""Fetching and decoding in worker processes, for hosts where one Python process cannot feed the
model (a GPU beside many cores: its towers embed thousands of images a second, and one
interpreter's fetch and decode path, bound by its GIL, gives a few hundred).

Each worker process holds its own ``Fetcher`` and a few threads, and turns a chunk of URLs into
model input (the uint8 crop or float32 array) or the row's ``RowError``. Only those come back,
never the downloaded bytes. Its S3 client is made there by ``similarity.aws.make_client`` from the
same environment: a client object cannot cross processes, so one passed to the parent's
``Fetcher`` is not what the workers use. The parent's decode budget is divided among the workers,
so all of them together hold what one process would.

A worker that dies (a decoder crash, the kernel's OOM killer) breaks the pool. The pool is
restarted and what it held sent again (``ProcessLoader``); a URL that kills a worker on its own
gets ``WorkerCrashed``, so one poisonous image costs its own rows and not the run.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cache.cache import Counts, RunCache
from ..cache.keys import Fingerprint
from ..errors import InternalError, WorkerCrashed, WorkersFailing
from ..fetch import AddressPolicy, Fetcher, FetchSettings
from ..model.preprocess import DecodeLimits, PreprocessConfig, decode_limits, load_pixels, set_decode_limits
from .loading import Loaded, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSpec:
    """How a worker opens the parent's embedding cache (``open_cache``'s arguments) and keys it."""

    origin: tuple[Any, str]
    fingerprint: Fingerprint
    dim: int


@dataclass(frozen=True)
class LoaderSpec:
    """What a worker process needs to fetch and decode like the parent (picklable)."""

    fetch: FetchSettings
    policy: AddressPolicy
    preprocess: PreprocessConfig
    uint8: bool
    threads: int
    limits: DecodeLimits
    base_dir: str | None = None
    cache: CacheSpec | None = None
    #: The parent fetcher's end (``Fetcher.until``): ``time.monotonic()`` is the system's monotonic
    #: clock, the same in every process of the machine.
    end: float | None = None

    @classmethod
    def of(
        cls,
        fetcher: Fetcher,
        preprocess: PreprocessConfig,
        uint8: bool,
        threads: int,
        processes: int,
        cache: CacheSpec | None = None,
    ) -> LoaderSpec:
        """The spec for ``processes`` workers loading as ``fetcher`` and ``preprocess`` do, with
        ``threads`` fetches in flight in all of them together."""
        parent = decode_limits()
        limits = dataclasses.replace(parent, budget_megapixels=parent.budget_megapixels / max(processes, 1))
        per_process = max(2, -(-threads // max(processes, 1)))
        return cls(
            fetch=dataclasses.replace(fetcher.settings, pool_size=per_process),
            policy=fetcher.policy,
            preprocess=preprocess,
            uint8=uint8,
            threads=per_process,
            limits=limits,
            base_dir=str(fetcher.base_dir) if fetcher.base_dir is not None else None,
            cache=cache,
            end=fetcher.end,
        )


# -- worker process side
#: A slot's value: the chunk its worker is loading, or one of these.
IDLE, TERMINATED = -1, -2
#: Restarts in a row without a chunk to blame (the workers die before loading anything) that end
#: the run with ``WorkersFailing`` rather than restarting for ever.
MAX_GUILTLESS_RESTARTS = 3


@dataclass
class _Worker:
    spec: LoaderSpec
    fetcher: Fetcher
    pool: ThreadPoolExecutor
    slots: Any
    slot: int
    cache: RunCache | None


_worker: _Worker | None = None


def _init(spec: LoaderSpec, slots: Any, claimed: Any) -> None:
    global _worker
    with claimed.get_lock():
        slot = claimed.value
        claimed.value += 1

    def terminated(signum: int, frame: object) -> None:
        # The pool sends SIGTERM to every worker left when one dies: marking the slot tells the
        # parent this worker's chunk was not what killed it.
        slots[slot] = TERMINATED
        os._exit(1)

    signal.signal(signal.SIGTERM, terminated)
    set_decode_limits(spec.limits)
    fetcher = Fetcher(spec.fetch, spec.policy, base_dir=Path(spec.base_dir) if spec.base_dir else None)
    fetcher = fetcher.until(spec.end)
    run_cache = None
    if spec.cache is not None:
        from ..cache import open_cache

        opened = open_cache(*spec.cache.origin)  # None (with a warning) if the store is out of reach
        fp, dim = spec.cache.fingerprint, spec.cache.dim
        run_cache = RunCache(opened, None, fp, dim, spec.preprocess.max_pixels) if opened is not None else None
    pool = ThreadPoolExecutor(spec.threads, thread_name_prefix="load")
    _worker = _Worker(spec, fetcher, pool, slots, slot, run_cache)


def _pixels(data: bytes) -> np.ndarray:
    assert _worker is not None
    return load_pixels(data, _worker.spec.preprocess, uint8=_worker.spec.uint8)


def _load_one(url: str) -> Loaded:
    assert _worker is not None
    return load_image(url, _worker.fetcher, _pixels, _worker.cache)


def _load_chunk(chunk_id: int, urls: list[str]) -> tuple[list[Loaded], dict[str, int]]:
    """The chunk's results, and the cache counts they took (the parent adds them to its own)."""
    assert _worker is not None
    w = _worker
    # The id stays in the slot after returning: the pool pickles and sends the result after this,
    # and a worker killed then must still name the chunk (the parent counts only undelivered ones).
    w.slots[w.slot] = chunk_id
    if w.cache is not None:
        w.cache.counts = Counts()  # one chunk at a time per worker: these are this chunk's
    results = list(w.pool.map(_load_one, urls))
    return results, (w.cache.counts.as_dict() if w.cache is not None else {})


# -- parent side
@dataclass(eq=False)
class _Chunk:
    id: int
    urls: list[str]
    future: Future[tuple[list[Loaded], dict[str, int]]]
    generation: int
    #: After its pool broke: where its URLs went (the same chunk again, or one chunk per URL).
    then: list[_Chunk] | None = None
    split: bool = False
    #: Sent on its own after it, or the chunk it came from, killed a worker: a death now is its own.
    alone: bool = False


@dataclass(eq=False)
class Handle:
    """One URL's result-to-be: the chunk that holds it and its place there."""

    chunk: _Chunk
    index: int


@dataclass
class _Pool:
    executor: ProcessPoolExecutor
    slots: Any
    generation: int


class ProcessLoader:
    """``processes`` worker processes fetching and decoding per ``spec``. ``load`` sends URLs off
    and hands back one ``Handle`` per URL; ``result`` waits for one.

    When a worker dies, the slot it wrote its chunk's id into before loading names the chunk
    that killed it (the workers the pool then stops with SIGTERM mark theirs). The pool is
    restarted; the other chunks in flight are sent again as they were, the guilty chunk's URLs
    one per chunk, and a URL that kills a worker on its own gets ``WorkerCrashed``.
    """

    def __init__(
        self,
        spec: LoaderSpec,
        processes: int,
        start_method: str = "spawn",
        counts: Counts | None = None,
    ) -> None:
        """``counts``: where the workers' cache counts go (the run's ``RunCache.counts``)."""
        # spawn: the parent may hold CUDA, OpenMP or OpenVINO threads that a fork would copy broken.
        self.spec = spec
        self.counts = counts
        self.processes = max(1, processes)
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._live: dict[int, _Chunk] = {}  # chunks not yet loaded: what a restart sends again
        self._guiltless = 0  # restarts in a row with no chunk to blame
        self._pool = self._start(0)
        self.restarts = 0

    def _start(self, generation: int) -> _Pool:
        slots = self._ctx.Array("q", [IDLE] * self.processes, lock=False)
        claimed = self._ctx.Value("i", 0)
        executor = ProcessPoolExecutor(
            self.processes, mp_context=self._ctx, initializer=_init, initargs=(self.spec, slots, claimed)
        )
        return _Pool(executor, slots, generation)

    def load(self, urls: list[str]) -> list[Handle]:
        """Handles for ``urls``, in that order, sent as about two chunks per worker process."""
        size = max(1, -(-len(urls) // (2 * self.processes)))
        handles: list[Handle] = []
        with self._lock:
            for start in range(0, len(urls), size):
                chunk = self._send_locked(urls[start : start + size])
                handles.extend(Handle(chunk, i) for i in range(len(chunk.urls)))
        return handles

    def _send_locked(self, urls: list[str], alone: bool = False) -> _Chunk:
        chunk_id = next(self._ids)
        while True:
            try:
                fut = self._pool.executor.submit(_load_chunk, chunk_id, urls)
            except BrokenProcessPool:  # it broke since the last look: restart it and try again
                self._restart_locked(self._pool.generation)
                continue
            # Python 3.11's pool fails its pending futures without the submit lock, so a submit
            # racing the break can leave a future nothing will ever settle: treat it as refused.
            if getattr(self._pool.executor, "_broken", False):
                fut.cancel()
                self._restart_locked(self._pool.generation)
                continue
            break
        chunk = _Chunk(chunk_id, urls, fut, self._pool.generation, alone=alone)
        self._live[chunk_id] = chunk
        fut.add_done_callback(lambda f: self._loaded(chunk_id, f))
        return chunk

    def _loaded(self, chunk_id: int, fut: Future[tuple[list[Loaded], dict[str, int]]]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self._live.pop(chunk_id, None)
            self._guiltless = 0
            if self.counts is not None:
                for name, n in fut.result()[1].items():
                    self.counts.add(name, n)

    def _restart_locked(self, broken: int) -> None:
        """Restart the pool of generation ``broken`` (once) and send what it held again."""
        if broken != self._pool.generation:
            return
        old = self._pool
        old.executor.shutdown(wait=True, cancel_futures=True)  # joins the workers: every slot is final
        guilty = {v for v in old.slots if v in self._live}  # delivered chunks left _live already
        self._guiltless = 0 if guilty else self._guiltless + 1
        if self._guiltless >= MAX_GUILTLESS_RESTARTS:
            raise WorkersFailing(
                f"image worker processes died {self._guiltless} times in a row with no image in flight: "
                "they cannot start (see the log above)"
            )
        self._pool = self._start(broken + 1)
        self.restarts += 1
        log.warning("an image worker process died; pool restarted (%d so far)", self.restarts)
        # The old pool's futures have all settled (shutdown joined its manager thread), so the
        # chunks left in _live are exactly those it lost.
        for chunk in [c for c in self._live.values() if c.generation == broken]:
            self._live.pop(chunk.id, None)
            chunk.split = chunk.id in guilty
            if chunk.split and chunk.alone:
                chunk.then = []  # it killed a worker on its own
            elif chunk.split:  # each URL again on its own (one sent alone first time gets a second try)
                chunk.then = [self._send_locked([u], alone=True) for u in chunk.urls]
            else:
                chunk.then = [self._send_locked(chunk.urls, alone=chunk.alone)]

    def result(self, handle: Handle) -> Loaded:
        """The URL's model input or row error, once loaded; waits, and follows it through restarts."""
        while True:
            chunk = handle.chunk
            try:
                return chunk.future.result()[0][handle.index]
            except BrokenProcessPool:
                with self._lock:
                    if chunk.then is None:
                        self._restart_locked(chunk.generation)
                then = chunk.then
                if then is None:  # cannot happen: every chunk of a broken pool is routed on
                    return InternalError("image worker pool broke and this image was not sent again")
                if not then:
                    return WorkerCrashed(
                        "the worker process fetching and decoding this image died on it "
                        "(a decoder crash or the memory limit)"
                    )
                handle.chunk, handle.index = (then[handle.index], 0) if chunk.split else (then[0], handle.index)

    def close(self) -> None:
        with self._lock:
            self._pool.executor.shutdown(wait=True, cancel_futures=True)
