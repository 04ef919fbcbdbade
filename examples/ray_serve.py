"""Serve the scorer on Ray Serve: ``similarity serve``'s app (the Lambda API's routes, the Open
Inference Protocol, /metrics), one model per replica.

    python examples/ray_serve.py --model s3://bucket/models/clip/ --autoscale 1,8   # on the cluster
    python examples/ray_serve.py --model tests/fixtures/tiny-clip --local           # here, loopback only

MODEL: a directory on every node or ``s3://bucket/prefix/`` (copied to each node once).
``--replicas N`` or ``--autoscale MIN,MAX``; ``--num-cpus`` per replica (its inference threads).
Settings are the server's variables (``SERVER_*``, ``SIMILARITY_*``, ``MAX_PAIRS``, ...), passed to
the replicas. The config-file way is ``serve run examples/ray_serve.yaml``. ``--local`` starts Ray
here (2 CPUs, loopback only) and serves until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

#: Variables the replicas get from this process's environment (the settings are read there).
PREFIXES = ("SIMILARITY_", "SERVER_", "CLIP_", "MAX_", "API_", "BUCKET", "CHUNK_", "AWS_")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    scale = p.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    scale.add_argument("--autoscale", metavar="MIN,MAX", help="autoscale between MIN and MAX replicas")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    p.add_argument("--max-ongoing", type=int, default=64, help="requests a replica takes at once")
    p.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxy listens (0.0.0.0 on a cluster)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route-prefix", default="/")
    p.add_argument("--local", action="store_true", help="start Ray here (2 CPUs, loopback only)")
    return p.parse_args(argv)


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The deployment's options: replicas, CPUs and the replicas' environment."""
    env = {k: v for k, v in os.environ.items() if k.startswith(PREFIXES)}
    opts: dict[str, Any] = {
        "max_ongoing_requests": args.max_ongoing,
        "ray_actor_options": {"num_cpus": args.num_cpus, "runtime_env": {"env_vars": env}},
    }
    if args.autoscale:
        lo, hi = (int(x) for x in args.autoscale.split(",", 1))
        opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 16}
    else:
        opts["num_replicas"] = args.replicas
    return opts


def run(args: argparse.Namespace) -> str:
    """Deploy on the Ray this process is connected to; returns the app's base URL once every
    replica has its model loaded."""
    from ray import serve

    from similarity.engines.ray_serve import SimilarityDeployment

    serve.start(http_options={"host": args.host, "port": args.port})
    app = SimilarityDeployment.options(**options(args)).bind(args.model)
    serve.run(app, name="similarity", route_prefix=args.route_prefix)
    return f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.local:
        from similarity.engines.local import local_ray

        args.host = "127.0.0.1"
        with local_ray(2):
            return serve_forever(run(args))
    import ray

    ray.init()  # the cluster of RAY_ADDRESS, or the one this job was submitted to
    print(f"serving at {run(args)}", file=sys.stderr)  # Serve keeps it running after this exits
    return 0


def serve_forever(url: str) -> int:
    from ray import serve

    print(f"serving at {url} (Ctrl-C stops)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 130
    finally:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
