"""JobService's protocol with in-memory ports (tests/unit/fakes.py): no job stays in progress for
good, whatever step fails, and every retry ends in the output a single run would write.

Classes of stuck job (issue 22 A1-A4), each tested over its variants:
  A1 fan-out failing midway (every batch position, the fan-out marker, all attempts failing)
  A2 the merge dead-lettered, then redriven (released lock, lock of a killed attempt, old locks)
  A3 reads cut off and writes lost during the merge (parts, markers, the final manifest write)
  A4 a file that raises on every attempt (Latin-1 bytes, any unexpected error)
"""

from __future__ import annotations

import csv
import io

import pytest
from fakes import Clock, FakeLauncher, FakeObjectStore, FakeQueue, FakeScorer, Injected, whole_file

from similarity.config import JobSettings
from similarity.errors import InputNotFound, RunError
from similarity.jobs import (
    ChunkDeadline,
    ChunkMessage,
    JobService,
    JobState,
    JobStore,
    LambdaSplitStarter,
    Location,
    Manifest,
    MergeBusy,
    PreconditionFailed,
    SplitNotStarted,
    StartRequest,
)
from similarity.jobs.service import FINAL_WRITE_TRIES

B = "bucket"
KEY = "incoming/x.csv"
OUT = "scored/x_scored.csv"


def make_csv(rows: int = 25) -> str:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "url", "caption"])
    for i in range(rows):
        w.writerow([i, f"https://img.example/{i % 7}.png", f"caption {i}" if i % 9 else f'a "quoted"\nnewline {i}'])
    return buf.getvalue()


class World:
    def __init__(self, chunk_rows: int = 2, gpu: bool = False, **settings) -> None:
        self.objects = FakeObjectStore()
        self.queue = FakeQueue()
        self.launcher = FakeLauncher()
        self.clock = Clock()
        gpu_path = {"ecs_cluster": "gpu", "ecs_task_definition": "td", "ecs_subnets": "subnet-a", "gpu_min_rows": 10}
        self.settings = JobSettings(
            bucket=B, chunk_queue_url="q", chunk_rows=chunk_rows, **{**(gpu_path if gpu else {}), **settings}
        )
        self.jobs = JobService(
            self.settings,
            JobStore(self.objects, clock=self.clock),
            self.queue,
            self.launcher,
            clock=self.clock,
            sleep=lambda _s: None,
        )
        self.scorer = FakeScorer()
        self.ids = 0

    def drop(self, body: str | bytes, key: str = KEY) -> Manifest:
        data = body.encode() if isinstance(body, str) else body
        v = self.objects._write(B, key, data)
        return self.start(key, v.version_id, v.etag)

    def start(self, key: str = KEY, version_id: str | None = None, etag: str | None = None) -> Manifest:
        return self.jobs.start(B, key, version_id=version_id, etag=etag)

    def work(self, msg: ChunkMessage, message_id: str | None = None, time_left: float = 300.0) -> bool:
        self.ids += 1
        return self.jobs.process_chunk(msg, self.scorer, message_id or f"msg-{self.ids}", lambda: time_left)

    def drain(self) -> None:
        """Every message sent so far, once each (duplicates included), as SQS would deliver them."""
        for msg in list(self.queue.sent):
            self.work(msg)

    def state(self, job_id: str) -> JobState:
        m = self.jobs.load(B, job_id)
        assert m is not None
        return m.state

    def output(self) -> str:
        return self.objects.text(B, OUT)


# ------------------------------------------------------------------------------ the happy path
def test_merge_equals_one_run_over_the_file() -> None:
    w = World()
    body = make_csv()
    m = w.drop(body)
    assert m.state == JobState.RUNNING and m.chunk_count == 13 and len(w.queue.sent) == 13
    w.drain()
    assert w.state(m.job_id) == JobState.DONE
    assert w.output() == whole_file(body)
    assert w.objects.uploads_open == 0 and w.objects.uploads_aborted == 0


# ------------------------------------------------------------------------------ A1: fan-out midway
@pytest.mark.parametrize("failing_batch", [0, 1])
def test_fan_out_failing_midway_is_sent_again_by_the_retry(failing_batch: int) -> None:
    """The second SendMessageBatch (or the first) fails on every botocore attempt: the job is not
    fanned out, and Lambda's retry of the S3 event sends every message again."""
    w = World()
    body = make_csv()
    w.queue.fail_at_batch, w.queue.fail_times = failing_batch, 1
    with pytest.raises(Injected):
        w.drop(body)
    [job_id] = {k.split("/")[1] for k in w.objects.keys(B, "jobs/")}
    assert len(w.queue.sent) == 10 * failing_batch  # only what went out before the failure
    m = w.jobs.load(B, job_id)
    assert m.state == JobState.RUNNING and not w.jobs.store.fanned_out(m)
    w.drain()  # the workers score what they got; nobody can merge: chunks are missing
    assert w.state(job_id) == JobState.RUNNING
    again = w.start(KEY, m.source.version_id, m.source.etag)  # Lambda's retry of the same event
    assert again.job_id == job_id and w.jobs.store.fanned_out(again)
    assert {msg.chunk for msg in w.queue.sent} == set(range(13))
    w.drain()
    assert w.state(job_id) == JobState.DONE and w.output() == whole_file(body)


