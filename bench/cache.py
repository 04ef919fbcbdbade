"""Embedding cache figures: a warm-cache rescore beside the cold run, in the same run, and the
stores' read and write latency.

    .venv/bin/python bench/cache.py [--rows 1000]    # standalone: builds bench/run.py's model
    make bench                                       # bench/run.py calls run_cache_bench at its end

For the default backend and ONNX Runtime fp32 (what the Lambda functions run), in turn: the CSV has ``--rows`` rows with as many distinct photo-like JPEGs (640x480) served from 127.0.0.1
by a server that answers conditional requests like a static host. The cold run scores it with an
empty local store; the rescore then scores the same images with new captions (what a data team does
when it tries other captions): the images come from the cache after a 304, the captions still go
through the text tower. With a redis-server on PATH the rescore is also timed against Redis holding
the same entries. Everything it contacts is on loopback.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from PIL import Image  # noqa: E402

from support.conditional import ConditionalImages  # noqa: E402
from support.imageserver import ImageServer  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def distinct_jpegs(n: int, seed: int = 1) -> list[bytes]:
    """n different JPEGs: a few photo-like bases (slow to make), each shifted and tinted per image."""
    from run import make_jpeg

    rng = random.Random(seed)
    bases = [np.asarray(Image.open(io.BytesIO(make_jpeg(rng, (640, 480))))) for _ in range(12)]
    out = []
    for i in range(n):
        base = bases[i % len(bases)]
        shifted = np.roll(base, (rng.randrange(480), rng.randrange(640)), axis=(0, 1)).astype(np.int16)
        tint = np.asarray([rng.randrange(-40, 40) for _ in range(3)], dtype=np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(shifted + tint, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def _csv(rows: list[tuple[str, str]]) -> str:
    import csv

    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["url", "caption"])
    w.writerows(rows)
    return buf.getvalue()


def _score(text: str, model, fetcher, cache) -> tuple[float, dict[str, int], str]:
    from similarity.pipeline import score_stream

    out = io.StringIO(newline="")
    start = time.perf_counter()
    result = score_stream(io.StringIO(text, newline=""), out, model, fetcher, cache=cache)
    return time.perf_counter() - start, result.stats.cache, out.getvalue()


def store_latency(store, reps: int = 200) -> dict[str, float]:
    """Median microseconds per call: one entry and 32 at a time, read and write (2 KiB entries,
    a float32 ViT-B/32 embedding)."""
    from similarity.cache.codec import encode_embedding

    rng = np.random.default_rng(0)
    value = encode_embedding(rng.normal(size=512).astype(np.float32))
    keys = [f"i:bench-{i}" for i in range(reps * 32)]
    out: dict[str, float] = {}
    for label, n in (("1", 1), ("32", 32)):
        put, get = [], []
        for r in range(reps):
            batch = keys[r * n : (r + 1) * n]
            t = time.perf_counter()
            store.put_many(dict.fromkeys(batch, value))
            put.append(time.perf_counter() - t)
            t = time.perf_counter()
            got = store.get_many(batch)
            get.append(time.perf_counter() - t)
            assert got == [value] * n
        out[f"put_{label}_us"] = statistics.median(put) * 1e6
        out[f"get_{label}_us"] = statistics.median(get) * 1e6
    return out


def _copy_entries(sqlite_path: Path, redis_store) -> int:
    db = sqlite3.connect(sqlite_path)
    rows = db.execute("SELECT key, value FROM entries").fetchall()
    db.close()
    for i in range(0, len(rows), 500):
        redis_store.put_many(dict(rows[i : i + 500]))
    return len(rows)


def run_cache_bench(model_dir: Path, configs: list[tuple[str, str]], rows: int = 1000, tmp: Path | None = None) -> dict:
    """Cold run and warm rescore for each (backend, dtype) in ``configs``, each right after the
    other; the first one's entries are also read back from Redis."""
    from run import caption, cpu_description
    from similarity.cache import EmbeddingCache
    from similarity.cache.sqlite_store import SqliteStore
    from similarity.fetch import Fetcher, FetchSettings
    from similarity.fetch.guard import AddressPolicy, parse_networks
    from similarity.model import load_model

    tmp = Path(tmp or tempfile.mkdtemp(prefix="cache-bench-"))
    cpu = cpu_description()
    amx = " with AMX" if any(f.startswith("amx") for f in cpu.get("simd", [])) else ""
    where = f"{cpu.get('model_name')}{amx}, {cpu['cores']} cores"
    server = ImageServer("127.0.0.1").start()
    images = ConditionalImages(server)
    t = time.perf_counter()
    jpegs = distinct_jpegs(rows + 64)
    urls = [images.put(f"/cache-bench/{i}.jpg", data) for i, data in enumerate(jpegs[:rows])]
    spare = [images.put(f"/cache-bench/warmup-{i}.jpg", data) for i, data in enumerate(jpegs[rows:])]
    log(f"cache bench: {rows} distinct 640x480 JPEGs made in {time.perf_counter() - t:.1f}s, served from {server.base}")
    rng = random.Random(5)
    warmup_csv = _csv([(u, caption(rng, i)) for i, u in enumerate(spare)])
    cold_csv = _csv([(u, caption(rng, i)) for i, u in enumerate(urls)])
    warm_csv = _csv([(u, "another " + caption(rng, i)) for i, u in enumerate(urls)])
    redis_csv = _csv([(u, "yet another " + caption(rng, i)) for i, u in enumerate(urls)])

    fetcher = Fetcher(FetchSettings(pool_size=64), AddressPolicy(parse_networks("127.0.0.1/32")))
    local = EmbeddingCache(SqliteStore(tmp / "bench.sqlite3", 1024**3))
    results: dict = {"rows": rows, "cpu": where, "runs": {}}
    try:
        for n, (backend, dtype) in enumerate(configs):
            key = f"{backend}-{dtype}"
            model = load_model(model_dir, backend=backend, dtype=dtype)
            _score(warmup_csv, model, fetcher, None)  # compile and allocate outside the timings
            cold_s, _, _ = _score(cold_csv, model, fetcher, local)
            images.reset_log()
            warm_s, counts, _ = _score(warm_csv, model, fetcher, local)
            statuses = images.statuses()
            assert counts["image_hits"] == rows and counts["caption_misses"] == rows, counts
            run = results["runs"][key] = {
                "cold_pairs_per_s": rows / cold_s,
                "warm_pairs_per_s": rows / warm_s,
                "warm_vs_cold": cold_s / warm_s,
                "warm_requests": {"304": statuses.count(304), "200": statuses.count(200)},
            }
            log(
                f"cache, {key} on {where}: cold run (empty local store) {run['cold_pairs_per_s']:.1f} pairs/s; "
                f"rescore of the same {rows} images with new captions {run['warm_pairs_per_s']:.1f} pairs/s "
                f"({run['warm_vs_cold']:.2f}x, target 5x); the image server saw {statuses.count(304)} x 304 "
                f"and {statuses.count(200)} x 200"
            )
            if n == 0:
                results["sqlite"] = {"version": sqlite3.sqlite_version, **store_latency(local.store)}
                redis_bench(tmp, model, fetcher, redis_csv, rows, cold_s, results)
            del model
    finally:
        fetcher.close()
        local.close()
        server.stop()
    s = results["sqlite"]
    log(
        f"local store (SQLite {s['version']}, 2 KiB entries) on {where}: get 1 entry {s['get_1_us']:.0f} us, "
        f"32 entries {s['get_32_us']:.0f} us; put 1 entry {s['put_1_us']:.0f} us, 32 entries {s['put_32_us']:.0f} us"
    )
    if "redis" in results:
        r = results["redis"]
        log(
            f"Redis {r['version']} on loopback, same entries: get 1 {r['get_1_us']:.0f} us, 32 {r['get_32_us']:.0f} us; "
            f"put 1 {r['put_1_us']:.0f} us, 32 {r['put_32_us']:.0f} us; rescore from Redis ({configs[0][0]}-"
            f"{configs[0][1]}) {r['warm_pairs_per_s']:.1f} pairs/s ({r['warm_vs_cold']:.2f}x its cold run)"
        )
    return results


