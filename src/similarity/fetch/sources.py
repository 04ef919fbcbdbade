"""The non-HTTP sources: S3 objects, base64 data: URIs and (CLI only) local regular files."""

from __future__ import annotations

import base64
import binascii
import errno
import os
import re
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import (
    FetchTimeout,
    InvalidDataUri,
    LocalPathsDisabled,
    NotAFile,
    NotFound,
    S3Error,
    TooLarge,
    UnsupportedSource,
)
from .conditional import Fetched, Validators
from .deadline import DeadlinePassed, run_with_deadline
from .http import short
from .settings import FetchSettings

#: S3 error codes that mean the object is not there (HEAD answers bare status codes).
S3_MISSING = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
#: What botocore raises for a GET whose ``IfNoneMatch`` matched.
S3_NOT_MODIFIED = frozenset({"304", "NotModified"})


class S3Source:
    """``client`` is an S3 client or a zero-argument callable that makes one on first use."""

    def __init__(self, client: Any | Callable[[], Any]) -> None:
        self._client = client
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if callable(self._client) and not hasattr(self._client, "get_object"):
                self._client = self._client()
            return self._client

    def fetch(self, url: str, settings: FetchSettings) -> bytes:
        return self.fetch_conditional(url, settings).data or b""

    def fetch_conditional(self, url: str, settings: FetchSettings, validators: Validators | None = None) -> Fetched:
        """With ``validators.etag``, a GET with ``IfNoneMatch``: an unchanged object is not sent."""
        bucket, key = split_s3_url(url)
        from botocore.exceptions import BotoCoreError, ClientError

        cap = settings.max_bytes
        condition = {"IfNoneMatch": validators.etag} if validators and validators.etag else {}
        try:
            obj = self.client().get_object(Bucket=bucket, Key=key, **condition)
            if obj.get("ContentLength", 0) > cap:
                obj["Body"].close()
                raise TooLarge(f"object is {obj['ContentLength']} bytes, cap {cap}")
            data: bytes = obj["Body"].read(cap + 1)
            obj["Body"].close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if condition and code in S3_NOT_MODIFIED:
                return Fetched(None, validators.etag if validators else None)
            if code in S3_MISSING:
                raise NotFound(f"s3://{bucket}/{key}: {code}") from None
            raise S3Error(f"{code or 'error'} for s3://{bucket}/{key}") from None
        except BotoCoreError as exc:
            raise S3Error(short(exc)) from None
        if len(data) > cap:
            raise TooLarge(f"object exceeds {cap} bytes")
        return Fetched(data, obj.get("ETag"))