def test_post_jobs_on_a_job_not_fanned_out_sends_again() -> None:
    """POST /jobs on the same object (no version given: the latest is looked up) finds the job
    that is not fanned out and sends its messages, instead of returning it stuck."""
    w = World()
    body = make_csv()
    w.queue.fail_at_batch, w.queue.fail_times = 1, 1
    with pytest.raises(Injected):
        w.drop(body)
    m = w.start(KEY)  # as ApiService.start_job calls it
    assert w.jobs.store.fanned_out(m) and {msg.chunk for msg in w.queue.sent} == set(range(13))
    w.drain()
    assert w.state(m.job_id) == JobState.DONE


def test_fan_out_marker_lost_means_every_message_again() -> None:
    w = World()
    body = make_csv()
    w.objects.fail("put", "fanout.json")
    with pytest.raises(Injected):
        w.drop(body)
    assert len(w.queue.sent) == 13
    m = w.start(KEY)
    assert len(w.queue.sent) == 26 and w.jobs.store.fanned_out(m)  # duplicates: workers are idempotent
    w.drain()
    assert w.state(m.job_id) == JobState.DONE and w.output() == whole_file(body)
    assert w.scorer.calls == 13  # each chunk scored once: the second delivery finds its marker


def test_fan_out_failing_on_every_attempt_fails_the_job_with_the_reason() -> None:
    w = World()
    w.queue.fail_at_batch, w.queue.fail_times = 0, 99
    for _ in range(w.settings.start_attempts - 1):
        with pytest.raises(Injected):
            w.drop(make_csv()) if not w.objects.keys(B, "jobs/") else w.start(KEY)
    m = w.start(KEY)
    assert m.state == JobState.FAILED
    assert "start_failed" in m.reason and "SendMessageBatch" in m.reason and "attempt 3 of 3" in m.reason
    assert w.jobs.status(B, m.job_id)["reason"] == m.reason
    assert w.start(KEY).state == JobState.FAILED  # a later delivery returns the failed job


def test_split_failing_midway_starts_over() -> None:
    w = World()
    body = make_csv()
    w.objects.fail("put", "chunk-00004")
    with pytest.raises(Injected):
        w.drop(body)
    m = w.start(KEY)
    assert m.state == JobState.RUNNING and len(w.queue.sent) == 13
    w.drain()
    assert w.output() == whole_file(body)


# ------------------------------------------------------------------------------ A2: merge and redrive
def _last_chunk_fails_merge(w: World, body: str, failures: int) -> Manifest:
    """Every chunk but the last scored; the last one's merge fails ``failures`` times."""
    m = w.drop(body)
    for msg in w.queue.sent[:-1]:
        assert w.work(msg) is False
    w.objects.fail("get", "parts/part-00006", times=failures)
    return m


def test_redriven_message_completes_the_job_right_away() -> None:
    """The merge fails on all three receives; the message goes to the DLQ. The README's redrive
    sends it back with a new message id: the job completes on that first delivery."""
    w = World()
    body = make_csv()
    m = _last_chunk_fails_merge(w, body, failures=3)
    last = w.queue.sent[-1]
    for _receive in range(3):  # the same message id on each receive
        with pytest.raises(Injected):
            w.work(last, message_id="dead-message")
        assert w.state(m.job_id) == JobState.MERGING
    assert w.objects.uploads_aborted == 3 and not w.objects.keys(B, OUT)  # nothing half-written
    assert w.work(last, message_id="redriven-new-id") is True
    assert w.state(m.job_id) == JobState.DONE and w.output() == whole_file(body)


def test_lock_of_a_killed_attempt_blocks_only_until_its_deadline() -> None:
    """An attempt killed mid-merge (Lambda timeout: no cleanup) leaves its lock. Another message
    is not acknowledged (MergeBusy) until the lock expires with the dead attempt's deadline; then
    it takes the lock over and merges."""
    w = World()
    body = make_csv()
    m = w.drop(body)
    for msg in w.queue.sent[:-1]:
        w.work(msg)
    w.jobs.take_lock(m, owner="killed-attempt", ttl=120)  # the killed invocation had 120 s left
    last = w.queue.sent[-1]
    with pytest.raises(MergeBusy) as busy:
        w.work(last, message_id="other")
    assert 119 <= busy.value.retry_after <= 120  # the worker hands the message back for that long
    assert w.state(m.job_id) != JobState.DONE
    w.clock.advance(121)
    assert w.work(last, message_id="other") is True
    assert w.state(m.job_id) == JobState.DONE and w.output() == whole_file(body)


