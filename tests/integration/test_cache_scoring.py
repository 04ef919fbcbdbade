"""score_pairs with the embedding cache on the local store, against a loopback image server that
answers conditional requests like a static host: what a rerun fetches, embeds and encodes."""

from __future__ import annotations

import random
import sqlite3

import pytest

from similarity import Record, score_pairs
from similarity.cache import EmbeddingCache
from similarity.cache.sqlite_store import SqliteStore
from similarity.hardware import has_native_bf16
from similarity.model import load_model
from support.conditional import ConditionalImages, sqlite_cache, true_pairs
from support.imageserver import png_bytes
from support.shapes import draw


def _images(images: ConditionalImages, n: int, seed: int = 0) -> list[tuple[str, str]]:
    return true_pairs(images, n, "cache", seed)


_cache = sqlite_cache


def _score(records, model, fetcher, cache):
    stats = []
    res = list(score_pairs(records, model, fetcher, cache=cache, batch_size=4, stats_out=stats.append))
    return [(r.similarity, r.cosine, r.error_text, r.truncated) for r in res], stats[0]


def _close(a, b) -> bool:
    """The same rows and errors, cosines within 1e-6: an image embedded again may land in a batch
    of another size, which moves fp32 results in their last bits."""
    return len(a) == len(b) and all(x[2] == y[2] and abs((x[1] or 0) - (y[1] or 0)) < 1e-6 for x, y in zip(a, b))


@pytest.fixture
def images(server):
    return ConditionalImages(server)


def test_rerun_is_identical_and_sees_only_304s(tiny_model, fetcher, images, tmp_path) -> None:
    pairs = _images(images, 12)
    records = [Record(u, c) for u, c in pairs] + [Record(pairs[0][0], "a blue square")]
    cache = _cache(tmp_path)
    first, s1 = _score(records, tiny_model, fetcher, cache)
    assert images.statuses() == [200] * 12 and all(r[2] == "" for r in first)
    assert s1.images_embedded == 12 and s1.cache["image_misses"] == 12 and s1.cache["url_misses"] == 12
    images.reset_log()
    second, s2 = _score(records, tiny_model, fetcher, cache)
    assert second == first  # the same floats, so the same bytes in any output
    assert images.statuses() == [304] * 12
    assert all(s.if_none_match for s in images.log)
    assert s2.images_embedded == 0 and s2.captions_encoded == 0
    assert (s2.cache["image_hits"], s2.cache["url_hits"], s2.cache["url_not_modified"]) == (12, 12, 12)
    assert s2.cache["caption_hits"] == s1.cache["caption_misses"] == 12  # every colour and shape once


def test_within_the_ttl_no_request_is_made(tiny_model, fetcher, images, tmp_path) -> None:
    records = [Record(u, c) for u, c in _images(images, 6)]
    cache = _cache(tmp_path, url_ttl=3600)
    first, _ = _score(records, tiny_model, fetcher, cache)
    images.reset_log()
    second, s2 = _score(records, tiny_model, fetcher, cache)
    assert second == first and images.log == [] and s2.cache["url_trusted"] == 6


def test_an_expired_ttl_asks_again(tiny_model, fetcher, images, tmp_path) -> None:
    now = [1000.0]
    records = [Record(u, c) for u, c in _images(images, 3)]
    cache = _cache(tmp_path, url_ttl=60, clock=lambda: now[0])
    _score(records, tiny_model, fetcher, cache)
    now[0] += 61
    images.reset_log()
    _, s = _score(records, tiny_model, fetcher, cache)
    assert images.statuses() == [304] * 3 and s.cache["url_trusted"] == 0
    images.reset_log()
    _score(records, tiny_model, fetcher, cache)  # revalidated 0 s ago: trusted again
    assert images.log == []


def test_changed_bytes_are_re_embedded(tiny_model, fetcher, images, tmp_path) -> None:
    pairs = _images(images, 4)
    records = [Record(u, c) for u, c in pairs]
    cache = _cache(tmp_path)
    first, _ = _score(records, tiny_model, fetcher, cache)
    path = pairs[1][0].rsplit("/", 2)[-2:]
    images.put("/" + "/".join(path), png_bytes(draw("yellow", "triangle", random.Random(99))))  # new ETag
    images.reset_log()
    second, s = _score(records, tiny_model, fetcher, cache)
    assert sorted(images.statuses()) == [200, 304, 304, 304]
    assert s.images_embedded == 1 and s.cache["image_misses"] == 1 and s.cache["url_misses"] == 1
    assert second[1] != first[1] and [second[i] for i in (0, 2, 3)] == [first[i] for i in (0, 2, 3)]
    images.reset_log()
    third, s3 = _score(records, tiny_model, fetcher, cache)  # the new version is what is cached now
    assert third == second and images.statuses() == [304] * 4 and s3.images_embedded == 0


