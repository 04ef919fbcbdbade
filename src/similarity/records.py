"""The two types at the library's boundary: what goes in (``Record``) and what comes out."""

from __future__ import annotations

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
    row: Any = None
    error: RowError | None = None


@dataclass(frozen=True, slots=True)
class ScoreResult:
    record: Record
    cosine: float | None = None
    error: RowError | None = None
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

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
        return {
            "similarity": self.similarity,
            "cosine": self.cosine_rounded,
            "error": self.error_text or None,
            "truncated": self.truncated,
        }
