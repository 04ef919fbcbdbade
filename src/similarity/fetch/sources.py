"""The non-HTTP sources: S3 objects, base64 data: URIs and (CLI only) local files."""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import InvalidDataUri, LocalPathsDisabled, NotFound, S3Error, TooLarge, UnsupportedSource
from .conditional import Fetched, Validators
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
        parts = urlsplit(url)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not bucket or not key:
            raise UnsupportedSource("s3 URL needs s3://bucket/key")
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


def fetch_data_uri(url: str, settings: FetchSettings) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header.lower():
        raise InvalidDataUri("only base64 data: URIs are accepted")
    if len(payload) * 3 // 4 > settings.max_bytes:
        raise TooLarge(f"data URI exceeds {settings.max_bytes} bytes")
    try:
        return base64.b64decode(unquote(payload).strip(), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidDataUri(f"bad base64: {exc}") from None


def fetch_local(url: str, settings: FetchSettings, base_dir: Path | None) -> bytes:
    if not settings.allow_local_paths:
        raise LocalPathsDisabled("local paths are not accepted here; use http(s)://, s3:// or data:")
    path = Path(unquote(urlsplit(url).path)) if url.lower().startswith("file:") else Path(url)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        size = path.stat().st_size
        if size > settings.max_bytes:
            raise TooLarge(f"file is {size} bytes, cap {settings.max_bytes}")
        with path.open("rb") as fh:
            return fh.read(settings.max_bytes + 1)
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}") from None
    except OSError as exc:
        raise NotFound(f"cannot read {path}: {exc.strerror or exc}") from None