def test_lock_from_before_expiry_times_is_stale_after_fifteen_minutes() -> None:
    w = World()
    m = w.drop(make_csv(5))
    for msg in w.queue.sent[:-1]:
        w.work(msg)
    w.objects.put(B, w.jobs.store.lock_key(m.job_id), b'{"owner": "old", "at": %d}' % w.clock(), "application/json")
    with pytest.raises(MergeBusy):
        w.work(w.queue.sent[-1])
    w.clock.advance(901)
    assert w.work(w.queue.sent[-1]) is True


def test_lock_holder_retrying_takes_its_own_lock_again() -> None:
    w = World()
    m = w.drop(make_csv(5))
    for msg in w.queue.sent[:-1]:
        w.work(msg)
    w.jobs.take_lock(m, owner="same-message", ttl=300)
    assert w.work(w.queue.sent[-1], message_id="same-message") is True


def test_concurrent_takeover_of_an_expired_lock_lets_one_through() -> None:
    w = World()
    m = w.drop(make_csv(5))
    w.jobs.take_lock(m, owner="dead", ttl=10)
    w.clock.advance(11)
    w.jobs.take_lock(m, owner="first", ttl=300)
    with pytest.raises(MergeBusy) as busy:
        w.jobs.take_lock(m, owner="second", ttl=300)
    assert busy.value.owner == "first"


def test_message_of_a_finished_job_is_acknowledged() -> None:
    w = World()
    m = w.drop(make_csv(5))
    w.drain()
    assert w.state(m.job_id) == JobState.DONE
    assert all(w.work(msg) is True for msg in w.queue.sent)


# ------------------------------------------------------------------------------ A3: cut-off reads, lost writes
@pytest.mark.parametrize("what", ["parts/part-00000", "parts/part-00012", "done/part-00003"])
def test_a_read_failing_during_the_merge_costs_one_attempt(what: str) -> None:
    w = World()
    body = make_csv()
    m = w.drop(body)
    w.objects.fail("get", lambda k, what=what: what in k and w.objects.keys(B, "jobs/" + m.job_id + "/done/")[12:])
    with pytest.raises(Injected):
        w.drain()
    assert w.state(m.job_id) == JobState.MERGING
    if "parts/" in what:  # a part cut off: no output at all (the upload is aborted)
        assert not w.objects.keys(B, OUT)
    assert w.work(w.queue.sent[-1]) is True
    assert w.output() == whole_file(body)


@pytest.mark.parametrize("lost_answer", [False, True])
def test_final_manifest_write_failing_leaves_a_retry_that_only_writes_the_manifest(lost_answer: bool) -> None:
    """The output is complete but the write that marks the job done fails (every try of this
    attempt). The retry finds merged.json with the output's ETag and writes the manifest only."""
    w = World()
    body = make_csv()
    m = w.drop(body)
    output_there = lambda k: k.endswith("manifest.json") and bool(w.objects.keys(B, OUT))  # noqa: E731
    w.objects.fail("put", output_there, times=FINAL_WRITE_TRIES, after=lost_answer)
    with pytest.raises(Injected):
        w.drain()
    assert w.output() == whole_file(body)
    if not lost_answer:
        assert w.state(m.job_id) == JobState.MERGING
    writes = w.objects.calls["writer"]
    assert w.work(w.queue.sent[-1], message_id="retry") is True
    assert w.state(m.job_id) == JobState.DONE
    assert w.objects.calls["writer"] == writes  # the output was not written again
    st = w.jobs.status(B, m.job_id)
    assert st["rows"] == {"done": 25, "total": 25} and st["chunks"] == {"done": 13, "total": 13}


def test_failed_merge_aborts_its_upload() -> None:
    w = World()
    m = w.drop(make_csv())
    w.objects.fail("get", "parts/part-00010")
    with pytest.raises(Injected):
        w.drain()
    assert w.objects.uploads_aborted == 1 and w.objects.uploads_open == 0
    assert not w.objects.keys(B, OUT) and w.state(m.job_id) == JobState.MERGING


# ------------------------------------------------------------------------------ A4: inputs that raise
@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("id,url,caption\n1,https://x/a.png,caf\xe9 cr\xe8me\n".encode("latin-1"), "not valid utf-8 at byte 36 "),
        (b"url,caption\n" + b"https://x/a.png,ok\n" * 3000 + b"https://x/b.png,\xff\xfe\n", "at byte 57028 (line 3002"),
        ("url,caption\nhttps://x/a.png,hi\n".encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    ],
    ids=["latin-1", "deep-in-the-file", "utf-16-without-bom"],
)
def test_undecodable_file_fails_the_job_at_once_with_the_reason(body: bytes, says: str) -> None:
    w = World()
    m = w.drop(body)
    assert m.state == JobState.FAILED and m.reason.startswith("bad_encoding: ") and says in m.reason, m.reason
    assert w.queue.sent == []
    assert w.jobs.status(B, m.job_id)["state"] == "failed"


