"""Score a Snowflake table where it lives: a vectorized UDF and a stored procedure
(``pip install 'text-image-similarity[snowpark]'``).

- ``SIMILARITY_SCORE(url, caption)`` (vectorized: Snowflake hands it batches as pandas DataFrames)
  returns one OBJECT per row: ``{similarity, cosine, error, truncated}``, errors per row as
  everywhere (``code: detail``).
- ``SIMILARITY_SCORE_TABLE(source, target, url_col, caption_col)`` writes ``target``: every
  column of ``source`` plus typed ``SIMILARITY``, ``COSINE``, ``ERROR`` and ``TRUNCATED``.

The model comes from a stage through the UDF's imports: a zip of the model directory (unpacked
once per node into /tmp), a folder, or its files imported one by one. It is loaded once per Python
process by the cache in ``core``. The package itself is imported as a zip (``package_zip``), and
fetching http(s) images needs an External Access Integration (see docs/engines.md).

Snowpark's local testing mode can register the UDF but calls a vectorized UDF once per row with
plain values; the handler then scores that row as a one-row batch. The batch path itself
(``score_batch``) is what Snowflake runs and what the tests check on pandas batches.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NoCaptionColumn, NoUrlColumn, RunError
from .core import ColumnConflict, JobSpec, score_frames
from .models import IMPORT_PREFIX

if TYPE_CHECKING:
    import pandas as pd
    from snowflake.snowpark import Session

UDF_NAME = "SIMILARITY_SCORE"
PROC_NAME = "SIMILARITY_SCORE_TABLE"
#: From Snowflake's Anaconda channel: the library's dependencies, ONNX Runtime as the backend.
PACKAGES = (
    "numpy",
    "pandas",
    "pillow",
    "requests",
    "boto3",
    "tokenizers",
    "safetensors",
    "pydantic",
    "pydantic-settings",
    "onnxruntime",
)


def score_batch(frame: pd.DataFrame, spec: JobSpec) -> pd.Series:
    """What the UDF runs on each batch: column 0 the image URL, column 1 the caption (Snowflake
    passes the arguments as positional columns); one dict per row, in order."""
    import pandas as pd

    named = pd.DataFrame({spec.url_col: frame.iloc[:, 0], spec.caption_col: frame.iloc[:, 1]}, index=frame.index)
    scored = next(score_frames([named], spec))
    return pd.Series(
        [
            {
                "similarity": None if math.isnan(s) else s,
                "cosine": None if math.isnan(c) else c,
                "error": e,
                "truncated": bool(t),
            }
            for s, c, e, t in zip(scored["similarity"], scored["cosine"], scored["error"], scored["truncated"])
        ],
        index=frame.index,
        dtype="object",
    )


def udf_handler(spec: JobSpec) -> Callable[..., Any]:
    """The UDF's handler: a pandas DataFrame per batch in Snowflake; one row's values per call
    under Snowpark's local testing (scored as a one-row batch)."""
    import pandas as pd

    def handler(*columns: Any) -> Any:
        if len(columns) == 1 and isinstance(columns[0], pd.DataFrame):
            return score_batch(columns[0], spec)
        return score_batch(pd.DataFrame([list(columns)]), spec).iloc[0]

    handler._sf_vectorized_input = pd.DataFrame  # type: ignore[attr-defined]
    return _without_hints(handler)


