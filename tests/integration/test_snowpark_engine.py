"""The Snowpark adapter. Snowflake itself cannot run here; Snowpark's local testing mode
(telemetry off) can register and call the UDF and the stored procedure, but calls a vectorized
UDF once per row with plain values. So:

- the function the UDF wraps (``score_batch``) is checked on pandas batches, as Snowflake passes
  them (positional columns), against the CLI on the hostile CSV;
- the UDF and the stored procedure are registered and run in local testing (row by row there);
- the model from Snowflake's import directory (a staged zip) is checked with a real import
  directory laid out as Snowflake does, loaded once per process.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("snowflake.snowpark", reason="the [snowpark] extra is not installed")

import pandas as pd

from similarity.engines import core
from similarity.engines.snowpark import (
    PROC_NAME,
    UDF_NAME,
    package_zip,
    register_procedure,
    register_udf,
    score_batch,
    udf_spec,
)
from support.engines import (
    ENGINE_SETTINGS,
    Scored,
    assert_same_scores,
    cli_scores,
    hostile_rows,
    load_records,
    write_csv,
)


@pytest.fixture(scope="module")
def session():
    from snowflake.snowpark import Session
    from snowflake.snowpark.mock._telemetry import LocalTestOOBTelemetryService

    LocalTestOOBTelemetryService.get_instance().disable()
    s = (
        Session.builder.config("local_testing", True)
        # Local testing posts its own telemetry to snowflakecomputing.com unless told not to.
        .config("disable_local_testing_telemetry", True)
        .create()
    )
    s.telemetry_enabled = False
    assert s._conn._oob_telemetry.enabled is False
    yield s
    s.close()


@pytest.fixture(scope="module")
def spec(tiny_clip_dir):
    return udf_spec(str(tiny_clip_dir), **ENGINE_SETTINGS)


def _as_scored(value: dict) -> Scored:
    return Scored(value["similarity"], value["cosine"], value["error"] or "", value["truncated"])


def test_udf_batches_match_the_cli(spec, server, forbidden_server, tmp_path, tiny_clip_dir) -> None:
    h = hostile_rows(server, forbidden_server)
    cli = cli_scores(write_csv(tmp_path / "in.csv", h.rows), tiny_clip_dir, tmp_path / "out.csv")
    got: dict[str, Scored] = {}
    for start in range(0, len(h.rows), 25):  # batches, as Snowflake hands them to the UDF
        rows = h.rows[start : start + 25]
        frame = pd.DataFrame([[r[1] or None, r[2] or None] for r in rows], index=range(start, start + len(rows)))
        out = score_batch(frame, spec)
        assert list(out.index) == list(frame.index)
        got |= {r[0]: _as_scored(v) for r, v in zip(rows, out)}
    assert_same_scores(got, cli)
    assert h.expected_codes <= {s.code for s in got.values()}


def test_udf_runs_in_local_testing(session, spec, server) -> None:
    from snowflake.snowpark.functions import call_udf, col

    url = server.url("/eng/0.png")
    register_udf(session, spec, packages=())
    df = session.create_dataframe(
        pd.DataFrame({"ID": [1, 2, 3], "URL": [url, url, None], "CAPTION": ["a red circle", "", "a red circle"]})
    )
    rows = df.select(col("ID"), call_udf(UDF_NAME, col("URL"), col("CAPTION")).alias("S")).sort("ID").collect()
    values = [r["S"] if isinstance(r["S"], dict) else json.loads(r["S"]) for r in rows]
    assert values[0]["error"] is None and 0 < values[0]["similarity"] < 1 and values[0]["truncated"] is False
    assert values[1]["error"].startswith("missing_caption") and values[1]["similarity"] is None
    assert values[2]["error"].startswith("missing_url")
    direct = score_batch(pd.DataFrame([[url, "a red circle"]]), spec)[0]
    assert values[0]["similarity"] == direct["similarity"]


def test_stored_procedure_scores_a_table_into_a_new_one(session, spec, server) -> None:
    url = server.url("/eng/0.png")
    register_udf(session, spec, packages=())
    register_procedure(session, packages=())
    source = pd.DataFrame(
        {
            "ID": [1, 2, 3, 4],
            "IMAGE_URL": [url, url, "ftp://x/y.png", url],
            "TEXT": ["a red circle", "a blue square", "x", ""],
        }
    )
    session.create_dataframe(source).write.save_as_table("CAPTIONS", mode="overwrite")
    summary = json.loads(session.call(PROC_NAME, "CAPTIONS", "CAPTIONS_SCORED", "image_url", "text", UDF_NAME))
    assert summary == {"target": "CAPTIONS_SCORED", "rows": 4, "scored": 2, "errors": 2}
    out = session.table("CAPTIONS_SCORED").to_pandas().sort_values("ID")
    assert list(out.columns) == ["ID", "IMAGE_URL", "TEXT", "SIMILARITY", "COSINE", "ERROR", "TRUNCATED"]
    assert out["SIMILARITY"].iloc[0] > out["SIMILARITY"].iloc[1]  # the true caption wins
    assert out["ERROR"].iloc[2].startswith("unsupported_source") and out["ERROR"].iloc[3].startswith("missing_caption")
    assert out["SIMILARITY"].iloc[2:].isna().all() and out["TRUNCATED"].dtype == bool


def test_stored_procedure_carries_a_column_named_like_its_scratch_column(session, spec, server) -> None:
    # Before: the procedure's scratch column __SIMILARITY replaced the table's own, whose values
    # were lost to the UDF's objects.
    url = server.url("/eng/0.png")
    register_udf(session, spec, packages=())
    register_procedure(session, packages=())
    source = pd.DataFrame(
        {"ID": [1, 2], "URL": [url, url], "CAPTION": ["a red circle", "x"], "__SIMILARITY": ["a", "b"]}
    )
    session.create_dataframe(source).write.save_as_table("SCRATCH", mode="overwrite")
    session.call(PROC_NAME, "SCRATCH", "SCRATCH_SCORED", "url", "caption", UDF_NAME)
    out = session.table("SCRATCH_SCORED").to_pandas().sort_values("ID")
    assert list(out.columns) == ["ID", "URL", "CAPTION", "__SIMILARITY", "SIMILARITY", "COSINE", "ERROR", "TRUNCATED"]
    assert list(out["__SIMILARITY"]) == ["a", "b"] and out["ERROR"].isna().all()


def test_stored_procedure_names_a_missing_column(session, spec) -> None:
    register_procedure(session, packages=())
    session.create_dataframe(pd.DataFrame({"URL": ["u"], "TEXT": ["c"]})).write.save_as_table("T", mode="overwrite")
    with pytest.raises(Exception, match="no column 'caption'"):
        session.call(PROC_NAME, "T", "T2", "url", "caption", UDF_NAME)


def test_model_from_the_import_directory_loads_once(tiny_clip_dir, tmp_path, monkeypatch) -> None:
    """As Snowflake lays it out: each import a file in the directory that
    sys._xoptions['snowflake_import_directory'] names; a zip is not unpacked for us."""
    imports = tmp_path / "imports"
    imports.mkdir()
    with zipfile.ZipFile(imports / "tiny-clip.zip", "w") as zf:
        for f in Path(tiny_clip_dir).iterdir():
            zf.write(f, f"tiny-clip/{f.name}")
    package_zip(imports / "similarity.zip")
    monkeypatch.setitem(sys._xoptions, "snowflake_import_directory", str(imports))
    monkeypatch.setenv("SIMILARITY_ENGINE_MODEL_CACHE", str(tmp_path / "models"))
    monkeypatch.setenv("SIMILARITY_ENGINE_LOAD_LOG", str(tmp_path / "loads"))
    monkeypatch.setattr(core, "CACHE", core.ModelCache())  # a fresh process, as far as the cache knows
    spec = udf_spec("import:tiny-clip.zip", backend="torch")
    batch = pd.DataFrame([["data:image/png,x", "a caption"], [None, "a caption"]])
    for _ in range(3):
        out = score_batch(batch, spec)
        assert out[0]["error"].startswith("invalid_data_uri") and out[1]["error"].startswith("missing_url")
    [load] = load_records(tmp_path / "loads")
    assert load["copied"] is True and Path(load["local_dir"]).parent == tmp_path / "models"
    names = zipfile.ZipFile(imports / "similarity.zip").namelist()
    assert "similarity/engines/snowpark.py" in names and "similarity/bootstrap.py" in names
