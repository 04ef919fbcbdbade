"""score_pairs: order, de-duplication, fault containment, bounded windows."""

from __future__ import annotations

import base64
import random

import numpy as np
import pytest
from PIL import Image

from similarity import Record, score_pairs
from similarity.errors import RaggedRow
from similarity.pipeline.scorer import Scorer
from support.imageserver import huge_png_header, png_bytes
from support.shapes import draw


def _img(seed: int, colour: str = "red", shape: str = "circle") -> bytes:
    return png_bytes(draw(colour, shape, random.Random(seed)))


def test_every_fault_mode_in_one_run(tiny_model, server, forbidden_server, fetcher) -> None:
    good = _img(1)
    jpeg = png_bytes(draw("blue", "square", random.Random(2)), "JPEG", quality=90)
    cases = [
        (server.image("/s/good.png", good), None),
        (server.status("/s/404.png", 404), "http_404"),
        (server.fail_then_serve("/s/flaky.png", good, 500), None),
        (server.fail_then_serve("/s/429.png", good, 429, headers={"Retry-After": "0"}), None),
        (server.drip("/s/drip.png", good, interval=0.5), "timeout"),
        (server.huge("/s/big.png", 3 * 1024 * 1024), "too_large"),
        (server.huge("/s/bomb.gz", 30 * 1024 * 1024, gzipped=True), "too_large"),
        (server.image("/s/wrong-type.png", good, ctype="text/html"), None),
        (server.redirect("/s/r1", "/s/r2"), None),
        (server.redirect("/s/to-internal", forbidden_server.image("/s/secret.png", good)), "blocked_address"),
        (server.image("/s/truncated.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"), "decode_error"),
        (server.image("/s/huge-header.png", huge_png_header(100_000, 100_000)), "too_many_pixels"),
        (server.image("/s/not-image", b"<html>nope</html>", "image/png"), "not_an_image"),
        ("", "missing_url"),
        ("ftp://example.invalid/a.png", "unsupported_source"),
        ("data:image/png;base64," + base64.b64encode(good).decode(), None),
    ]
    server.image("/s/r2", good)
    records = [Record(url, "a red circle", row=[i]) for i, (url, _) in enumerate(cases)]
    records.append(Record(server.url("/s/good.png"), "  ", row=["blank caption"]))
    records.append(Record("u", "c", row=["ragged"], error=RaggedRow("4 fields")))
    results = list(score_pairs(records, tiny_model, fetcher, batch_size=4, workers=8))
    assert [r.record.row for r in results] == [r.row for r in records]  # all rows, in order
    for (url, expected), res in zip(cases, results):
        assert res.error_code == expected, (url, res.error_text)
        if expected is None:
            assert res.similarity is not None and 0 <= res.similarity <= 1
        else:
            assert res.similarity is None and res.cosine is None
    assert results[-2].error_code == "missing_caption"
    assert results[-1].error_code == "ragged_row"
    assert forbidden_server.hits["/s/secret.png"] == 0
    # the same image scores the same whichever way it arrived
    same = [results[i].cosine for i in (0, 2, 3, 7, 8, 15)]
    assert max(same) - min(same) < 1e-6


def test_identical_urls_and_captions_processed_once(tiny_model, server, fetcher) -> None:
    urls = [server.image(f"/dedup/{i}.png", _img(10 + i)) for i in range(5)]
    records = [Record(urls[i % 5], f"a red circle {i % 3}") for i in range(200)]
    stats = []
    results = list(score_pairs(records, tiny_model, fetcher, batch_size=8, window=32, stats_out=stats.append))
    assert len(results) == 200 and all(r.ok for r in results)
    for i in range(5):
        assert server.hits[f"/dedup/{i}.png"] == 1
    assert stats[0].images_embedded == 5
    assert stats[0].captions_encoded == 3
    # results of duplicate rows are identical
    assert len({(r.record.url, r.record.caption, r.cosine) for r in results}) == 15