def _without_hints(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of ``fn`` without annotations: Snowpark reads a handler's type hints even when the
    types are given, and cannot use ``Any`` or names imported only for type checking."""
    import types

    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__dict__.update(fn.__dict__)
    copy.__annotations__ = {}
    return copy


def udf_spec(model: str, *, batch_size: int = 32, workers: int = 16, **settings: Any) -> JobSpec:
    """The UDF's settings. ``model``: a local directory (local testing), ``import:NAME`` for a file
    or folder the UDF imports from a stage, or ``s3://``. Local paths are refused as images."""
    settings.setdefault("backend", "onnx")
    return JobSpec.make(model, batch_size=batch_size, workers=workers, settings=settings)


def register_udf(
    session: Session,
    spec: JobSpec,
    *,
    name: str = UDF_NAME,
    imports: Sequence[str] = (),
    packages: Sequence[str] = PACKAGES,
    stage_location: str | None = None,
    external_access_integrations: Sequence[str] = (),
    max_batch_size: int | None = 256,
) -> Any:
    """Register the vectorized UDF (permanent when ``stage_location`` is given)."""
    from snowflake.snowpark.functions import pandas_udf
    from snowflake.snowpark.types import PandasDataFrameType, PandasSeriesType, StringType, VariantType

    extra = _registration(stage_location, imports, packages, external_access_integrations)
    return pandas_udf(
        udf_handler(spec),
        return_type=PandasSeriesType(VariantType()),
        input_types=[PandasDataFrameType([StringType(), StringType()])],
        name=name,
        replace=True,
        max_batch_size=max_batch_size,
        session=session,
        **extra,
    )


def _registration(
    stage_location: str | None,
    imports: Sequence[str],
    packages: Sequence[str],
    integrations: Sequence[str] = (),
) -> dict[str, Any]:
    """The keywords a UDF and a procedure registration share; only what is given is passed."""
    extra: dict[str, Any] = {}
    if stage_location:
        extra |= {"is_permanent": True, "stage_location": stage_location}
    if imports:
        extra["imports"] = list(imports)
    if integrations:
        extra["external_access_integrations"] = list(integrations)
    if packages:
        extra["packages"] = list(packages)
    return extra


def _column(columns: Sequence[str], wanted: str, missing: type[RunError]) -> str:
    """Snowflake folds unquoted names to upper case: match a name the way SQL would."""
    for c in columns:
        if c == wanted or c.strip('"') == wanted or c.upper() == wanted.upper():
            return c
    raise missing(f"no column {wanted!r}; the table has {list(columns)!r}")


def score_table(
    session: Session, source: str, target: str, url_col: str, caption_col: str, udf_name: str = UDF_NAME
) -> str:
    """The stored procedure: ``source`` scored into ``target`` (replaced), inside the warehouse.
    Returns a JSON summary: rows, rows scored, rows with an error."""
    from snowflake.snowpark.functions import call_udf, col
    from snowflake.snowpark.types import BooleanType, DoubleType, StringType

    df = session.table(source)
    url = _column(df.columns, url_col, NoUrlColumn)
    caption = _column(df.columns, caption_col, NoCaptionColumn)
    clash = [c for c in df.columns if c.strip('"').upper() in ("SIMILARITY", "COSINE", "ERROR", "TRUNCATED")]
    if clash:
        raise ColumnConflict(f"{source} already has {', '.join(clash)}; the scores would replace it")
    # The UDF's object lands in a scratch column; one the table already has would be replaced.
    taken = {c.strip('"').upper() for c in df.columns}
    scratch = "__SIMILARITY"
    while scratch in taken:
        scratch += "_"
    scored = df.with_column(scratch, call_udf(udf_name, col(url), col(caption)))
    result = col(scratch)
    out = scored.select(
        *[col(c) for c in df.columns],
        result["similarity"].cast(DoubleType()).alias("SIMILARITY"),
        result["cosine"].cast(DoubleType()).alias("COSINE"),
        result["error"].cast(StringType()).alias("ERROR"),
        result["truncated"].cast(BooleanType()).alias("TRUNCATED"),
    )
    out.write.save_as_table(target, mode="overwrite")
    written = session.table(target)
    rows = int(written.count())  # numpy integers under local testing
    errors = int(written.filter(col("ERROR").is_not_null()).count())
    return json.dumps({"target": target, "rows": rows, "scored": rows - errors, "errors": errors})


def register_procedure(
    session: Session,
    *,
    name: str = PROC_NAME,
    imports: Sequence[str] = (),
    packages: Sequence[str] = ("snowflake-snowpark-python", *PACKAGES),
    stage_location: str | None = None,
) -> Any:
    """Register ``score_table`` as a stored procedure (permanent when ``stage_location`` is given)."""
    from snowflake.snowpark.types import StringType

    extra = _registration(stage_location, imports, packages)
    return session.sproc.register(
        _without_hints(score_table),
        return_type=StringType(),
        input_types=[StringType()] * 5,
        name=name,
        replace=True,
        **extra,
    )


def package_zip(dest: str | os.PathLike[str]) -> Path:
    """A zip of this package (``similarity/...``) for a stage: Snowflake puts an imported zip on
    the Python path."""
    root = Path(__file__).resolve().parents[1]
    out = Path(dest)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".typed"):
                zf.write(path, Path("similarity") / path.relative_to(root))
    return out


__all__ = [
    "IMPORT_PREFIX",
    "PACKAGES",
    "PROC_NAME",
    "UDF_NAME",
    "package_zip",
    "register_procedure",
    "register_udf",
    "score_batch",
    "score_table",
    "udf_handler",
    "udf_spec",
]
