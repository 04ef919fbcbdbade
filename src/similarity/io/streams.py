"""Byte streams over local files, ``-`` (stdin/stdout) and S3 objects, and ``s3://`` URIs.

``open_source`` gives a peekable binary stream with the source's size and a count of the bytes
read from it (the CLI's progress: bytes read against the size, local files and S3 alike, gzip
counted compressed). ``open_input`` keeps the text interface the batch pipeline reads CSV with.
S3's answers (no such key, access denied) and missing credentials become ``InputNotFound`` /
``InputUnreadable`` (``RunError``: the input as given cannot be read). Transport errors (a dropped
connection) are left as botocore raises them: the batch pipeline retries those.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import InputNotFound, InputUnreadable
from .formats import FileFormat
from .text import TextLines


def is_s3(uri: str) -> bool:
    return uri.lower().startswith("s3://")


def is_stream(uri: str) -> bool:
    """``-``, or a local name that is a pipe rather than a file (``<(zcat x.gz)``, a FIFO,
    ``/dev/stdin``): read once, front to back, like stdin; nothing identifies it for ``--resume``."""
    if uri == "-":
        return True
    if is_s3(uri):
        return False
    path = Path(uri)
    return path.exists() and not path.is_file() and not path.is_dir()


def split_s3(uri: str) -> tuple[str, str]:
    # Not urlsplit: "?" and "#" are ordinary characters of an S3 key, not a query or a fragment.
    bucket, _, key = uri[len("s3://") :].partition("/") if is_s3(uri) else ("", "", "")
    key = key.lstrip("/")
    if not bucket or not key:
        raise InputNotFound(f"{uri!r} is not s3://bucket/key")
    return bucket, key


def s3_reason(exc: BaseException) -> str:
    """A botocore error in one line: the S3 error code, or what went wrong before any answer."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        msg = err.get("Message")
        return f"{code}: {msg}" if msg and msg != code else str(code)
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    return f"{name}: {exc}"


class _Counting(io.RawIOBase):
    """Counts the bytes read through it; adapts botocore's body to ``io.RawIOBase``."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        self.count += n
        return n

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._raw.close()
        super().close()


@dataclass
class Source:
    """An input opened for reading: ``stream`` is peekable and already gunzipped when asked."""

    uri: str
    stream: BinaryIO
    size: int | None
    counter: _Counting
    #: What identifies this exact content (``--resume`` checks it): size, mtime, ETag, version.
    identity: dict[str, Any] = field(default_factory=dict)
    #: A local path holding the bytes (local files), for readers that need to seek (Parquet).
    path: Path | None = None

    @property
    def bytes_read(self) -> int:
        return self.counter.count

    def fraction(self) -> float | None:
        return min(1.0, self.counter.count / self.size) if self.size else None


def local_identity(path: Path) -> dict[str, Any]:
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"size": st.st_size, "sha256": digest.hexdigest()}


def _s3_get(uri: str, s3_client: Any) -> dict[str, Any]:
    bucket, key = split_s3(uri)
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    try:
        result: dict[str, Any] = s3_client.get_object(Bucket=bucket, Key=key)
        return result
    except (ClientError, NoCredentialsError, PartialCredentialsError) as exc:
        reason = s3_reason(exc)
        if reason.startswith(("NoSuchKey", "404")):
            raise InputNotFound(f"input {uri} does not exist") from None
        raise InputUnreadable(f"cannot read {uri}: {reason}") from None


@contextlib.contextmanager
def open_source(uri: str, s3_client: Any = None, gunzip: bool = False, identify: bool = False) -> Iterator[Source]:
    """Open a local file, ``-`` (stdin) or an S3 object for reading, lazily. ``identify``: hash a
    local file first (what ``--resume`` compares)."""
    identity: dict[str, Any] = {}
    path: Path | None = None
    size: int | None = None
    if uri == "-":
        counter = _Counting(sys.stdin.buffer)
    elif is_s3(uri):
        obj = _s3_get(uri, s3_client)
        size = obj.get("ContentLength")
        identity = {"size": size, "etag": obj.get("ETag"), "version": obj.get("VersionId")}
        counter = _Counting(obj["Body"])
    else:
        path = Path(uri)
        if path.is_dir():
            raise InputUnreadable(f"input {uri!r} is a directory")
        if not path.exists():
            raise InputNotFound(f"input file {uri!r} does not exist")
        try:
            fh = path.open("rb")
        except OSError as exc:
            raise InputUnreadable(f"cannot read {uri}: {exc.strerror or exc}") from None
        if is_stream(uri):  # read once, as it comes (Parquet is spooled, as from stdin)
            path = None
        else:
            size = os.fstat(fh.fileno()).st_size
            if identify:
                identity = local_identity(path)
        counter = _Counting(fh)
    buffered = io.BufferedReader(counter, 1 << 16)
    stream: BinaryIO = buffered
    if gunzip:
        stream = _Gunzip(uri, buffered)  # type: ignore[assignment]
    try:
        yield Source(uri, stream, size, counter, identity, path if not gunzip else None)
    finally:
        if uri != "-":
            counter.close()


class _Gunzip(gzip.GzipFile):
    """gzip's errors as the run's: a damaged or cut file is ``MalformedInput`` (a ``RunError``)
    where it is read, so whoever holds a partial output knows to discard it."""

    def __init__(self, uri: str, fileobj: BinaryIO) -> None:
        super().__init__(fileobj=fileobj, mode="rb")
        self._uri = uri

    def _malformed(self, exc: Exception) -> Exception:
        from ..errors import MalformedInput

        return MalformedInput(f"{self._uri} is not a complete gzip file: {exc}")

    def read(self, size: int | None = -1) -> bytes:
        try:
            return super().read(size)
        except (EOFError, gzip.BadGzipFile) as exc:
            raise self._malformed(exc) from None

    def peek(self, n: int) -> bytes:
        try:
            return super().peek(n)
        except (EOFError, gzip.BadGzipFile) as exc:
            raise self._malformed(exc) from None


@contextlib.contextmanager
def open_input(uri: str, s3_client: Any = None, encoding: str | None = None) -> Iterator[Iterable[str]]:
    """The lines of a text input (local file, ``-`` or S3), decoded as ``io.text`` says; what the
    batch pipeline splits CSV from. Bad bytes raise ``InputEncodingError`` (a ``RunError``)."""
    with open_source(uri, s3_client) as src:
        yield TextLines(src.stream, encoding)


def default_output(input_uri: str, fmt: FileFormat | None = None) -> str:
    """``INPUT_scored`` with the extension of ``fmt`` (default: the input's format), beside the
    input (``-``: stdout)."""
    from .formats import format_of, scored_name

    if input_uri == "-":
        return "-"
    name = scored_name(input_uri, fmt or format_of(input_uri))
    if is_s3(input_uri):
        return input_uri.rstrip("/").rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(input_uri), name)
