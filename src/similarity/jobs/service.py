"""CSV jobs in S3: split into chunks, fan out, score, merge in order, report status.

Delivery is at least once everywhere, so every step is idempotent: the job id derives from the
source object's key and version/etag (and the output and escaping asked for), a chunk re-delivered
overwrites the same part with the same bytes, and the merge writes the same output whoever runs it. The service talks to storage only
through ``JobStore`` and to SQS and ECS only through the ``ChunkQueue`` and ``GpuLauncher`` ports.

No job may stay in progress for good, so each step either finishes or leaves something that will
retry it:

* **Start.** A job counts as fanned out only once every chunk message is sent (``fanout.json``); a
  re-delivered start (Lambda's retry, a duplicate event, ``POST /jobs``) sends them all again.
  Bad input fails the job at once; any other error is raised for a retry, and the start that
  reaches ``JOB_START_ATTEMPTS`` fails the job with the error as its reason. ``POST /jobs`` with a
  splitter (``submit``) only creates the job ``splitting`` and hands the split to the splitter
  function: a lost hand-off is failed by ``status`` after ``JOB_START_TIMEOUT_SECONDS``, a refused
  one at once (and the same request again hands it off anew). Each write a start
  makes to the manifest is conditional on the manifest it read or last wrote (``_Claim``), so of
  two deliveries racing, the one overtaken writes nothing more: no job moves backwards.
* **Merge.** The lock names its owner and expires when the owner's invocation ends; it is released
  when the attempt fails, so a message redriven from the dead-letter queue (a new message id) finds
  it free. While the job is not done, the message that should merge it is never acknowledged
  (``MergeBusy`` hands it back until the lock's holder finishes or its lock expires).
* **Finish.** ``merged.json`` records the complete output before the manifest says done, so a retry
  after a failed manifest write only writes the manifest.
* **Overwritten input.** An output belongs to the input's current version: a job for an older
  version writes nothing once the current version has a job writing the same output, and fails
  as ``superseded`` (``_check_current``, before the write and again before it completes).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TextIO

from ..config import JobSettings
from ..errors import InputNotFound, MalformedCsv, RunError
from ..io.chunking import Chunk, merge_parts, split_csv
from ..io.csvfile import header_line
from ..io.text import TextLines
from ..pipeline import FileResult
from .models import ChunkMarker, ChunkMessage, JobPath, JobState, Location, Manifest, StartRequest
from .objects import ObjectChanged, ObjectMissing, PreconditionFailed
from .ports import ChunkQueue, ChunkScorer, GpuLauncher, SplitNotStarted, SplitStarter
from .store import JobStore

log = logging.getLogger(__name__)

#: A lock written by a version without ``expires`` is stale after this long.
MERGE_LOCK_STALE_S = 900
#: A running job's status reads at most this many chunk markers for its error counts.
STATUS_MARKERS = 500
#: Tries of the write that marks a job done before the attempt gives up (and is retried).
FINAL_WRITE_TRIES = 3
#: The reason of a job whose splitter could not be invoked: the same request again starts it anew.
SPLIT_NOT_STARTED = "split_not_started"
#: Chunk text the split holds back (with the GPU path) until the file is known to stay on the
#: Lambda path: `gpu_from` rows of a usual CSV are far less; the splitter has 1 GB.
HOLD_BYTES = 128 * 1024 * 1024


class JobTooLarge(RunError):
    """More rows than the Lambda path merges within the worker's timeout, and no GPU path."""

    code = "too_large_for_lambda"


class JobSuperseded(RunError):
    """The input was overwritten and the job for its current version writes the same output: this
    job, for an older version, must not overwrite what that one writes."""

    code = "superseded"


class StartOvertaken(Exception):
    """Another start (or a worker) wrote the job's manifest since this start last read or wrote it:
    the job is theirs to carry on, and this start writes nothing more to it."""


@dataclass
class _Claim:
    """The manifest's ETag as one start last read or wrote it. Each write of the start is
    conditional on it, so a start never moves a job backwards: a slow first start cannot save
    ``running`` over ``done``, nor a duplicate a fresh ``splitting`` over ``running``."""

    store: JobStore
    etag: str | None

    def save(self, m: Manifest) -> Manifest:
        try:
            self.etag = self.store.save_if(m, self.etag)
        except PreconditionFailed:
            raise StartOvertaken(m.job_id) from None
        return m


