"""The GPU path (the ECS task's): torch CUDA fp16 against the same baseline run on the same GPU.

    python bench/gpu.py [--pairs 1024] [--out bench/results-gpu.json]
    python bench/gpu.py --device cpu --pairs 64 --out /tmp/x.json   # a smoke run of the script itself

Needs a CUDA device (CI and the dev machine have none; the README says where it last ran). Builds
the same full-size random ViT-B/32 as bench/run.py, serves generated JPEGs from a loopback HTTP
server in separate processes sharing one port (so serving does not share this process's GIL),
and prints, in one run: end-to-end pairs/s of the baseline (CLIPProcessor + CLIPModel fp32 on the
GPU, batch 32), of score_pairs as the GPU task calls it (fp16, batch 128, 32 workers), and of the
same with fetching and decoding in worker processes (``--processes``: SIMILARITY_PROCESSES) and with
the device pixel paths (``--pixels``: SIMILARITY_PIXELS=torch, the resize on the GPU; nvjpeg, JPEG
decoding there too), three interleaved rounds each, with this process's CPU per pair; the towers
alone; decode + preprocess alone and fetching alone on the CPU; agreement with the CPU fp32
reference; on the trained test model, whether the torch pixel path gives Pillow's pixels to the bit
on this GPU and how far nvJPEG's pixels move scores; and cold start to the first score.
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


def with_pixels(model, path: str, device: str):
    """``model`` (its backend shared) with the ``path`` pixel path; ``--device cpu`` runs nvjpeg's
    code on nvImageCodec's CPU backend, as the tests do. None where nvImageCodec is missing."""
    from similarity.model import ClipModel
    from similarity.model.device_pixels import DevicePixels

    try:
        dp = DevicePixels(
            model.preprocess,
            device,
            uint8=model.uint8_pixels,
            decoder="nvjpeg" if path == "nvjpeg" else "pillow",
            nvjpeg_on_gpu=device == "cuda",
        )
    except Exception as exc:  # noqa: BLE001 - reported, and that row left out
        cpu_bench.log(f"SIMILARITY_PIXELS={path}: not available here ({exc})")
        return None
    return ClipModel(model.backend, model.tokenizer, model.preprocess, model.info, path, dp)  # type: ignore[arg-type]


