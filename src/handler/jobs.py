"""CSV jobs in S3: split into chunks, fan out over SQS, score, merge in order, report status.

Everything a job owns lives under ``<JOBS_PREFIX><job_id>/``:

    manifest.json            state, source (key, version, etag), counts, header, timings
    chunks/chunk-00000.csv   input records, each chunk a complete CSV with the header
    parts/part-00000.csv     scored rows of that chunk, headerless (written whole, or not at all)
    done/part-00000.json     the chunk's counts and seconds; its presence means the part is final
    merge.lock               who is merging (created with If-None-Match, so one worker merges)

Delivery is at least once everywhere, so every step is idempotent: the job id derives from the
source object's key and version/etag, a chunk re-delivered overwrites the same part with the same
bytes, and the merge writes the same output whoever runs it.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from similarity.chunking import merge_parts, output_header_line, split_csv
from similarity.csvio import open_input
from similarity.csvjob import score_stream
from similarity.errors import JobError
from similarity.fetch import Fetcher
from similarity.model import ClipModel

from .config import ServiceSettings

MERGE_LOCK_STALE_S = 900


class Location(BaseModel):
    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None


class Manifest(BaseModel):
    job_id: str
    state: str  # splitting | running | merging | done | failed | gpu
    source: Location
    output: Location
    created_at: float
    updated_at: float
    path: str = "lambda"  # lambda | gpu
    chunk_rows: int = 0
    chunk_count: int = 0
    row_count: int = 0
    header: list[str] = Field(default_factory=list)
    reason: str | None = None
    scored: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    compute_seconds: float = 0.0
    finished_at: float | None = None
    ecs_task_arn: str | None = None


class ChunkMessage(BaseModel):
    job_id: str
    bucket: str
    chunk: int
    chunks: int


class ChunkDeadline(Exception):
    """Not enough time left in this invocation to finish the chunk: hand it back to the queue."""


@dataclass
class Jobs:
    """S3/SQS/ECS plumbing of the batch path. Clients are passed in (see ``handler.runtime``)."""

    settings: ServiceSettings
    s3: Any
    sqs: Any = None
    ecs: Any = None

    # ------------------------------------------------------------------ keys and small objects
    def prefix(self, job_id: str) -> str:
        return f"{self.settings.jobs_prefix}{job_id}/"

    def chunk_key(self, job_id: str, i: int) -> str:
        return f"{self.prefix(job_id)}chunks/chunk-{i:05d}.csv"

    def part_key(self, job_id: str, i: int) -> str:
        return f"{self.prefix(job_id)}parts/part-{i:05d}.csv"

    def done_key(self, job_id: str, i: int) -> str:
        return f"{self.prefix(job_id)}done/part-{i:05d}.json"

    def _get_json(self, bucket: str, key: str) -> dict | None:
        try:
            return json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise

    def _put_json(self, bucket: str, key: str, data: dict, **extra: Any) -> None:
        self.s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(data).encode(), ContentType="application/json", **extra)

    def load(self, bucket: str, job_id: str) -> Manifest | None:
        data = self._get_json(bucket, f"{self.prefix(job_id)}manifest.json")
        return Manifest.model_validate(data) if data else None

    def save(self, m: Manifest) -> Manifest:
        m.updated_at = time.time()
        self._put_json(m.source.bucket, f"{self.prefix(m.job_id)}manifest.json", m.model_dump())
        return m

    # ------------------------------------------------------------------ starting a job
    @staticmethod
    def job_id_for(src: Location) -> str:
        ident = f"{src.bucket}/{src.key}#{src.version_id or src.etag or ''}"
        return hashlib.sha256(ident.encode()).hexdigest()[:20]

    def default_output(self, key: str) -> str:
        s = self.settings
        rel = key[len(s.input_prefix):] if key.startswith(s.input_prefix) else key.rsplit("/", 1)[-1]
        stem = rel[:-4] if rel.lower().endswith(".csv") else rel
        return f"{s.output_prefix}{stem}_scored.csv"

    def start(self, bucket: str, key: str, version_id: str | None = None, etag: str | None = None,
              output: Location | None = None) -> Manifest:
        if version_id is None and etag is None:
            head = self.s3.head_object(Bucket=bucket, Key=key)  # raises for a missing object
            version_id, etag = head.get("VersionId"), head.get("ETag", "").strip('"')
        src = Location(bucket=bucket, key=key, version_id=version_id, etag=etag)
        job_id = self.job_id_for(src)
        existing = self.load(bucket, job_id)
        if existing is not None and existing.state != "splitting":
            return existing  # the same object delivered again: the job is already under way
        now = time.time()
        m = Manifest(job_id=job_id, state="splitting", source=src,
                     output=output or Location(bucket=bucket, key=self.default_output(key)),
                     created_at=now, updated_at=now, chunk_rows=self.settings.chunk_rows)
        self.save(m)
        try:
            return self._split_and_send(m)
        except JobError as exc:  # bad input: the job fails with its reason, nothing is retried
            m.state, m.reason, m.finished_at = "failed", str(exc), time.time()
            return self.save(m)

    def _split_and_send(self, m: Manifest) -> Manifest:
        s = self.settings
        uri = f"s3://{m.source.bucket}/{m.source.key}"
        with open_input(uri, self.s3) as stream:
            header, chunks = split_csv(stream, s.chunk_rows)
            m.header = header
            gpu = bool(s.ecs_cluster and s.ecs_task_definition)
            rows = count = 0
            with ThreadPoolExecutor(8) as pool:
                pending = []
                for chunk in chunks:
                    rows += chunk.rows
                    count += 1
                    if gpu and rows > s.gpu_min_rows:
                        break  # too big for the Lambda fleet: the GPU task scores the whole file
                    pending.append(pool.submit(self.s3.put_object, Bucket=m.source.bucket,
                                               Key=self.chunk_key(m.job_id, chunk.index),
                                               Body=chunk.text.encode("utf-8"), ContentType="text/csv"))
                    if len(pending) >= 64:
                        for f in pending:
                            f.result()
                        pending = []
                for f in pending:
                    f.result()
        if gpu and rows > s.gpu_min_rows:
            return self._start_gpu(m)
        m.chunk_count, m.row_count = count, rows
        if count == 0:  # a header and no rows: the output is the header alone
            self.s3.put_object(Bucket=m.output.bucket, Key=m.output.key, Body=output_header_line(header),
                               ContentType="text/csv; charset=utf-8")
            m.state, m.finished_at = "done", time.time()
            return self.save(m)
        m.state = "running"
        self.save(m)  # chunk_count is known before any worker can finish
        self._send(m)
        return m

    def _send(self, m: Manifest) -> None:
        entries = [{"Id": str(i), "MessageBody": ChunkMessage(job_id=m.job_id, bucket=m.source.bucket, chunk=i,
                                                              chunks=m.chunk_count).model_dump_json()}
                   for i in range(m.chunk_count)]
        for start in range(0, len(entries), 10):
            batch = entries[start:start + 10]
            for _attempt in range(5):
                resp = self.sqs.send_message_batch(QueueUrl=self.settings.chunk_queue_url, Entries=batch)
                failed = {f["Id"] for f in resp.get("Failed", [])}
                batch = [e for e in batch if e["Id"] in failed]
                if not batch:
                    break
                time.sleep(0.2)
            if batch:
                raise RuntimeError(f"could not enqueue {len(batch)} chunks of job {m.job_id}")

    def _start_gpu(self, m: Manifest) -> Manifest:
        s = self.settings
        command = ["--bucket", m.source.bucket, "--input-key", m.source.key, "--output-bucket", m.output.bucket,
                   "--output-key", m.output.key, "--job-id", m.job_id]
        kwargs: dict[str, Any] = {
            "cluster": s.ecs_cluster,
            "taskDefinition": s.ecs_task_definition,
            "count": 1,
            "startedBy": f"job-{m.job_id}"[:36],
            "overrides": {"containerOverrides": [{"name": s.ecs_container_name, "command": command}]},
            "networkConfiguration": {"awsvpcConfiguration": {"subnets": list(s.ecs_subnets),
                                                             "securityGroups": list(s.ecs_security_groups),
                                                             "assignPublicIp": "DISABLED"}},
        }
        if s.ecs_capacity_provider:
            kwargs["capacityProviderStrategy"] = [{"capacityProvider": s.ecs_capacity_provider, "weight": 1}]
        resp = self.ecs.run_task(**kwargs)
        if resp.get("failures") or not resp.get("tasks"):
            raise RuntimeError(f"RunTask failed for job {m.job_id}: {resp.get('failures')}")
        m.path, m.state, m.ecs_task_arn = "gpu", "gpu", resp["tasks"][0]["taskArn"]
        return self.save(m)

    # ------------------------------------------------------------------ one chunk (the worker)
    def process_chunk(self, msg: ChunkMessage, model: ClipModel, fetcher: Fetcher, message_id: str,
                      time_left: Callable[[], float], batch_size: int = 32, workers: int = 16) -> bool:
        """Score one chunk unless it is already final, then try the merge. Returns True when the
        job's output is complete."""
        m = self.load(msg.bucket, msg.job_id)
        if m is None:
            raise JobError(f"job {msg.job_id} has no manifest")
        if m.state == "done":
            return True
        if not 0 <= msg.chunk < m.chunk_count:
            raise JobError(f"chunk {msg.chunk} out of range for job {msg.job_id} ({m.chunk_count} chunks)")
        bucket = msg.bucket
        if self._get_json(bucket, self.done_key(m.job_id, msg.chunk)) is None:
            reserve = self.settings.worker_reserve_seconds

            def check(_n: int) -> None:
                if time_left() < reserve:
                    raise ChunkDeadline(f"{time_left():.0f}s left, chunk {msg.chunk} handed back")

            check(0)
            src = self.s3.get_object(Bucket=bucket, Key=self.chunk_key(m.job_id, msg.chunk))["Body"].read()
            out = io.StringIO(newline="")
            result = score_stream(io.StringIO(src.decode("utf-8"), newline=""), out, model, fetcher,
                                  batch_size=batch_size, workers=workers, write_header=False, on_row=check)
            # The part is written whole, after every row is scored; then the marker that makes it final.
            self.s3.put_object(Bucket=bucket, Key=self.part_key(m.job_id, msg.chunk),
                               Body=out.getvalue().encode("utf-8"), ContentType="text/csv")
            st = result.stats
            self._put_json(bucket, self.done_key(m.job_id, msg.chunk),
                           {"rows": st.rows, "scored": st.scored, "errors": st.errors, "seconds": result.seconds})
        return self.try_merge(m, owner=message_id)

    # ------------------------------------------------------------------ merge
    def _done_keys(self, m: Manifest) -> list[str]:
        """Keys of the chunks that are final: a listing, no object reads (cheap on every chunk)."""
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=m.source.bucket,
                                                                      Prefix=f"{self.prefix(m.job_id)}done/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def _read_markers(self, m: Manifest, keys: list[str]) -> list[dict]:
        with ThreadPoolExecutor(16) as pool:  # thousands of small GETs: in parallel
            return [d for d in pool.map(lambda k: self._get_json(m.source.bucket, k), keys) if d]

    @staticmethod
    def _sum_errors(markers: list[dict]) -> dict[str, int]:
        errors: Counter[str] = Counter()
        for d in markers:
            errors.update(d.get("errors", {}))
        return dict(errors)

    def _take_lock(self, m: Manifest, owner: str) -> bool:
        key = f"{self.prefix(m.job_id)}merge.lock"
        body = {"owner": owner, "at": time.time()}
        try:
            self._put_json(m.source.bucket, key, body, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise
        held = self._get_json(m.source.bucket, key) or {}
        if held.get("owner") == owner or time.time() - float(held.get("at", 0)) > MERGE_LOCK_STALE_S:
            self._put_json(m.source.bucket, key, body)  # our own retry, or a merger that died: take over
            return True
        return False

    def try_merge(self, m: Manifest, owner: str) -> bool:
        keys = self._done_keys(m)
        if len(keys) < m.chunk_count:
            return False
        if not self._take_lock(m, owner):
            return False  # another worker finished last at the same moment and is merging
        m.state = "merging"
        self.save(m)
        bucket = m.source.bucket

        def parts():
            for i in range(m.chunk_count):
                yield self.s3.get_object(Bucket=bucket, Key=self.part_key(m.job_id, i))["Body"]

        with tempfile.TemporaryFile() as tmp:
            merge_parts(m.header, parts(), tmp)
            tmp.seek(0)
            self.s3.upload_fileobj(tmp, m.output.bucket, m.output.key,
                                   ExtraArgs={"ContentType": "text/csv; charset=utf-8"})
        self._finish(m, self._read_markers(m, keys))
        return True

    def _finish(self, m: Manifest, markers: list[dict]) -> None:
        m.errors, m.scored = self._sum_errors(markers), sum(d.get("scored", 0) for d in markers)
        m.compute_seconds = sum(d.get("seconds", 0.0) for d in markers)
        m.state, m.finished_at = "done", time.time()
        self.save(m)

    # ------------------------------------------------------------------ status
    #: A running job's status reads at most this many chunk markers for its error counts.
    STATUS_MARKERS = 500

    def status(self, bucket: str, job_id: str) -> dict | None:
        m = self.load(bucket, job_id)
        if m is None:
            return None
        end = m.finished_at or time.time()
        errors_complete = True
        if m.state == "done":
            chunks_done, rows_done, errors, seconds = m.chunk_count, m.row_count, dict(m.errors), m.compute_seconds
        elif m.path == "lambda" and m.state in ("running", "merging"):
            keys = self._done_keys(m)
            chunks_done = len(keys)
            # Every chunk holds chunk_rows records except the last: rows done follow from the keys.
            last_rows = m.row_count - (m.chunk_count - 1) * m.chunk_rows
            last_done = self.done_key(m.job_id, m.chunk_count - 1) in keys
            rows_done = (chunks_done - last_done) * m.chunk_rows + (last_rows if last_done else 0)
            markers = self._read_markers(m, keys[: self.STATUS_MARKERS])
            errors_complete = len(keys) <= self.STATUS_MARKERS
            errors = self._sum_errors(markers)
            seconds = sum(d.get("seconds", 0.0) for d in markers) * (len(keys) / max(len(markers), 1))
        else:
            chunks_done, rows_done, errors, seconds = 0, 0, {}, 0.0
        if m.path == "gpu":
            cost = (end - m.created_at) / 3600 * self.settings.gpu_hourly_usd
        else:
            cost = self.settings.lambda_cost_usd(seconds)
        return {
            "job_id": m.job_id,
            "state": m.state,
            "path": m.path,
            "reason": m.reason,
            "input": f"s3://{m.source.bucket}/{m.source.key}",
            "output": f"s3://{m.output.bucket}/{m.output.key}",
            "chunks": {"done": chunks_done, "total": m.chunk_count},
            "rows": {"done": rows_done, "total": m.row_count},
            "errors": errors,
            "errors_complete": errors_complete,
            "elapsed_seconds": round(end - m.created_at, 3),
            "compute_seconds": round(seconds, 3),
            "estimated_cost_usd": round(cost, 6),
        }
