"""The Redis store against a real redis-server on 127.0.0.1: entries, expiry, and what scoring does
when the server is unreachable, killed, hung, full or holds damaged entries (it goes on, uncached)."""

from __future__ import annotations

import itertools
import logging
import random
import time

import pytest

from similarity import Record, score_pairs
from similarity.cache import EmbeddingCache, StoreUnavailable
from similarity.cache.redis_store import PREFIX, RedisStore
from support.conditional import ConditionalImages
from support.imageserver import png_bytes
from support.redis_server import free_port, running
from support.shapes import COLOURS, SHAPES, draw

WARNING = "embedding cache unavailable"
_paths = itertools.count()


@pytest.fixture
def redis_server():
    yield from running()


def _records(images: ConditionalImages, n: int) -> list[Record]:
    rng = random.Random(n)
    out = []
    for i in range(n):
        c, s = list(COLOURS)[i % 4], SHAPES[i % 3]
        url = images.put(f"/redis/{next(_paths)}.png", png_bytes(draw(c, s, rng)))
        out.append(Record(url, f"a {c} {s} number {i}"))
    return out


def _score(records, model, fetcher, cache, **kw):
    stats = []
    res = list(score_pairs(records, model, fetcher, cache=cache, batch_size=4, stats_out=stats.append, **kw))
    return [(r.similarity, r.cosine, r.error_text) for r in res], (stats[0] if stats else None)


def _close(a, b) -> bool:
    """The same rows and errors, cosines within 1e-6: an image embedded again may land in a batch
    of another size, which moves fp32 results in their last bits."""
    return len(a) == len(b) and all(x[2] == y[2] and abs((x[1] or 0) - (y[1] or 0)) < 1e-6 for x, y in zip(a, b))


@pytest.fixture
def images(server):
    return ConditionalImages(server)


def test_entries_carry_the_prefix_and_an_expiry_and_clear_leaves_other_keys(redis_server) -> None:
    store = RedisStore(redis_server.url, timeout=0.5, entry_ttl=3600)
    store.put_many({"i:a": b"1", "c:b": b"2", "u:c": b"3"})
    assert store.get_many(["i:a", "c:b", "missing"]) == [b"1", b"2", None]
    r = redis_server.client()
    assert r.get(PREFIX + "i:a") == b"1" and 0 < r.ttl(PREFIX + "i:a") <= 3600
    r.set("someone-else", b"keep")
    assert store.stats().entries == {"images": 1, "captions": 1, "urls": 1}
    assert store.clear() == 3
    assert r.get("someone-else") == b"keep" and store.get_many(["i:a"]) == [None]


def test_a_hung_server_fails_within_the_timeout_not_after_retries(redis_server) -> None:
    store = RedisStore(redis_server.url, timeout=0.2)
    store.put_many({"i:a": b"1"})  # connected
    redis_server.pause()
    try:
        for call in (lambda: store.get_many(["i:a"]), lambda: store.put_many({"i:b": b"2"})):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable, match="Timeout"):
                call()
            assert time.monotonic() - start < 1.0  # redis-py's default retries took ~6 s here
    finally:
        redis_server.resume()


def test_killed_mid_run_every_row_is_scored_with_a_warning(tiny_model, fetcher, images, redis_server, caplog) -> None:
    records = _records(images, 40)
    exact, _ = _score(records, tiny_model, fetcher, None)
    cache = EmbeddingCache(RedisStore(redis_server.url, timeout=0.2), retry_after=0.5)
    stats = []
    results = []
    with caplog.at_level(logging.WARNING):
        gen = score_pairs(records, tiny_model, fetcher, cache=cache, batch_size=4, window=8, stats_out=stats.append)
        for r in gen:
            results.append((r.similarity, r.cosine, r.error_text))
            if len(results) == 10:
                assert redis_server.client().dbsize() > 0  # it was in use
                redis_server.kill()
    assert _close(results, exact)  # every row, in order, scored as without a cache
    assert caplog.text.count(WARNING) >= 1 and stats[0].cache["store_errors"] >= 1
    # the server comes back (empty): after retry_after the cache is used again
    redis_server.start(redis_server.port)
    time.sleep(0.6)
    again, s = _score(records, tiny_model, fetcher, cache)
    assert _close(again, exact) and s.cache["store_errors"] == 0 and redis_server.client().dbsize() > 0


def test_hung_mid_run_costs_one_timeout_per_call_in_flight(tiny_model, fetcher, images, redis_server, caplog) -> None:
    records = _records(images, 40)
    exact, _ = _score(records, tiny_model, fetcher, None)
    cache = EmbeddingCache(RedisStore(redis_server.url, timeout=0.3), retry_after=60)
    results, stats = [], []
    try:
        with caplog.at_level(logging.WARNING):
            gen = score_pairs(
                records, tiny_model, fetcher, cache=cache, batch_size=4, window=8, workers=4, stats_out=stats.append
            )
            for r in gen:
                results.append((r.similarity, r.cosine, r.error_text))
                if len(results) == 10:
                    redis_server.pause()
    finally:
        redis_server.resume()
    assert _close(results, exact) and WARNING in caplog.text
    # 30 rows after the pause make some 45 store calls; each one that waited is a store error. Only
    # those already in flight (4 fetch workers and the scorer) wait; the rest skip the store.
    assert 1 <= stats[0].cache["store_errors"] <= 5, stats[0].cache


def test_unreachable_from_the_start_warns_once_and_scores(tiny_model, fetcher, images, caplog) -> None:
    records = _records(images, 12)
    cache = EmbeddingCache(RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2))
    with caplog.at_level(logging.WARNING):
        res, s = _score(records, tiny_model, fetcher, cache)
    assert all(e == "" for _, _, e in res)
    assert caplog.text.count(WARNING) == 1 and s.cache["store_errors"] >= 1
    assert s.cache["image_hits"] == 0 and s.images_embedded == 12


def test_a_full_server_refusing_writes_is_only_a_warning(tiny_model, fetcher, images, caplog) -> None:
    gen = running(maxmemory="1mb", policy="noeviction")
    srv = next(gen)
    try:
        filler = srv.client()
        for i in range(2000):  # fill it up to the limit
            try:
                filler.set(f"filler:{i}", b"x" * 1024)
            except Exception:  # noqa: BLE001 - OOM reached
                break
        records = _records(images, 8)
        cache = EmbeddingCache(RedisStore(srv.url, timeout=0.5))
        with caplog.at_level(logging.WARNING):
            res, s = _score(records, tiny_model, fetcher, cache)
        assert all(e == "" for _, _, e in res) and s.cache["store_errors"] >= 1 and "maxmemory" in caplog.text
    finally:
        gen.close()


def test_corrupt_entries_in_redis_are_ignored_and_overwritten(tiny_model, fetcher, images, redis_server) -> None:
    records = _records(images, 6)
    cache = EmbeddingCache(RedisStore(redis_server.url, timeout=0.5))
    first, _ = _score(records, tiny_model, fetcher, cache)
    r = redis_server.client()
    keys = list(r.scan_iter(match=PREFIX + "*"))
    assert len(keys) == 18  # 6 images, 6 captions, 6 URL records
    for k in keys:
        v = r.get(k)
        r.set(k, v[:-3] + bytes([v[-3] ^ 0x55]) + v[-2:])  # one flipped byte
    second, s = _score(records, tiny_model, fetcher, cache)
    assert _close(second, first) and s.cache["corrupt"] == 18 and s.images_embedded == 6
    third, s3 = _score(records, tiny_model, fetcher, cache)
    assert third == second and s3.cache["corrupt"] == 0 and s3.images_embedded == 0
