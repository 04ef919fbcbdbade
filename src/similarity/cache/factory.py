"""The settings' ``cache`` section to a store and an ``EmbeddingCache``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..config import CacheConfig
from .cache import EmbeddingCache
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

APP_NAME = "text-image-similarity"
DB_FILE = "embeddings.sqlite3"


def default_dir() -> Path:
    """The user's cache directory (``$XDG_CACHE_HOME/text-image-similarity`` on Linux)."""
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir(APP_NAME, appauthor=False))
    except ImportError:  # platformdirs is a dependency; this keeps a broken install scoring
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(base) / APP_NAME


def target(cfg: CacheConfig, default: str = "off") -> str:
    """``off``, ``local`` or a store URL: the setting, else the entry point's default."""
    return cfg.store or default


def open_store(cfg: CacheConfig, where: str) -> Store:
    """Raises ``StoreUnavailable`` when the store cannot be opened."""
    if where == "local" or where.startswith("sqlite:"):
        from .sqlite_store import SqliteStore

        if where == "local":
            path = Path(cfg.dir) / DB_FILE if cfg.dir else default_dir() / DB_FILE
        else:
            path = Path(unquote(urlsplit(where).path))
        return SqliteStore(path, cfg.max_bytes, timeout=max(cfg.timeout, 1.0))
    if where.startswith(("redis://", "rediss://", "unix://")):
        from .redis_store import RedisStore

        return RedisStore(where, timeout=cfg.timeout, entry_ttl=cfg.entry_ttl)
    raise StoreUnavailable(f"no cache store for {where!r}")


def open_cache(cfg: CacheConfig, default: str = "off") -> EmbeddingCache | None:
    """The cache the settings ask for, or None when it is off or cannot be opened (a warning:
    scoring never depends on it)."""
    where = target(cfg, default)
    if where == "off":
        return None
    try:
        store = open_store(cfg, where)
    except StoreUnavailable as exc:
        log.warning("embedding cache off for this run: %s", exc)
        return None
    cache = EmbeddingCache(store, url_ttl=cfg.ttl, dtype=cfg.dtype)
    cache.origin = (cfg, default)
    return cache