def test_results_stream_with_bounded_window(tiny_model, server, fetcher) -> None:
    """The scorer pulls at most two windows ahead of what it has yielded (bounded memory)."""
    url = server.image("/stream.png", _img(5))
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(1000):
            pulled += 1
            yield Record(url, f"caption {i}")

    scorer = Scorer(tiny_model, fetcher, batch_size=8, window=16)
    it = scorer.score(source())
    first = next(it)
    assert first.ok
    assert pulled <= 2 * 16
    rest = list(it)
    assert len(rest) == 999 and pulled == 1000


def test_unexpected_exception_costs_one_row(tiny_model, server, fetcher, monkeypatch) -> None:
    good = server.image("/ok-bug.png", _img(6))
    boom = server.image("/bug.png", _img(7))
    real = fetcher.fetch

    def buggy(url: str) -> bytes:
        if url.endswith("/bug.png"):
            raise KeyError("surprise")
        return real(url)

    monkeypatch.setattr(fetcher, "fetch", buggy)
    res = list(score_pairs([Record(good, "a"), Record(boom, "b"), Record(good, "c")], tiny_model, fetcher))
    assert [r.error_code for r in res] == [None, "internal_error", None]


def test_grey_and_transparent_images_score(tiny_model, fetcher, server) -> None:
    rgba = Image.new("RGBA", (50, 50), (255, 0, 0, 128))
    url = server.image("/rgba.png", png_bytes(rgba))
    [res] = list(score_pairs([Record(url, "a red square")], tiny_model, fetcher))
    assert res.ok


# ------------------------------------------------------------------ poison inputs cost their own row
def test_captions_no_tokenizer_can_encode_cost_their_own_rows(tiny_model, server, fetcher) -> None:
    """Lone surrogates (a JSON \\ud800 escape, undecodable CSV bytes kept as surrogates) made the
    tokenizer fail the whole batch of up to 32 captions."""
    url = server.image("/poison/caption.png", _img(21))
    captions = ["a red circle", "a blue \ud800 square", "a red square", "x\udcff", "a green triangle", "\udfff"]
    res = list(score_pairs([Record(url, c) for c in captions], tiny_model, fetcher, batch_size=32))
    assert [r.error_code for r in res] == [None, "invalid_caption", None, "invalid_caption", None, "invalid_caption"]
    assert "U+D800 at character 7" in res[1].error_text
    for r in res:
        if r.ok:
            [alone] = score_pairs([Record(url, r.record.caption)], tiny_model, fetcher)
            assert abs(alone.cosine - r.cosine) < 1e-6


class Poisoned:
    """The real model, except that any batch holding the poison caption or image fails as a
    backend would on an input it cannot take (nothing real fails on valid input, hence the
    stand-in)."""

    def __init__(self, model, caption: str, pixels: np.ndarray) -> None:
        self.model, self.poison_caption, self.poison_pixels = model, caption, pixels
        self.calls = {"text": 0, "image": 0}

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def embed_texts(self, captions: list[str]):
        self.calls["text"] += 1
        if self.poison_caption in captions:
            raise RuntimeError("text backend rejected its input")
        return self.model.embed_texts(captions)

    def embed_images(self, pixels: np.ndarray):
        self.calls["image"] += 1
        if any(np.array_equal(p, self.poison_pixels) for p in pixels):
            raise ValueError("image backend rejected its input")
        return self.model.embed_images(pixels)


