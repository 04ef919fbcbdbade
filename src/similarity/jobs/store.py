"""The only code that knows the S3 key layout of a job. Everything a job owns lives under
``<JOBS_PREFIX><job_id>/``:

    manifest.json            state, source (key, version, etag), counts, header, timings
    chunks/chunk-00000.csv   input records, each chunk a complete CSV with the header
    parts/part-00000.csv     scored rows of that chunk, headerless (written whole, or not at all)
    done/part-00000.json     the chunk's counts and seconds; its presence means the part is final
    merge.lock               who is merging (created with If-None-Match, so one worker merges)
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from botocore.exceptions import ClientError

from ..fetch.sources import S3_MISSING
from .models import ChunkMarker, Manifest

PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})


class JobStore:
    def __init__(self, s3: Any, jobs_prefix: str = "jobs/") -> None:
        self.s3 = s3
        self.jobs_prefix = jobs_prefix

    # -- keys
    def prefix(self, job_id: str) -> str:
        return f"{self.jobs_prefix}{job_id}/"

    def manifest_key(self, job_id: str) -> str:
        return f"{self.prefix(job_id)}manifest.json"

    def chunk_key(self, job_id: str, i: int) -> str:
        return f"{self.prefix(job_id)}chunks/chunk-{i:05d}.csv"

    def part_key(self, job_id: str, i: int) -> str:
        return f"{self.prefix(job_id)}parts/part-{i:05d}.csv"

    def done_key(self, job_id: str, i: int) -> str:
        return f"{self.prefix(job_id)}done/part-{i:05d}.json"

    def lock_key(self, job_id: str) -> str:
        return f"{self.prefix(job_id)}merge.lock"

    # -- small JSON objects
    def get_json(self, bucket: str, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if exc.response["Error"]["Code"] in S3_MISSING:
                return None
            raise
        return data if isinstance(data, dict) else None

    def put_json(self, bucket: str, key: str, data: dict[str, Any], **extra: Any) -> None:
        self.s3.put_object(
            Bucket=bucket, Key=key, Body=json.dumps(data).encode(), ContentType="application/json", **extra
        )

    # -- manifest
    def load(self, bucket: str, job_id: str) -> Manifest | None:
        data = self.get_json(bucket, self.manifest_key(job_id))
        return Manifest.model_validate(data) if data else None

    def save(self, m: Manifest) -> Manifest:
        m.updated_at = time.time()
        self.put_json(m.source.bucket, self.manifest_key(m.job_id), m.model_dump(mode="json"))
        return m

    # -- chunks, parts, markers
    def put_chunk(self, m: Manifest, index: int, text: str) -> None:
        self.s3.put_object(
            Bucket=m.source.bucket,
            Key=self.chunk_key(m.job_id, index),
            Body=text.encode("utf-8"),
            ContentType="text/csv",
        )

    def read_chunk(self, m: Manifest, index: int) -> str:
        body: bytes = self.s3.get_object(Bucket=m.source.bucket, Key=self.chunk_key(m.job_id, index))["Body"].read()
        return body.decode("utf-8")

    def put_part(self, m: Manifest, index: int, text: str) -> None:
        self.s3.put_object(
            Bucket=m.source.bucket,
            Key=self.part_key(m.job_id, index),
            Body=text.encode("utf-8"),
            ContentType="text/csv",
        )

    def parts(self, m: Manifest) -> Iterator[BinaryIO]:
        for i in range(m.chunk_count):
            yield self.s3.get_object(Bucket=m.source.bucket, Key=self.part_key(m.job_id, i))["Body"]

    def marker(self, m: Manifest, index: int) -> ChunkMarker | None:
        data = self.get_json(m.source.bucket, self.done_key(m.job_id, index))
        return ChunkMarker.model_validate(data) if data else None

    def put_marker(self, m: Manifest, index: int, marker: ChunkMarker) -> None:
        self.put_json(m.source.bucket, self.done_key(m.job_id, index), marker.model_dump())

    def done_keys(self, m: Manifest) -> list[str]:
        """Keys of the chunks that are final: a listing, no object reads (cheap on every chunk)."""
        keys: list[str] = []
        paginator = self.s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=m.source.bucket, Prefix=f"{self.prefix(m.job_id)}done/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def read_markers(self, m: Manifest, keys: list[str]) -> list[ChunkMarker]:
        with ThreadPoolExecutor(16) as pool:  # thousands of small GETs: in parallel
            found = pool.map(lambda k: self.get_json(m.source.bucket, k), keys)
            return [ChunkMarker.model_validate(d) for d in found if d]

    # -- merge lock
    def create_lock(self, m: Manifest, body: dict[str, Any]) -> bool:
        """Create the lock if there is none; False when another exists."""
        try:
            self.put_json(m.source.bucket, self.lock_key(m.job_id), body, IfNoneMatch="*")
            return True
        except ClientError as exc:
            if exc.response["Error"]["Code"] not in PRECONDITION_FAILED:
                raise
        return False

    def read_lock(self, m: Manifest) -> dict[str, Any]:
        return self.get_json(m.source.bucket, self.lock_key(m.job_id)) or {}

    def replace_lock(self, m: Manifest, body: dict[str, Any]) -> None:
        self.put_json(m.source.bucket, self.lock_key(m.job_id), body)

    # -- source and output objects
    def head_source(self, bucket: str, key: str) -> tuple[str | None, str | None]:
        head = self.s3.head_object(Bucket=bucket, Key=key)  # raises for a missing object
        return head.get("VersionId"), head.get("ETag", "").strip('"') or None

    def write_output(self, m: Manifest, data: BinaryIO) -> None:
        self.s3.upload_fileobj(
            data, m.output.bucket, m.output.key, ExtraArgs={"ContentType": "text/csv; charset=utf-8"}
        )

    def put_output(self, m: Manifest, body: bytes) -> None:
        self.s3.put_object(Bucket=m.output.bucket, Key=m.output.key, Body=body, ContentType="text/csv; charset=utf-8")
