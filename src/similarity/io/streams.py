"""Text streams over local files, ``-`` (stdin/stdout) and S3 objects, and ``s3://`` URIs."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from ..errors import InputNotFound


def is_s3(uri: str) -> bool:
    return uri.lower().startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if not parts.netloc or not key:
        raise InputNotFound(f"{uri!r} is not s3://bucket/key")
    return parts.netloc, key


@contextlib.contextmanager
def open_input(uri: str, s3_client: Any = None) -> Iterator[TextIO]:
    """Text stream over a local file, ``-`` (stdin) or an S3 object, read lazily."""
    if uri == "-":
        yield io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
        return
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            body = s3_client.get_object(Bucket=bucket, Key=key)["Body"]
        except ClientError as exc:
            raise InputNotFound(f"cannot read {uri}: {exc.response.get('Error', {}).get('Code', exc)}") from None
        stream = io.TextIOWrapper(io.BufferedReader(_Readable(body)), encoding="utf-8-sig", newline="")
        try:
            yield stream
        finally:
            body.close()
        return
    path = Path(uri)
    if not path.is_file():
        raise InputNotFound(f"input file {uri!r} does not exist")
    with path.open("r", encoding="utf-8-sig", newline="") as fh:
        yield fh


class _Readable(io.RawIOBase):
    """Adapts a botocore/urllib3 stream to ``io.RawIOBase`` so TextIOWrapper can decode it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._raw.read(len(buf))
        n = len(data)
        buf[:n] = data
        return n


@contextlib.contextmanager
def open_output(uri: str, s3_client: Any = None) -> Iterator[TextIO]:
    """Text stream to a local file, ``-`` (stdout) or S3. Files are written to a temporary name
    and moved into place (S3: uploaded) only when the block finishes without error, so a failed run
    never leaves a half-written output behind."""
    if uri == "-":
        yield io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=True)
        return
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with tempfile.TemporaryFile("w+b") as tmp:
            text = io.TextIOWrapper(tmp, encoding="utf-8", newline="")
            yield text
            text.flush()
            text.detach()  # keep `tmp` open: the upload reads it
            tmp.seek(0)
            s3_client.upload_fileobj(tmp, bucket, key, ExtraArgs={"ContentType": "text/csv; charset=utf-8"})
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            yield fh
        shutil.move(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def default_output(input_uri: str) -> str:
    if input_uri == "-":
        return "-"
    stem, _ext = os.path.splitext(input_uri)
    return f"{stem}_scored.csv"
