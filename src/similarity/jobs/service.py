"""CSV jobs in S3: split into chunks, fan out, score, merge in order, report status.

Delivery is at least once everywhere, so every step is idempotent: the job id derives from the
source object's key and version/etag, a chunk re-delivered overwrites the same part with the same
bytes, and the merge writes the same output whoever runs it. The service talks to S3 only through
``JobStore`` and to SQS and ECS only through the ``ChunkQueue`` and ``GpuLauncher`` ports.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..cache import EmbeddingCache
from ..config import JobSettings
from ..errors import RunError
from ..fetch import Fetcher
from ..io.chunking import merge_parts, split_csv
from ..io.csvfile import header_line
from ..io.streams import open_input
from ..model import ClipModel
from ..pipeline import FileResult, score_stream
from .models import ChunkMarker, ChunkMessage, JobPath, JobState, Location, Manifest
from .ports import ChunkQueue, GpuLauncher
from .store import JobStore

MERGE_LOCK_STALE_S = 900
#: A running job's status reads at most this many chunk markers for its error counts.
STATUS_MARKERS = 500


class ChunkDeadline(Exception):
    """Not enough time left in this invocation to finish the chunk: hand it back to the queue."""


class JobService:
    def __init__(
        self,
        settings: JobSettings,
        store: JobStore,
        queue: ChunkQueue | None = None,
        launcher: GpuLauncher | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.launcher = launcher

    def load(self, bucket: str, job_id: str) -> Manifest | None:
        return self.store.load(bucket, job_id)

    # ------------------------------------------------------------------ starting a job
    @staticmethod
    def job_id_for(src: Location) -> str:
        ident = f"{src.bucket}/{src.key}#{src.version_id or src.etag or ''}"
        return hashlib.sha256(ident.encode()).hexdigest()[:20]

    def default_output(self, key: str) -> str:
        s = self.settings
        rel = key[len(s.input_prefix) :] if key.startswith(s.input_prefix) else key.rsplit("/", 1)[-1]
        stem = rel[:-4] if rel.lower().endswith(".csv") else rel
        return f"{s.output_prefix}{stem}_scored.csv"

    def start(
        self,
        bucket: str,
        key: str,
        version_id: str | None = None,
        etag: str | None = None,
        output: Location | None = None,
        excel_safe: bool = False,
    ) -> Manifest:
        if version_id is None and etag is None:
            version_id, etag = self.store.head_source(bucket, key)
        src = Location(bucket=bucket, key=key, version_id=version_id, etag=etag)
        job_id = self.job_id_for(src)
        existing = self.store.load(bucket, job_id)
        if existing is not None and existing.state != JobState.SPLITTING:
            return existing  # the same object delivered again: the job is already under way
        now = time.time()
        m = Manifest(
            job_id=job_id,
            state=JobState.SPLITTING,
            source=src,
            output=output or Location(bucket=bucket, key=self.default_output(key)),
            created_at=now,
            updated_at=now,
            chunk_rows=self.settings.chunk_rows,
            excel_safe=excel_safe,
        )
        self.store.save(m)
        try:
            return self._split_and_send(m)
        except RunError as exc:  # bad input: the job fails with its reason, nothing is retried
            return self.fail(m, str(exc))

    def _split_and_send(self, m: Manifest) -> Manifest:
        s = self.settings
        with open_input(m.source.uri, self.store.s3) as stream:
            header, chunks = split_csv(stream, s.chunk_rows)
            m.header = header
            rows = count = 0
            with ThreadPoolExecutor(8) as pool:
                pending: list[Future[None]] = []
                for chunk in chunks:
                    rows += chunk.rows
                    count += 1
                    if s.gpu_enabled and rows > s.gpu_min_rows:
                        break  # too big for the Lambda fleet: the GPU task scores the whole file
                    pending.append(pool.submit(self.store.put_chunk, m, chunk.index, chunk.text))
                    if len(pending) >= 64:
                        for f in pending:
                            f.result()
                        pending = []
                for f in pending:
                    f.result()
        if s.gpu_enabled and rows > s.gpu_min_rows:
            return self._start_gpu(m)
        m.chunk_count, m.row_count = count, rows
        if count == 0:  # a header and no rows: the output is the header alone
            self.store.put_output(m, header_line(header, m.excel_safe))
            m.state, m.finished_at = JobState.DONE, time.time()
            return self.store.save(m)
        m.state = JobState.RUNNING
        self.store.save(m)  # chunk_count is known before any worker can finish
        self._send(m)
        return m

    def _send(self, m: Manifest) -> None:
        if self.queue is None:
            raise RuntimeError("no chunk queue configured (CHUNK_QUEUE_URL)")
        self.queue.send(
            [
                ChunkMessage(job_id=m.job_id, bucket=m.source.bucket, chunk=i, chunks=m.chunk_count)
                for i in range(m.chunk_count)
            ]
        )

    def _start_gpu(self, m: Manifest) -> Manifest:
        if self.launcher is None:
            raise RuntimeError("no GPU launcher configured (ECS_CLUSTER, ECS_TASK_DEFINITION)")
        m.ecs_task_arn = self.launcher.launch(m)
        m.path, m.state = JobPath.GPU, JobState.GPU
        return self.store.save(m)

    # ------------------------------------------------------------------ end states
    def fail(self, m: Manifest, reason: str) -> Manifest:
        m.state, m.reason, m.finished_at = JobState.FAILED, reason, time.time()
        return self.store.save(m)

    def complete_whole(self, m: Manifest, result: FileResult) -> Manifest:
        """The GPU task scored the whole file in one go."""
        st = result.stats
        m.row_count, m.scored, m.errors, m.compute_seconds = st.rows, st.scored, dict(st.errors), result.seconds
        m.state, m.finished_at = JobState.DONE, time.time()
        return self.store.save(m)

    # ------------------------------------------------------------------ one chunk (the worker)
    def process_chunk(
        self,
        msg: ChunkMessage,
        model: ClipModel,
        fetcher: Fetcher,
        message_id: str,
        time_left: Callable[[], float],
        batch_size: int = 32,
        workers: int = 16,
        cache: EmbeddingCache | None = None,
    ) -> bool:
        """Score one chunk unless it is already final, then try the merge. Returns True when the
        job's output is complete. ``cache``: the embedding cache (shared by the workers through
        Redis in the deployment)."""
        m = self.store.load(msg.bucket, msg.job_id)
        if m is None:
            raise RunError(f"job {msg.job_id} has no manifest")
        if m.state == JobState.DONE:
            return True
        if not 0 <= msg.chunk < m.chunk_count:
            raise RunError(f"chunk {msg.chunk} out of range for job {msg.job_id} ({m.chunk_count} chunks)")
        if self.store.marker(m, msg.chunk) is None:
            reserve = self.settings.worker_reserve_seconds

            def check(_n: int) -> None:
                if time_left() < reserve:
                    raise ChunkDeadline(f"{time_left():.0f}s left, chunk {msg.chunk} handed back")

            check(0)
            src = self.store.read_chunk(m, msg.chunk)
            out = io.StringIO(newline="")
            result = score_stream(
                io.StringIO(src, newline=""),
                out,
                model,
                fetcher,
                batch_size=batch_size,
                workers=workers,
                excel_safe=m.excel_safe,
                write_header=False,
                on_row=check,
                cache=cache,
            )
            # The part is written whole, after every row is scored; then the marker that makes it final.
            self.store.put_part(m, msg.chunk, out.getvalue())
            st = result.stats
            self.store.put_marker(
                m,
                msg.chunk,
                ChunkMarker(rows=st.rows, scored=st.scored, errors=dict(st.errors), seconds=result.seconds),
            )
        return self.try_merge(m, owner=message_id)

    # ------------------------------------------------------------------ merge
    def take_lock(self, m: Manifest, owner: str) -> bool:
        body: dict[str, Any] = {"owner": owner, "at": time.time()}
        if self.store.create_lock(m, body):
            return True
        held = self.store.read_lock(m)
        if held.get("owner") == owner or time.time() - float(held.get("at", 0)) > MERGE_LOCK_STALE_S:
            self.store.replace_lock(m, body)  # our own retry, or a merger that died: take over
            return True
        return False

    def try_merge(self, m: Manifest, owner: str) -> bool:
        keys = self.store.done_keys(m)
        if len(keys) < m.chunk_count:
            return False
        if not self.take_lock(m, owner):
            return False  # another worker finished last at the same moment and is merging
        m.state = JobState.MERGING
        self.store.save(m)
        with tempfile.TemporaryFile() as tmp:
            merge_parts(m.header, self.store.parts(m), tmp, excel_safe=m.excel_safe)
            tmp.seek(0)
            self.store.write_output(m, tmp)
        markers = self.store.read_markers(m, keys)
        m.errors, m.scored = _sum_errors(markers), sum(d.scored for d in markers)
        m.compute_seconds = sum(d.seconds for d in markers)
        m.state, m.finished_at = JobState.DONE, time.time()
        self.store.save(m)
        return True

    # ------------------------------------------------------------------ status
    def status(self, bucket: str, job_id: str) -> dict[str, Any] | None:
        m = self.store.load(bucket, job_id)
        if m is None:
            return None
        end = m.finished_at or time.time()
        errors_complete = True
        if m.state == JobState.DONE:
            chunks_done, rows_done, errors, seconds = m.chunk_count, m.row_count, dict(m.errors), m.compute_seconds
        elif m.path == JobPath.LAMBDA and m.state in (JobState.RUNNING, JobState.MERGING):
            keys = self.store.done_keys(m)
            chunks_done = len(keys)
            # Every chunk holds chunk_rows records except the last: rows done follow from the keys.
            last_rows = m.row_count - (m.chunk_count - 1) * m.chunk_rows
            last_done = self.store.done_key(m.job_id, m.chunk_count - 1) in keys
            rows_done = (chunks_done - last_done) * m.chunk_rows + (last_rows if last_done else 0)
            markers = self.store.read_markers(m, keys[:STATUS_MARKERS])
            errors_complete = len(keys) <= STATUS_MARKERS
            errors = _sum_errors(markers)
            seconds = sum(d.seconds for d in markers) * (len(keys) / max(len(markers), 1))
        else:
            chunks_done, rows_done, errors, seconds = 0, 0, {}, 0.0
        if m.path == JobPath.GPU:
            cost = (end - m.created_at) / 3600 * self.settings.gpu_hourly_usd
        else:
            cost = self.settings.lambda_cost_usd(seconds)
        return {
            "job_id": m.job_id,
            "state": m.state.value,
            "path": m.path.value,
            "reason": m.reason,
            "input": m.source.uri,
            "output": m.output.uri,
            "chunks": {"done": chunks_done, "total": m.chunk_count},
            "rows": {"done": rows_done, "total": m.row_count},
            "errors": errors,
            "errors_complete": errors_complete,
            "elapsed_seconds": round(end - m.created_at, 3),
            "compute_seconds": round(seconds, 3),
            "estimated_cost_usd": round(cost, 6),
        }


def _sum_errors(markers: list[ChunkMarker]) -> dict[str, int]:
    errors: Counter[str] = Counter()
    for d in markers:
        errors.update(d.errors)
    return dict(errors)
