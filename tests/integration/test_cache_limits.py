"""A cache hit gives what the fetch and decode would under this run's limits: the byte cap, the
pixel limit and the address guard apply to entries stored by a run that had other limits."""

from __future__ import annotations

import base64
import dataclasses
import os
import random
import sqlite3

import pytest

from similarity import Record, score_pairs
from similarity.cache import EmbeddingCache
from similarity.cache.codec import decode_url, encode_embedding, encode_url
from similarity.cache.keys import image_key
from similarity.cache.sqlite_store import SqliteStore
from similarity.fetch import AddressPolicy, Fetcher
from similarity.fetch.guard import parse_networks
from similarity.model.preprocess import decode_limits, set_decode_limits
from support.conditional import ConditionalImages, sqlite_cache, true_pairs
from support.imageserver import png_bytes
from support.shapes import draw


def _images(images: ConditionalImages, n: int, seed: int = 0) -> list[tuple[str, str]]:
    return true_pairs(images, n, "limits", seed)


_cache = sqlite_cache


def _score(records, model, fetcher, cache):
    stats = []
    res = list(score_pairs(records, model, fetcher, cache=cache, batch_size=4, stats_out=stats.append))
    return [(r.error_code or "", r.cosine) for r in res], stats[0]


def _codes(rows) -> list[str]:
    return [r[0] for r in rows]


@pytest.fixture
def images(server):
    return ConditionalImages(server)


class PixelLimit:
    """The process's pixel limit (what SIMILARITY_MAX_IMAGE_PIXELS sets), restored after a test."""

    def __init__(self) -> None:
        self.before = decode_limits()

    def set(self, n: int) -> None:
        set_decode_limits(dataclasses.replace(self.before, max_pixels=n))

    def reset(self) -> None:
        set_decode_limits(self.before)


@pytest.fixture
def pixel_limit():
    limit = PixelLimit()
    yield limit
    limit.reset()