def test_utf16_with_its_byte_order_mark_is_read_as_the_cli_reads_it() -> None:
    w = World()
    text = make_csv(5)
    m = w.drop(text.encode("utf-16"))
    assert m.state == JobState.RUNNING and m.row_count == 5
    w.drain()
    assert w.output() == whole_file(text)


def test_unexpected_error_while_splitting_fails_the_job_on_the_last_attempt() -> None:
    """Anything that raises on every attempt (here the source read) ends failed with the reason,
    on the attempt Lambda gives last, instead of staying 'splitting'."""
    w = World()
    v = w.objects._write(B, KEY, make_csv().encode())
    w.objects.fail("open", KEY, times=99, exc=RuntimeError("the reader broke"))
    for _ in range(w.settings.start_attempts - 1):
        with pytest.raises(RuntimeError):
            w.start(KEY, v.version_id, v.etag)
        [job_id] = {k.split("/")[1] for k in w.objects.keys(B, "jobs/")}
        assert w.state(job_id) == JobState.SPLITTING
    m = w.start(KEY, v.version_id, v.etag)
    assert m.state == JobState.FAILED and "RuntimeError: the reader broke" in m.reason


def test_a_file_too_large_for_the_lambda_path_fails_at_the_split() -> None:
    w = World(lambda_max_rows=20)
    m = w.drop(make_csv(25))
    assert m.state == JobState.FAILED and m.reason.startswith("too_large_for_lambda: more than LAMBDA_MAX_ROWS (20)")
    assert w.queue.sent == []
    assert World(lambda_max_rows=20, gpu=True).drop(make_csv(25)).state == JobState.GPU  # the GPU path takes it


def test_starts_killed_on_every_attempt_leave_a_failed_job() -> None:
    """Attempts that never return (Lambda's timeout or out of memory kills them: no exception to
    catch) leave 'splitting'. The status fails such a job once no start can still be running, and
    a start after every attempt was used fails it at once."""
    w = World()
    v = w.objects._write(B, KEY, make_csv().encode())
    w.objects.fail("open", KEY, times=99, exc=KeyboardInterrupt())  # stands in for the kill

    def killed_start() -> None:
        with pytest.raises(KeyboardInterrupt):
            w.start(KEY, v.version_id, v.etag)

    killed_start()
    [job_id] = {k.split("/")[1] for k in w.objects.keys(B, "jobs/")}
    w.clock.advance(600)
    assert w.jobs.status(B, job_id)["state"] == "splitting"  # Lambda's retry may still come
    w.clock.advance(w.settings.start_timeout_seconds)
    st = w.jobs.status(B, job_id)
    assert st["state"] == "failed" and "stopped without an error" in st["reason"]
    w2 = World()
    v2 = w2.objects._write(B, KEY, make_csv().encode())
    w2.objects.fail("open", KEY, times=99, exc=KeyboardInterrupt())
    for _ in range(w2.settings.start_attempts):
        with pytest.raises(KeyboardInterrupt):
            w2.start(KEY, v2.version_id, v2.etag)
    m = w2.start(KEY)  # e.g. POST /jobs after three killed invocations
    assert m.state == JobState.FAILED and "3 attempts" in m.reason


def test_input_errors_fail_at_once() -> None:
    w = World()
    m = w.drop("link,caption\nx,y\n")
    assert m.state == JobState.FAILED and "no_url_column" in m.reason


# ------------------------------------------------------------------------------ versions, deadlines, GPU
def test_the_version_the_event_names_is_read_even_if_overwritten() -> None:
    w = World()
    first = make_csv(5)
    v1 = w.objects._write(B, KEY, first.encode())
    w.objects._write(B, KEY, make_csv(40).encode())  # overwritten before the splitter ran
    m = w.start(KEY, v1.version_id, v1.etag)
    assert m.row_count == 5
    w.drain()
    assert w.output() == whole_file(first)


def test_chunk_near_the_deadline_is_handed_back_unwritten() -> None:
    w = World(worker_reserve_seconds=20)
    m = w.drop(make_csv(5))
    with pytest.raises(ChunkDeadline):
        w.work(w.queue.sent[0], time_left=10)
    assert not w.objects.keys(B, f"jobs/{m.job_id}/parts/")
    w.jobs.hand_back("receipt-1", w.settings.handback_seconds)
    assert w.queue.handed_back == [("receipt-1", 5)]


def test_gpu_path_starts_one_task_and_a_stopped_task_fails_the_job() -> None:
    w = World(gpu=True)
    w.objects.fail("put", lambda k: k.endswith("manifest.json") and bool(w.launcher.launched))
    with pytest.raises(Injected):
        w.drop(make_csv(30))
    m = w.start(KEY)  # the retry launches again: the launcher starts no second task for the job
    assert m.state == JobState.GPU and w.launcher.launched == [m.job_id] and w.queue.sent == []
    stopped = w.jobs.task_stopped(B, m.job_id, m.ecs_task_arn or "", "task stopped; container scorer exit 137")
    assert stopped.state == JobState.FAILED and "exit 137" in stopped.reason
    assert w.jobs.status(B, m.job_id)["reason"].startswith("gpu_task_failed")


