"""The micro-batcher on the tiny CLIP with data: URIs (no sockets): rows of concurrent requests
embedded together, results equal to the Lambda's scorer, waits, limits, poison inputs, shutdown,
and the readiness canary."""

from __future__ import annotations

import base64
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from similarity import Record, score_pairs
from similarity.errors import RaggedRow
from similarity.fetch import Fetcher, FetchSettings
from similarity.model import ClipModel
from similarity.server.batcher import BatcherClosed, MicroBatcher, QueueFull
from similarity.server.canary import Canary
from support.imageserver import png_bytes
from support.shapes import COLOURS, SHAPES, draw


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.depths: list[tuple[int, int]] = []
        self.fetches: list[str | None] = []
        self.lock = threading.Lock()

    def batch(self, tower: str, size: int, seconds: float) -> None:
        with self.lock:
            self.batches.append((tower, size))

    def fetched(self, seconds: float, error_code: str | None) -> None:
        with self.lock:
            self.fetches.append(error_code)

    def depth(self, waiting: int, in_flight: int) -> None:
        self.depths.append((waiting, in_flight))

    def sizes(self, tower: str) -> list[int]:
        return [n for t, n in self.batches if t == tower]


def data_uri(seed: int, colour: str = "red", shape: str = "circle") -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(draw(colour, shape, random.Random(seed)))).decode()


@pytest.fixture
def data_fetcher():
    f = Fetcher(FetchSettings(allow_local_paths=False))
    yield f
    f.close()


@pytest.fixture
def make_batcher(tiny_model):
    made: list[MicroBatcher] = []

    def make(**kw) -> tuple[MicroBatcher, Recorder]:
        rec = Recorder()
        b = MicroBatcher(tiny_model, observer=rec, **kw).start()
        made.append(b)
        return b, rec

    yield make
    for b in made:
        b.close(timeout=5)


def mixed_records(n: int) -> list[Record]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        out.append(Record(data_uri(i, c, s), f"a {c} {s}"))
    return out


def test_concurrent_requests_share_batches_and_match_the_scorer(make_batcher, tiny_model, data_fetcher) -> None:
    batcher, rec = make_batcher(batch_size=16, max_wait=0.2, workers=8)
    records = mixed_records(24)
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda r: batcher.score([r], data_fetcher, timeout=60), records))
    expected = list(score_pairs(records, tiny_model, data_fetcher, batch_size=16))
    for (got,), want in zip(answers, expected, strict=True):
        assert got.error is None and got.record is not None
        assert got.cosine == pytest.approx(want.cosine, abs=1e-5)
        assert got.truncated == want.truncated
    # 24 single-row requests, at most 16 per model call: they were embedded together
    assert max(rec.sizes("image")) > 1 and sum(rec.sizes("image")) == 24
    assert max(rec.sizes("image")) <= 16 and max(rec.sizes("text")) <= 16
    assert rec.depths[-1] == (0, 0) and batcher.rows_in_flight == 0


def test_rows_without_work_and_order_within_a_request(make_batcher, data_fetcher) -> None:
    batcher, _ = make_batcher()
    url = data_uri(1)
    records = [
        Record(url, "a red circle"),
        Record("", "x"),
        Record(url, "  "),
        Record(None, None, error=RaggedRow("3 fields, header has 2")),
        Record("ftp://example.invalid/a.png", "x"),
        Record(url, "a blue square"),
        Record(url, "a red circle"),  # a duplicate: fetched and encoded once, answered twice
    ]
    out = batcher.score(records, data_fetcher, timeout=30)
    assert [r.error_code for r in out] == [
        None,
        "missing_url",
        "missing_caption",
        "ragged_row",
        "unsupported_source",
        None,
        None,
    ]
    assert [r.record for r in out] == records
    assert out[0].cosine == out[6].cosine and out[0].cosine > out[5].cosine


def test_a_request_with_nothing_to_embed_needs_no_inference(tiny_model, data_fetcher) -> None:
    batcher = MicroBatcher(tiny_model)  # never started: only checks answer
    assert batcher.submit([Record("", "x"), Record("u", "")], data_fetcher).result(1)[1].error_code == "missing_caption"
    batcher.close(timeout=1)


