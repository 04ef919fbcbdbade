"""Limits of one image fetch."""

from __future__ import annotations

from dataclasses import dataclass

from .._version import __version__


@dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 30.0  # total seconds per image, retries and redirects included
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    max_retries: int = 2
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    retry_after_cap: float = 10.0
    per_host: int = 8
    pool_size: int = 32
    allow_local_paths: bool = False
    user_agent: str = f"text-image-similarity/{__version__} (+image scoring; respects 429)"

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout", "deadline"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0 seconds, not {getattr(self, name)}")
        for name in ("max_bytes", "per_host", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.max_retries < 0 or self.max_redirects < 0:
            raise ValueError("max_retries and max_redirects cannot be negative")