def test_stopped_task_leaves_a_finished_job_alone() -> None:
    w = World(gpu=True)
    m = w.drop(make_csv(30))
    w.jobs.fail(m, "malformed_csv: line 3")  # the task failed the job itself, with its reason
    after = w.jobs.task_stopped(B, m.job_id, m.ecs_task_arn or "", "exit 2")
    assert after.reason == "malformed_csv: line 3"
    assert w.jobs.task_stopped(B, "0" * 20, "", "exit 1") is None


# ------------------------------------------------------------------------------ overwritten inputs, rival starts
def test_older_versions_merge_gives_way_to_the_newer_versions_job() -> None:
    w = World()
    old, new = make_csv(25), make_csv(3)
    m1 = w.drop(old)
    m2 = w.drop(new)  # the input overwritten: the new version's job
    for msg in [x for x in w.queue.sent if x.job_id == m2.job_id]:
        w.work(msg)
    assert w.state(m2.job_id) == JobState.DONE and w.output() == whole_file(new)
    for msg in [x for x in w.queue.sent if x.job_id == m1.job_id]:
        assert w.work(msg) in (False, True)
    stale = w.jobs.load(B, m1.job_id)
    assert stale.state == JobState.FAILED and stale.reason.startswith("superseded: ") and m2.job_id in stale.reason
    assert w.output() == whole_file(new) and w.objects.uploads_aborted == 0  # refused before any upload began
    assert all(w.work(msg) is True for msg in w.queue.sent if msg.job_id == m1.job_id)  # acknowledged


def test_older_version_gives_way_even_when_it_would_merge_first() -> None:
    """Once the newer version has a job, the output is that job's: the older one does not write
    it first either (no output flips from new rows to old and back)."""
    w = World()
    old, new = make_csv(3), make_csv(25)
    m1, m2 = w.drop(old), w.drop(new)
    w.drain()  # the old (small) job's chunks come first
    assert (w.state(m1.job_id), w.state(m2.job_id)) == (JobState.FAILED, JobState.DONE)
    assert w.objects.calls["writer"] == 1 and w.output() == whole_file(new)


def test_header_only_older_version_does_not_overwrite_the_newer_output() -> None:
    """A late start (a retried event) of an older, header-only version after the newer version's
    job: it fails as superseded and writes no header-only output over the newer one."""
    w = World()
    v1 = w.objects._write(B, KEY, b"id,url,caption\n")
    new = make_csv(3)
    m2 = w.drop(new)
    w.drain()
    m1 = w.start(KEY, v1.version_id, v1.etag)
    assert m1.state == JobState.FAILED and m1.reason.startswith("superseded: ") and m2.job_id in m1.reason
    assert w.output() == whole_file(new)


def test_gpu_task_of_an_older_version_writes_nothing() -> None:
    w = World(gpu=True)
    m1 = w.drop(make_csv(30))
    m2 = w.drop(make_csv(31))
    assert (m1.state, m2.state) == (JobState.GPU, JobState.GPU)

    def score(_src, _dst):
        raise AssertionError("a superseded job is not scored")

    with pytest.raises(RunError, match=f"^superseded: .*{m2.job_id}"):
        w.jobs.score_whole(m1, score)
    assert not w.objects.keys(B, OUT) and w.objects.calls["writer"] == 0


class LostAnswers(FakeObjectStore):
    """A conditional write that succeeds but whose answer is lost; the SDK's retry of it then
    fails its own condition (412), as S3 answers a retried If-Match / If-None-Match."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = 0

    def put(self, bucket: str, key: str, data: bytes, content_type: str, if_match: str | None = None) -> str:
        etag = super().put(bucket, key, data, content_type, if_match)
        if if_match is not None and key.endswith("manifest.json") and self.lose:
            self.lose -= 1
            raise PreconditionFailed(key)
        return etag


def test_a_start_recognises_its_own_write_whose_answer_was_lost() -> None:
    w = World()
    w.objects = LostAnswers()
    w.jobs.store.objects = w.objects
    w.objects.lose = 1
    body = make_csv()
    m = w.drop(body)
    assert m.state == JobState.RUNNING and len(w.queue.sent) == 13  # not taken for a rival start
    w.drain()
    assert w.state(m.job_id) == JobState.DONE and w.output() == whole_file(body)


def test_a_start_overtaken_by_another_writes_nothing_more() -> None:
    """Two starts of one job: the second reads the first's `splitting` manifest; the first then
    fans out. The second's fresh manifest would reset the job, so it is not written."""
    w = World()
    v = w.objects._write(B, KEY, make_csv().encode())
    store = w.jobs.store
    first_done: list[Manifest] = []
    claim_attempt = store.claim_attempt

    def claim(bucket: str, job_id: str, limit: int) -> int:
        n = claim_attempt(bucket, job_id, limit)
        if n == 2:  # the second start has read the job: the first one finishes now
            store.claim_attempt = claim_attempt  # type: ignore[method-assign]
            first_done.append(w.start(KEY, v.version_id, v.etag))
        return n

    m0 = Manifest(
        job_id=w.jobs.job_id_for(Location(bucket=B, key=KEY, version_id=v.version_id, etag=v.etag)),
        state=JobState.SPLITTING,
        source=Location(bucket=B, key=KEY, version_id=v.version_id, etag=v.etag),
        output=Location(bucket=B, key=OUT),
        created_at=w.clock(),
        updated_at=w.clock(),
        start_attempt=1,
    )
    store.save(m0)  # as the first start left it while splitting (its attempt-1 claimed)
    store.claim_attempt(B, m0.job_id, w.settings.start_attempts)
    store.claim_attempt = claim  # type: ignore[method-assign]
    second = w.start(KEY, v.version_id, v.etag)
    [first] = first_done
    assert first.state == JobState.RUNNING and first.chunk_count == 13
    assert second.state == JobState.RUNNING and second.chunk_count == 13
    assert len(w.queue.sent) == 13  # sent once, by the first
    w.drain()
    assert w.state(m0.job_id) == JobState.DONE