def test_full_batch_runs_without_waiting(tiny_model, data_fetcher) -> None:
    rec = Recorder()
    batcher = MicroBatcher(tiny_model, batch_size=4, max_wait=30.0, observer=rec)
    futures = [batcher.submit([r], data_fetcher) for r in mixed_records(4)]
    end = time.monotonic() + 30
    while batcher.queue_depth < 8 and time.monotonic() < end:  # 4 images fetched, 4 captions queued
        time.sleep(0.01)
    start = time.monotonic()
    batcher.start()
    assert all(f.result(25)[0].error is None for f in futures)
    assert time.monotonic() - start < 20  # well before the 30 s wait: four inputs fill a batch
    assert rec.sizes("image") == [4] and rec.sizes("text") == [4]
    batcher.close(timeout=5)


def test_a_lone_row_waits_at_most_max_wait(make_batcher, data_fetcher) -> None:
    batcher, rec = make_batcher(batch_size=32, max_wait=0.0)
    for r in mixed_records(3):
        batcher.score([r], data_fetcher, timeout=30)
    assert rec.sizes("image") == [1, 1, 1]


def test_an_invalid_caption_costs_only_its_row(make_batcher, data_fetcher) -> None:
    # A lone surrogate (a CSV decoder's leftover, a \ud800 escape) no tokenizer can encode: the
    # Scorer's own check answers it, and its neighbours in the batch are scored.
    batcher, _ = make_batcher(batch_size=8, max_wait=0.2)
    records = [Record(data_uri(1), "a red circle"), Record(data_uri(2), "bad \ud800 text"), Record(data_uri(3), "x")]
    with ThreadPoolExecutor(3) as pool:
        out = list(pool.map(lambda r: batcher.score([r], data_fetcher, timeout=60)[0], records))
    assert [r.error_code for r in out] == [None, "invalid_caption", None]
    assert out[1].error_text == "invalid_caption: lone surrogate U+D800 at character 4"


class Poisoned(ClipModel):
    """The tiny CLIP, except that a batch holding a caption with POISON, or an all-black image,
    fails as a whole (what a backend does with an input it cannot take)."""

    def embed_texts(self, captions):
        if any("POISON" in c for c in captions):
            raise ValueError("poisoned text batch")
        return super().embed_texts(captions)

    def embed_images(self, pixels):
        if any(float(np.ptp(p, axis=(1, 2)).max()) == 0.0 for p in pixels):  # one flat colour
            raise ValueError("poisoned image batch")
        return super().embed_images(pixels)


def test_a_failing_model_call_costs_only_the_inputs_that_fail_alone(tiny_model, data_fetcher) -> None:
    from PIL import Image

    model = Poisoned(tiny_model.backend, tiny_model.tokenizer, tiny_model.preprocess, tiny_model.info)
    rec = Recorder()
    batcher = MicroBatcher(model, batch_size=8, max_wait=0.0, observer=rec)
    black = "data:image/png;base64," + base64.b64encode(png_bytes(Image.new("RGB", (64, 64)))).decode()
    records = [
        Record(data_uri(1), "a red circle"),
        Record(data_uri(2), "POISON"),
        Record(black, "x"),
        Record(data_uri(3), "y"),
    ]
    futures = [batcher.submit([r], data_fetcher) for r in records]
    end = time.monotonic() + 30
    while batcher.queue_depth < 8 and time.monotonic() < end:  # one batch per tower, all four in it
        time.sleep(0.01)
    batcher.start()
    out = [f.result(60)[0] for f in futures]
    batcher.close(timeout=5)
    assert [r.error_code for r in out] == [None, "inference_error", "inference_error", None]
    assert out[1].error_text == "inference_error: ValueError in text tower"
    assert out[2].error_text == "inference_error: ValueError in image tower"
    assert sorted(rec.sizes("text")) == [1, 1, 1] and sorted(rec.sizes("image")) == [1, 1, 1]  # the retries


def test_admission_limit(make_batcher, data_fetcher) -> None:
    batcher, _ = make_batcher(max_rows=2, max_wait=0.5)
    first = batcher.submit(mixed_records(2), data_fetcher)
    with pytest.raises(QueueFull):
        batcher.submit(mixed_records(1), data_fetcher)
    canary = batcher.submit(mixed_records(1), data_fetcher, admit_always=True)
    assert len(first.result(60)) == 2 and canary.result(60)[0].error is None
    assert batcher.submit([Record("", "x")], data_fetcher).result(5)[0].error_code == "missing_url"


