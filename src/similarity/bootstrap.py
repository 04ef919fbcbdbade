"""The one place a run is put together: settings in, a configured model, fetcher and scoring
options out. The CLI, the Lambda functions, the ECS task and the engine adapters all call
``build``; they then only parse, call and shape."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .cache import EmbeddingCache, open_cache
from .config import Settings
from .fetch import AddressPolicy, Fetcher
from .model import ClipModel, load_model
from .model.preprocess import set_decode_limits
from .pipeline import FileResult, score_csv, score_pairs
from .types import Record, ScoreResult


class S3Provider:
    """One S3 client for the run, made on first use (``client``: a client, a callable making one,
    or None for ``similarity.aws.make_client``)."""

    def __init__(self, client: Any | Callable[[], Any] | None = None) -> None:
        self._client = client
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            if self._client is None:
                from .aws import make_client

                self._client = make_client("s3")
            elif callable(self._client) and not hasattr(self._client, "get_object"):
                self._client = self._client()
            return self._client


@dataclass
class Runtime:
    """A configured run. The model loads on first use (or ``load()``), once, thread-safely.
    ``cache``: the embedding cache every run of this runtime consults (None: off)."""

    settings: Settings
    fetcher: Fetcher
    s3: S3Provider
    cache: EmbeddingCache | None = None
    _model: ClipModel | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def batch_size(self) -> int:
        return self.settings.score.batch_size

    @property
    def workers(self) -> int:
        return self.settings.score.workers

    @property
    def processes(self) -> int:
        return self.settings.score.processes

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> ClipModel:
        return self.load()

    def load(self) -> ClipModel:
        with self._lock:
            if self._model is None:
                m = self.settings.model
                self._model = load_model(
                    m.dir,
                    backend=m.backend,
                    device=m.device,
                    dtype=m.dtype,
                    threads=m.threads,
                    streams=m.streams,
                    cache_dir=m.ov_cache_dir,
                    jpeg_draft=m.jpeg_draft,
                    pixels=m.pixels,
                )
            return self._model

    def score_pairs(self, records: Iterable[Record], fetcher: Fetcher | None = None) -> Iterator[ScoreResult]:
        return score_pairs(
            records,
            self.model,
            fetcher or self.fetcher,
            batch_size=self.batch_size,
            workers=self.workers,
            cache=self.cache,
            processes=self.processes,
        )

    def score_csv(self, input_uri: str, output_uri: str, **kwargs: Any) -> FileResult:
        kwargs.setdefault("excel_safe", self.settings.score.excel_safe)
        kwargs.setdefault("cache", self.cache)
        s3 = self.s3() if input_uri.startswith("s3://") or output_uri.startswith("s3://") else None
        return score_csv(
            input_uri,
            output_uri,
            self.model,
            self.fetcher,
            s3_client=s3,
            batch_size=self.batch_size,
            workers=self.workers,
            processes=self.processes,
            **kwargs,
        )

    def cache_metrics(self) -> dict[str, int]:
        """Cache counts since the last call, by metric name (empty without a cache)."""
        return self.cache.metrics() if self.cache is not None else {}

    def close(self) -> None:
        self.fetcher.close()
        if self.cache is not None:
            self.cache.close()


def build(
    settings: Settings,
    *,
    s3: Any | Callable[[], Any] | None = None,
    local_paths: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
    default_cache: str = "off",
) -> Runtime:
    """``local_paths``: whether local image paths are read unless ``SIMILARITY_ALLOW_LOCAL_PATHS``
    says otherwise (the CLI: yes; the services: no). ``base_dir``: what relative image paths are
    relative to. ``s3``: an S3 client, or a callable making one when first needed.
    ``default_cache``: the embedding cache when ``SIMILARITY_CACHE`` is unset (the CLI: ``local``;
    the services: ``off``)."""
    provider = S3Provider(s3)
    set_decode_limits(settings.fetch.decode_limits())  # per process: every decode thread shares it
    fetch = settings.fetch.fetch_settings(allow_local_paths=local_paths, pool_size=settings.score.workers)
    fetcher = Fetcher(fetch, AddressPolicy(settings.fetch.networks()), s3_client=provider, base_dir=base_dir)
    cache = open_cache(settings.cache, default=default_cache)
    return Runtime(settings=settings, fetcher=fetcher, s3=provider, cache=cache)
