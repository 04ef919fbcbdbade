"""Score a table of (image URL, caption) rows with Spark.

    spark-submit examples/spark_score.py INPUT OUTPUT --model MODEL [options]

INPUT / OUTPUT: a CSV file or folder (``.csv``) or Parquet (anything else), local, ``s3://``
(EMR, Databricks) or ``s3a://`` (plain Spark with hadoop-aws: ``--packages
org.apache.hadoop:hadoop-aws:3.4.1``). MODEL: a model directory present on every node, or an
``s3://bucket/prefix/`` copied to each node's local disk once. The package must be installed on
every node (the wheel: ``--py-files`` is not enough, the workers import it).

``--local`` runs on this machine (local[2], loopback only) instead of the cluster spark-submit
names. Settings not given as options come from the ``SIMILARITY_*`` variables of the driver.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", required=True, help="model directory on every node, or s3://bucket/prefix/")
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--partitions", type=int, help="repartition the input first (default: as read)")
    p.add_argument("--batch-size", type=int, default=32, help="images/captions per model call")
    p.add_argument("--workers", type=int, default=16, help="concurrent image fetches per task")
    p.add_argument("--backend", help="auto, onnx, openvino or torch (default: $SIMILARITY_BACKEND or auto)")
    p.add_argument("--dtype", help="auto, fp32, bf16, fp16 or int8")
    p.add_argument("--allow-network", action="append", default=[], metavar="CIDR")
    p.add_argument("--mode", default="errorifexists", help="Spark save mode for the output (overwrite, ...)")
    p.add_argument("--local", action="store_true", help="run on local[2] here, on loopback only")
    return p.parse_args(argv)


def is_csv(path: str) -> bool:
    return path.rstrip("/").lower().endswith(".csv")


def run(spark: Any, args: argparse.Namespace) -> int:
    from similarity.engines.spark import score_dataframe

    if is_csv(args.input):
        df = spark.read.csv(args.input, header=True, multiLine=True, escape='"')
    else:
        df = spark.read.parquet(args.input)
    if args.partitions:
        df = df.repartition(args.partitions)
    settings: dict[str, Any] = {k: v for k, v in (("backend", args.backend), ("dtype", args.dtype)) if v}
    if args.allow_network:
        settings["allowed_networks"] = args.allow_network
    scored = score_dataframe(
        df,
        args.model,
        url_col=args.url_col,
        caption_col=args.caption_col,
        batch_size=args.batch_size,
        workers=args.workers,
        **settings,
    )
    writer = scored.write.mode(args.mode)
    if is_csv(args.output):
        writer.csv(args.output, header=True, escape='"')
    else:
        writer.parquet(args.output)
    out = (
        spark.read.csv(args.output, header=True, multiLine=True, escape='"')
        if is_csv(args.output)
        else spark.read.parquet(args.output)
    )
    totals = out.selectExpr("count(*) AS rows", "count(error) AS errors").first()
    rows, errors = int(totals["rows"]), int(totals["errors"])
    print(f"rows: {rows}  scored: {rows - errors}  errors: {errors}  -> {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.local:
        from similarity.engines.local import local_spark

        with local_spark(2) as spark:
            return run(spark, args)
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.appName("similarity-score").getOrCreate()
    try:
        return run(spark, args)
    finally:
        spark.stop()


if __name__ == "__main__":
    sys.exit(main())
