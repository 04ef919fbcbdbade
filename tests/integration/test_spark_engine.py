"""The Spark adapter on a real local[2] Spark (Java 17): the CLI's rows, scores and error codes for
the same hostile CSV, one model per Python worker, poison images contained to their rows, a
model from an s3:// prefix copied once per node, and every socket on loopback. One SparkSession
for the module (it takes 15-30 s to start on 2 shared cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pyspark", reason="the [spark] extra is not installed")

from similarity.engines.local import local_spark
from similarity.engines.spark import score_dataframe
from similarity.errors import ConfigError, NoCaptionColumn, NoUrlColumn
from support.engines import (
    ENGINE_SETTINGS,
    HEADER,
    assert_same_scores,
    cli_scores,
    descendants,
    frame_scores,
    hostile_rows,
    load_records,
    off_loopback,
    sockets_of,
    write_csv,
)

pytestmark = pytest.mark.slow

OUT_COLUMNS = ["similarity", "cosine", "error", "truncated"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, moto_endpoint) -> dict:
    from similarity.aws import make_client

    d = tmp_path_factory.mktemp("spark-engine")
    s3 = make_client("s3")
    bucket = "spark-engine"
    s3.create_bucket(Bucket=bucket)
    return {"dir": d, "loads": d / "loads", "models": d / "models", "s3": s3, "bucket": bucket}


@pytest.fixture(scope="module")
def spark(work):
    env = {
        "SIMILARITY_ENGINE_LOAD_LOG": str(work["loads"]),
        "SIMILARITY_ENGINE_MODEL_CACHE": str(work["models"]),
    }
    # Small Arrow batches: every partition reaches the scorer as several batches.
    with local_spark(2, env=env, conf={"spark.sql.execution.arrow.maxRecordsPerBatch": "16"}) as session:
        yield session


@pytest.fixture(scope="module")
def hostile(work, server, forbidden_server, tiny_clip_dir):
    h = hostile_rows(server, forbidden_server, s3_bucket=work["bucket"])
    path = write_csv(work["dir"] / "hostile.csv", h.rows)
    return {"hostile": h, "path": path, "cli": cli_scores(path, tiny_clip_dir, work["dir"] / "cli.csv")}


@pytest.fixture(scope="module")
def scored(spark, hostile, tiny_clip_dir):
    from pyspark.sql.functions import spark_partition_id

    df = spark.read.csv(str(hostile["path"]), header=True, multiLine=True, escape='"').repartition(3)
    df = df.withColumn("part", spark_partition_id())
    return score_dataframe(df, tiny_clip_dir, **ENGINE_SETTINGS).toPandas()


def test_same_rows_scores_and_error_codes_as_cli(scored, hostile) -> None:
    assert list(scored.columns) == [*HEADER, "part", *OUT_COLUMNS]
    assert len(scored) == len(hostile["hostile"].rows)
    assert_same_scores(frame_scores(scored), hostile["cli"])
    codes = {s.code for s in frame_scores(scored).values()}
    assert hostile["hostile"].expected_codes <= codes
    by_id = {str(r["id"]): r for r in scored.to_dict("records")}
    for row in hostile["hostile"].rows:  # every input column kept as read
        assert by_id[row[0]]["note"] == row[3]
    assert scored["similarity"].dtype == "float64" and scored["truncated"].dtype == "bool"


def test_poison_images_leave_the_rest_of_their_partition_scored(scored, hostile) -> None:
    poison = scored[scored["id"].isin(hostile["hostile"].poison_ids)]
    assert set(poison["error"].str.split(":").str[0]) == {"too_many_pixels", "decode_error", "too_large"}
    for part in set(poison["part"]):
        same = scored[(scored["part"] == part) & (scored["note"] == "good")]
        assert len(same) > 0 and same["error"].isna().all() and same["similarity"].notna().all()


def test_model_loaded_once_per_python_worker(spark, scored, hostile, work, tiny_clip_dir) -> None:
    def loads() -> list[dict]:
        return [r for r in load_records(work["loads"]) if r["model"] == str(Path(tiny_clip_dir).resolve())]

    first = loads()
    assert 1 <= len(first) <= 2  # local[2]: at most two Python workers
    assert len({r["pid"] for r in first}) == len(first)  # never twice in one process
    # More tasks than workers, and a second job: the reused workers keep their model.
    rows = [r for r in hostile["hostile"].rows if r[3] == "good"]
    df = spark.createDataFrame(rows, HEADER).repartition(5)
    assert score_dataframe(df, tiny_clip_dir, **ENGINE_SETTINGS).count() == len(rows)
    assert loads() == first


def test_model_from_s3_prefix_is_copied_once_per_node(spark, work, tiny_clip_dir, server, hostile) -> None:
    s3, bucket = work["s3"], work["bucket"]
    for f in Path(tiny_clip_dir).iterdir():
        s3.upload_file(str(f), bucket, f"models/tiny-clip/{f.name}")
    rows = [r for r in hostile["hostile"].rows if r[3] == "good"][:24]
    df = spark.createDataFrame(rows, HEADER).repartition(4)
    out = score_dataframe(df, f"s3://{bucket}/models/tiny-clip/", **ENGINE_SETTINGS).toPandas()
    assert_same_scores(frame_scores(out), {r[0]: hostile["cli"][r[0]] for r in rows})
    recs = [r for r in load_records(work["loads"]) if r["model"].startswith("s3://")]
    assert len(recs) >= 1 and sum(r["copied"] for r in recs) == 1  # two workers, one copy
    assert len({r["local_dir"] for r in recs}) == 1
    assert Path(recs[0]["local_dir"]).parent == work["models"]


def test_bad_input_fails_before_any_job(spark, tiny_clip_dir) -> None:
    df = spark.createDataFrame([("1", "u", "c")], ["id", "link", "caption"])
    with pytest.raises(NoUrlColumn, match="'url'"):
        score_dataframe(df, tiny_clip_dir)
    with pytest.raises(NoCaptionColumn, match="'text'"):
        score_dataframe(df, tiny_clip_dir, url_col="link", caption_col="text")
    with pytest.raises(ConfigError, match="keyword deadline"):
        score_dataframe(df, tiny_clip_dir, url_col="link", deadline=0)
    with pytest.raises(ConfigError, match="unknown setting timeout"):
        score_dataframe(df, tiny_clip_dir, url_col="link", timeout=3)


def test_missing_model_fails_the_job_with_its_reason(spark, tmp_path) -> None:
    df = spark.createDataFrame([("1", "data:,x", "c")], ["id", "url", "caption"])
    with pytest.raises(Exception, match="model directory .* does not exist"):
        score_dataframe(df, tmp_path / "no-model").collect()


def test_every_spark_socket_is_on_loopback(spark, scored) -> None:
    socks = sockets_of(descendants(__import__("os").getpid()))
    assert any(s.listening for s in socks)  # the JVM's and the workers' listeners are seen
    assert off_loopback(socks) == []


def test_spark_submit_script_csv_to_parquet(spark, hostile, tiny_clip_dir, work) -> None:
    """examples/spark_score.py as spark-submit runs it, on this module's session."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    import spark_score

    rows = [r for r in hostile["hostile"].rows if r[3] != "bad"]  # good and poison: no slow rows
    src = write_csv(work["dir"] / "script.csv", rows)
    out = work["dir"] / "scored.parquet"
    args = spark_score.parse(
        [str(src), str(out), "--model", str(tiny_clip_dir), "--partitions", "2", "--backend", "torch"]
        + ["--allow-network", "127.0.0.1/32"]
    )
    assert spark_score.run(spark, args) == 0
    got = spark.read.parquet(str(out)).toPandas()
    assert sorted(got["id"]) == sorted(r[0] for r in rows)
    assert_same_scores(frame_scores(got), {r[0]: hostile["cli"][r[0]] for r in rows})