@pytest.mark.parametrize("batch_size", [4, 32])
def test_a_poison_caption_or_image_costs_only_its_row(tiny_model, server, fetcher, batch_size) -> None:
    colours, shapes = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"]
    records = []
    for i in range(12):
        c, s = colours[i % 4], shapes[i % 3]
        url = server.image(f"/poison/{batch_size}/{i}.png", png_bytes(draw(c, s, random.Random(100 + i))))
        records.append(Record(url, f"a {c} {s} number {i}"))
    clean = list(score_pairs(records, tiny_model, fetcher, batch_size=batch_size))
    assert all(r.ok for r in clean)
    poison_pixels = tiny_model.pixels(fetcher.fetch(records[9].url))
    model = Poisoned(tiny_model, records[5].caption, poison_pixels)
    res = list(score_pairs(records, model, fetcher, batch_size=batch_size))
    assert [r.error_code for r in res] == [None] * 5 + ["inference_error"] + [None] * 3 + ["inference_error"] + [
        None
    ] * 2
    assert "text tower" in res[5].error_text and "image tower" in res[9].error_text
    for got, want in zip(res, clean, strict=True):
        if got.ok:
            assert abs(got.cosine - want.cosine) < 1e-6
    assert model.calls["text"] > 1 and model.calls["image"] > 1  # the failed batches were retried


class _Recording:
    """The real model, recording which images shared each image batch (by their first pixels)."""

    def __init__(self, model) -> None:
        self.model, self.batches = model, []

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def embed_images(self, pixels: np.ndarray):
        self.batches.append([p.tobytes()[:64] for p in pixels])
        return self.model.embed_images(pixels)


class _DelayedFetcher:
    """Serves each URL's PNG after its own delay, so downloads finish in another order than the rows'."""

    def __init__(self, images: dict[str, bytes], delays: dict[str, float]) -> None:
        self.images, self.delays = images, delays

    def fetch(self, url: str) -> bytes:
        import time

        time.sleep(self.delays.get(url, 0.0))
        return self.images[url]


def test_image_batches_form_in_row_order_whatever_order_downloads_finish(tiny_model) -> None:
    """A row's embedding depends (in the 7th digit) on its batch-mates, so batches must not depend
    on download timing: two runs whose downloads finish in opposite orders batch the same rows
    together, and print the same scores (what makes a resumed run equal a clean one)."""
    urls = [f"https://img.example/{i}.png" for i in range(12)]
    images = {u: _img(i, ["red", "green", "blue"][i % 3], ["circle", "square"][i % 2]) for i, u in enumerate(urls)}
    records = [Record(u, f"caption {i % 4}") for i, u in enumerate(urls)]
    runs = []
    for slow in (urls[:6], urls[6:]):  # first the early rows arrive last, then the late ones
        model = _Recording(tiny_model)
        fetcher = _DelayedFetcher(images, dict.fromkeys(slow, 0.15))
        results = list(Scorer(model, fetcher, batch_size=4, workers=12).score(records))  # type: ignore[arg-type]
        runs.append((model.batches, [(r.similarity, r.cosine) for r in results]))
    (batches_a, scores_a), (batches_b, scores_b) = runs
    in_rows = [[tiny_model.pixels(images[u]).tobytes()[:64] for u in urls[i : i + 4]] for i in range(0, 12, 4)]
    assert batches_a == batches_b == in_rows
    assert scores_a == scores_b


@pytest.mark.parametrize("side", ["image", "caption"])
def test_a_repeated_failure_keeps_its_error_when_the_cache_is_full(tiny_model, server, fetcher, side) -> None:
    # Before: a repeat found in the error cache was not marked recent, so new failures in its own
    # window evicted it and the row came out as internal_error ("embedding missing").
    good = server.image("/lru/good.png", _img(7))
    scorer = Scorer(tiny_model, fetcher, batch_size=1, window=4, cache_size=1)  # holds 16 of each
    n = 4 * scorer.window
    if side == "image":
        bad = [server.status(f"/lru/{i}.png", 404) for i in range(n + 3)]
        records = [Record(u, "a red circle") for u in bad[:n]] + [Record(u, "a red circle") for u in (bad[0], *bad[n:])]
    else:
        bad = [f"caption {i} \ud800" for i in range(n + 3)]
        records = [Record(good, c) for c in bad[:n]] + [Record(good, c) for c in (bad[0], *bad[n:])]
    results = list(scorer.score(records))
    assert len(results) == len(records)
    expected = "http_404" if side == "image" else "invalid_caption"
    assert [r.error_code for r in results] == [expected] * len(records)