def test_last_modified_alone_revalidates_too(tiny_model, fetcher, server, tmp_path) -> None:
    images = ConditionalImages(server, etag=False)
    records = [Record(u, c) for u, c in _images(images, 3)]
    cache = _cache(tmp_path)
    _score(records, tiny_model, fetcher, cache)
    images.reset_log()
    _, s = _score(records, tiny_model, fetcher, cache)
    assert images.statuses() == [304] * 3 and all(x.if_modified_since and not x.if_none_match for x in images.log)


def test_without_validators_the_bytes_come_again_but_are_not_re_embedded(tiny_model, fetcher, server, tmp_path) -> None:
    images = ConditionalImages(server, etag=False, last_modified=False)
    records = [Record(u, c) for u, c in _images(images, 3)]
    cache = _cache(tmp_path)
    first, _ = _score(records, tiny_model, fetcher, cache)
    images.reset_log()
    second, s = _score(records, tiny_model, fetcher, cache)
    assert second == first and images.statuses() == [200] * 3
    assert s.images_embedded == 0 and s.cache["image_hits"] == 3 and s.cache["url_misses"] == 3


def test_the_same_bytes_at_a_new_url_are_embedded_once(tiny_model, fetcher, images, tmp_path) -> None:
    data = png_bytes(draw("green", "square", random.Random(5)))
    a, b = images.put("/cache/same-a.png", data), images.put("/cache/same-b.png", data)
    cache = _cache(tmp_path)
    _score([Record(a, "a green square")], tiny_model, fetcher, cache)
    res, s = _score([Record(b, "a green square")], tiny_model, fetcher, cache)
    assert s.images_embedded == 0 and s.cache["image_hits"] == 1 and res[0][2] == ""


def test_another_dtype_never_uses_the_entries(tiny_model, tiny_clip_dir, fetcher, images, tmp_path) -> None:
    records = [Record(u, c) for u, c in _images(images, 5)]
    cache = _cache(tmp_path)
    fp32, _ = _score(records, tiny_model, fetcher, cache)
    # Mixed bf16 where the CPU runs it; elsewhere (refused there) fp16, another dtype all the same.
    other = "bf16" if has_native_bf16() else "fp16"
    bf16_model = load_model(tiny_clip_dir, backend="torch", device="cpu", dtype=other)
    assert bf16_model.info.dtype == other
    images.reset_log()
    bf16, s = _score(records, bf16_model, fetcher, cache)
    assert s.images_embedded == 5 and s.captions_encoded == 5 and s.cache["image_hits"] == 0
    assert images.statuses() == [200] * 5  # no 304 asked for: the URLs' embeddings are fp32 ones
    assert bf16 != fp32  # the other dtype really gives other scores: reusing fp32 entries would have hidden that
    again, s2 = _score(records, tiny_model, fetcher, cache)
    assert again == fp32 and s2.images_embedded == 0  # both kinds now live side by side


