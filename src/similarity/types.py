"""The types at the library's boundary: what goes in (``Record``), what comes out (``ScoreResult``)
and the counts of a run (``ScoreStats``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RowError


@dataclass(frozen=True, slots=True)
class Record:
    """One (image, caption) pair. ``row`` carries the untouched input fields for the writer.

    ``error`` is set when the row was already broken when read (ragged, oversized field): it is
    passed through instead of being scored, so the row still comes out in its place.
    """

    url: str | None
    caption: str | None
    row: Sequence[str] = ()
    error: RowError | None = None


@dataclass(frozen=True, slots=True)
class ScoreResult:
    record: Record
    cosine: float | None = None
    error: RowError | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.cosine is not None

    @property
    def similarity(self) -> float | None:
        """``(cos + 1) / 2`` rounded to 4 decimals: the 0..1 score of the original design."""
        if self.cosine is None:
            return None
        return round((self.cosine + 1.0) / 2.0, 4)

    @property
    def cosine_rounded(self) -> float | None:
        return None if self.cosine is None else round(self.cosine, 4)

    @property
    def error_code(self) -> str | None:
        return None if self.error is None else self.error.code

    @property
    def error_text(self) -> str:
        """``code: detail`` with the detail kept short and on one line (it goes into a CSV cell)."""
        if self.error is None:
            return ""
        detail = " ".join(str(self.error.detail).split())
        if len(detail) > 200:
            detail = detail[:197] + "..."
        return f"{self.error.code}: {detail}" if detail else self.error.code

    def as_dict(self) -> dict[str, Any]:
        """The API's per-row shape."""
        return {
            "similarity": self.similarity,
            "cosine": self.cosine_rounded,
            "error": self.error_text or None,
            "error_code": self.error_code,
            "truncated": self.truncated,
        }


@dataclass
class ScoreStats:
    rows: int = 0
    scored: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    images_fetched: int = 0
    images_embedded: int = 0
    captions_encoded: int = 0
    truncated: int = 0
    #: Embedding cache hits and misses by kind (similarity.cache.COUNTS); empty without a cache.
    cache: dict[str, int] = field(default_factory=dict)

    def add(self, result: ScoreResult) -> None:
        self.rows += 1
        if result.error is not None:
            self.errors[result.error.code] = self.errors.get(result.error.code, 0) + 1
        else:
            self.scored += 1
        self.truncated += int(result.truncated)

    @classmethod
    def of(cls, results: Sequence[ScoreResult]) -> ScoreStats:
        stats = cls()
        for r in results:
            stats.add(r)
        return stats