def redis_bench(tmp: Path, model, fetcher, text: str, rows: int, cold_s: float, results: dict) -> None:
    from similarity.cache import EmbeddingCache
    from similarity.cache.redis_store import RedisStore
    from support.redis_server import BINARY, RedisServer

    if BINARY is None:
        log("cache bench: redis-server not on PATH; Redis figures left out")
        return
    srv = RedisServer(maxmemory="512mb").start()
    try:
        store = RedisStore(srv.url, timeout=0.5)
        _copy_entries(tmp / "bench.sqlite3", store)  # the entries the cold run made, as a worker would find them
        cache = EmbeddingCache(store)
        warm_s, counts, _ = _score(text, model, fetcher, cache)
        assert counts["image_hits"] == rows and counts["store_errors"] == 0, counts
        version = srv.client().info("server").get("redis_version")
        results["redis"] = {
            "version": version,
            "warm_pairs_per_s": rows / warm_s,
            "warm_vs_cold": cold_s / warm_s,
            **store_latency(store),
        }
        store.close()
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args()
    from run import make_model
    from similarity.model import resolve
    from similarity.tools.onnx_export import export_onnx

    tmp = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    try:
        model_dir = tmp / "model"
        make_model(model_dir)
        export_onnx(model_dir, int8=False)
        auto = resolve("auto", "cpu", model_dir)
        configs = list(dict.fromkeys([(auto.backend, auto.dtype), ("onnx", "fp32")]))  # the default; Lambda's
        results = run_cache_bench(model_dir, configs, rows=args.rows, tmp=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the model and its ONNX files: ~1.2 GB
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
