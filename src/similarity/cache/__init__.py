"""The embedding cache shared across runs, jobs and workers: image embeddings by content hash,
caption embeddings by text, URL records for conditional requests, each keyed by the model's
fingerprint. A local SQLite store for the CLI, Redis for the services. See docs/cache.md."""

from .cache import COUNTS, EmbeddingCache, Hit, Miss, RunCache
from .codec import UrlRecord
from .factory import default_dir, open_cache, open_store
from .keys import Fingerprint, fingerprint
from .store import Store, StoreStats, StoreUnavailable

__all__ = [
    "COUNTS",
    "EmbeddingCache",
    "Fingerprint",
    "Hit",
    "Miss",
    "RunCache",
    "Store",
    "StoreStats",
    "StoreUnavailable",
    "UrlRecord",
    "default_dir",
    "fingerprint",
    "open_cache",
    "open_store",
]