def test_close_drains_then_refuses(make_batcher, data_fetcher) -> None:
    batcher, _ = make_batcher(max_wait=0.3)
    pending = batcher.submit(mixed_records(3), data_fetcher)
    assert batcher.close(timeout=60) is True
    assert [r.error for r in pending.result(0)] == [None, None, None]
    with pytest.raises(BatcherClosed):
        batcher.submit(mixed_records(1), data_fetcher)


def test_rows_left_at_the_deadline_become_timeouts(tiny_model, data_fetcher) -> None:
    # The inference thread is not started: nothing can finish, so the wait must end the rows.
    batcher = MicroBatcher(tiny_model, max_wait=0.0)
    start = time.monotonic()
    out = batcher.score([Record(data_uri(1), "a red circle"), Record("", "x")], data_fetcher, timeout=0.5)
    assert time.monotonic() - start < 5
    assert [r.error_code for r in out] == ["timeout", "missing_url"]
    assert batcher.rows_in_flight == 0
    batcher.close(timeout=1)


class Drifting:
    """The tiny model's backend with its image features nudged once ``drift`` is set."""

    def __init__(self, backend) -> None:
        self.inner = backend
        self.drift = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        out = self.inner.image_features(pixels)
        return out + self.drift * np.linspace(-1, 1, out.shape[1], dtype=out.dtype)

    def text_features(self, ids, mask):
        return self.inner.text_features(ids, mask)


def test_canary_passes_then_catches_drift(tiny_clip_dir, data_fetcher) -> None:
    from similarity.model import load_model

    model = load_model(tiny_clip_dir, backend="torch", device="cpu")
    model.backend = Drifting(model.backend)
    batcher = MicroBatcher(model, max_wait=0.0).start()
    try:
        canary = Canary(
            lambda records, timeout: batcher.submit(records, data_fetcher).result(timeout), tolerance=1e-3, interval=0
        )
        expected = canary.record()
        assert -1 <= expected <= 1
        ok = canary.check()
        assert ok.ok and ok.drift == pytest.approx(0, abs=1e-6)
        model.backend.drift = 0.5
        bad = canary.check()
        assert not bad.ok and bad.drift > 1e-3 and "drifted" in bad.reason
        model.backend.drift = float("nan")
        assert "scored" in canary.check().reason
    finally:
        batcher.close(timeout=5)


def test_canary_times_out_when_nothing_scores(tiny_model, data_fetcher) -> None:
    stuck = MicroBatcher(tiny_model)  # never started
    canary = Canary(lambda records, timeout: stuck.submit(records, data_fetcher).result(timeout), timeout=0.3)
    with pytest.raises(RuntimeError, match="not scored within"):
        canary.record()
    stuck.close(timeout=1)


def test_fetches_run_in_the_requests_log_context(make_batcher, data_fetcher) -> None:
    from similarity.server.logs import REQUEST_ID

    seen: list[str | None] = []
    batcher, rec = make_batcher()
    rec.fetched = lambda seconds, code: seen.append(REQUEST_ID.get())  # runs on the fetch thread

    def request(rid: str) -> None:
        REQUEST_ID.set(rid)
        batcher.score([Record(data_uri(1), "a red circle"), Record(data_uri(2), "x")], data_fetcher, timeout=30)

    threads = [threading.Thread(target=request, args=(f"req-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == ["req-0", "req-0", "req-1", "req-1", "req-2", "req-2"]


def test_with_a_cache_a_repeated_request_embeds_nothing_and_scores_the_same(tiny_model, data_fetcher, tmp_path) -> None:
    from similarity.cache import EmbeddingCache
    from similarity.cache.sqlite_store import SqliteStore

    cache = EmbeddingCache(SqliteStore(tmp_path / "cache.db", 10**8))
    records = mixed_records(6)
    answers, recorders = [], []
    for _ in range(2):  # two server lifetimes on one store
        rec = Recorder()
        b = MicroBatcher(tiny_model, observer=rec, max_wait=0.01, cache=cache.session(tiny_model)).start()
        try:
            answers.append(b.score(records, data_fetcher, timeout=60))
        finally:
            b.close(timeout=5)
        recorders.append(rec)
    assert sum(recorders[0].sizes("image")) == 6 and sum(recorders[0].sizes("text")) > 0
    assert recorders[1].sizes("image") == [] and recorders[1].sizes("text") == []
    for first, second in zip(*answers, strict=True):
        assert first.error is None and second.error is None
        assert second.cosine == first.cosine
