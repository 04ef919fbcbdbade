"""Score a Ray Dataset: ``map_batches`` over an actor pool (``pip install 'text-image-similarity[ray]'``).

    from similarity.engines.ray import score_dataset
    scored = score_dataset(ray.data.read_parquet("s3://bucket/pairs/"), "s3://bucket/models/clip/", concurrency=8)

Each actor loads the model once, in its constructor, and scores every batch Ray hands it; its
URL and caption caches persist across batches. Rows keep every input column and gain
``similarity``, ``cosine``, ``error`` and ``truncated``. Row order follows Ray's own setting
(``DataContext.execution_options.preserve_order``); carry an id column to join on.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from .core import JobSpec, check_columns, new_scorer, runtime_for, score_frames

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from ray.data import Dataset


class BatchScorer:
    """The callable class Ray Data runs as actors: one model per actor."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.scorer = new_scorer(runtime_for(spec))

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        return _typed(next(score_frames([batch], self.spec, scorer=self.scorer)))


def _typed(frame: pd.DataFrame) -> pa.Table:
    """The scored batch as Arrow with the four appended columns typed. From pandas, a batch whose
    rows all scored has an all-null ``error`` and one whose rows all failed all-null scores: Arrow's
    null type, so blocks' schemas would differ and Parquet files written from them would not read
    back as one table."""
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    for name, type_ in (("similarity", pa.float64()), ("cosine", pa.float64()), ("error", pa.string()),
                        ("truncated", pa.bool_())):  # fmt: skip
        i = table.schema.get_field_index(name)
        table = table.set_column(i, pa.field(name, type_), table.column(i).cast(type_))
    return table


def actor_spec(
    model_dir: str | os.PathLike[str],
    *,
    url_col: str,
    caption_col: str,
    num_gpus: float,
    num_cpus: float,
    batch_size: int,
    workers: int,
    **settings: Any,
) -> JobSpec:
    """An actor's settings: CUDA when it has a GPU, ``int(num_cpus)`` inference threads (at least
    one) unless the settings say otherwise."""
    if num_gpus:
        settings.setdefault("device", "cuda")
    settings.setdefault("threads", max(1, int(num_cpus)))
    return JobSpec.make(
        model_dir, url_col=url_col, caption_col=caption_col, batch_size=batch_size, workers=workers, settings=settings
    )


def score_dataset(
    ds: Dataset,
    model_dir: str | os.PathLike[str],
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    concurrency: int | tuple[int, int] | None = None,
    num_gpus: float = 0,
    num_cpus: float = 1,
    batch_size: int = 32,
    workers: int = 16,
    rows_per_call: int = 1024,
    **settings: Any,
) -> Dataset:
    """``ds`` with the four score columns appended, lazily.

    ``concurrency``: actors, fixed (``n``) or autoscaled (``(min, max)``; default from 1 up to what
    the cluster holds). ``num_cpus`` / ``num_gpus``: each actor's share; with a GPU the model runs
    on CUDA (fp16 unless ``dtype`` says otherwise), and inference uses ``int(num_cpus)`` threads
    (at least one) unless ``threads`` is given. ``batch_size``: images per model call;
    ``rows_per_call``: rows per actor call. ``settings``: as for the Spark adapter."""
    import ray.data

    schema = ds.schema(fetch_if_missing=False)
    if schema is not None:
        check_columns(list(schema.names), url_col, caption_col)
    spec = actor_spec(
        model_dir,
        url_col=url_col,
        caption_col=caption_col,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        batch_size=batch_size,
        workers=workers,
        **settings,
    )
    if isinstance(concurrency, tuple):
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    elif concurrency is not None:
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=None)
    return ds.map_batches(
        BatchScorer,
        fn_constructor_kwargs={"spec": spec},
        compute=compute,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_size=rows_per_call,
        batch_format="pandas",
    )
