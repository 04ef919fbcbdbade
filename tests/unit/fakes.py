"""In-memory fakes of the job pipeline's ports (``similarity.jobs.objects.ObjectStore``,
``ChunkQueue``, ``GpuLauncher``, ``ChunkScorer``), with the semantics of the real services that the
protocol depends on (conditional writes, versions, at-least-once delivery) and hooks to inject the
faults the protocol must survive. No sockets: the same protocol runs against moto in tests/e2e."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

from similarity.io.csvfile import CsvReader, CsvWriter
from similarity.jobs import Blob, ChunkMessage, Manifest, ObjectInfo, ObjectMissing, PreconditionFailed
from similarity.pipeline import FileResult
from similarity.types import ScoreResult, ScoreStats


class Injected(ConnectionError):
    """A fault put there by a test."""


@dataclass
class Fault:
    op: str
    match: Callable[[str], bool]
    times: int
    exc: BaseException
    after: bool = False  # the write happens, then the caller sees the error (a lost answer)


@dataclass
class _Version:
    data: bytes
    etag: str
    version_id: str


class FakeObjectStore:
    """A versioned bucket namespace. ``fail(op, ...)`` makes the next ``times`` calls of ``op``
    ("get", "put", "put_if_absent", "head", "list", "open", "writer") on matching keys raise."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], list[_Version]] = {}
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.uploads_open = 0
        self.uploads_aborted = 0
        self._ids = itertools.count(1)

    # -- test hooks
    def fail(
        self,
        op: str,
        match: str | Callable[[str], bool] = "",
        times: int = 1,
        exc: BaseException | None = None,
        after: bool = False,
    ) -> None:
        pred = match if callable(match) else (lambda key, sub=match: sub in key)
        self.faults.append(Fault(op, pred, times, exc or Injected(f"injected {op} failure"), after))

    def _fault(self, op: str, key: str) -> Fault | None:
        self.calls[op] += 1
        for f in self.faults:
            if f.op == op and f.times > 0 and f.match(key):
                f.times -= 1
                return f
        return None

    def _check(self, op: str, key: str) -> Fault | None:
        f = self._fault(op, key)
        if f is not None and not f.after:
            raise f.exc
        return f

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        return sorted(k for b, k in self.objects if b == bucket and k.startswith(prefix))

    def text(self, bucket: str, key: str) -> str:
        return self.objects[(bucket, key)][-1].data.decode("utf-8")

    def _write(self, bucket: str, key: str, data: bytes) -> _Version:
        v = _Version(data, hashlib.md5(data).hexdigest(), f"v{next(self._ids)}")
        self.objects.setdefault((bucket, key), []).append(v)
        return v

    def _latest(self, bucket: str, key: str) -> _Version | None:
        versions = self.objects.get((bucket, key))
        return versions[-1] if versions else None

    # -- the port
    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectInfo:
        self._check("head", key)
        v = self._version(bucket, key, version_id)
        return ObjectInfo(len(v.data), v.etag, v.version_id)

    def _version(self, bucket: str, key: str, version_id: str | None) -> _Version:
        for v in reversed(self.objects.get((bucket, key), [])):
            if version_id is None or v.version_id == version_id:
                return v
        raise ObjectMissing(f"s3://{bucket}/{key}")

    def get(self, bucket: str, key: str) -> Blob | None:
        self._check("get", key)
        v = self._latest(bucket, key)
        return Blob(v.data, v.etag) if v is not None else None

    def put(self, bucket: str, key: str, data: bytes, content_type: str, if_match: str | None = None) -> str:
        f = self._check("put", key)
        current = self._latest(bucket, key)
        if if_match is not None and (current is None or current.etag != if_match):
            raise PreconditionFailed(key)
        v = self._write(bucket, key, data)
        if f is not None:
            raise f.exc
        return v.etag

    def put_if_absent(self, bucket: str, key: str, data: bytes, content_type: str) -> str | None:
        f = self._check("put_if_absent", key)
        if self._latest(bucket, key) is not None:
            return None
        v = self._write(bucket, key, data)
        if f is not None:
            raise f.exc
        return v.etag

    def list(self, bucket: str, prefix: str) -> list[str]:
        self._check("list", prefix)
        return self.keys(bucket, prefix)

    def open(self, bucket: str, key: str, version_id: str | None = None) -> BinaryIO:
        self._check("open", key)
        return io.BufferedReader(io.BytesIO(self._version(bucket, key, version_id).data))  # with peek, as S3's

    @contextlib.contextmanager
    def writer(self, bucket: str, key: str, content_type: str) -> Iterator[BinaryIO]:
        self._check("writer", key)
        buf = io.BytesIO()
        self.uploads_open += 1
        try:
            yield buf
        except BaseException:
            self.uploads_aborted += 1
            raise
        finally:
            self.uploads_open -= 1
        self._write(bucket, key, buf.getvalue())


@dataclass
class FakeQueue:
    """SQS in batches of 10, at least once. ``fail_batches``: how many of the next batches raise."""

    sent: list[ChunkMessage] = field(default_factory=list)
    handed_back: list[tuple[str, int]] = field(default_factory=list)
    fail_at_batch: int | None = None  # the n-th batch (0-based, counted over all sends) raises
    fail_times: int = 0
    batches: int = 0

    def send(self, messages: Sequence[ChunkMessage]) -> None:
        for start in range(0, len(messages), 10):
            n = self.batches
            self.batches += 1
            if self.fail_times and self.fail_at_batch is not None and n >= self.fail_at_batch:
                self.fail_times -= 1
                raise Injected(f"SendMessageBatch {n} failed")
            self.sent.extend(messages[start : start + 10])

    def hand_back(self, receipt: str, delay_seconds: int) -> None:
        self.handed_back.append((receipt, delay_seconds))


@dataclass
class FakeLauncher:
    launched: list[str] = field(default_factory=list)

    def launch(self, m: Manifest) -> str:
        if m.job_id not in self.launched:  # one task per job, like RunTask's clientToken
            self.launched.append(m.job_id)
        return f"arn:aws:ecs:us-east-1:123456789012:task/gpu/{m.job_id}"


def fake_score(url: str | None, caption: str | None) -> float:
    """A made-up cosine that depends on the row's content only (not on its chunk)."""
    digest = hashlib.sha256(f"{url}\x00{caption}".encode()).digest()
    return round(int.from_bytes(digest[:2], "big") / 32768 - 1, 4)


def _result(rec: Any) -> ScoreResult:
    return ScoreResult(rec, cosine=None if rec.error else fake_score(rec.url, rec.caption), error=rec.error)


class FakeScorer:
    """Scores with the real CSV reader and writer and a made-up cosine: the same rows give the
    same bytes, so merged outputs can be compared with a whole-file run."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, src: TextIO, dst: TextIO, *, excel_safe: bool, on_row: Callable[[int], None]) -> FileResult:
        self.calls += 1
        reader = CsvReader(src)
        writer = CsvWriter(dst, reader.header, excel_safe=excel_safe, write_header=False)
        stats = ScoreStats()
        for rec in reader:
            r = _result(rec)
            writer.write(r)
            stats.add(r)
            on_row(1)
        return FileResult(stats, 0.01, reader.header)


def whole_file(text: str, excel_safe: bool = False) -> str:
    """What one run over the whole file writes (header included): the merge must equal it."""
    reader = CsvReader(io.StringIO(text, newline=""))
    out = io.StringIO(newline="")
    writer = CsvWriter(out, reader.header, excel_safe=excel_safe, write_header=True)
    for rec in reader:
        writer.write(_result(rec))
    return out.getvalue()


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