def test_carried_columns_skip_pandas_nan_and_extreme_timestamps_survive(spark, hostile, tiny_clip_dir) -> None:
    """Only the URL and caption reach Python: a NaN double (alone or in an array) stays NaN, not
    null, and timestamps pandas cannot hold (9999-12-31, 0001-01-01, TIMESTAMP_NTZ 2300-01-01)
    come back unchanged instead of failing the job."""
    import math

    import pandas as pd
    from pyspark.sql import functions as F

    carried = [("NaN", "9999-12-31 00:00:00"), (None, "0001-01-01 00:00:00"), ("0.5", None)]
    good = [r for r in hostile["hostile"].rows if r[3] == "good"][:6]
    rows = [[*r[:3], *carried[i % len(carried)]] for i, r in enumerate(good)]
    df = (
        spark.createDataFrame(rows, ["id", "url", "caption", "ratio_text", "ts_text"])
        .withColumn("ratio", F.col("ratio_text").cast("double"))
        .withColumn("ts", F.col("ts_text").cast("timestamp"))
        .withColumn("ntz", F.lit("2300-01-01 00:00:00").cast("timestamp_ntz"))
        .withColumn("arr", F.array(F.col("ratio"), F.lit(float("nan")), F.lit(None).cast("double")))
        .repartition(2)
    )
    out = score_dataframe(df, tiny_clip_dir, **ENGINE_SETTINGS)
    assert out.columns == [*df.columns, *OUT_COLUMNS]
    assert [f.dataType for f in out.schema.fields[: len(df.columns)]] == [f.dataType for f in df.schema.fields]
    assert out.filter(F.isnan("ratio")).count() == df.filter(F.isnan("ratio")).count() == 2
    assert out.filter(F.col("ratio").isNull()).count() == df.filter(F.col("ratio").isNull()).count() == 2

    got = {
        r["id"]: r
        for r in out.selectExpr("*", "CAST(ts AS STRING) AS ts_str", "CAST(ntz AS STRING) AS ntz_str")
        .drop("ts", "ntz")  # as strings: Python's datetime cannot hold 0001-01-01 in every zone
        .collect()
    }
    assert sorted(got) == sorted(r[0] for r in rows)
    for row in rows:
        r = got[row[0]]
        ratio_text, ts_text = row[3], row[4]
        want = {"NaN": "nan", None: None, "0.5": 0.5}[ratio_text]
        for value in (r["ratio"], r["arr"][0]):
            assert (value is not None and math.isnan(value)) if want == "nan" else value == want, (row, r)
        assert r["arr"][1] is not None and math.isnan(r["arr"][1]) and r["arr"][2] is None, (row, r)
        assert (r["ts_str"], r["ntz_str"]) == (ts_text, "2300-01-01 00:00:00"), (row, r)
    scores = pd.DataFrame([{k: got[i][k] for k in ["id", *OUT_COLUMNS]} for i in got])
    assert_same_scores(frame_scores(scores), {r[0]: hostile["cli"][r[0]] for r in rows})