def split_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of an ``s3://`` image URL, the key percent-decoded.

    The rule of ``io.streams.split_s3`` (not urlsplit): "?" and "#" are ordinary characters of an
    S3 key, not a query and a fragment.
    """
    bucket, _, key = url[len("s3://") :].partition("/") if url[:5].lower() == "s3://" else ("", "", "")
    key = unquote(key.lstrip("/"))
    if not bucket or not key:
        raise UnsupportedSource("s3 URL needs s3://bucket/key")
    return bucket, key


#: Whitespace a base64 payload may be broken with (line breaks of pasted or MIME base64).
_WHITESPACE = str.maketrans("", "", " \t\n\r\f\v")
_STANDARD_B64 = re.compile(r"[A-Za-z0-9+/]*")
_URLSAFE_B64 = re.compile(r"[A-Za-z0-9_-]*")


def fetch_data_uri(url: str, settings: FetchSettings) -> bytes:
    """The bytes of a base64 ``data:`` URI: standard or URL-safe alphabet, padded or not, broken
    by whitespace or percent-encoded; the cap applies to the decoded size."""
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header.lower():
        raise InvalidDataUri("only base64 data: URIs are accepted")
    cap = settings.max_bytes
    # Refused before any copy of the text: the base64 of ``cap`` bytes, even fully percent-encoded
    # and broken by a CRLF every 32 characters, is no longer than this.
    encoded = 4 * -(-cap // 3)
    if len(payload) > 3 * (encoded + encoded // 16 + 4):
        raise TooLarge(f"data URI of {len(payload)} characters exceeds {cap} bytes")
    text = (unquote(payload) if "%" in payload else payload).translate(_WHITESPACE)
    body = text.rstrip("=")
    if len(body) * 3 // 4 > cap:
        raise TooLarge(f"data URI holds {len(body) * 3 // 4} bytes, cap {cap}")
    if _STANDARD_B64.fullmatch(body):
        altchars = None
    elif _URLSAFE_B64.fullmatch(body):
        altchars = b"-_"
    else:
        raise InvalidDataUri("bad base64: characters outside the standard and the URL-safe alphabet")
    if len(text) - len(body) > 2 or len(body) % 4 == 1:
        raise InvalidDataUri(f"bad base64: {len(body)} characters and {len(text) - len(body)} of padding")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidDataUri(f"bad base64: {exc}") from None


def fetch_local(url: str, settings: FetchSettings, base_dir: Path | None) -> bytes:
    """A local file's bytes. Only regular files are read (a device, FIFO, socket or directory is
    refused before it is opened, and again on the opened descriptor); the cap is checked on the
    bytes actually read, not on the size ``stat`` reports (0 for /proc files, 4096 for /sys ones);
    and the read runs under the fetch deadline, so a hung file system costs one row its deadline
    instead of stopping the run."""
    if not settings.allow_local_paths:
        raise LocalPathsDisabled("local paths are not accepted here; use http(s)://, s3:// or data:")
    try:
        path = Path(unquote(urlsplit(url).path)) if url.lower().startswith("file:") else Path(url)
    except ValueError as exc:  # urlsplit: an unbalanced bracket in the host ("file://[x/a.png")
        raise UnsupportedSource(f"URL {url[:100]!r} cannot be parsed: {exc}") from None
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return run_with_deadline(lambda: read_regular_file(path, settings.max_bytes), settings.deadline, "local-read")
    except DeadlinePassed:
        raise FetchTimeout(f"reading {path} took more than the deadline of {settings.deadline:g}s") from None


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_regular_file(path: Path, cap: int) -> bytes:
    """At most ``cap`` bytes of the regular file ``path`` (symlinks followed), or a ``RowError``."""
    if "\0" in str(path):  # os.stat would raise ValueError: no file can have such a name
        raise NotFound(f"no such file: {str(path)!r} (a file name cannot hold a NUL byte)")
    try:
        st = os.stat(path)  # before opening: opening a device can have effects (a tape rewinds)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is {_kind(st.st_mode)}, not a regular file")
        pseudo = pseudo_filesystem(st.st_dev)
        if pseudo:
            raise NotAFile(f"{path} is on {pseudo}, a kernel pseudo-file system, not a regular file")
        if st.st_size > cap:
            raise TooLarge(f"file is {st.st_size} bytes, cap {cap}")
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it must not wait
        # for a writer; O_NOCTTY: a terminal never becomes ours.
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_NOCTTY | _O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENODEV):  # a socket or device node
            raise NotAFile(f"{path} is not a regular file: {exc.strerror or exc}") from None
        raise NotFound(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)  # what was opened, whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{path} is {_kind(st.st_mode)}, not a regular file")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(_READ, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > cap:
                raise TooLarge(f"{path}: more than {cap} bytes read")
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if total != st.st_size:
        # Pseudo-files report a size unrelated to their content (/proc: 0, /sys: 4096); a real
        # file that changed while it was read is no better.
        raise NotAFile(f"{path} reports {st.st_size} bytes but {total} were read (a /proc or /sys file?)")
    return b"".join(chunks)


#: Kernel file systems whose "regular" files are interfaces, not data (/proc/kcore reports 128 TB,
#: /proc/self/environ 0 bytes, tracefs's trace_pipe blocks on read).
PSEUDO_FILESYSTEMS = frozenset(
    {
        "proc", "sysfs", "debugfs", "tracefs", "securityfs", "cgroup", "cgroup2", "configfs", "bpf",
        "pstore", "efivarfs", "fusectl", "binfmt_misc", "mqueue", "devpts", "autofs", "rpc_pipefs", "nsfs",
    }
)  # fmt: skip


def pseudo_filesystem(device: int, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The kernel pseudo-file system the device ``device`` (a ``st_dev``) is, if any (Linux; None
    elsewhere or when it cannot be told). Read each time: mounts change, and the file is small."""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if "-" not in fields:
                    continue
                major, _, minor = fields[2].partition(":")
                if major.isdigit() and minor.isdigit() and os.makedev(int(major), int(minor)) == device:
                    fstype = fields[fields.index("-") + 1]
                    if fstype in PSEUDO_FILESYSTEMS:
                        return fstype
    except (OSError, AttributeError):  # no /proc (not Linux), or no os.makedev
        return None
    return None


_READ = 1024 * 1024
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