def _corrupt_all(db_path, how: str) -> int:
    db = sqlite3.connect(db_path)
    rows = db.execute("SELECT key, value FROM entries").fetchall()
    for key, value in rows:
        bad = value[: len(value) // 2] if how == "truncate" else value[:20] + bytes([value[20] ^ 0xFF]) + value[21:]
        db.execute("UPDATE entries SET value = ? WHERE key = ?", (bad, key))
    db.commit()
    db.close()
    return len(rows)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_entries_are_ignored_and_overwritten(tiny_model, fetcher, images, tmp_path, how) -> None:
    records = [Record(u, c) for u, c in _images(images, 4)]
    cache = _cache(tmp_path)
    first, _ = _score(records, tiny_model, fetcher, cache)
    assert _corrupt_all(tmp_path / "cache.db", how) == 4 + 4 + 4  # images, captions, URL records
    images.reset_log()
    second, s = _score(records, tiny_model, fetcher, cache)
    assert _close(second, first)  # recomputed, not read from the damaged entries
    assert s.cache["corrupt"] == 12 and s.images_embedded == 4 and s.captions_encoded == 4
    assert images.statuses() == [200] * 4  # a damaged URL record sends no validators
    third, s3 = _score(records, tiny_model, fetcher, cache)
    assert third == second and s3.cache["corrupt"] == 0 and s3.images_embedded == 0  # overwritten


def test_float16_entries_rerun_identically_and_stay_close(tiny_model, fetcher, images, tmp_path) -> None:
    records = [Record(u, c) for u, c in _images(images, 6)]
    exact, _ = _score(records, tiny_model, fetcher, None)
    cache = EmbeddingCache(SqliteStore(tmp_path / "f16.db", 10**8), dtype="float16")
    cold, _ = _score(records, tiny_model, fetcher, cache)
    warm, s = _score(records, tiny_model, fetcher, cache)
    assert warm == cold and s.images_embedded == 0
    assert max(abs(a[1] - b[1]) for a, b in zip(exact, cold)) < 1e-3


def test_a_tiny_store_evicts_and_still_scores_every_row(tiny_model, fetcher, images, tmp_path) -> None:
    records = [Record(u, c) for u, c in _images(images, 20)]
    exact, _ = _score(records, tiny_model, fetcher, None)
    cache = EmbeddingCache(SqliteStore(tmp_path / "small.db", 8 * 1024))  # room for a few entries
    first, _ = _score(records, tiny_model, fetcher, cache)
    second, s = _score(records, tiny_model, fetcher, cache)
    assert _close(first, exact) and _close(second, exact)
    assert cache.store.stats().bytes <= 8 * 1024
    assert s.images_embedded > 0  # evicted ones were embedded again


def test_s3_images_revalidate_with_if_none_match(tiny_model, s3, bucket, fast_settings, tmp_path) -> None:
    from similarity.fetch import Fetcher

    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"img/{i}.png", Body=png_bytes(draw("red", "circle", random.Random(i))))
    records = [Record(f"s3://{bucket}/img/{i}.png", "a red circle") for i in range(3)]
    fetcher = Fetcher(fast_settings, s3_client=s3)
    cache = _cache(tmp_path)
    first, _ = _score(records, tiny_model, fetcher, cache)
    second, s = _score(records, tiny_model, fetcher, cache)
    assert second == first and s.cache["url_not_modified"] == 3 and s.images_embedded == 0
    s3.put_object(Bucket=bucket, Key="img/0.png", Body=png_bytes(draw("blue", "square", random.Random(7))))
    third, s3_ = _score(records, tiny_model, fetcher, cache)
    assert s3_.images_embedded == 1 and third[0] != first[0]


def test_data_uris_and_local_files_are_keyed_by_content(tiny_model, fetcher, tmp_path) -> None:
    import base64

    data = png_bytes(draw("blue", "circle", random.Random(3)))
    path = tmp_path / "img.png"
    path.write_bytes(data)
    records = [
        Record("data:image/png;base64," + base64.b64encode(data).decode(), "a blue circle"),
        Record(str(path), "x"),
    ]
    cache = _cache(tmp_path)
    first, _ = _score(records, tiny_model, fetcher, cache)
    second, s2 = _score(records, tiny_model, fetcher, cache)
    assert second == first and s2.images_embedded == 0 and s2.cache["image_hits"] == 2
    assert s2.cache["url_hits"] == s2.cache["url_misses"] == 0  # no URL records for these


@pytest.mark.slow
def test_another_backend_never_uses_the_entries(tiny_model, tiny_clip_dir, fetcher, images, tmp_path) -> None:
    import shutil

    from similarity.tools.onnx_export import export_onnx

    d = tmp_path / "tiny-clip"
    shutil.copytree(tiny_clip_dir, d)
    torch_model = load_model(d, backend="torch", device="cpu", dtype="fp32")
    records = [Record(u, c) for u, c in _images(images, 4)]
    cache = _cache(tmp_path)
    _score(records, torch_model, fetcher, cache)
    export_onnx(d, int8=False)
    onnx_model = load_model(d, backend="onnx", dtype="fp32")
    images.reset_log()
    _, s = _score(records, onnx_model, fetcher, cache)
    assert s.images_embedded == 4 and s.captions_encoded == 4 and s.cache["image_hits"] == 0
    assert images.statuses() == [200] * 4


def test_an_unparsable_url_is_its_rows_error_with_the_cache_on(tiny_model, fetcher, tmp_path) -> None:
    # Before: urlsplit's ValueError escaped the cache's lookup: internal_error.
    records = [Record("http://[::1/a.png", "a red circle"), Record("s3://]/a", "a red circle")]
    results = list(score_pairs(records, tiny_model, fetcher, cache=_cache(tmp_path)))
    assert [r.error_code for r in results] == ["unsupported_source", "unsupported_source"]
