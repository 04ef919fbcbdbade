"""`similarity serve` under load, against the CLI on the same images, in one run.

    .venv/bin/python bench/serve.py [--pairs 192] [--rounds 2] [--model DIR] [--out bench/results-serve.json]

Builds the full-size ViT-B/32 with random weights that bench/run.py builds (same cost as the real
one) and exports its ONNX files, unless --model names a model directory; serves generated JPEGs
from 127.0.0.1; then, in rounds that interleave them (the machine is shared and its speed drifts):

- the CLI: `similarity score` on a CSV of the pairs (its batch pairs/s, from --summary-json);
- the server: `similarity serve`, driven by 1, 8 and 32 concurrent clients on loopback, each
  sending one pair per request and the next as soon as the answer arrives.

Prints requests/s, p50/p95/p99 latency, the mean image batch the micro-batcher formed (from
/metrics), and the ratio of the server's rate at 32 clients to the CLI's in the same round.
Target on 2 cores: at least 0.7x, with p99 under 2 s. Everything it contacts is on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from run import caption, cpu_description, make_jpeg, make_model  # noqa: E402
from support.imageserver import ImageServer  # noqa: E402
from support.serveproc import Served  # noqa: E402

CLIENTS = (1, 8, 32)


def log(msg: str) -> None:
    print(msg, flush=True)


def base_env(model_dir: Path) -> dict[str, str]:
    env = {**os.environ, "CLIP_MODEL_DIR": str(model_dir), "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32"}
    env.update(MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="8589934592", OMP_WAIT_POLICY="PASSIVE")
    for k in ("PROMETHEUS_MULTIPROC_DIR", "SERVER_AUTH_TOKEN", "SERVER_AUTH_TOKEN_FILE"):
        env.pop(k, None)
    return env


# ------------------------------------------------------------------------------------ the CLI
def cli_rate(env: dict[str, str], csv_path: Path, tmp: Path) -> float:
    summary = tmp / "summary.json"
    subprocess.run(
        [sys.executable, "-m", "similarity", "score", str(csv_path), "-o", str(tmp / "out.csv"), "--no-progress"]
        # No embedding cache: a second round would score every image from it (the server has none).
        + ["--summary-json", str(summary), "--no-cache"],
        env=env,
        check=True,
        capture_output=True,
        timeout=1800,
    )
    out = json.loads(summary.read_text())
    assert out["scored"] == out["rows"], out["errors"]
    return float(out["pairs_per_second"])  # the scoring alone: the model load is not in it


# ------------------------------------------------------------------------------------ the load generator
async def _client(port: int, bodies: list[bytes], latencies: list[float], errors: list[str]) -> None:
    """One keep-alive connection, one request at a time (asyncio streams: light on the shared CPU)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for body in bodies:
            head = f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            start = time.perf_counter()
            writer.write(head.encode() + body)
            await writer.drain()
            status = (await reader.readline()).split(b" ", 2)[1]
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            payload = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if status != b"200" or b'"error": null' not in payload:
                errors.append(payload[:200].decode(errors="replace"))
    finally:
        writer.close()


def drive(port: int, pairs: list[tuple[str, str]], clients: int, requests_total: int) -> dict[str, float]:
    bodies = [json.dumps({"pairs": [{"image": u, "caption": c}]}).encode() for u, c in pairs]
    per_client = [
        [bodies[(i * clients + k) % len(bodies)] for i in range(requests_total // clients)] for k in range(clients)
    ]
    latencies: list[float] = []
    errors: list[str] = []

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(_client(port, b, latencies, errors) for b in per_client))
        return time.perf_counter() - start

    seconds = asyncio.run(main())
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / seconds,
        "p50_s": statistics.median(latencies),
        "p95_s": q[94],
        "p99_s": q[98],
    }


