"""How large a file the Lambda path of the S3 batch pipeline handles: the splitter and the merge,
timed on real S3 calls (botocore over HTTP to moto's server in its own process on 127.0.0.1).

    .venv/bin/python bench/jobs.py [--rows 50000,200000] [--chunk-rows 500]

For each size it drops a CSV, runs the splitter (``JobService.start``: parse, write the chunks,
fan out the messages) and, after writing every chunk's scored part and marker as the workers
would (scoring itself is per chunk and does not grow with the file), the merge
(``JobService.try_merge``: parts read ahead, the output streamed as a multipart upload). It prints
wall time, this process's CPU time, and the Python heap's peak during the merge (tracemalloc),
which stays flat as the file grows; then the largest file each step could take within its Lambda
timeout at the measured rates, with the splitter's CPU scaled to its 1024 MB share of a vCPU.
moto on loopback stands in for S3: its latency per request is of S3's order, but it shares this
machine's cores with the client, so the figures are a floor, not a promise.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SPLIT_TIMEOUT_S = 900  # S3EventFunction
SPLIT_VCPU = 1024 / 1769  # Lambda gives one vCPU at 1769 MB
MERGE_TIMEOUT_S = 300  # WorkerFunction; the merge starts after the last chunk is scored
MERGE_VCPU = 4096 / 1769
SCORE_COLUMNS = ",0.8698,0.7396,,\r\n"  # similarity, cosine, error, truncated: what scoring appends


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_csv(rows: int) -> bytes:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "url", "caption"])
    for i in range(rows):
        w.writerow(
            [i, f"https://images.example.com/catalogue/{i % 5000:05d}/photo-{i}.jpg", f"a photo of item {i}, red"]
        )
    return buf.getvalue().encode()


def run(rows: int, chunk_rows: int) -> dict[str, float]:
    from similarity.aws import make_client
    from similarity.config import JobSettings
    from similarity.jobs import ChunkMarker, make_service

    s3, sqs = make_client("s3"), make_client("sqs")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    queue = sqs.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    settings = JobSettings(
        bucket=bucket,
        chunk_queue_url=queue,
        chunk_rows=chunk_rows,
        ecs_cluster="",
        ecs_task_definition="",
        lambda_max_rows=10**9,
    )
    jobs = make_service(settings, s3, sqs)
    body = make_csv(rows)
    s3.put_object(Bucket=bucket, Key="incoming/big.csv", Body=body)
    head = s3.head_object(Bucket=bucket, Key="incoming/big.csv")

    wall, cpu = time.perf_counter(), time.process_time()
    m = jobs.start(bucket, "incoming/big.csv", version_id=head["VersionId"], etag=head["ETag"].strip('"'))
    split_wall, split_cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert m.state.value == "running" and m.row_count == rows, m

    # What the workers leave: every chunk's scored part (its rows plus the score columns) and marker.
    out_bytes = 0
    for i in range(m.chunk_count):
        chunk = jobs.store.read_chunk(m, i)
        lines = chunk.split("\r\n")[1:-1]  # headerless rows (csv.writer ends records with \r\n)
        part = "".join(line + SCORE_COLUMNS for line in lines)
        out_bytes += len(part.encode())
        jobs.store.put_part(m, i, part)
        jobs.store.put_marker(m, i, ChunkMarker(rows=len(lines), scored=len(lines), seconds=1.0))

    tracemalloc.start()
    wall, cpu = time.perf_counter(), time.process_time()
    assert jobs.try_merge(m, owner="bench", time_left=lambda: 300.0)
    merge_wall, merge_cpu = time.perf_counter() - wall, time.process_time() - cpu
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    done = jobs.load(bucket, m.job_id)
    assert done is not None and done.state.value == "done"
    size = s3.head_object(Bucket=bucket, Key=m.output.key)["ContentLength"]
    return {
        "rows": rows,
        "chunks": m.chunk_count,
        "input_mb": len(body) / 1e6,
        "output_mb": size / 1e6,
        "split_wall_s": split_wall,
        "split_cpu_s": split_cpu,
        "merge_wall_s": merge_wall,
        "merge_cpu_s": merge_cpu,
        "merge_heap_peak_mb": peak / 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="50000,200000", help="comma-separated file sizes in rows")
    ap.add_argument("--chunk-rows", type=int, default=500)
    args = ap.parse_args()
    proc, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        results = [run(int(n), args.chunk_rows) for n in args.rows.split(",")]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} vCPUs (shared, load average {load}); S3 = moto server on 127.0.0.1 (its own process)"
    )
    print(
        f"chunks of {args.chunk_rows} rows, rows of ~{results[0]['input_mb'] * 1e6 / results[0]['rows']:.0f} B in and "
        f"~{results[0]['output_mb'] * 1e6 / results[0]['rows']:.0f} B out"
    )
    print(
        f"{'rows':>9} {'chunks':>6} {'in MB':>7} {'out MB':>7} | {'split s':>8} {'cpu s':>6} {'rows/s':>8} | "
        f"{'merge s':>8} {'cpu s':>6} {'MB/s':>6} {'heap peak MB':>12}"
    )
    for r in results:
        print(
            f"{r['rows']:>9} {r['chunks']:>6} {r['input_mb']:>7.1f} {r['output_mb']:>7.1f} | {r['split_wall_s']:>8.1f} "
            f"{r['split_cpu_s']:>6.1f} {r['rows'] / r['split_wall_s']:>8.0f} | {r['merge_wall_s']:>8.1f} "
            f"{r['merge_cpu_s']:>6.1f} {r['output_mb'] / r['merge_wall_s']:>6.1f} {r['merge_heap_peak_mb']:>12.1f}"
        )
    big = results[-1]
    # Splitter: the slower of the wall time measured here and its CPU on a 1024 MB Lambda's share.
    split_s_per_row = max(big["split_wall_s"], big["split_cpu_s"] / SPLIT_VCPU) / big["rows"]
    merge_s_per_mb = max(big["merge_wall_s"], big["merge_cpu_s"] / MERGE_VCPU) / big["output_mb"]
    bytes_per_row_out = big["output_mb"] * 1e6 / big["rows"]
    split_rows = SPLIT_TIMEOUT_S / split_s_per_row
    merge_rows = MERGE_TIMEOUT_S * 0.9 / merge_s_per_mb * 1e6 / bytes_per_row_out
    print(
        f"largest file at these rates: splitter {split_rows / 1e6:.1f} M rows in {SPLIT_TIMEOUT_S} s "
        f"(1024 MB = {SPLIT_VCPU:.2f} vCPU); merge {merge_rows / 1e6:.1f} M rows "
        f"({merge_rows * bytes_per_row_out / 1e9:.2f} GB out) in 90% of {MERGE_TIMEOUT_S} s; "
        f"so the Lambda path takes about {min(split_rows, merge_rows) / 1e6:.1f} M rows of this shape"
    )
    print(json.dumps({"cpu": cpu_name(), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
