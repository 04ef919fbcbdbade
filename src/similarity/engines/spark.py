"""Score a Spark DataFrame: ``mapInPandas`` over the library (``pip install 'text-image-similarity[spark]'``).

    from similarity.engines.spark import score_dataframe
    scored = score_dataframe(df, "/dbfs/models/clip-vit-base-patch32", url_col="url", caption_col="caption")

Every input row and column comes back with ``similarity`` (double), ``cosine`` (double),
``error`` (string, ``code: detail``, null when scored) and ``truncated`` (boolean) appended.

The partition function lives in this module, not in the caller's script, so workers import it
and the model cache in ``core`` lives as long as the Python worker: with Spark's default
``spark.python.worker.reuse=true`` the model loads once per worker process and serves every later
batch, task and job there. The package must be installed on every node (a wheel on Databricks or
EMR); the model must be a directory present on every node or an ``s3://`` prefix (copied to local
disk once per node). Each task's inference uses ``spark.task.cpus`` threads unless ``threads`` is
given; ``workers`` is the number of concurrent image fetches per task.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .core import JobSpec, check_columns, score_frames

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame


def score_dataframe(
    df: DataFrame,
    model_dir: str | os.PathLike[str],
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    batch_size: int = 32,
    workers: int = 16,
    **settings: Any,
) -> DataFrame:
    """``df`` with the four score columns appended. ``settings``: the library's settings by field
    name (``backend``, ``dtype``, ``deadline``, ``allowed_networks``, ...; see
    ``core.SETTING_FIELDS``), over the driver's ``SIMILARITY_*`` environment. Local image paths
    are refused unless ``allow_local_paths=True``. Lazy, like any transformation: nothing runs
    until an action."""
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

    check_columns(df.columns, url_col, caption_col)
    if "threads" not in settings:
        settings["threads"] = int(df.sparkSession.conf.get("spark.task.cpus", "1") or "1")
    spec = JobSpec.make(
        model_dir, url_col=url_col, caption_col=caption_col, batch_size=batch_size, workers=workers, settings=settings
    )
    schema = StructType(
        [
            *df.schema.fields,
            StructField("similarity", DoubleType(), True),
            StructField("cosine", DoubleType(), True),
            StructField("error", StringType(), True),
            StructField("truncated", BooleanType(), False),
        ]
    )
    return df.mapInPandas(functools.partial(score_partition, spec), schema)


def score_partition(spec: JobSpec, frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """One partition's Arrow batches, scored in order (runs on the workers)."""
    yield from score_frames(frames, spec)
