"""The engine adapters' overhead: pairs/s of the CLI, Spark local[2] and Ray local on the same CSV,
in one run, interleaved (CLI, Spark, CLI, Ray, CLI, ... per round).

    .venv/bin/python bench/engines.py [--pairs 480] [--rounds 1] [--out bench/results-engines.json]

A full-size ViT-B/32 with random weights (the real one's cost; bench/run.py's model) scores
generated JPEGs served from 127.0.0.1. Each side reads the CSV and writes its scores:

- CLI: ``python -m similarity score`` in a subprocess; pairs/s as it reports them (model load
  excluded), and its whole wall time;
- Spark: ``spark.read.csv`` -> ``score_dataframe`` -> ``write.csv`` on local[2] (two tasks, one
  inference thread each); the Python workers were warmed by a small job first, as a long-running
  cluster's are;
- Ray: ``read_csv`` -> ``score_dataset`` -> ``write_csv`` with two actors (half a CPU each, one
  inference thread each). Ray Data starts a new actor pool per job, so each job loads its models:
  that is counted.

The ratio is each engine's pairs/s over the mean of the CLI runs just before and after it. Both
engines start only through similarity.engines.local (loopback only). The host is shared: the load
average is printed before and after.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from run import caption, cpu_description, log, make_jpeg, make_model  # noqa: E402
from similarity.engines.local import local_ray, local_spark  # noqa: E402  (first: Ray's environment)
from support.imageserver import ImageServer  # noqa: E402

ALLOW = "127.0.0.1/32"


def make_csv(path: Path, server: ImageServer, n: int) -> None:
    rng = random.Random(0)
    sizes = [(640, 480)] * 8 + [(480, 640), (800, 600), (1600, 1200), (1024, 768)]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "url", "caption"])
        for i in range(n):
            url = server.image(f"/img/{i}.jpg", make_jpeg(rng, sizes[i % len(sizes)]), "image/jpeg")
            w.writerow([i, url, caption(rng, i)])


def cli(model_dir: Path, csv_path: Path, tmp: Path) -> dict:
    summary = tmp / "cli-summary.json"
    start = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "similarity", "score", str(csv_path), "-o", str(tmp / "cli.csv")]
        + ["--model", str(model_dir), "--allow-network", ALLOW, "--no-progress", "--summary-json", str(summary)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if r.returncode:
        raise SystemExit(f"CLI failed: {r.stderr[-2000:]}")
    s = json.loads(summary.read_text())
    return {"pairs_per_s": s["pairs_per_second"], "wall_s": wall, "errors": s["errors"], "model": s["model"]}


def spark_run(spark, model_dir: Path, csv_path: Path, out: Path, n: int) -> dict:  # type: ignore[no-untyped-def]
    from similarity.engines.spark import score_dataframe

    start = time.perf_counter()
    df = spark.read.csv(str(csv_path), header=True).repartition(4)
    score_dataframe(df, model_dir, allowed_networks=ALLOW).write.mode("overwrite").csv(str(out), header=True)
    wall = time.perf_counter() - start
    errors = spark.read.csv(str(out), header=True).filter("error is not null").count()
    return {"pairs_per_s": n / wall, "wall_s": wall, "error_rows": errors}


def ray_run(model_dir: Path, csv_path: Path, out: Path, n: int) -> dict:
    import ray.data

    from similarity.engines.ray import score_dataset

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    ds = ray.data.read_csv(str(csv_path)).repartition(8)
    score_dataset(ds, model_dir, concurrency=2, num_cpus=0.5, rows_per_call=32, allowed_networks=ALLOW).write_csv(
        str(out)
    )
    wall = time.perf_counter() - start
    errors = sum(
        1 for f in out.glob("*.csv") for row in csv.DictReader(f.open(newline="")) if row.get("error") not in ("", None)
    )
    return {"pairs_per_s": n / wall, "wall_s": wall, "error_rows": errors}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=480)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-engines.json"))
    args = ap.parse_args()
    machine = cpu_description()
    results: dict = {"machine": machine, "pairs": args.pairs, "load_before": os.getloadavg()}
    log(
        f"CPU: {machine.get('model_name')}, {machine['cores']} cores, {' '.join(machine.get('simd', []))}; "
        f"load average {results['load_before'][0]:.1f} (shared host)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="engines-bench-"))
    server = ImageServer("127.0.0.1").start()
    try:
        from similarity.tools.onnx_export import export_onnx

        model_dir = tmp / "model"
        t0 = time.perf_counter()
        results["tokenizer"] = make_model(model_dir)
        export_onnx(model_dir, int8=False)
        log(f"model + ONNX export: {time.perf_counter() - t0:.1f}s")
        csv_path = tmp / "pairs.csv"
        make_csv(csv_path, server, args.pairs)
        warm = tmp / "warm.csv"
        with csv_path.open() as src, warm.open("w") as dst:
            dst.writelines(line for i, line in enumerate(src) if i <= 8)
        first = cli(model_dir, warm, tmp)  # also fills the OpenVINO cache every later load reads
        results["model"] = first["model"]
        log(f"model runs as {first['model'].get('backend')}/{first['model'].get('dtype')}")

        runs: list[dict] = []
        cli_runs: list[dict] = []

        def cli_now() -> dict:
            c = cli(model_dir, csv_path, tmp)
            cli_runs.append(c)
            log(f"  cli   {c['pairs_per_s']:6.1f} pairs/s ({c['wall_s']:.1f}s wall with start-up and load)")
            return c

        with local_spark(2) as spark:
            t0 = time.perf_counter()
            spark_run(spark, model_dir, warm, tmp / "spark-warm", 8)  # starts and warms the Python workers
            log(f"spark: session up, workers warm in {time.perf_counter() - t0:.1f}s")
            for _ in range(args.rounds):
                before = cli_now()
                s = spark_run(spark, model_dir, csv_path, tmp / "spark-out", args.pairs)
                after = cli_now()
                s["vs_cli"] = s["pairs_per_s"] / ((before["pairs_per_s"] + after["pairs_per_s"]) / 2)
                runs.append({"engine": "spark local[2]", **s})
                log(f"  spark {s['pairs_per_s']:6.1f} pairs/s ({s['wall_s']:.1f}s) = {s['vs_cli']:.2f}x the CLI")
        with local_ray(2):
            for _ in range(args.rounds):
                before = cli_runs[-1]
                r = ray_run(model_dir, csv_path, tmp / "ray-out", args.pairs)
                after = cli_now()
                r["vs_cli"] = r["pairs_per_s"] / ((before["pairs_per_s"] + after["pairs_per_s"]) / 2)
                runs.append({"engine": "ray local (2 actors)", **r})
                log(
                    f"  ray   {r['pairs_per_s']:6.1f} pairs/s ({r['wall_s']:.1f}s, actors' model loads included) "
                    f"= {r['vs_cli']:.2f}x the CLI"
                )
        results["cli"] = cli_runs
        results["engines"] = runs
        results["load_after"] = os.getloadavg()
        for name in ("spark local[2]", "ray local (2 actors)"):
            ratios = sorted(r["vs_cli"] for r in runs if r["engine"] == name)
            results[f"{name} vs cli (median)"] = ratios[len(ratios) // 2]
        log(
            f"vs the CLI on {machine.get('model_name')} ({machine['cores']} cores): "
            f"spark {results['spark local[2] vs cli (median)']:.2f}x, ray {results['ray local (2 actors) vs cli (median)']:.2f}x "
            f"(target >= 0.8x); load average {results['load_after'][0]:.1f} after"
        )
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
