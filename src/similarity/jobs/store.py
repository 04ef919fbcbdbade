"""The only code that knows the key layout of a job. Everything a job owns lives under
``<JOBS_PREFIX><job_id>/``:

    manifest.json            state, source (key, version, etag), counts, header, timings; a start
                             writes it only over the version it read (If-Match / If-None-Match)
    starts/attempt-N         one per start of the job (S3 event, its retries, POST /jobs): the count
                             bounds the retries of a start that keeps failing
    fanout.json              written once every chunk message is sent: until then the job is not
                             fanned out, and a re-delivered start sends them all again
    chunks/chunk-00000.csv   input records, each chunk a complete CSV with the header
    parts/part-00000.csv     scored rows of that chunk, headerless (written whole, or not at all)
    done/part-00000.json     the chunk's counts and seconds; its presence means the part is final
    merge.lock               who is merging and until when (created with If-None-Match, taken over
                             with If-Match, so one worker merges at a time)
    merged.json              the ETag of the complete output, written before the manifest says done

It talks to storage only through the ``ObjectStore`` port.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

from .models import ChunkMarker, Location, Manifest
from .objects import Blob, ObjectInfo, ObjectMissing, ObjectStore, PreconditionFailed

JSON = "application/json"
CSV = "text/csv; charset=utf-8"
#: Parts read ahead of the one being written during the merge (each part is one chunk's output).
PREFETCH = 8


class JobStore:
    def __init__(
        self, objects: ObjectStore, jobs_prefix: str = "jobs/", clock: Callable[[], float] = time.time
    ) -> None:
        self.objects = objects
        self.jobs_prefix = jobs_prefix
        self.clock = clock

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

    def fanout_key(self, job_id: str) -> str:
        return f"{self.prefix(job_id)}fanout.json"

    def merged_key(self, job_id: str) -> str:
        return f"{self.prefix(job_id)}merged.json"

    def attempt_key(self, job_id: str, n: int) -> str:
        return f"{self.prefix(job_id)}starts/attempt-{n}"

    # -- small JSON objects
    def get_json(self, bucket: str, key: str) -> dict[str, Any] | None:
        blob = self.objects.get(bucket, key)
        return _json(blob) if blob is not None else None

    def put_json(self, bucket: str, key: str, data: dict[str, Any]) -> str:
        return self.objects.put(bucket, key, json.dumps(data).encode(), JSON)

    # -- manifest
    def load(self, bucket: str, job_id: str) -> Manifest | None:
        data = self.get_json(bucket, self.manifest_key(job_id))
        return Manifest.model_validate(data) if data else None

    def save(self, m: Manifest) -> Manifest:
        m.updated_at = self.clock()
        self.put_json(m.source.bucket, self.manifest_key(m.job_id), m.model_dump(mode="json"))
        return m

    def load_tagged(self, bucket: str, job_id: str) -> tuple[Manifest | None, str | None]:
        """The manifest and its ETag (for ``save_if``); ``(None, None)`` when there is none."""
        blob = self.objects.get(bucket, self.manifest_key(job_id))
        data = _json(blob) if blob is not None else None
        if blob is None or not data:
            return None, None
        return Manifest.model_validate(data), blob.etag

    def save_if(self, m: Manifest, etag: str | None) -> str:
        """Write the manifest only if it is still the one read with ``etag`` (None: only if there
        is none yet); return the new ETag. ``PreconditionFailed`` when someone else wrote it since.
        A write whose answer was lost and whose retry then lost the condition is recognised by its
        bytes, so a start never mistakes its own write for a rival's."""
        m.updated_at = self.clock()
        key = self.manifest_key(m.job_id)
        body = json.dumps(m.model_dump(mode="json")).encode()
        try:
            if etag is None:
                created = self.objects.put_if_absent(m.source.bucket, key, body, JSON)
                if created is None:
                    raise PreconditionFailed(f"s3://{m.source.bucket}/{key} exists")
                return created
            return self.objects.put(m.source.bucket, key, body, JSON, if_match=etag)
        except PreconditionFailed:
            blob = self.objects.get(m.source.bucket, key)
            if blob is not None and blob.data == body:
                return blob.etag
            raise

    # -- starts and fan-out
    def claim_attempt(self, bucket: str, job_id: str, limit: int) -> int:
        """Number this start of the job: 1 for the first, and so on (at most ``limit + 1``)."""
        for n in range(1, limit + 1):
            if self.objects.put_if_absent(bucket, self.attempt_key(job_id, n), b"", JSON) is not None:
                return n
        return limit + 1

    def fanned_out(self, m: Manifest) -> bool:
        return self.objects.get(m.source.bucket, self.fanout_key(m.job_id)) is not None

    def mark_fanned_out(self, m: Manifest) -> None:
        self.put_json(m.source.bucket, self.fanout_key(m.job_id), {"messages": m.chunk_count, "at": self.clock()})

    # -- chunks, parts, markers
    def put_chunk(self, m: Manifest, index: int, text: str) -> None:
        self.objects.put(m.source.bucket, self.chunk_key(m.job_id, index), text.encode("utf-8"), CSV)

    def read_chunk(self, m: Manifest, index: int) -> str:
        blob = self.objects.get(m.source.bucket, self.chunk_key(m.job_id, index))
        if blob is None:
            raise ObjectMissing(self.chunk_key(m.job_id, index))
        return blob.data.decode("utf-8")

    def put_part(self, m: Manifest, index: int, text: str) -> None:
        self.objects.put(m.source.bucket, self.part_key(m.job_id, index), text.encode("utf-8"), CSV)

    def parts(self, m: Manifest) -> Iterator[bytes]:
        """Every part in order, ``PREFETCH`` read ahead: the merge waits on S3's latency once, not
        once per part, and holds at most that many parts."""

        def read(i: int) -> bytes:
            blob = self.objects.get(m.source.bucket, self.part_key(m.job_id, i))
            if blob is None:
                raise ObjectMissing(f"{self.part_key(m.job_id, i)} (its marker exists)")
            return blob.data

        with ThreadPoolExecutor(PREFETCH) as pool:
            ahead: list[Future[bytes]] = []
            try:
                for i in range(m.chunk_count):
                    ahead.append(pool.submit(read, i))
                    if len(ahead) > PREFETCH:
                        yield ahead.pop(0).result()
                while ahead:
                    yield ahead.pop(0).result()
            finally:
                for f in ahead:
                    f.cancel()

    def marker(self, m: Manifest, index: int) -> ChunkMarker | None:
        data = self.get_json(m.source.bucket, self.done_key(m.job_id, index))
        return ChunkMarker.model_validate(data) if data else None

    def put_marker(self, m: Manifest, index: int, marker: ChunkMarker) -> None:
        self.put_json(m.source.bucket, self.done_key(m.job_id, index), marker.model_dump())

    def done_keys(self, m: Manifest) -> list[str]:
        """Keys of the chunks that are final: a listing, no object reads (cheap on every chunk)."""
        return self.objects.list(m.source.bucket, f"{self.prefix(m.job_id)}done/")

    def read_markers(self, m: Manifest, keys: list[str]) -> list[ChunkMarker]:
        with ThreadPoolExecutor(16) as pool:  # thousands of small GETs: in parallel
            found = pool.map(lambda k: self.get_json(m.source.bucket, k), keys)
            return [ChunkMarker.model_validate(d) for d in found if d]

    # -- merge lock
    def create_lock(self, m: Manifest, body: dict[str, Any]) -> str | None:
        """Create the lock if there is none: its ETag, or None when one exists."""
        return self.objects.put_if_absent(m.source.bucket, self.lock_key(m.job_id), json.dumps(body).encode(), JSON)

    def read_lock(self, m: Manifest) -> tuple[dict[str, Any], str] | None:
        blob = self.objects.get(m.source.bucket, self.lock_key(m.job_id))
        return (_json(blob) or {}, blob.etag) if blob is not None else None

    def replace_lock(self, m: Manifest, body: dict[str, Any], if_match: str) -> str:
        """Overwrite the lock we read (ETag ``if_match``); ``PreconditionFailed`` if it changed."""
        return self.objects.put(
            m.source.bucket, self.lock_key(m.job_id), json.dumps(body).encode(), JSON, if_match=if_match
        )

    # -- merged output
    def merged(self, m: Manifest) -> dict[str, Any] | None:
        return self.get_json(m.source.bucket, self.merged_key(m.job_id))

    def mark_merged(self, m: Manifest, etag: str) -> None:
        self.put_json(m.source.bucket, self.merged_key(m.job_id), {"etag": etag, "at": self.clock()})

    # -- source and output objects
    def head_source(self, bucket: str, key: str) -> ObjectInfo:
        """Raises ``ObjectMissing``."""
        return self.objects.head(bucket, key)

    def open_source(self, src: Location) -> BinaryIO:
        """The source as the job saw it: the version the event named, even if overwritten since."""
        return self.objects.open(src.bucket, src.key, src.version_id)

    def head_output(self, m: Manifest) -> ObjectInfo | None:
        try:
            return self.objects.head(m.output.bucket, m.output.key)
        except ObjectMissing:
            return None

    def output_writer(self, out: Location) -> contextlib.AbstractContextManager[BinaryIO]:
        return self.objects.writer(out.bucket, out.key, CSV)

    def put_output(self, m: Manifest, body: bytes) -> str:
        return self.objects.put(m.output.bucket, m.output.key, body, CSV)


def _json(blob: Blob) -> dict[str, Any] | None:
    try:
        data = json.loads(blob.data) if blob.data else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
