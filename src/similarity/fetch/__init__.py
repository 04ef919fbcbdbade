"""Guarded, concurrent-safe image fetching: http(s), ``s3://``, ``data:`` and local paths.

``fetcher`` dispatches by scheme; ``http`` holds the hardened HTTP path, ``deadline`` the per-image
deadline watchdog, ``guard`` the address classification (pure functions), ``sources`` the other
sources.
"""

from .conditional import Fetched, Validators
from .fetcher import Fetcher
from .guard import AddressPolicy, classify, parse_networks
from .settings import FetchSettings

__all__ = ["AddressPolicy", "FetchSettings", "Fetched", "Fetcher", "Validators", "classify", "parse_networks"]