# ------------------------------------------------------------------------------ POST /jobs hands the split off
class RecordingSplitter:
    """The splitter function's queue of asynchronous invokes: what POST /jobs handed over."""

    def __init__(self, refuse: int = 0) -> None:
        self.requests: list[StartRequest] = []
        self.refuse = refuse

    def start(self, request: StartRequest) -> None:
        if self.refuse:
            self.refuse -= 1
            raise SplitNotStarted("TooManyRequestsException")
        self.requests.append(request)


def with_splitter(w: World, splitter: RecordingSplitter) -> JobService:
    return JobService(
        w.settings, w.jobs.store, w.queue, w.launcher, clock=w.clock, sleep=lambda _s: None, splitter=splitter
    )


def run_split(w: World, req: StartRequest) -> Manifest:
    """What the splitter function does with a hand-off (handler.s3_event)."""
    return w.jobs.start(
        req.bucket, req.key, version_id=req.version_id, etag=req.etag, output=req.output, excel_safe=req.excel_safe
    )


def test_submit_with_a_splitter_answers_splitting_before_any_split() -> None:
    w, splitter = World(), RecordingSplitter()
    api = with_splitter(w, splitter)
    body = make_csv()
    v = w.objects._write(B, "uploads/x.csv", body.encode())
    out = Location(bucket=B, key="results/x.csv")
    m = api.submit(B, "uploads/x.csv", output=out, excel_safe=True)
    assert m.state == JobState.SPLITTING and m.chunk_count == 0 and w.queue.sent == []
    assert not [k for k in w.objects.keys(B, f"jobs/{m.job_id}/") if "/chunks/" in k]
    [req] = splitter.requests
    assert (req.bucket, req.key, req.version_id, req.etag) == (B, "uploads/x.csv", v.version_id, v.etag)
    assert req.output == out and req.excel_safe is True
    assert api.status(B, m.job_id)["state"] == "splitting"
    # the same request while it is splitting: the same job, not handed off again
    assert api.submit(B, "uploads/x.csv", output=out, excel_safe=True).job_id == m.job_id
    assert len(splitter.requests) == 1
    started = run_split(w, req)
    assert started.job_id == m.job_id and started.state == JobState.RUNNING and len(w.queue.sent) == 13
    assert started.created_at == m.created_at
    assert run_split(w, req).state == JobState.RUNNING and len(w.queue.sent) == 13  # a duplicate: harmless
    w.drain()
    assert w.state(m.job_id) == JobState.DONE and w.objects.text(B, "results/x.csv") == whole_file(
        body, excel_safe=True
    )


def test_submit_of_a_missing_input_creates_nothing() -> None:
    w, splitter = World(), RecordingSplitter()
    with pytest.raises(InputNotFound):
        with_splitter(w, splitter).submit(B, "uploads/none.csv")
    assert splitter.requests == [] and w.objects.keys(B, "jobs/") == []


def test_a_refused_hand_off_fails_the_job_and_the_same_request_hands_it_off_again() -> None:
    w, splitter = World(), RecordingSplitter(refuse=1)
    api = with_splitter(w, splitter)
    w.objects._write(B, "uploads/x.csv", make_csv(3).encode())
    with pytest.raises(SplitNotStarted):
        api.submit(B, "uploads/x.csv")
    [job_id] = {k.split("/")[1] for k in w.objects.keys(B, "jobs/")}
    failed = w.jobs.load(B, job_id)
    assert failed.state == JobState.FAILED and failed.reason.startswith("split_not_started: TooManyRequests")
    m = api.submit(B, "uploads/x.csv")
    assert m.job_id == job_id and m.state == JobState.SPLITTING and m.reason is None
    [req] = splitter.requests
    assert run_split(w, req).state == JobState.RUNNING


