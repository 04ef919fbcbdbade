"""The one small interface every store implements: bytes by key, in batches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class StoreUnavailable(Exception):
    """A store call failed or timed out. ``EmbeddingCache`` turns it into misses and a warning;
    it never reaches a row."""


#: Key prefixes by kind of entry (see ``keys``).
KINDS = {"i": "images", "c": "captions", "u": "urls"}


@dataclass
class StoreStats:
    store: str
    entries: dict[str, int] = field(default_factory=dict)  # by kind
    bytes: int | None = None
    max_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "store": self.store,
            "entries": self.entries,
            "total_entries": sum(self.entries.values()),
        }
        if self.bytes is not None:
            out["bytes"] = self.bytes
        if self.max_bytes is not None:
            out["max_bytes"] = self.max_bytes
        return {**out, **self.extra}


class Store(Protocol):
    """Thread-safe. Every call either returns within the store's timeout or raises
    ``StoreUnavailable``."""

    #: Where the entries live, without secrets (for messages and ``cache stats``).
    name: str

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def put_many(self, items: Mapping[str, bytes]) -> None: ...

    def stats(self) -> StoreStats: ...

    def clear(self) -> int:
        """Delete this project's entries (only those); return how many."""
        ...

    def close(self) -> None: ...
