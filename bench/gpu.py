"""The GPU path (the ECS task's): torch CUDA fp16 against the same baseline run on the same GPU.

    python bench/gpu.py [--pairs 1024] [--out bench/results-gpu.json]
    python bench/gpu.py --device cpu --pairs 64 --out /tmp/x.json   # a smoke run of the script itself

Needs a CUDA device (CI and the dev machine have none; the README says where it last ran). Builds
the same full-size random ViT-B/32 as bench/run.py, serves generated JPEGs from a loopback HTTP
server in separate processes sharing one port (so serving does not share this process's GIL),
and prints, in one run: end-to-end pairs/s of the baseline (CLIPProcessor + CLIPModel fp32 on the
GPU, batch 32), of score_pairs as the GPU task calls it (fp16, batch 128, 32 workers), and of the
same with fetching and decoding in worker processes (``--processes``: SIMILARITY_PROCESSES), three
interleaved rounds each; the towers alone; decode + preprocess alone and fetching alone on the CPU; agreement with
the CPU fp32 reference; and cold start to the first score.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as cpu_bench

ROOT = cpu_bench.ROOT


def _serve(routes: dict[str, bytes], conn, port: int = 0) -> None:
    from support.imageserver import ImageServer

    srv = ImageServer("127.0.0.1", port=port, reuse_port=True)
    for path, data in routes.items():
        srv.image(path, data, "image/jpeg")
    conn.send(srv.base)
    srv.serve_forever()


def start_servers(routes: dict[str, bytes], count: int) -> tuple[str, list]:
    """``count`` server processes on one loopback port (SO_REUSEPORT): one Python process serves
    far fewer images a second than 16 cores fetch."""
    ctx = multiprocessing.get_context("fork")
    procs, base, port = [], "", 0
    for _ in range(max(1, count)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(routes, child, port), daemon=True)
        proc.start()
        base = parent.recv()
        port = int(base.rsplit(":", 1)[1])
        procs.append(proc)
    return base, procs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-gpu.json"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    cores = os.cpu_count() or 1
    ap.add_argument("--server-processes", type=int, default=max(1, cores // 4), help="image server processes")
    ap.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=sorted({max(1, cores // 2), max(1, cores - 2)}),
        help="SIMILARITY_PROCESSES values to time beside the threads (one row each)",
    )
    args = ap.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device")
    tmp = Path(tempfile.mkdtemp(prefix="clip-bench-gpu-"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args: argparse.Namespace, tmp: Path) -> None:
    import torch

    from similarity import Fetcher, FetchSettings, load_model
    from similarity.fetch.guard import AddressPolicy, parse_networks
    from similarity.model.preprocess import load_pixels

    log = cpu_bench.log
    dev = args.device
    results: dict = {
        "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "none (--device cpu)",
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    log(f"GPU: {results['gpu']}, {results['cpu_cores']} CPU cores, torch {torch.__version__}")
    model_dir = tmp / "model"
    results["tokenizer"] = cpu_bench.make_model(model_dir)

    # 48 distinct photos in the CPU bench's size mix, each served under many URLs: every row is still
    # fetched and decoded (de-duplication is by URL), and setting up takes seconds, not minutes.
    rng = random.Random(0)
    sizes = [(640, 480)] * 8 + [(480, 640), (800, 600), (3000, 2000), (1600, 1200)]
    photos = [cpu_bench.make_jpeg(rng, sizes[i % len(sizes)]) for i in range(48)]
    routes = {f"/img/{i}.jpg": photos[i % len(photos)] for i in range(args.pairs)}
    base_url, servers = start_servers(routes, args.server_processes)
    pairs = [(base_url + path, cpu_bench.caption(rng, i)) for i, path in enumerate(routes)]
    policy = AddressPolicy(parse_networks("127.0.0.1/32"))
    results["server_processes"] = len(servers)
    log(f"{len(pairs)} pairs served from {base_url} by {len(servers)} separate process(es)")

    model = load_model(model_dir, backend="torch", device=dev)
    info = model.info
    assert dev == "cpu" or (info.backend, info.device, info.dtype) == ("torch", "cuda", "fp16"), info
    ref = load_model(model_dir, backend="torch", device="cpu", dtype="fp32")
    cfg = model.preprocess
    pixels = np.stack([load_pixels(photos[i], cfg) for i in range(32)])
    caps = [c for _, c in pairs[:64]]
    ref_i, ref_t = ref.embed_images(pixels), ref.embed_texts(caps)[0]
    del ref
    results["agreement_vs_cpu_fp32"] = cpu_bench.agreement(
        ref_i, ref_t, model.embed_images(pixels), model.embed_texts(caps)[0]
    )
    log(
        f"{dev} {info.dtype} vs CPU fp32, random full-size model: "
        + ", ".join(f"{k} {v:.5f}" for k, v in results["agreement_vs_cpu_fp32"].items())
    )

    big_px = np.concatenate([pixels] * 4)  # batch 128, as the GPU task runs
    big_caps = caps * 2
    img_s, cap_s = cpu_bench.model_only(model, big_px, big_caps, reps=5)
    fp32 = load_model(model_dir, backend="torch", device=dev, dtype="fp32")
    assert fp32.info.dtype == "fp32"
    results["agreement_cuda_fp32_vs_cpu_fp32"] = cpu_bench.agreement(
        ref_i, ref_t, fp32.embed_images(pixels), fp32.embed_texts(caps)[0]
    )
    img32, cap32 = cpu_bench.model_only(fp32, big_px, big_caps, reps=5)
    del fp32
    results["towers_batch_128"] = {
        "fp16": {"image_per_s": img_s, "caption_per_s": cap_s},
        "fp32": {"image_per_s": img32, "caption_per_s": cap32},
    }
    log(
        f"{dev} fp32 vs CPU fp32: max|dsim| {results['agreement_cuda_fp32_vs_cpu_fp32']['max_abs_similarity_diff']:.5f}"
    )
    log(
        f"towers alone, batch 128: fp16 image {img_s:.0f}/s captions {cap_s:.0f}/s; fp32 image {img32:.0f}/s captions {cap32:.0f}/s"
    )

    def decode_all(workers: int) -> float:
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: load_pixels(photos[i % len(photos)], cfg), range(len(pairs))))
        return len(pairs) / (time.perf_counter() - t)

    decode_all(32)
    results["decode_preprocess_per_s"] = {"1 thread": decode_all(1), "32 threads": decode_all(32)}
    log(
        "decode + preprocess alone on the CPU: "
        + ", ".join(f"{k} {v:.0f} images/s" for k, v in results["decode_preprocess_per_s"].items())
    )
    # Fetching alone, from this bench's server processes: if it is near the end-to-end rate, the
    # server or the fetch path, not decoding or the model, is what bounds end to end.
    fetcher = Fetcher(FetchSettings(pool_size=64), policy)
    t = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(fetcher.fetch, [u for u, _ in pairs]))
    results["fetch_alone_per_s_32_threads"] = len(pairs) / (time.perf_counter() - t)
    fetcher.close()
    log(f"fetching alone, 32 threads: {results['fetch_alone_per_s_32_threads']:.0f} images/s")

    def ours(processes: int = 0) -> tuple[float, list[float | None]]:  # as the GPU task calls it
        return cpu_bench.ours(model, pairs, policy, batch=128, workers=32, processes=processes)

    ours()  # warm: cuDNN/cuBLAS pick their kernels for these shapes
    rounds = []
    for _ in range(3):
        b_s, b_cos = cpu_bench.baseline(model_dir, pairs, device=dev)
        o_s, o_cos = ours()
        rounds.append({"baseline": len(pairs) / b_s, "ours": len(pairs) / o_s})
        for n in args.processes:  # SIMILARITY_PROCESSES=n: fetching and decoding in n worker processes
            p_s, p_cos = ours(n)
            diff = max(abs(a - b) for a, b in zip(p_cos, o_cos, strict=True))  # type: ignore[operator]
            assert diff < 1e-3, f"worker processes gave other scores than the threads ({diff})"
            rounds[-1][f"ours, processes={n}"] = len(pairs) / p_s
        log("round: " + ", ".join(f"{k} {v:.0f} pairs/s" for k, v in rounds[-1].items()))
    assert all(c is not None for c in o_cos), "every pair must score"
    results["max_abs_similarity_diff_vs_baseline_e2e"] = max(abs(a - b) / 2 for a, b in zip(o_cos, b_cos))
    results["rounds"] = rounds
    results["baseline_pairs_per_s"] = float(np.median([r["baseline"] for r in rounds]))
    results["pairs_per_s"] = float(np.median([r["ours"] for r in rounds]))
    results["speedup"] = float(np.median([r["ours"] / r["baseline"] for r in rounds]))
    results["processes"] = {
        str(n): {
            "pairs_per_s": float(np.median([r[f"ours, processes={n}"] for r in rounds])),
            "vs_threads": float(np.median([r[f"ours, processes={n}"] / r["ours"] for r in rounds])),
        }
        for n in args.processes
    }
    for n, row in results["processes"].items():
        log(f"SIMILARITY_PROCESSES={n}: {row['pairs_per_s']:.0f} pairs/s, {row['vs_threads']:.2f}x the threads")
    for proc in servers:
        proc.terminate()

    results["cold_start_s"] = cpu_bench.cold_start(model_dir, "torch", "auto", reps=1)[0]  # auto: CUDA fp16 here
    log(
        f"cold start to first score on the GPU: {results['cold_start_s']:.2f}s; e2e max |dsim| vs baseline "
        f"{results['max_abs_similarity_diff_vs_baseline_e2e']:.5f}"
    )
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.out}")
    log(
        f"GPU end to end: baseline {results['baseline_pairs_per_s']:.0f} pairs/s, ours {results['pairs_per_s']:.0f} pairs/s"
    )
    log(f"end-to-end speedup vs baseline on the GPU: {results['speedup']:.2f}x")


if __name__ == "__main__":
    main()