def test_submit_of_a_job_not_fanned_out_hands_it_off_again_once_its_start_is_past() -> None:
    # Before: every repeated POST /jobs during the fan-out handed the job off again; each start
    # claimed an attempt, and the fourth failed the healthy job as killed (no output ever).
    w, splitter = World(), RecordingSplitter()
    w.queue.fail_at_batch, w.queue.fail_times = 1, 1
    with pytest.raises(Injected):
        w.drop(make_csv())
    api = with_splitter(w, splitter)
    for _ in range(4):  # as if its start were still sending the messages: left to it
        assert api.submit(B, KEY).state == JobState.RUNNING
    assert splitter.requests == []
    w.clock.advance(w.settings.start_timeout_seconds + 1)  # that start is long dead
    m = api.submit(B, KEY)
    assert m.state == JobState.RUNNING and len(splitter.requests) == 1
    assert w.jobs.store.fanned_out(run_split(w, splitter.requests[0]))
    w.drain()
    assert w.state(m.job_id) == JobState.DONE


def test_a_hand_off_never_picked_up_fails_by_the_status_timeout() -> None:
    w = World()
    api = with_splitter(w, RecordingSplitter())
    w.objects._write(B, "uploads/x.csv", make_csv(3).encode())
    m = api.submit(B, "uploads/x.csv")
    w.clock.advance(w.settings.start_timeout_seconds + 1)
    st = api.status(B, m.job_id)
    assert st["state"] == "failed" and st["reason"].startswith("start_failed")


