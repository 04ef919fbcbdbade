"""``Fetcher``: image bytes for any supported source. Every failure becomes a ``RowError`` with a
stable code; nothing else escapes ``Fetcher.fetch``."""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import UnsupportedSource
from .conditional import Fetched, Validators
from .guard import AddressPolicy
from .http import HttpSource
from .settings import FetchSettings
from .sources import S3Source, fetch_data_uri, fetch_local


def _default_s3() -> Any:
    from ..aws import make_client

    return make_client("s3")


class Fetcher:
    """Thread-safe; share one per run. ``s3_client`` is a client or a callable that makes one
    (default: ``similarity.aws.make_client`` on first use of an ``s3://`` URL)."""

    def __init__(
        self,
        settings: FetchSettings | None = None,
        policy: AddressPolicy | None = None,
        s3_client: Any | Callable[[], Any] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings or FetchSettings()
        self.policy = policy or AddressPolicy()
        self._http = HttpSource(self.settings, self.policy)
        self._s3 = S3Source(s3_client if s3_client is not None else _default_s3)
        self.base_dir = Path(base_dir) if base_dir else None

    @property
    def session(self) -> Any:
        return self._http.session

    def close(self) -> None:
        self._http.close()

    def with_settings(self, **changes: Any) -> Fetcher:
        """A view with other settings (e.g. a request's deadline) sharing the pooled session, the
        per-host slots and the S3 client."""
        clone = copy.copy(self)
        clone.settings = dataclasses.replace(self.settings, **changes)
        return clone

    def fetch(self, url: str) -> bytes:
        fetched = self.fetch_conditional(url)
        return fetched.data if fetched.data is not None else b""  # no validators: never "not modified"

    def fetch_conditional(self, url: str, validators: Validators | None = None) -> Fetched:
        """The one dispatch by scheme. With ``validators`` (what a cache recorded), http(s) and
        ``s3://`` answer "not modified" without the bytes; both return their own validators (ETag,
        Last-Modified) for next time. Other sources have none and always return the bytes."""
        url = url.strip()
        try:
            scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        except ValueError as exc:  # an unbalanced bracket in the host: "http://[::1/", "s3://]/a"
            raise UnsupportedSource(f"URL {url[:100]!r} cannot be parsed: {exc}") from None
        if scheme in ("http", "https"):
            return self._http.fetch_conditional(url, self.settings, validators)
        if scheme == "s3":
            return self._s3.fetch_conditional(url, self.settings, validators)
        if scheme == "data":
            return Fetched(fetch_data_uri(url, self.settings))
        if scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return Fetched(fetch_local(url, self.settings, self.base_dir))
        raise UnsupportedSource(f"scheme {scheme!r} is not supported")
