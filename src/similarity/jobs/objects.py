"""The object store the job pipeline runs on: the few operations ``JobStore`` needs (a port), and
their S3 adapter. In-memory fakes of the port live in the tests (``tests/unit/fakes.py``).

What the adapter adds to boto3, because the pipeline depends on it:

* **Body reads are retried.** botocore retries a request whose response never came, but not an
  error raised while the body is being read (a connection dropped half-way through a part). ``get``
  re-reads the whole object; ``open`` resumes where the cut happened with a ranged GET pinned to the
  version (or the ETag) first read, so a resumed stream can never splice two versions.
* **Writes are streamed.** ``writer`` uploads a multipart object part by part (memory: one part),
  never spooling to local disk; the object appears only when the block ends without error, and the
  upload is aborted otherwise (the bucket's lifecycle rule removes any a dead process leaves).
* **Conditional writes** (``put_if_absent``, ``put(if_match=...)``) raise or return in one way
  whatever S3 answers (412, 409 for a concurrent conditional write).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

log = logging.getLogger(__name__)

#: S3 error codes that mean the key (or the version) is not there. HEAD answers bare status codes.
MISSING = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchVersion", "NoSuchBucket"})
#: A conditional write that lost: the object exists / changed, or another conditional write is in flight.
LOST_CONDITION = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
MIN_PART = 5 * 1024 * 1024  # S3's smallest part, except the last


class ObjectMissing(Exception):
    """The key, or the version asked for, does not exist."""


class PreconditionFailed(Exception):
    """A conditional write lost: the object exists (put_if_absent) or changed (if_match)."""


class ObjectChanged(Exception):
    """The object changed between two reads of one stream (a resumed read found another version)."""


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    etag: str
    version_id: str | None = None


class ObjectStore(Protocol):
    """What the job pipeline needs from an object store."""

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectInfo:
        """Size, ETag and version; raises ``ObjectMissing``."""

    def get(self, bucket: str, key: str) -> Blob | None:
        """A whole (small) object, or None when it does not exist."""

    def put(self, bucket: str, key: str, data: bytes, content_type: str, if_match: str | None = None) -> str:
        """Write the object; return its ETag. With ``if_match``, raise ``PreconditionFailed`` unless
        the current object has that ETag."""

    def put_if_absent(self, bucket: str, key: str, data: bytes, content_type: str) -> str | None:
        """Create the object unless one exists: its ETag, or None when another was there."""

    def list(self, bucket: str, prefix: str) -> list[str]:
        """Every key under ``prefix``, sorted."""

    def open(self, bucket: str, key: str, version_id: str | None = None) -> BinaryIO:
        """A stream over the object (that version when given); raises ``ObjectMissing``."""

    def writer(self, bucket: str, key: str, content_type: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """A stream the object is written through: it appears, whole, when the block exits cleanly;
        nothing appears (and nothing stays stored) when it raises."""


# ------------------------------------------------------------------------------ S3 adapter
def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a body read raises when the connection drops or the body is cut short."""
    from botocore.exceptions import (
        ConnectionClosedError,
        FlexibleChecksumError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (
        ResponseStreamingError,
        IncompleteReadError,
        ReadTimeoutError,
        ConnectionClosedError,
        FlexibleChecksumError,
        Urllib3Error,
        ConnectionError,
    )


class S3ObjectStore:
    """``ObjectStore`` over a boto3 S3 client (made by ``similarity.aws``)."""

    def __init__(
        self,
        s3: Any,
        part_size: int = 8 * 1024 * 1024,
        read_attempts: int = 5,
        backoff: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        resume_progress: int = 8 * 1024 * 1024,
    ) -> None:
        """``read_attempts``: cut-offs in a row a stream survives; ``resume_progress``: bytes read
        after a resume that make the next cut-off count as the first again (a multi-GB input read
        at scoring pace for hours may be cut more often than that in all)."""
        if part_size < MIN_PART:
            raise ValueError(f"part size {part_size} is under S3's minimum of {MIN_PART} bytes")
        self.s3 = s3
        self.part_size = part_size
        self.read_attempts = read_attempts
        self.resume_progress = resume_progress
        self.backoff = backoff
        self.sleep = sleep
        self._read_errors = _read_errors()

    def _client_error(self) -> type[Exception]:
        from botocore.exceptions import ClientError

        return ClientError  # type: ignore[no-any-return]

    def _pause(self, attempt: int) -> None:
        self.sleep(min(self.backoff * 2**attempt, 5.0))

    def head(self, bucket: str, key: str, version_id: str | None = None) -> ObjectInfo:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        try:
            h = self.s3.head_object(**kwargs)
        except self._client_error() as exc:
            if _code(exc) in MISSING:
                raise ObjectMissing(f"s3://{bucket}/{key}") from None
            raise
        return ObjectInfo(int(h.get("ContentLength", 0)), str(h.get("ETag", "")).strip('"'), h.get("VersionId"))

    def get(self, bucket: str, key: str) -> Blob | None:
        for attempt in range(self.read_attempts):
            try:
                resp = self.s3.get_object(Bucket=bucket, Key=key)
            except self._client_error() as exc:
                if _code(exc) in MISSING:
                    return None
                raise
            try:
                data: bytes = resp["Body"].read()
            except self._read_errors:
                if attempt == self.read_attempts - 1:
                    raise
                log.warning("read of s3://%s/%s cut off; reading again", bucket, key)
                self._pause(attempt)
                continue
            return Blob(data, str(resp.get("ETag", "")).strip('"'))
        raise AssertionError("unreachable")

    def put(self, bucket: str, key: str, data: bytes, content_type: str, if_match: str | None = None) -> str:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data, "ContentType": content_type}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'
        try:
            resp = self.s3.put_object(**kwargs)
        except self._client_error() as exc:
            if if_match is not None and _code(exc) in LOST_CONDITION | MISSING:
                raise PreconditionFailed(f"s3://{bucket}/{key} changed") from None
            raise
        return str(resp.get("ETag", "")).strip('"')

    def put_if_absent(self, bucket: str, key: str, data: bytes, content_type: str) -> str | None:
        try:
            resp = self.s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type, IfNoneMatch="*")
        except self._client_error() as exc:
            if _code(exc) in LOST_CONDITION:
                return None
            raise
        return str(resp.get("ETag", "")).strip('"')

    def list(self, bucket: str, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def open(self, bucket: str, key: str, version_id: str | None = None) -> BinaryIO:
        raw = _ResumingReader(self, bucket, key, version_id)
        return io.BufferedReader(raw, buffer_size=1 << 20)

    @contextlib.contextmanager
    def writer(self, bucket: str, key: str, content_type: str) -> Iterator[BinaryIO]:
        w = _MultipartWriter(self, bucket, key, content_type)
        try:
            yield w  # type: ignore[misc]
            w.commit()
        except BaseException:
            w.abort()
            raise


class _ResumingReader(io.RawIOBase):
    """One GET, resumed with a ranged GET of the same version (or ETag) after a cut-off read."""

    def __init__(self, store: S3ObjectStore, bucket: str, key: str, version_id: str | None) -> None:
        self.store, self.bucket, self.key = store, bucket, key
        self.version_id = version_id
        self.pos = 0
        self.attempt = 0
        self.resumed_at = 0  # where the stream was last (re)opened
        resp = self._get()
        self.size = int(resp["ContentLength"])
        self.etag = str(resp.get("ETag", "")).strip('"')
        self.version_id = version_id or resp.get("VersionId")
        self.body = resp["Body"]

    def _get(self, start: int = 0, etag: str | None = None) -> Any:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.version_id:
            kwargs["VersionId"] = self.version_id
        elif etag:
            kwargs["IfMatch"] = f'"{etag}"'
        if start:
            kwargs["Range"] = f"bytes={start}-"
        try:
            return self.store.s3.get_object(**kwargs)
        except self.store._client_error() as exc:
            code = _code(exc)
            if code in MISSING:
                raise ObjectMissing(f"s3://{self.bucket}/{self.key}") from None
            if code in LOST_CONDITION:
                raise ObjectChanged(f"s3://{self.bucket}/{self.key} changed while being read") from None
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.pos >= self.size:
            return 0
        while True:
            try:
                data: bytes = self.body.read(min(len(buf), self.size - self.pos))
                if not data:  # the stream ended before ContentLength: a cut-off body
                    raise ConnectionError(f"s3://{self.bucket}/{self.key} ended at byte {self.pos} of {self.size}")
                break
            except self.store._read_errors:
                if self.pos - self.resumed_at >= self.store.resume_progress:
                    self.attempt = 0  # the last resume held for long enough: a new cut-off
                self.attempt += 1
                self.resumed_at = self.pos
                if self.attempt >= self.store.read_attempts:
                    raise
                log.warning("read of s3://%s/%s cut off at byte %d; resuming", self.bucket, self.key, self.pos)
                with contextlib.suppress(Exception):
                    self.body.close()
                self.store._pause(self.attempt)
                self.body = self._get(self.pos, self.etag)["Body"]
        n = len(data)
        buf[:n] = data
        self.pos += n
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.body.close()
        super().close()


class _MultipartWriter(io.RawIOBase):
    """Buffers one part; uploads each full part; completes (or puts a small object whole) on
    ``commit``, aborts on ``abort``."""

    def __init__(self, store: S3ObjectStore, bucket: str, key: str, content_type: str) -> None:
        self.store, self.bucket, self.key, self.content_type = store, bucket, key, content_type
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.etag = ""
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.buf += data
        self.size += len(data)
        while len(self.buf) >= self.store.part_size:
            self._upload(bytes(self.buf[: self.store.part_size]))
            del self.buf[: self.store.part_size]
        return len(data)

    def _upload(self, data: bytes) -> None:
        s3 = self.store.s3
        if self.upload_id is None:
            self.upload_id = str(
                s3.create_multipart_upload(Bucket=self.bucket, Key=self.key, ContentType=self.content_type)["UploadId"]
            )
        number = len(self.parts) + 1
        resp = s3.upload_part(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data)
        self.parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def commit(self) -> None:
        if self.upload_id is None:  # smaller than one part: a plain put
            self.etag = self.store.put(self.bucket, self.key, bytes(self.buf), self.content_type)
            self.buf.clear()
            return
        if self.buf:
            self._upload(bytes(self.buf))
            self.buf.clear()
        expected = _multipart_etag([p["ETag"] for p in self.parts])
        try:
            resp = self.store.s3.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, MultipartUpload={"Parts": self.parts}
            )
            self.etag = str(resp.get("ETag", "")).strip('"') or expected
        except self.store._client_error() as exc:
            # A retry of a Complete whose answer was lost finds the upload gone: the object is
            # there if its ETag is the one these parts make.
            if _code(exc) != "NoSuchUpload" or self._current_etag() != expected:
                raise
            self.etag = expected
        self.upload_id = None

    def _current_etag(self) -> str | None:
        try:
            return self.store.head(self.bucket, self.key).etag
        except ObjectMissing:
            return None

    def abort(self) -> None:
        self.buf.clear()
        if self.upload_id is None:
            return
        try:
            self.store.s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self.upload_id)
        except Exception:  # the lifecycle rule aborts what is left after a day
            log.warning("could not abort the upload of s3://%s/%s", self.bucket, self.key, exc_info=True)
        self.upload_id = None


def _multipart_etag(part_etags: list[str]) -> str:
    """The ETag S3 gives a multipart object: MD5 of the parts' MD5s, then ``-<parts>``."""
    digest = hashlib.md5(b"".join(bytes.fromhex(e.strip('"')) for e in part_etags), usedforsecurity=False)
    return f"{digest.hexdigest()}-{len(part_etags)}"
