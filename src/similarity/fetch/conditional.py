"""Conditional fetches: what a cache knows about a URL (its validators) in, the bytes or "not
modified" out, with the validators the source sent back for next time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Validators:
    """An earlier response's ``ETag`` and ``Last-Modified``, sent back as ``If-None-Match`` and
    ``If-Modified-Since`` (for ``s3://``: the object's ETag as ``IfNoneMatch``)."""

    etag: str | None = None
    last_modified: str | None = None

    def __bool__(self) -> bool:
        return bool(self.etag or self.last_modified)

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        if self.etag:
            out["If-None-Match"] = self.etag
        if self.last_modified:
            out["If-Modified-Since"] = self.last_modified
        return out


@dataclass(frozen=True)
class Fetched:
    """``data`` is None when the source answered "not modified" to the validators sent. ``via``:
    the URLs redirected to on the way, in order (a cache that later trusts the answer without
    asking again checks their hosts too)."""

    data: bytes | None
    etag: str | None = None
    last_modified: str | None = None
    via: tuple[str, ...] = ()

    @property
    def not_modified(self) -> bool:
        return self.data is None