class ChunkDeadline(Exception):
    """Not enough time left in this invocation to finish the chunk: hand it back to the queue."""


class MergeBusy(Exception):
    """Every chunk is done but another attempt holds the merge lock: this message must come back
    (not be acknowledged) in ``retry_after`` seconds, when that attempt is over one way or another."""

    def __init__(self, owner: str, retry_after: float) -> None:
        super().__init__(f"merge lock held by {owner} for {retry_after:.0f}s more")
        self.owner = owner
        self.retry_after = retry_after


class JobService:
    def __init__(
        self,
        settings: JobSettings,
        store: JobStore,
        queue: ChunkQueue | None = None,
        launcher: GpuLauncher | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        *,
        splitter: SplitStarter | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = queue
        self.launcher = launcher
        self.clock = clock
        self.sleep = sleep
        self.splitter = splitter

    def load(self, bucket: str, job_id: str) -> Manifest | None:
        return self.store.load(bucket, job_id)

    # ------------------------------------------------------------------ starting a job
    @staticmethod
    def job_id_for(src: Location, output: Location | None = None, excel_safe: bool = False) -> str:
        """One source version scored into ``output`` (None: the default output), escaped for Excel
        or not: the same request always names the same job, and asking for another output or the
        other escaping is another job (not the first one's answer under the new request)."""
        ident = f"{src.bucket}/{src.key}#{src.version_id or src.etag or ''}"
        if output is not None:
            ident += f"\0output={output.bucket}/{output.key}"
        if excel_safe:
            ident += "\0excel_safe"
        return hashlib.sha256(ident.encode()).hexdigest()[:20]

    def job_id(self, src: Location, output: Location | None, excel_safe: bool) -> str:
        """``job_id_for``, an output equal to the default counting as the default: an S3 drop and a
        ``POST /jobs`` naming that output are one job."""
        if output is not None and (output.bucket, output.key) == (src.bucket, self.default_output(src.key)):
            output = None
        return self.job_id_for(src, output, excel_safe)

    def default_output(self, key: str) -> str:
        """The output of ``key`` when none is asked for. Two different input keys never share one:

        * a key under the input prefix keeps its path below the output prefix, ``_scored`` going
          before the name's extension, which is kept as it is: ``<input_prefix>a/b.csv`` ->
          ``<output_prefix>a/b_scored.csv``, ``b.CSV`` -> ``b_scored.CSV``, ``b`` -> ``b_scored``;
        * any other key (``POST /jobs`` only) keeps its whole path under ``<output_prefix>_/``:
          ``uploads/2024/b.csv`` -> ``<output_prefix>_/uploads/2024/b_scored.csv``, never the output
          of the S3 drop ``<input_prefix>uploads/2024/b.csv`` (``<output_prefix>uploads/2024/...``);
        * so that no input-prefix key reaches ``_/`` either, a first folder made only of
          underscores gets one more: ``<input_prefix>_/b.csv`` -> ``<output_prefix>__/b_scored.csv``.

        One-to-one because the name's extension is found again in the output's name (``_scored``
        has no dot), and the three kinds of path start differently below the output prefix."""
        s = self.settings
        if key.startswith(s.input_prefix):
            rel = key[len(s.input_prefix) :]
            first, slash, _rest = rel.partition("/")
            if slash and first and first.strip("_") == "":
                rel = "_" + rel
        else:
            rel = "_/" + key
        folder, slash, name = rel.rpartition("/")
        dot = name.rfind(".")
        stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
        return f"{s.output_prefix}{folder}{slash}{stem}_scored{ext}"

    def submit(self, bucket: str, key: str, output: Location | None = None, excel_safe: bool = False) -> Manifest:
        """``POST /jobs``. With a splitter: check the input, create the job ``splitting`` and hand
        the split to the splitter without waiting (a large file takes longer to split than API
        Gateway waits for an answer). Without one: ``start`` here. Raises ``InputNotFound`` for a
        missing object, ``SplitNotStarted`` when the splitter refused the job."""
        if self.splitter is None:
            return self.start(bucket, key, output=output, excel_safe=excel_safe)
        try:
            info = self.store.head_source(bucket, key)
        except ObjectMissing:
            raise InputNotFound(f"s3://{bucket}/{key} does not exist") from None
        src = Location(bucket=bucket, key=key, version_id=info.version_id, etag=info.etag or None)
        job_id = self.job_id(src, output, excel_safe)
        request = StartRequest(
            bucket=bucket, key=key, version_id=src.version_id, etag=src.etag, output=output, excel_safe=excel_safe
        )
        existing, etag = self.store.load_tagged(bucket, job_id)
        if existing is not None and existing.state == JobState.RUNNING and not self.store.fanned_out(existing):
            # Its messages are not all out. A start still sending them (written within the
            # splitter's time) is left to finish; one that died long ago is replaced.
            if self.clock() - existing.updated_at > self.settings.start_timeout_seconds:
                self.splitter.start(request)
            return existing
        if existing is not None and not _never_handed_off(existing):
            # Under way or finished. A job still `splitting` is not handed off again: each start
            # claims an attempt, and repeated requests would use up JOB_START_ATTEMPTS.
            return existing
        m = self._new_job(job_id, src, output, excel_safe)
        try:
            etag = self.store.save_if(m, etag)  # created only if absent (or still the refused one)
        except PreconditionFailed:
            # An S3 drop's start or another request wrote the job first: it is theirs to carry on.
            return self.store.load(bucket, job_id) or m
        try:
            self.splitter.start(request)
        except SplitNotStarted as exc:
            # Failed now rather than left `splitting` until the status times it out; the same
            # request again creates it anew (_never_handed_off).
            m.state, m.reason, m.finished_at = JobState.FAILED, f"{SPLIT_NOT_STARTED}: {exc}", self.clock()
            with contextlib.suppress(PreconditionFailed):  # a start got it after all: theirs
                self.store.save_if(m, etag)
            raise
        return m

    def _new_job(
        self, job_id: str, src: Location, output: Location | None, excel_safe: bool,
        existing: Manifest | None = None, attempt: int = 0,
    ) -> Manifest:  # fmt: skip
        """A ``splitting`` manifest for ``src`` (keeping ``existing``'s creation time)."""
        now = self.clock()
        return Manifest(
            job_id=job_id,
            state=JobState.SPLITTING,
            source=src,
            output=output or Location(bucket=src.bucket, key=self.default_output(src.key)),
            created_at=existing.created_at if existing is not None else now,
            updated_at=now,
            chunk_rows=self.settings.chunk_rows,
            excel_safe=excel_safe,
            start_attempt=attempt,
        )

    def start(
        self,
        bucket: str,
        key: str,
        version_id: str | None = None,
        etag: str | None = None,
        output: Location | None = None,
        excel_safe: bool = False,
    ) -> Manifest:
        """Create the job for this object version, or carry on with it: a job not yet fanned out is
        split (or its messages sent) again; any other job is returned as it is. Raises
        ``InputNotFound`` for a missing object."""
        if version_id is None and etag is None:
            try:
                info = self.store.head_source(bucket, key)
            except ObjectMissing:
                raise InputNotFound(f"s3://{bucket}/{key} does not exist") from None
            version_id, etag = info.version_id, info.etag or None
        src = Location(bucket=bucket, key=key, version_id=version_id, etag=etag)
        job_id = self.job_id(src, output, excel_safe)
        existing, etag = self.store.load_tagged(bucket, job_id)
        resend = existing is not None and existing.state == JobState.RUNNING and not self.store.fanned_out(existing)
        if existing is not None and existing.state != JobState.SPLITTING and not resend:
            return existing  # the same object delivered again: the job is already under way
        attempt = self.store.claim_attempt(bucket, job_id, self.settings.start_attempts)
        claim = _Claim(self.store, etag)
        if attempt > self.settings.start_attempts and existing is not None:
            # every attempt started and none finished or raised: each was killed (out of time or memory)
            return self._fail_claimed(existing, _killed(self.settings.start_attempts), claim)
        if existing is not None and resend:
            m = existing
        else:
            m = self._new_job(job_id, src, output, excel_safe, existing, attempt)
        try:
            if resend:
                log.warning("job %s: resending its %d chunk messages (attempt %d)", job_id, m.chunk_count, attempt)
                self._fan_out(m)
                return m
            claim.save(m)
            return self._split_and_send(m, claim)
        except StartOvertaken:
            return self._overtaken(m)
        except RunError as exc:  # bad input: the job fails with its reason, nothing is retried
            return self._fail_claimed(m, str(exc), claim)
        except UnicodeDecodeError as exc:
            return self._fail_claimed(m, str(MalformedCsv(f"the file is not UTF-8 text ({exc})")), claim)
        except ObjectMissing as exc:  # the version the event names is gone
            return self._fail_claimed(m, str(InputNotFound(f"{exc} does not exist")), claim)
        except ObjectChanged as exc:
            return self._fail_claimed(m, f"input_changed: {exc}", claim)
        except Exception as exc:
            if attempt < self.settings.start_attempts:
                raise  # retried: Lambda's retries of the S3 event, or the caller of POST /jobs
            reason = f"start_failed: {type(exc).__name__}: {exc} (attempt {attempt} of {self.settings.start_attempts})"
            log.exception("job %s failed", job_id)
            return self._fail_claimed(m, reason, claim)

    def _overtaken(self, m: Manifest) -> Manifest:
        log.warning("job %s: another start or a worker wrote the job meanwhile; leaving it to them", m.job_id)
        return self.store.load(m.source.bucket, m.job_id) or m

    def _split_and_send(self, m: Manifest, claim: _Claim) -> Manifest:
        s = self.settings
        # Past LAMBDA_MAX_ROWS the merge cannot finish in a worker: the GPU task takes it even
        # below GPU_MIN_ROWS.
        gpu_from = min(s.gpu_min_rows, s.lambda_max_rows)
        with self.store.open_source(m.source) as raw:
            # Decoded as the CLI decodes (UTF-8, or UTF-16 with its byte-order mark): a bad byte is
            # an InputEncodingError naming its offset, which fails the job with that reason.
            header, chunks = split_csv(TextLines(raw), s.chunk_rows)
            m.header = header
            rows = count = 0
            # With the GPU path, chunks are held until the file is known to stay on the Lambda
            # path, so a file for the GPU task (which reads the source itself) leaves none behind.
            # At most `gpu_from` rows are held; past HOLD_BYTES they are written after all.
            holding, held_bytes = s.gpu_enabled, 0
            held: list[Chunk] = []
            with ThreadPoolExecutor(8) as pool:
                pending: list[Future[None]] = []

                def write(chunk: Chunk) -> None:
                    nonlocal pending
                    pending.append(pool.submit(self.store.put_chunk, m, chunk.index, chunk.text))
                    if len(pending) >= 64:
                        for f in pending:
                            f.result()
                        pending = []

                for chunk in chunks:
                    rows += chunk.rows
                    count += 1
                    if s.gpu_enabled and rows > gpu_from:
                        break  # too big for the Lambda fleet: the GPU task scores the whole file
                    if rows > s.lambda_max_rows:
                        raise JobTooLarge(
                            f"more than LAMBDA_MAX_ROWS ({s.lambda_max_rows}) rows: the merge would not finish "
                            "within the worker's timeout; split the file, or deploy the GPU path (GpuImageUri)"
                        )
                    if not holding:
                        write(chunk)
                        continue
                    held.append(chunk)
                    held_bytes += len(chunk.text)
                    if held_bytes > HOLD_BYTES:
                        holding = False
                        for c in held:
                            write(c)
                        held = []
                to_gpu = s.gpu_enabled and rows > gpu_from
                for c in [] if to_gpu else held:
                    write(c)
                for f in pending:
                    f.result()
        if to_gpu:
            # Only the rows read so far: a lower bound of the file's rows until the GPU task
            # finishes and records them all (complete_whole); status reports it as the total.
            m.row_count = rows
            return self._start_gpu(m, claim)
        m.chunk_count, m.row_count = count, rows
        if count == 0:  # a header and no rows: the output is the header alone
            self._check_current(m)
            self.store.put_output(m, header_line(header, m.excel_safe))
            m.state, m.finished_at = JobState.DONE, self.clock()
            return claim.save(m)
        # Saved before any message exists, so no worker can race this write; the job is not
        # fanned out until _fan_out has sent every message.
        m.state = JobState.RUNNING
        claim.save(m)
        self._fan_out(m)
        return m

    def _fan_out(self, m: Manifest) -> None:
        if self.queue is None:
            raise RuntimeError("no chunk queue configured (CHUNK_QUEUE_URL)")
        self.queue.send(
            [
                ChunkMessage(job_id=m.job_id, bucket=m.source.bucket, chunk=i, chunks=m.chunk_count)
                for i in range(m.chunk_count)
            ]
        )
        self.store.mark_fanned_out(m)

    def _start_gpu(self, m: Manifest, claim: _Claim) -> Manifest:
        if self.launcher is None:
            raise RuntimeError("no GPU launcher configured (ECS_CLUSTER, ECS_TASK_DEFINITION)")
        m.ecs_task_arn = self.launcher.launch(m)
        m.path, m.state = JobPath.GPU, JobState.GPU
        return claim.save(m)

    # ------------------------------------------------------------------ the output belongs to the current version
    def _check_current(self, m: Manifest) -> None:
        """Raise ``JobSuperseded`` when the input has been overwritten and the job for its current
        version writes the same output: that job's output must not be replaced by this older one.
        Without such a job (the new upload's event not handled yet, or never to be) the version
        this job read is still written: an output is never left missing for lack of a newer one."""
        src = m.source
        if not (src.version_id or src.etag):
            return  # a manual GPU run of whatever is there: no version to compare
        try:
            info = self.store.head_source(src.bucket, src.key)
        except ObjectMissing:
            return  # deleted since: no newer version's job to give way to
        if (info.version_id == src.version_id) if src.version_id else (info.etag == src.etag):
            return
        current = Location(bucket=src.bucket, key=src.key, version_id=info.version_id, etag=info.etag or None)
        for excel_safe in (m.excel_safe, not m.excel_safe):
            newer = self.store.load(src.bucket, self.job_id(current, m.output, excel_safe))
            if newer is not None and newer.state != JobState.FAILED:  # a failed one writes nothing
                raise JobSuperseded(
                    f"{src.uri} was overwritten: its current version ({info.version_id or info.etag}) has job "
                    f"{newer.job_id}, which writes {m.output.uri}; this job's version "
                    f"({src.version_id or src.etag}) is not written over it"
                )

    # ------------------------------------------------------------------ end states
    def fail(self, m: Manifest, reason: str) -> Manifest:
        """Fail the job with ``reason``, unless it finished meanwhile: then the finished job."""
        for _ in range(FINAL_WRITE_TRIES):
            current, etag = self.store.load_tagged(m.source.bucket, m.job_id)
            if current is not None and current.state in (JobState.DONE, JobState.FAILED):
                return current  # finished meanwhile (or already failed with the first reason)
            m.state, m.reason, m.finished_at = JobState.FAILED, reason, self.clock()
            try:
                self.store.save_if(m, etag)
                return m
            except PreconditionFailed:
                continue  # written between the read and the write (finished, perhaps): look again
        return self.store.load(m.source.bucket, m.job_id) or m

    def _fail_claimed(self, m: Manifest, reason: str, claim: _Claim) -> Manifest:
        """Fail the job only if nobody wrote it since ``claim`` (else it is someone else's now)."""
        m.state, m.reason, m.finished_at = JobState.FAILED, reason, self.clock()
        try:
            return claim.save(m)
        except StartOvertaken:
            return self._overtaken(m)

    def complete_whole(self, m: Manifest, result: FileResult) -> Manifest:
        """The GPU task scored the whole file in one go."""
        st = result.stats
        m.row_count, m.scored, m.errors, m.compute_seconds = st.rows, st.scored, dict(st.errors), result.seconds
        m.state, m.finished_at = JobState.DONE, self.clock()
        return self.store.save(m)

    def task_stopped(self, bucket: str, job_id: str, task_arn: str, reason: str) -> Manifest | None:
        """The job's GPU task stopped (ECS task state change). A job still in state ``gpu`` then
        never will be finished by it: it fails with the task's reason. None for an unknown job."""
        m = self.store.load(bucket, job_id)
        if m is None:
            return None
        if m.state != JobState.GPU or (m.ecs_task_arn and task_arn and m.ecs_task_arn != task_arn):
            return m  # finished (or failed) by the task itself, or another task's event
        return self.fail(m, f"gpu_task_failed: {reason}")

    # ------------------------------------------------------------------ the whole file (the GPU task)
    def score_whole(self, m: Manifest, score: Callable[[Iterable[str], TextIO], FileResult]) -> FileResult:
        """Score the job's source version into its output in one stream (no chunks): ``score``
        reads CSV lines and writes the scored CSV, header included. The output appears only whole,
        and not at all over the output of a newer version's job (``JobSuperseded``)."""
        self._check_current(m)
        with self.store.open_source(m.source) as src, self.store.output_writer(m.output) as raw:
            dst = io.TextIOWrapper(raw, encoding="utf-8", newline="", write_through=True)
            try:
                result = score(TextLines(src), dst)
            except UnicodeDecodeError as exc:
                raise MalformedCsv(f"the file is not UTF-8 text ({exc})") from None
            finally:
                dst.flush()
                dst.detach()
            self._check_current(m)  # again right before the upload completes: the scoring took hours
            return result

    # ------------------------------------------------------------------ one chunk (the worker)
    def process_chunk(
        self, msg: ChunkMessage, scorer: ChunkScorer, message_id: str, time_left: Callable[[], float]
    ) -> bool:
        """Score one chunk unless it is already final, then try the merge. True when the job is
        finished (done, or failed: nothing more to do for this message); False when other chunks
        are still to come. Raises ``ChunkDeadline`` or ``MergeBusy`` when the message must come back."""
        m = self.store.load(msg.bucket, msg.job_id)
        if m is None:
            raise RunError(f"job {msg.job_id} has no manifest")
        if m.state in (JobState.DONE, JobState.FAILED):
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
            result = scorer(io.StringIO(src, newline=""), out, excel_safe=m.excel_safe, on_row=check)
            # The part is written whole, after every row is scored; then the marker that makes it final.
            self.store.put_part(m, msg.chunk, out.getvalue())
            st = result.stats
            self.store.put_marker(
                m,
                msg.chunk,
                ChunkMarker(rows=st.rows, scored=st.scored, errors=dict(st.errors), seconds=result.seconds),
            )
        return self.try_merge(m, owner=message_id, time_left=time_left)

    def hand_back(self, receipt: str, delay_seconds: float) -> None:
        if self.queue is None:
            raise RuntimeError("no chunk queue configured (CHUNK_QUEUE_URL)")
        self.queue.hand_back(receipt, int(delay_seconds + 0.999))

    # ------------------------------------------------------------------ merge
    def take_lock(self, m: Manifest, owner: str, ttl: float) -> str:
        """Take the merge lock for ``ttl`` seconds (the rest of the caller's invocation): return the
        lock's ETag (to release it), or raise ``MergeBusy``. A lock that expired, was released, or
        is the caller's own (a retry of the same message) is taken over, atomically (If-Match)."""
        now = self.clock()
        body: dict[str, Any] = {"owner": owner, "at": now, "expires": now + max(ttl, 1.0)}
        for _ in range(5):
            etag = self.store.create_lock(m, body)
            if etag is not None:
                return etag
            held = self.store.read_lock(m)
            if held is None:
                continue  # released by deletion, or its creator's write not visible yet
            data, held_etag = held
            expires = float(data.get("expires", float(data.get("at", 0)) + MERGE_LOCK_STALE_S))
            if data.get("owner") == owner or data.get("released") or expires <= now:
                try:
                    return self.store.replace_lock(m, body, if_match=held_etag)
                except PreconditionFailed:
                    continue  # someone else took it over first: look again
            raise MergeBusy(str(data.get("owner")), max(expires - now, 1.0))
        raise MergeBusy("unknown", 5.0)

    def release_lock(self, m: Manifest, owner: str, etag: str) -> None:
        """Best effort: a lock not released expires with its owner's invocation anyway."""
        try:
            self.store.replace_lock(m, {"owner": owner, "released": self.clock()}, if_match=etag)
        except Exception:  # taken over (it had expired) or storage down: it expires
            log.warning("job %s: merge lock not released", m.job_id, exc_info=True)

    def try_merge(self, m: Manifest, owner: str, time_left: Callable[[], float] = lambda: 300.0) -> bool:
        keys = self.store.done_keys(m)
        if len(keys) < m.chunk_count:
            return False  # not the last chunk: whoever finishes the last one merges
        etag = self.take_lock(m, owner, ttl=time_left())
        try:
            current = self.store.load(m.source.bucket, m.job_id)
            if current is not None and current.state in (JobState.DONE, JobState.FAILED):
                return True  # merged by the lock's previous holder
            m.state = JobState.MERGING
            self.store.save(m)
            merged, out = self.store.merged(m), self.store.head_output(m)
            if not (merged and out and out.etag == merged.get("etag")):
                try:
                    self._check_current(m)
                    with self.store.output_writer(m.output) as dst:
                        merge_parts(
                            m.header, (io.BytesIO(p) for p in self.store.parts(m)), dst, excel_safe=m.excel_safe
                        )
                        # Again right before the upload completes (the merge may take minutes): a
                        # newer version's job that appeared meanwhile keeps the output.
                        self._check_current(m)
                except JobSuperseded as exc:
                    log.warning("job %s: %s", m.job_id, exc)
                    self.fail(m, str(exc))
                    return True
                written = self.store.head_output(m)
                self.store.mark_merged(m, written.etag if written else "")
            markers = self.store.read_markers(m, keys)
            m.errors, m.scored = _sum_errors(markers), sum(d.scored for d in markers)
            m.compute_seconds = sum(d.seconds for d in markers)
            m.state, m.finished_at = JobState.DONE, self.clock()
            self._final_save(m)
            return True
        finally:
            self.release_lock(m, owner, etag)

    def _final_save(self, m: Manifest) -> None:
        for attempt in range(FINAL_WRITE_TRIES):
            try:
                self.store.save(m)
                return
            except Exception:
                if attempt == FINAL_WRITE_TRIES - 1:
                    raise  # the message comes back; merged.json spares the retry the merge
                log.warning("job %s: writing the done manifest failed; trying again", m.job_id, exc_info=True)
                self.sleep(0.5 * 2**attempt)

    # ------------------------------------------------------------------ status
    def status(self, bucket: str, job_id: str) -> dict[str, Any] | None:
        """``GET /jobs/{id}``. On the Lambda path (running, merging, and failed too) chunks and
        rows done, errors and compute seconds follow from the chunk markers written so far;
        ``rows.total`` is the file's rows. A GPU job has no chunks (``chunks`` 0 of 0) and, until
        its task finishes, ``rows`` done 0 of the rows the split counted before it chose the GPU
        path: a lower bound (just over ``GPU_MIN_ROWS``, or ``LAMBDA_MAX_ROWS`` where lower); done,
        the task's count of every row. None for an unknown job."""
        m, etag = self.store.load_tagged(bucket, job_id)
        if m is None:
            return None
        if m.state == JobState.SPLITTING and self.clock() - m.updated_at > self.settings.start_timeout_seconds:
            # No start is running (it would have written since); one that writes now wins.
            m = self._fail_claimed(m, _killed(None), _Claim(self.store, etag))
        end = m.finished_at or self.clock()
        errors_complete = True
        if m.state == JobState.DONE:
            chunks_done, rows_done, errors, seconds = m.chunk_count, m.row_count, dict(m.errors), m.compute_seconds
        elif (
            m.path == JobPath.LAMBDA
            and m.chunk_count
            and m.state in (JobState.RUNNING, JobState.MERGING, JobState.FAILED)
        ):
            # A failed job counts too: its chunks may all have been scored (and paid for) before
            # it failed (superseded at the merge, say).
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


def _never_handed_off(m: Manifest) -> bool:
    """The job failed because its splitter could not be invoked, and no start ever ran for it."""
    return m.state == JobState.FAILED and m.start_attempt == 0 and (m.reason or "").startswith(SPLIT_NOT_STARTED)


def _killed(attempts: int | None) -> str:
    what = f"{attempts} attempts" if attempts else "the last attempt"
    return (
        f"start_failed: {what} to split the file stopped without an error (out of time or memory): "
        "split the file, or deploy the GPU path for it"
    )


def _sum_errors(markers: list[ChunkMarker]) -> dict[str, int]:
    errors: Counter[str] = Counter()
    for d in markers:
        errors.update(d.errors)
    return dict(errors)
