"""What every engine adapter shares.

- ``JobSpec``: the settings a job runs with, made and validated on the driver from the
  environment plus keyword arguments named as the settings' fields (the same names and checks as
  the CLI's), then pickled to the workers.
- ``runtime_for``: one ``bootstrap.Runtime`` (model, fetcher) per worker process and spec, built on
  first use and reused by every later batch, task or call in that process.
- ``score_frames``: pandas batches in, the same batches out with ``similarity``, ``cosine``,
  ``error`` and ``truncated`` appended, through the library's ``Scorer``: all batches of one call
  stream through one scorer, so URLs and captions repeated within a partition are fetched and
  encoded once, and the per-row error codes are the CLI's.

Engines import this module on their workers, so it must stay importable (the installed package)
for the cache to live as long as the worker process does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bootstrap import Runtime, build
from ..config import EngineSettings, FetchConfig, ModelSettings, ScoreSettings, Settings, load, validated
from ..errors import ConfigError, FieldTooLarge, NoCaptionColumn, NoUrlColumn, RunError
from ..io.csvfile import DEFAULT_MAX_FIELD, OUTPUT_COLUMNS
from ..pipeline import Scorer
from ..types import Record, ScoreResult
from .models import IMPORT_PREFIX, default_cache_root, resolve_model

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: The settings a job may set by keyword, each mapped to its (section, field). ``model_dir``,
#: ``batch_size`` and ``workers`` are arguments of their own; those left out only concern files the
#: CLI writes. The embedding cache goes by the CLI's names (``cache``, ``cache_ttl``); its other
#: fields come from the driver's ``SIMILARITY_CACHE_*`` variables.
SETTING_FIELDS: dict[str, tuple[str, str]] = {
    **{
        name: (section, name)
        for section, cls in (("model", ModelSettings), ("fetch", FetchConfig), ("score", ScoreSettings))
        for name in cls.model_fields
        if name not in ("dir", "batch_size", "workers", "excel_safe", "commit_rows", "commit_seconds")
    },
    "cache": ("cache", "store"),
    "cache_ttl": ("cache", "ttl"),
}


class ColumnConflict(RunError):
    """The input already has a column the adapter appends."""

    code = "column_conflict"


def check_columns(columns: Sequence[str], url_col: str, caption_col: str) -> None:
    """The input's columns can be scored: both named columns exist, no output column does."""
    cols = list(columns)
    if url_col not in cols:
        raise NoUrlColumn(f"no image URL column {url_col!r}; the input has {cols!r}")
    if caption_col not in cols:
        raise NoCaptionColumn(f"no caption column {caption_col!r}; the input has {cols!r}")
    # Case-insensitive: Spark (and Snowflake) resolve names that way, so an input "Error" would
    # make the appended "error" ambiguous, never selectable.
    clash = [c for c in cols if c.lower() in OUTPUT_COLUMNS]
    if clash:
        raise ColumnConflict(f"the input already has {', '.join(map(repr, clash))}; rename or drop it first")


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to score: every setting resolved (``Settings.model_dump``), so workers
    do not depend on their own environment, and the two column names."""

    settings: dict[str, Any]
    url_col: str = "url"
    caption_col: str = "caption"

    @classmethod
    def make(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        url_col: str = "url",
        caption_col: str = "caption",
        batch_size: int = 32,
        workers: int = 16,
        settings: Mapping[str, Any] | None = None,
        base: Settings | None = None,
    ) -> JobSpec:
        """``base`` (default: the environment's settings, as the CLI reads them) with the model
        directory, batch size, workers and ``settings`` laid over it, each validated; a bad or
        unknown name raises ``ConfigError`` naming the keyword."""
        given = dict(settings or {})
        unknown = sorted(set(given) - set(SETTING_FIELDS))
        if unknown:
            raise ConfigError(
                f"unknown setting {', '.join(unknown)}; the settings are {', '.join(sorted(SETTING_FIELDS))}"
            )
        source = os.fspath(model_dir)
        if "://" not in source and not source.startswith(IMPORT_PREFIX) and Path(source).exists():
            source = str(Path(source).resolve())  # workers need not share the driver's working directory
        by_section: dict[str, dict[str, Any]] = {
            "model": {"dir": source},
            "fetch": {},
            "score": {"batch_size": batch_size, "workers": workers},
            "cache": {},
        }
        keyword: dict[str, dict[str, str]] = {s: {} for s in by_section}
        for name, value in given.items():
            section, field = SETTING_FIELDS[name]
            by_section[section][field] = value
            keyword[section][field] = f"keyword {name}"
        resolved = base or load(Settings)
        for section, values in by_section.items():
            resolved = resolved.with_overrides(
                section,
                values,
                {k: keyword[section].get(k, "model_dir" if k == "dir" else f"keyword {k}") for k in values},
            )
        return cls(resolved.model_dump(mode="json"), url_col, caption_col)

    @property
    def key(self) -> str:
        return json.dumps(self.settings, sort_keys=True)

    @property
    def model_source(self) -> str:
        return str(self.settings["model"]["dir"])

    def resolved(self) -> Settings:
        return validated(Settings, self.settings)


class ModelCache:
    """One ``Runtime`` per spec in this process, loaded once (thread-safe)."""

    def __init__(self) -> None:
        self._runtimes: dict[str, Runtime] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, spec: JobSpec) -> Runtime:
        with self._lock:
            runtime = self._runtimes.get(spec.key)
            if runtime is None:
                runtime = self._load(spec)
                self._runtimes[spec.key] = runtime
            return runtime

    def _load(self, spec: JobSpec) -> Runtime:
        engine = validated(EngineSettings)
        start = time.perf_counter()
        settings = spec.resolved()
        local = resolve_model(
            spec.model_source, Path(engine.model_cache_dir) if engine.model_cache_dir else default_cache_root()
        )
        runtime = build(settings.with_overrides("model", {"dir": str(local.path)}), local_paths=False)
        info = runtime.load().info
        self.loads += 1
        record = {
            "pid": os.getpid(),
            "model": spec.model_source,
            "local_dir": str(local.path),
            "copied": local.copied,
            "backend": info.backend,
            "device": info.device,
            "dtype": info.dtype,
            "seconds": round(time.perf_counter() - start, 3),
        }
        record_load(record, engine)
        return runtime

    def clear(self) -> None:
        with self._lock:
            for runtime in self._runtimes.values():
                runtime.close()
            self._runtimes.clear()


def record_load(record: dict[str, Any], engine: EngineSettings | None = None) -> None:
    """Log one model load and, when ``SIMILARITY_ENGINE_LOAD_LOG`` names a directory, write it
    there as one JSON file (a count of loads per process that outlives the process)."""
    engine = engine or validated(EngineSettings)
    log.info("model loaded: %s", json.dumps(record))
    if engine.load_log_dir:
        out = Path(engine.load_log_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"load-{os.getpid()}-{time.time_ns()}.json").write_text(json.dumps(record) + "\n")


#: This process's models: engines reuse worker processes, and with them this cache.
CACHE = ModelCache()


def runtime_for(spec: JobSpec) -> Runtime:
    return CACHE.get(spec)


def new_scorer(runtime: Runtime) -> Scorer:
    return Scorer(
        runtime.model, runtime.fetcher, batch_size=runtime.batch_size, workers=runtime.workers, cache=runtime.cache
    )


def cell_text(value: Any) -> str | None:
    """A DataFrame cell as the scorer's text: null (None, NaN, NA) is None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    return str(value)


def frame_records(frame: pd.DataFrame, url_col: str, caption_col: str) -> Iterator[Record]:
    """One record per row. Cells over the CLI's field limit get its ``field_too_large`` error."""
    for url, caption in zip(frame[url_col].tolist(), frame[caption_col].tolist()):
        u, c = cell_text(url), cell_text(caption)
        error = None
        for name, value in ((url_col, u), (caption_col, c)):
            if value is not None and len(value) > DEFAULT_MAX_FIELD:
                error = FieldTooLarge(f"{name!r} has {len(value)} characters, limit {DEFAULT_MAX_FIELD}")
                break
        yield Record(u, c, error=error)


def with_scores(frame: pd.DataFrame, results: Sequence[ScoreResult]) -> pd.DataFrame:
    """``frame`` with the four output columns appended (null similarity and cosine on errors)."""
    import pandas as pd

    if len(results) != len(frame):  # the scorer yields one result per record; never drop a row
        raise RuntimeError(f"{len(results)} results for {len(frame)} rows")
    idx = frame.index
    return frame.assign(
        similarity=pd.Series([r.similarity for r in results], index=idx, dtype="float64"),
        cosine=pd.Series([r.cosine_rounded for r in results], index=idx, dtype="float64"),
        error=pd.Series([r.error_text or None for r in results], index=idx, dtype="object"),
        truncated=pd.Series([r.truncated for r in results], index=idx, dtype="bool"),
    )


def score_frames(frames: Iterable[pd.DataFrame], spec: JobSpec, scorer: Scorer | None = None) -> Iterator[pd.DataFrame]:
    """Each frame back, in order, scored. All frames stream through one scorer (``scorer``, or a
    new one on this process's runtime), so fetching overlaps inference across frame boundaries."""
    scorer = scorer or new_scorer(runtime_for(spec))
    queue: deque[pd.DataFrame] = deque()

    def records() -> Iterator[Record]:
        for frame in frames:
            queue.append(frame)
            yield from frame_records(frame, spec.url_col, spec.caption_col)

    done: list[ScoreResult] = []
    for result in scorer.score(records()):
        done.append(result)
        while queue and len(done) >= len(queue[0]):  # also lets empty frames through
            frame = queue.popleft()
            yield with_scores(frame, done[: len(frame)])
            del done[: len(frame)]
    while queue:  # empty frames after the last row
        frame = queue.popleft()
        yield with_scores(frame, done[: len(frame)])
        del done[: len(frame)]