def pixel_fidelity(device: str) -> dict:
    """On the trained test model (torch fp32 on ``device``): how many of the test bed's files
    (large JPEGs, EXIF-rotated ones, odd PNGs) the torch pixel path gives other pixels for than
    Pillow (0 expected: the arithmetic is exact); nvJPEG's drift in similarity against Pillow's
    pixels; and what nvJPEG makes of a truncated JPEG (Pillow refuses it)."""
    from similarity.model import load_model
    from support.parity import large_images, parity_inputs, similarities

    tiny = load_model(ROOT / "tests" / "fixtures" / "tiny-clip", backend="torch", device=device, dtype="fp32")
    files = large_images(64)
    caps = parity_inputs(tiny.preprocess)[1]
    want = [tiny.pixels(f) for f in files]
    out: dict = {}
    torch_model = with_pixels(tiny, "torch", device)
    assert torch_model is not None
    out["torch_pixels_differ"] = sum(not np.array_equal(torch_model.pixels(f), w) for f, w in zip(files, want))
    nv = with_pixels(tiny, "nvjpeg", device)
    if nv is not None:
        got = np.stack([nv.pixels(f) for f in files])
        base = similarities(tiny, np.stack(want), caps)
        out["nvjpeg_decoded_on_device"] = nv.device_pixels.decoded_on_device  # type: ignore[union-attr]
        out["nvjpeg_max_abs_similarity_diff"] = float(np.abs(similarities(tiny, got, caps) - base).max())
        jpeg = next(f for f in files if f[:2] == b"\xff\xd8")
        decoder = nv.device_pixels.nvjpeg  # type: ignore[union-attr]
        cut = decoder(jpeg[: len(jpeg) // 2])
        out["nvjpeg_truncated_jpeg"] = "refused (Pillow reports it)" if cut is None else "decoded (Pillow refuses it)"
        damaged = bytearray(jpeg)  # a broken entropy-coded stream behind a sound header
        damaged[len(damaged) // 2 : len(damaged) // 2 + 50] = b"\xff" * 50
        broken = decoder(bytes(damaged))
        out["nvjpeg_damaged_jpeg"] = "refused (Pillow reports it)" if broken is None else "decoded (Pillow refuses it)"
    return out


#: Run in a fresh interpreter: where the GPU task's cold start goes, phase by phase, and whether
#: starting CUDA in a thread while transformers imports (on the CPU) overlaps the two.
_PHASES = r"""
import json, sys, threading, time
t0 = time.perf_counter(); marks = {}
def mark(name): marks[name] = round(time.perf_counter() - t0, 3)
import torch; mark("import torch")
dev = sys.argv[2]
def cuda_up():
    if dev == "cuda":
        torch.cuda.init(); x = torch.ones(64, 64, device="cuda", dtype=torch.float16); (x @ x).sum().item()
    mark("CUDA context and first cuBLAS fp16 matmul")
overlap = sys.argv[3] == "overlap"
th = threading.Thread(target=cuda_up)
if overlap: th.start()
else: cuda_up()
from transformers import CLIPModel; mark("import transformers' CLIPModel")
if overlap: th.join(); mark("joined the CUDA thread")
from similarity import load_model
m = load_model(sys.argv[1], backend="torch", device=dev); mark("load_model (checkpoint to the device)")
m.embed_images(__import__("numpy").zeros((1, 3, 224, 224), "float32")); mark("first image batch")
m.embed_texts(["a photo"]); mark("first caption batch")
print("PHASES" + json.dumps(marks))
"""


def cold_start_phases(model_dir: Path, device: str) -> dict:
    """``_PHASES`` in fresh processes, sequential and with CUDA started in a thread (the seconds
    since the interpreter started at the end of each phase)."""
    import subprocess

    out = {}
    for mode in ("sequential", "overlap"):
        r = subprocess.run(
            [sys.executable, "-c", _PHASES, str(model_dir), device, mode],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        out[mode] = json.loads(r.stdout.split("PHASES", 1)[1])
    return out


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
    ap.add_argument(
        "--pixels",
        nargs="*",
        default=["torch", "nvjpeg"],
        choices=["torch", "nvjpeg"],
        help="SIMILARITY_PIXELS paths to time beside Pillow's (one row each; nvjpeg needs nvImageCodec)",
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

    results["pixel_fidelity_test_model"] = pixel_fidelity(dev)
    log(
        "pixel paths on the test model: "
        + ", ".join(f"{k} {v}" for k, v in results["pixel_fidelity_test_model"].items())
    )
    pixel_models = {p: m for p in args.pixels if (m := with_pixels(model, p, dev)) is not None}

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

    def decode_all(workers: int, load=lambda data: load_pixels(data, cfg)) -> float:
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda i: load(photos[i % len(photos)]), range(len(pairs))))
        return len(pairs) / (time.perf_counter() - t)

    decode_all(32)
    results["decode_preprocess_per_s"] = {"1 thread": decode_all(1), "32 threads": decode_all(32)}
    for p, m in pixel_models.items():
        decode_all(32, m.pixels)
        results["decode_preprocess_per_s"][f"pixels={p}, 32 threads"] = decode_all(32, m.pixels)
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

    def ours(processes: int = 0, m=model) -> tuple[float, list[float | None]]:  # as the GPU task calls it
        return cpu_bench.ours(m, pairs, policy, batch=128, workers=32, processes=processes)

    cpu_ms: dict[str, list[float]] = {}

    def timed(name: str, f):  # the row's pairs/s, and this process's CPU per pair (servers excluded)
        cpu = sum(os.times()[:2])
        secs, cos = f()
        cpu_ms.setdefault(name, []).append((sum(os.times()[:2]) - cpu) * 1000 / len(pairs))
        return len(pairs) / secs, cos

    ours()  # warm: cuDNN/cuBLAS pick their kernels for these shapes
    for m in pixel_models.values():
        ours(m=m)
    rounds = []
    for _ in range(3):
        b_s, b_cos = cpu_bench.baseline(model_dir, pairs, device=dev)
        o_rate, o_cos = timed("ours", ours)
        rounds.append({"baseline": len(pairs) / b_s, "ours": o_rate})
        for n in args.processes:  # SIMILARITY_PROCESSES=n: fetching and decoding in n worker processes
            name = f"ours, processes={n}"
            rate, p_cos = timed(name, lambda n=n: ours(n))
            diff = max(abs(a - b) for a, b in zip(p_cos, o_cos, strict=True))  # type: ignore[operator]
            assert diff < 1e-3, f"worker processes gave other scores than the threads ({diff})"
            rounds[-1][name] = rate
        for p, m in pixel_models.items():  # SIMILARITY_PIXELS=p
            name = f"ours, pixels={p}"
            rate, p_cos = timed(name, lambda m=m: ours(m=m))
            diff = max(abs(a - b) for a, b in zip(p_cos, o_cos, strict=True))  # type: ignore[operator]
            assert p != "torch" or diff < 1e-3, f"the torch pixel path gave other scores than Pillow's ({diff})"
            results.setdefault("pixels_max_abs_cosine_diff_vs_pillow", {})[p] = diff
            rounds[-1][name] = rate
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
    results["pixels"] = {
        p: {
            "pairs_per_s": float(np.median([r[f"ours, pixels={p}"] for r in rounds])),
            "vs_pillow": float(np.median([r[f"ours, pixels={p}"] / r["ours"] for r in rounds])),
        }
        for p in pixel_models
    }
    for p, row in results["pixels"].items():
        log(f"SIMILARITY_PIXELS={p}: {row['pairs_per_s']:.0f} pairs/s, {row['vs_pillow']:.2f}x Pillow's")
    results["cpu_ms_per_pair"] = {k: float(np.median(v)) for k, v in cpu_ms.items()}
    log("CPU of this process per pair: " + ", ".join(f"{k} {v:.1f} ms" for k, v in results["cpu_ms_per_pair"].items()))
    for proc in servers:
        proc.terminate()

    results["cold_start_s"] = cpu_bench.cold_start(model_dir, "torch", "auto", reps=1)[0]  # auto: CUDA fp16 here
    results["cold_start_phases_s"] = cold_start_phases(model_dir, dev)
    for mode, marks in results["cold_start_phases_s"].items():
        log(f"cold start phases ({mode}, seconds since start): " + ", ".join(f"{k} {v}" for k, v in marks.items()))
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