def batch_counts(url: str) -> tuple[float, float]:
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    total = calls = 0.0
    for fam in text_string_to_metric_families(requests.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.labels.get("tower") == "image" and s.name == "similarity_batch_size_sum":
                total = s.value
            elif s.labels.get("tower") == "image" and s.name == "similarity_batch_size_count":
                calls = s.value
    return total, calls


def serve_rates(srv: Served, pairs: list[tuple[str, str]], clients: tuple[int, ...]) -> dict[int, dict[str, float]]:
    out = {}
    for c in clients:
        n = max(4 * c, len(pairs) // (4 if c == 1 else 1))  # the lone client gets a quarter: it is slow
        n -= n % c
        rows0, calls0 = batch_counts(srv.url)
        row = drive(srv.port or 0, pairs, c, n)
        rows1, calls1 = batch_counts(srv.url)
        row["mean_batch"] = (rows1 - rows0) / max(1.0, calls1 - calls0)
        out[c] = row
        log(
            f"  serve, {c:2d} clients: {row['req_per_s']:6.1f} req/s  p50 {row['p50_s'] * 1000:6.0f} ms  "
            f"p95 {row['p95_s'] * 1000:6.0f} ms  p99 {row['p99_s'] * 1000:6.0f} ms  mean batch {row['mean_batch']:.1f}"
        )
    return out


# ------------------------------------------------------------------------------------ the run
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", help="an existing model directory (default: build the random ViT-B/32)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results-serve.json"))
    args = ap.parse_args()
    results: dict = {"machine": cpu_description(), "load_average_at_start": os.getloadavg()}
    cpu = results["machine"]
    log(f"CPU: {cpu.get('model_name')}, {cpu['cores']} cores; load average {os.getloadavg()[0]:.1f}")
    tmp = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        model_dir = Path(args.model) if args.model else tmp / "model"
        if not args.model:
            from similarity.tools.onnx_export import export_onnx

            t0 = time.perf_counter()
            results["tokenizer"] = make_model(model_dir)
            export_onnx(model_dir, int8=False)
            log(f"model + ONNX export: {time.perf_counter() - t0:.0f} s ({results['tokenizer']})")
        rng = random.Random(0)
        server = ImageServer("127.0.0.1").start()
        sizes = [(640, 480)] * 8 + [(480, 640), (800, 600), (3000, 2000), (1600, 1200)]
        pairs = []
        for i in range(args.pairs):
            url = server.image(f"/img/{i}.jpg", make_jpeg(rng, sizes[i % len(sizes)]), "image/jpeg")
            pairs.append((url, caption(rng, i)))
        csv_path = tmp / "pairs.csv"
        with csv_path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["url", "caption"])
            w.writerows(pairs)
        env = base_env(model_dir)
        rounds = []
        with Served(env=env) as srv:
            srv.wait_ready(timeout=900)
            ready = json.loads(__import__("requests").get(srv.url + "/readyz", timeout=30).text)
            results["model"] = ready["model"]
            m = ready["model"]
            log(f"server ready: {m['backend']}/{m['device']}/{m['dtype']}, loaded in {m['load_seconds']:.1f} s")
            drive(srv.port or 0, pairs, 8, 32)  # warm-up: first batches of each size
            for r in range(args.rounds):
                log(f"round {r + 1}:")
                cli = cli_rate(env, csv_path, tmp)
                log(f"  CLI (similarity score, batch 32): {cli:6.1f} pairs/s")
                served = serve_rates(srv, pairs, CLIENTS if r == 0 else (32,))
                cli_after = cli_rate(env, csv_path, tmp)
                log(f"  CLI again: {cli_after:6.1f} pairs/s")
                ref = (cli + cli_after) / 2
                rounds.append(
                    {"cli_pairs_per_s": [cli, cli_after], "serve": served, "ratio_32": served[32]["req_per_s"] / ref}
                )
                log(f"  serve at 32 clients / CLI (mean of the two around it): {rounds[-1]['ratio_32']:.2f}x")
        results["rounds"] = rounds
        ratios = [r["ratio_32"] for r in rounds]
        p99 = [r["serve"][32]["p99_s"] for r in rounds]
        results["ratio_32_median"] = statistics.median(ratios)
        results["p99_32_max_s"] = max(p99)
        results["load_average_at_end"] = os.getloadavg()
        log(
            f"serve at 32 single-pair clients: {statistics.median(ratios):.2f}x the CLI's pairs/s (rounds: "
            + ", ".join(f"{x:.2f}x" for x in ratios)
            + f"), p99 at most {max(p99):.2f} s; targets: >= 0.7x, p99 < 2 s"
        )
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
