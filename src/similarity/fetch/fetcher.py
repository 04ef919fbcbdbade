"""``Fetcher``: image bytes for any supported source. Every failure becomes a ``RowError`` with a
stable code; nothing else escapes ``Fetcher.fetch``."""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import FetchTimeout, UnsupportedSource
from .conditional import Fetched, Validators
from .guard import AddressPolicy
from .http import HttpSource
from .settings import FetchSettings
from .sources import S3Source, fetch_data_uri, fetch_local

#: A ``FetchTimeout`` this close to the request's end is put down to the end (timers fire a little early).
_END_SLACK = 0.05


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
        #: ``time.monotonic()`` by which every fetch must be over (a request's end); None: no end.
        self.end: float | None = None

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

    def until(self, end: float | None) -> Fetcher:
        """A view whose fetches are all over by ``end`` (a ``time.monotonic()`` value: a request's
        end), sharing what ``with_settings`` views share. Each fetch's deadline becomes the lesser of
        its own and the time left to ``end``; one that starts with no time left is a
        ``FetchTimeout`` at once. Either way the row's detail says the request's time ran out.
        ``data:`` URIs and local files, which wait on no network, are read regardless."""
        clone = copy.copy(self)
        clone.end = end if self.end is None or end is None else min(self.end, end)
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
        if scheme not in ("http", "https", "s3", "data", "file", "") and not (len(scheme) == 1 and os.name == "nt"):
            raise UnsupportedSource(f"scheme {scheme!r} is not supported")
        if self.end is None or scheme not in ("http", "https", "s3"):  # data: and files wait on nothing
            return self._dispatch(scheme, url, self.settings, validators)
        left = self.end - time.monotonic()
        if left <= 0:
            raise FetchTimeout("not fetched: the request's time was up before this image's turn")
        s = self.settings
        if left >= s.deadline:
            return self._dispatch(scheme, url, s, validators)
        cut = dataclasses.replace(
            s, deadline=left, connect_timeout=min(s.connect_timeout, left), read_timeout=min(s.read_timeout, left)
        )
        try:
            return self._dispatch(scheme, url, cut, validators)
        except FetchTimeout:
            if time.monotonic() < self.end - _END_SLACK:
                raise  # its own timeout (connect, read), not the request's end
            raise FetchTimeout("the request's time ran out while this image was being fetched") from None

    def _dispatch(self, scheme: str, url: str, settings: FetchSettings, validators: Validators | None) -> Fetched:
        if scheme in ("http", "https"):
            return self._http.fetch_conditional(url, settings, validators)
        if scheme == "s3":
            return self._s3.fetch_conditional(url, settings, validators)
        if scheme == "data":
            return Fetched(fetch_data_uri(url, settings))
        return Fetched(fetch_local(url, settings, self.base_dir))
