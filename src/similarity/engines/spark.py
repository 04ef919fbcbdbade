"""Score a Spark DataFrame: a pandas UDF over the library (``pip install 'text-image-similarity[spark]'``).

    from similarity.engines.spark import score_dataframe
    scored = score_dataframe(df, "/dbfs/models/clip-vit-base-patch32", url_col="url", caption_col="caption")

Every input row and column comes back with ``similarity`` (double), ``cosine`` (double),
``error`` (string, ``code: detail``, null when scored) and ``truncated`` (boolean) appended.
Only the URL and caption columns go to Python (an iterator-of-Series pandas UDF returning the four
scores as one struct); every other column stays in the JVM, untouched by pandas: a NaN stays NaN,
a timestamp pandas cannot hold (0001-01-01, 9999-12-31) stays as it is.

The UDF's function lives in this module, not in the caller's script, so workers import it and the
model cache in ``core`` lives as long as the Python worker: with Spark's default
``spark.python.worker.reuse=true`` the model loads once per worker process and serves every later
batch, task and job there. The package must be installed on every node (a wheel on Databricks or
EMR); the model must be a directory present on every node or an ``s3://`` prefix (copied to local
disk once per node). Each task's inference uses ``spark.task.cpus`` threads unless ``threads`` is
given; ``workers`` is the number of concurrent image fetches per task.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..io.csvfile import OUTPUT_COLUMNS
from .core import JobSpec, check_columns, score_frames

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame

#: The struct column the UDF's scores travel in before they are split into the four columns.
SCORES_COLUMN = "__similarity_scores"


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
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.functions import pandas_udf
    from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType
    from pyspark.util import PythonEvalType

    check_columns(df.columns, url_col, caption_col)
    if "threads" not in settings:
        settings["threads"] = int(df.sparkSession.conf.get("spark.task.cpus", "1") or "1")
    spec = JobSpec.make(
        model_dir, url_col=url_col, caption_col=caption_col, batch_size=batch_size, workers=workers, settings=settings
    )
    schema = StructType(
        [
            StructField("similarity", DoubleType(), True),
            StructField("cosine", DoubleType(), True),
            StructField("error", StringType(), True),
            StructField("truncated", BooleanType(), True),  # Arrow hands the UDF's struct back all-nullable
        ]
    )
    with warnings.catch_warnings():  # the eval type is given, not inferred from type hints: no partial has them
        warnings.filterwarnings("ignore", message=".*preferred to specify type hints", category=UserWarning)
        udf = pandas_udf(  # type: ignore[call-overload]
            functools.partial(score_columns, spec), schema, PythonEvalType.SQL_SCALAR_PANDAS_ITER_UDF
        )
    # Nondeterministic: Spark evaluates it exactly once per row and never inlines it into the four
    # column references below (each would score the partition again).
    udf = udf.asNondeterministic()
    taken = {c.lower() for c in df.columns}
    tmp = SCORES_COLUMN
    while tmp.lower() in taken:
        tmp += "_"
    scored = df.select("*", udf(_column(url_col), _column(caption_col)).alias(tmp))
    fields = [F.col(tmp).getField(name) for name in OUTPUT_COLUMNS]
    # coalesce keeps ``truncated`` non-nullable, as it was (the UDF never returns a null there).
    fields[-1] = F.coalesce(fields[-1], F.lit(False))
    return scored.select("*", *(f.alias(name) for f, name in zip(fields, OUTPUT_COLUMNS))).drop(tmp)


def _column(name: str) -> Any:
    """The top-level column ``name``, even with dots or backticks in it."""
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def score_columns(spec: JobSpec, batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
    """One partition's (URL, caption) Arrow batches, scored in order: one frame of the four
    output columns per batch (runs on the workers)."""
    import pandas as pd

    frames = (pd.DataFrame({spec.url_col: urls, spec.caption_col: captions}) for urls, captions in batches)
    for frame in score_frames(frames, spec):
        yield frame[list(OUTPUT_COLUMNS)].reset_index(drop=True)


def score_partition(spec: JobSpec, frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Whole pandas frames (every column), scored in order: ``mapInPandas``'s form, for callers
    that want it (``score_dataframe`` sends only the URL and caption, through ``score_columns``)."""
    yield from score_frames(frames, spec)