def damage_entries(path) -> None:
    """Overwrite the root pages of the entries table and its indexes: the file opens (its schema
    page and the meta table are intact) and every read or write of an entry is "malformed"."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = db.execute("PRAGMA page_size").fetchone()[0]
    roots = [r for (r,) in db.execute("SELECT rootpage FROM sqlite_master WHERE tbl_name = 'entries' AND rootpage")]
    db.close()
    with open(path, "r+b") as f:
        for root in roots:
            f.seek((root - 1) * page)
            f.write(os.urandom(page))
    for suffix in ("-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.unlink(f"{path}{suffix}")


@pytest.mark.parametrize("ttl", [None, 3600], ids=["304", "trusted"])
def test_a_hit_over_this_runs_byte_cap_is_too_large(tiny_model, fetcher, images, tmp_path, ttl) -> None:
    records = [Record(u, c) for u, c in _images(images, 3)]
    cache = _cache(tmp_path, url_ttl=ttl)
    first, _ = _score(records, tiny_model, fetcher, cache)
    assert _codes(first) == [""] * 3
    small = fetcher.with_settings(max_bytes=200)  # the images are 300-400 bytes
    uncached, _ = _score(records, tiny_model, small, None)
    cached, s = _score(records, tiny_model, small, cache)
    assert _codes(uncached) == ["too_large"] * 3
    assert _codes(cached) == _codes(uncached)
    texts = [[r.error_text for r in score_pairs(records, tiny_model, small, cache=c)] for c in (None, cache)]
    assert texts[0] == texts[1] and texts[0][0].startswith("too_large: Content-Length ")
    assert s.cache["image_hits"] == 0
    again, s2 = _score(records, tiny_model, fetcher, cache)  # the refusals left the entries usable
    assert again == first and s2.images_embedded == 0


def test_a_hit_over_this_runs_pixel_limit_is_too_many_pixels(
    tiny_model, fetcher, images, tmp_path, pixel_limit
) -> None:
    data = png_bytes(draw("blue", "circle", random.Random(3)))
    records = [
        Record("data:image/png;base64," + base64.b64encode(data).decode(), "a blue circle"),
        *(Record(u, c) for u, c in _images(images, 2)),
    ]
    for ttl in (None, 3600):  # the 304 path and the trusted one
        cache = EmbeddingCache(SqliteStore(tmp_path / f"px-{ttl}.db", 10**8), url_ttl=ttl)
        first, _ = _score(records, tiny_model, fetcher, cache)
        assert _codes(first) == [""] * 3
        pixel_limit.set(100)  # the images are 65x120 and the like
        uncached, _ = _score(records, tiny_model, fetcher, None)
        cached, s = _score(records, tiny_model, fetcher, cache)
        pixel_limit.reset()
        assert _codes(uncached) == ["too_many_pixels"] * 3
        assert cached == uncached and s.cache["image_hits"] == 0
        again, s2 = _score(records, tiny_model, fetcher, cache)
        assert again == first and s2.images_embedded == 0


def test_the_same_error_text_as_the_decoder(tiny_model, fetcher, tmp_path, pixel_limit) -> None:
    data = png_bytes(draw("red", "square", random.Random(8)))
    records = [Record("data:image/png;base64," + base64.b64encode(data).decode(), "a red square")]
    cache = _cache(tmp_path)
    list(score_pairs(records, tiny_model, fetcher, cache=cache))
    pixel_limit.set(100)
    plain = [r.error_text for r in score_pairs(records, tiny_model, fetcher)]
    hit = [r.error_text for r in score_pairs(records, tiny_model, fetcher, cache=cache)]
    assert hit == plain and plain[0].startswith("too_many_pixels: ")


def test_a_trusted_url_the_guard_refuses_is_blocked_address(
    tiny_model, fetcher, fast_settings, images, tmp_path
) -> None:
    records = [Record(u, c) for u, c in _images(images, 3)]
    cache = _cache(tmp_path, url_ttl=3600)
    first, _ = _score(records, tiny_model, fetcher, cache)  # allowed 127.0.0.1/32
    assert _codes(first) == [""] * 3
    guarded = Fetcher(fast_settings, AddressPolicy())  # no allow-list: loopback is refused
    try:
        images.reset_log()
        uncached, _ = _score(records, tiny_model, guarded, None)
        cached, s = _score(records, tiny_model, guarded, cache)
    finally:
        guarded.close()
    assert _codes(uncached) == ["blocked_address"] * 3
    assert _codes(cached) == _codes(uncached) and s.cache["url_trusted"] == 0
    assert images.log == []  # refused before any connection, with or without the cache
    images.reset_log()
    again, s2 = _score(records, tiny_model, fetcher, cache)  # allowed again: trusted, no request
    assert again == first and s2.cache["url_trusted"] == 3 and images.log == []


def test_a_trusted_url_redirected_to_a_host_the_guard_refuses_is_blocked_address(
    tiny_model, fetcher, fast_settings, server, forbidden_server, tmp_path
) -> None:
    # Before: only the URL's own host was checked on the TTL path, so a run that may not reach
    # 127.0.0.2 was answered from the cache for a URL whose bytes came from there.
    target = forbidden_server.image("/via/target.png", png_bytes(draw("blue", "circle", random.Random(3))))
    records = [Record(server.redirect("/via/start.png", target), "a blue circle")]
    cache = _cache(tmp_path, url_ttl=3600)
    wider = Fetcher(fast_settings, AddressPolicy(parse_networks("127.0.0.1/32,127.0.0.2/32")))
    try:
        first, _ = _score(records, tiny_model, wider, cache)
        trusted, s = _score(records, tiny_model, wider, cache)
    finally:
        wider.close()
    assert _codes(first) == [""] and trusted == first and s.cache["url_trusted"] == 1
    uncached, _ = _score(records, tiny_model, fetcher, None)  # 127.0.0.1 only
    cached, s2 = _score(records, tiny_model, fetcher, cache)
    assert _codes(uncached) == ["blocked_address"]
    assert _codes(cached) == _codes(uncached) and s2.cache["url_trusted"] == 0


def test_a_url_record_that_does_not_say_where_it_was_redirected_is_revalidated(
    tiny_model, fetcher, images, tmp_path
) -> None:
    records = [Record(u, c) for u, c in _images(images, 2)]
    cache = _cache(tmp_path, url_ttl=3600)
    first, _ = _score(records, tiny_model, fetcher, cache)
    db = sqlite3.connect(tmp_path / "cache.db")
    for key, value in db.execute("SELECT key, value FROM entries WHERE key LIKE 'u:%'").fetchall():
        rec = decode_url(value)
        assert rec is not None and rec.via == ()
        db.execute("UPDATE entries SET value = ? WHERE key = ?", (encode_url(dataclasses.replace(rec, via=None)), key))
    db.commit()
    db.close()
    images.reset_log()
    second, s = _score(records, tiny_model, fetcher, cache)
    assert second == first and s.cache["url_trusted"] == 0 and images.statuses() == [304] * 2
    third, s3 = _score(records, tiny_model, fetcher, cache)  # renewed with its hops: trusted again
    assert third == first and s3.cache["url_trusted"] == 2


def test_a_trusted_host_is_resolved_once_per_run_not_per_url(
    tiny_model, fetcher, images, tmp_path, monkeypatch
) -> None:
    records = [Record(u, c) for u, c in _images(images, 5)]
    cache = _cache(tmp_path, url_ttl=3600)
    _score(records, tiny_model, fetcher, cache)
    calls = []
    real = AddressPolicy.resolve
    monkeypatch.setattr(AddressPolicy, "resolve", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    _, s = _score(records, tiny_model, fetcher, cache)
    assert s.cache["url_trusted"] == 5 and len(calls) == 1


def test_entries_from_before_sizes_were_kept_are_misses(tiny_model, fetcher, images, tmp_path) -> None:
    pairs = _images(images, 3)
    records = [Record(u, c) for u, c in pairs]
    cache = _cache(tmp_path, url_ttl=3600)
    first, _ = _score(records, tiny_model, fetcher, cache)
    # Rewrite the image entries as the earlier layout stored them: the embedding alone.
    run = cache.session(tiny_model)
    db = sqlite3.connect(tmp_path / "cache.db")
    from similarity.cache.codec import decode_image

    for key, value in db.execute("SELECT key, value FROM entries WHERE key LIKE 'i:%'").fetchall():
        vec, _ = decode_image(value, run.dim)
        db.execute("UPDATE entries SET value = ? WHERE key = ?", (encode_embedding(vec), key))
    db.commit()
    db.close()
    images.reset_log()
    second, s = _score(records, tiny_model, fetcher, cache)
    assert s.images_embedded == 3 and s.cache["corrupt"] == 0 and s.cache["url_trusted"] == 0
    assert images.statuses() == [200] * 3  # fetched again: their limits cannot be checked otherwise
    assert [r[0] for r in second] == [r[0] for r in first]
    third, s3 = _score(records, tiny_model, fetcher, cache)  # stored anew, with their sizes
    assert s3.images_embedded == 0 and s3.cache["url_trusted"] == 3
    assert image_key(run.fingerprint, "0" * 64).startswith("i:")


def test_rows_are_scored_while_a_damaged_file_is_replaced(tiny_model, fetcher, images, tmp_path, caplog) -> None:
    pairs = _images(images, 4)
    records = [Record(u, c) for u, c in pairs]
    path = tmp_path / "cache.db"
    store = SqliteStore(path, 10**9)
    store.put_many({f"i:{i:05d}": os.urandom(2000) for i in range(300)})
    store.close()
    damage_entries(path)
    cache = EmbeddingCache(SqliteStore(path, 10**9))
    exact, _ = _score(records, tiny_model, fetcher, None)
    with caplog.at_level("WARNING"):
        first, s1 = _score(records, tiny_model, fetcher, cache)
        second, s2 = _score(records, tiny_model, fetcher, cache)
    assert _codes(first) == _codes(exact) == [""] * 4
    assert s1.cache["store_errors"] == 0 and s2.cache["store_errors"] == 0
    assert s2.images_embedded == 0 and s2.cache["image_hits"] == 4  # the new file works
    assert sum("damaged" in r.getMessage() for r in caplog.records) == 1
    assert "unavailable" not in caplog.text
