"""The cache's part of the command line: ``score``'s ``--cache/--no-cache`` and ``--cache-ttl``,
``similarity cache stats|clear``, and the summary line. ``similarity.cli`` registers these."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..config import Settings, load
from .cache import COUNTS
from .factory import open_store, target
from .store import StoreUnavailable

#: What ``SIMILARITY_CACHE`` unset means for the CLI: the local store.
CLI_DEFAULT = "local"
FLAGS = {"store": "--cache/--no-cache", "ttl": "--cache-ttl"}
EXIT_UNAVAILABLE = 2


def add_score_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse embeddings across runs (default on: $SIMILARITY_CACHE, else a local store in the user's cache "
        "directory); --no-cache: neither read nor write it",
    )
    p.add_argument(
        "--cache-ttl",
        type=float,
        metavar="S",
        help="trust an image URL checked in the last S seconds without asking its server "
        "(default: ask every time, with If-None-Match / If-Modified-Since)",
    )


def apply_flags(settings: Settings, args: argparse.Namespace) -> Settings:
    store: str | None = None
    if args.cache is False:
        store = "off"
    elif args.cache is True and settings.cache.store in ("", "off"):
        store = "local"
    return settings.with_overrides("cache", {"store": store, "ttl": args.cache_ttl}, FLAGS)


def add_command(sub: Any) -> None:
    c = sub.add_parser("cache", help="the embedding cache ($SIMILARITY_CACHE, default the local store)")
    csub = c.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("stats", help="print the store, its entries by kind and its size (JSON)")
    csub.add_parser("clear", help="delete this project's entries from the store")


def run_command(args: argparse.Namespace) -> int:
    cfg = load(Settings).cache
    where = target(cfg, CLI_DEFAULT)
    if where == "off":
        print("the cache is off (SIMILARITY_CACHE=off): nothing to show or clear", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        store = open_store(cfg, where)
        try:
            if args.cache_command == "stats":
                print(json.dumps(store.stats().as_dict(), indent=2))
            else:
                n = store.clear()
                print(f"cleared {n} entries from {store.name}", file=sys.stderr)
        finally:
            store.close()
    except StoreUnavailable as exc:
        print(f"error: cache unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return 0


def summary_lines(counts: dict[str, int], store: str) -> list[str]:
    """The run summary's cache lines (each within 100 columns but the store's path)."""
    c = {k: counts.get(k, 0) for k in COUNTS}
    lines = [
        f"cache {store}",
        f"cache hits/misses: images {c['image_hits']}/{c['image_misses']}, URLs {c['url_hits']}/{c['url_misses']} "
        f"(304: {c['url_not_modified']}, within TTL: {c['url_trusted']}), captions "
        f"{c['caption_hits']}/{c['caption_misses']}",
    ]
    issues = []
    if c["corrupt"]:
        issues.append(f"{c['corrupt']} corrupt entries ignored")
    if c["store_errors"]:
        issues.append(f"{c['store_errors']} store errors (scored without the cache meanwhile)")
    if issues:
        lines.append("cache: " + "; ".join(issues))
    return lines