def test_lambda_split_starter_invokes_the_splitter_asynchronously() -> None:
    import json

    import boto3
    from botocore.stub import Stubber

    client = boto3.client("lambda", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    req = StartRequest(
        bucket=B, key="uploads/a b.csv", version_id="v1", etag="e1", output=Location(bucket=B, key="r/x.csv")
    )
    payload = json.dumps(req.model_dump(mode="json")).encode()
    with Stubber(client) as stub:
        stub.add_response(
            "invoke",
            {"StatusCode": 202},
            {"FunctionName": "stack-splitter", "InvocationType": "Event", "Payload": payload},
        )
        stub.add_client_error("invoke", "TooManyRequestsException", http_status_code=429)
        starter = LambdaSplitStarter(client, "stack-splitter")
        starter.start(req)
        with pytest.raises(SplitNotStarted, match="TooManyRequestsException"):
            starter.start(req)
        stub.assert_no_pending_responses()
    assert StartRequest.model_validate(json.loads(payload)) == req  # what the splitter reads back


def test_a_newer_versions_failed_job_does_not_hold_back_the_older_output() -> None:
    # Before: the input overwritten by a broken file (its job failed at once) made the running
    # job of the older version fail as superseded: no output at all.
    w = World(chunk_rows=2)
    v1 = w.objects._write(B, KEY, make_csv(6).encode())
    j1 = w.jobs.start(B, KEY, version_id=v1.version_id, etag=v1.etag)
    v2 = w.objects._write(B, KEY, b"id,caption\n1,a cat\n")
    assert w.jobs.start(B, KEY, version_id=v2.version_id, etag=v2.etag).state == JobState.FAILED
    w.drain()
    assert w.state(j1.job_id) == JobState.DONE and (B, OUT) in w.objects.objects


def test_past_lambda_max_rows_the_gpu_path_takes_the_file_even_below_gpu_min_rows() -> None:
    # Before: with the GPU path configured, LAMBDA_MAX_ROWS was not applied: a file between it and
    # GPU_MIN_ROWS took the Lambda path, whose merge cannot finish in a worker.
    w = World(chunk_rows=2, gpu=True, lambda_max_rows=8, gpu_min_rows=100)
    assert w.drop(make_csv(20)).state == JobState.GPU
    assert World(chunk_rows=2, gpu=True, lambda_max_rows=8, gpu_min_rows=100).drop(make_csv(6)).state == (
        JobState.RUNNING
    )


# ------------------------------------------------------------------------------ status of failed and GPU jobs
def test_a_failed_jobs_status_counts_the_chunks_it_scored() -> None:
    # Before: a Lambda-path job that failed after its chunks were scored (here: superseded at the
    # merge) showed 0 chunks and rows done, 0 compute seconds and $0, as if nothing had run.
    w = World(chunk_rows=2)
    v1 = w.objects._write(B, KEY, make_csv(6).encode())
    j1 = w.jobs.start(B, KEY, version_id=v1.version_id, etag=v1.etag)
    first = list(w.queue.sent)
    for msg in first[:-1]:
        w.work(msg)
    w.drop(make_csv(4))  # the input overwritten: the new version's job takes the output
    w.work(first[-1])  # the last chunk is scored, then the merge gives way
    assert w.state(j1.job_id) == JobState.FAILED
    st = w.jobs.status(B, j1.job_id)
    assert st["state"] == "failed" and st["reason"].startswith("superseded: ")
    assert st["chunks"] == {"done": 3, "total": 3} and st["rows"] == {"done": 6, "total": 6}
    assert st["compute_seconds"] == pytest.approx(0.03) and st["estimated_cost_usd"] > 0


def test_a_job_failed_at_the_split_reports_nothing_done() -> None:
    w = World(lambda_max_rows=20)
    m = w.drop(make_csv(25))
    st = w.jobs.status(B, m.job_id)
    assert st["state"] == "failed" and st["chunks"]["done"] == 0 and st["rows"]["done"] == 0
    assert st["compute_seconds"] == 0 and st["estimated_cost_usd"] == 0


def _chunk_objects(w: World) -> list[str]:
    return [k for k in w.objects.keys(B, "jobs/") if "/chunks/" in k]


def test_a_gpu_job_writes_no_chunks_and_reports_the_rows_it_counted() -> None:
    # Before: the split wrote the chunks of the first GPU_MIN_ROWS rows (never read), and the
    # status said 0 rows in total until the GPU task finished.
    w = World(chunk_rows=2, gpu=True)  # GPU_MIN_ROWS = 10
    m = w.drop(make_csv(25))
    assert m.state == JobState.GPU and m.chunk_count == 0
    assert _chunk_objects(w) == [] and w.queue.sent == []
    st = w.jobs.status(B, m.job_id)
    assert st["state"] == "gpu" and st["chunks"] == {"done": 0, "total": 0}
    # While the task runs, the total is the rows counted before the GPU path was chosen: a lower bound.
    assert st["rows"]["done"] == 0 and 10 < st["rows"]["total"] <= 25
    result = w.jobs.score_whole(m, lambda src, dst: w.scorer(src, dst, excel_safe=False, on_row=lambda _n: None))
    w.jobs.complete_whole(m, result)
    st = w.jobs.status(B, m.job_id)
    assert st["state"] == "done" and st["rows"] == {"done": 25, "total": 25}


def test_a_file_under_the_gpu_threshold_is_split_once() -> None:
    w = World(chunk_rows=2, gpu=True)  # GPU_MIN_ROWS = 10: 10 rows stay on the Lambda path
    body = make_csv(10)
    m = w.drop(body)
    assert m.state == JobState.RUNNING and m.chunk_count == 5 and m.row_count == 10
    assert len(_chunk_objects(w)) == 5 and all(len(w.objects.objects[(B, k)]) == 1 for k in _chunk_objects(w))
    w.drain()
    assert w.state(m.job_id) == JobState.DONE and w.output() == whole_file(body)


# ------------------------------------------------------------------------------ default outputs
@pytest.mark.parametrize(
    "a, b",
    [
        ("incoming/uploads/x.csv", "uploads/x.csv"),  # an S3 drop, and POST /jobs on a key outside incoming/
        ("incoming/x.CSV", "incoming/x.csv"),
        ("incoming/x", "incoming/x.csv"),
        ("incoming/x.CSV.csv", "incoming/x.CSV"),
        ("incoming/_/uploads/x.csv", "uploads/x.csv"),
        ("incoming/__/x.csv", "incoming/_/x.csv"),
        ("_/x.csv", "x.csv"),
    ],
)
def test_two_inputs_never_share_a_default_output(a: str, b: str) -> None:
    jobs = World().jobs
    assert jobs.default_output(a) != jobs.default_output(b)


@pytest.mark.parametrize(
    "key, out",
    [
        ("incoming/x.csv", "scored/x_scored.csv"),
        ("incoming/team/2024/x.csv", "scored/team/2024/x_scored.csv"),
        ("incoming/x.CSV", "scored/x_scored.CSV"),
        ("incoming/x", "scored/x_scored"),
        ("incoming/_/x.csv", "scored/__/x_scored.csv"),
        ("uploads/2024/x.csv", "scored/_/uploads/2024/x_scored.csv"),
        ("x.csv", "scored/_/x_scored.csv"),
    ],
)
def test_default_output(key: str, out: str) -> None:
    assert World().jobs.default_output(key) == out


def test_an_s3_drop_and_post_jobs_of_the_same_name_both_keep_their_output() -> None:
    # Before: incoming/uploads/x.csv (S3 drop) and uploads/x.csv (POST /jobs) both wrote
    # scored/uploads/x_scored.csv: both jobs said done, and one output replaced the other.
    w = World(chunk_rows=10)
    dropped, posted = make_csv(5), make_csv(7)
    m1 = w.drop(dropped, key="incoming/uploads/x.csv")
    w.objects._write(B, "uploads/x.csv", posted.encode())
    m2 = w.jobs.submit(B, "uploads/x.csv")
    assert m1.output.key != m2.output.key
    w.drain()
    assert (w.state(m1.job_id), w.state(m2.job_id)) == (JobState.DONE, JobState.DONE)
    assert w.objects.text(B, m1.output.key) == whole_file(dropped)
    assert w.objects.text(B, m2.output.key) == whole_file(posted)
