"""Score a dataset of (image URL, caption) rows with Ray Data, on a Ray cluster (KubeRay,
Anyscale) or on this machine.

    python examples/ray_score.py INPUT OUTPUT --model MODEL [options]      # on the cluster's head,
    ray job submit --working-dir . -- python examples/ray_score.py ...      # or submitted to it

INPUT: CSV (``.csv`` file or folder) or Parquet, local or ``s3://``; OUTPUT: a folder, CSV when it
ends in ``.csv`` else Parquet. MODEL: a directory on every node or ``s3://bucket/prefix/`` (copied
to each node once). ``--concurrency 4`` or ``2,8`` (autoscaling) actors; ``--num-gpus 1`` puts one
model per GPU (CUDA fp16). The package must be installed on every node (the cluster image, or
``runtime_env={"pip": [...]}``). ``--local`` starts Ray here (2 CPUs, loopback only).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--model", required=True)
    p.add_argument("--url-col", default="url")
    p.add_argument("--caption-col", default="caption")
    p.add_argument("--concurrency", help="actors: N, or MIN,MAX to autoscale (default 1 up to the cluster)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per actor")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-call", type=int, default=1024)
    p.add_argument("--allow-network", action="append", default=[], metavar="CIDR")
    p.add_argument("--local", action="store_true", help="start Ray here (2 CPUs, loopback only)")
    return p.parse_args(argv)


def concurrency(value: str | None) -> int | tuple[int, int] | None:
    if not value:
        return None
    if "," in value:
        lo, hi = value.split(",", 1)
        return int(lo), int(hi)
    return int(value)


def run(args: argparse.Namespace) -> int:
    import pyarrow.csv as pacsv
    import ray.data

    from similarity.engines.ray import score_dataset

    if args.input.rstrip("/").lower().endswith(".csv"):
        # Quoted newlines in captions are legal CSV; pyarrow only reads them when told.
        ds = ray.data.read_csv(args.input, parse_options=pacsv.ParseOptions(newlines_in_values=True))
    else:
        ds = ray.data.read_parquet(args.input)
    settings: dict[str, Any] = {"allowed_networks": args.allow_network} if args.allow_network else {}
    scored = score_dataset(
        ds,
        args.model,
        url_col=args.url_col,
        caption_col=args.caption_col,
        concurrency=concurrency(args.concurrency),
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        batch_size=args.batch_size,
        rows_per_call=args.rows_per_call,
        **settings,
    )
    if args.output.rstrip("/").lower().endswith(".csv"):
        scored.write_csv(args.output)
    else:
        scored.write_parquet(args.output)
    print(f"scored -> {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.local:
        from similarity.engines.local import local_ray

        with local_ray(2):
            return run(args)
    import ray

    ray.init()  # the cluster of RAY_ADDRESS, or the one this job was submitted to
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
