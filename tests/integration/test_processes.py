"""Fetching and decoding in worker processes (``processes=N``): the same rows, order, scores and
errors as the threads of one process; a worker killed mid-download costs nothing, and an image that
kills its worker on its own costs its own row (``worker_crashed``)."""

from __future__ import annotations

import base64
import dataclasses
import multiprocessing
import os
import random
import signal

import pytest

from similarity import Record, score_pairs
from similarity.errors import WorkersFailing
from similarity.model.preprocess import decode_limits
from similarity.pipeline.processes import LoaderSpec, ProcessLoader
from support.imageserver import Handler, huge_png_header, png_bytes
from support.procs import pid_with_local_port
from support.shapes import draw

SHAPES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


def _img(seed: int, fmt: str = "PNG") -> bytes:
    colour, shape = SHAPES[seed % len(SHAPES)]
    return png_bytes(draw(colour, shape, random.Random(seed)), fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _scores(results) -> list[tuple[object, float | None, str | None]]:
    return [(r.record.row, r.cosine, r.error_code) for r in results]


def test_processes_give_what_threads_give(tiny_model, server, forbidden_server, fetcher, tmp_path) -> None:
    local = tmp_path / "local.jpg"
    local.write_bytes(_img(7, "JPEG"))
    jpeg = _img(3, "JPEG")
    urls = [server.image(f"/proc/{i}.png", _img(i)) for i in range(40)]
    cases = [
        *urls,
        server.status("/proc/404.png", 404),
        server.image("/proc/truncated.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"),
        server.image("/proc/huge-header.png", huge_png_header(100_000, 100_000)),
        server.image("/proc/not-image", b"<html>nope</html>", "image/png"),
        server.redirect("/proc/to-internal", forbidden_server.image("/proc/secret.png", _img(1))),
        "data:image/png;base64," + base64.b64encode(_img(2)).decode(),
        str(local),
        "ftp://example.invalid/a.png",
        urls[0],  # a duplicate: fetched once
    ]
    records = [Record(url, f"a {SHAPES[i % 4][0]} {SHAPES[i % 4][1]}", row=[i]) for i, url in enumerate(cases)]
    threads = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4, workers=8))
    hits = dict(server.hits)
    procs = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4, workers=8, processes=2))
    assert procs == threads  # bit for bit: the same pixels, batched in the same row order
    codes = [code for _, _, code in procs]
    assert codes[40:] == [
        "http_404",
        "decode_error",
        "too_many_pixels",
        "not_an_image",
        "blocked_address",
        None,
        None,
        "unsupported_source",
        None,
    ]
    assert all(code is None for code in codes[:40])
    assert server.hits["/proc/0.png"] - hits["/proc/0.png"] == 1
    assert forbidden_server.hits["/proc/secret.png"] == 0  # the workers carry the parent's guard


def test_s3_urls_load_in_the_workers_own_clients(tiny_model, s3, bucket, fetcher) -> None:
    """A client cannot cross processes: each worker makes its own from the same environment
    (``similarity.aws.make_client``; here moto's endpoint in AWS_ENDPOINT_URL)."""
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"img/{i}.png", Body=_img(i))
    urls = [f"s3://{bucket}/img/{i}.png" for i in range(6)] + [f"s3://{bucket}/img/missing.png"]
    records = [Record(u, "a green triangle", row=[i]) for i, u in enumerate(urls)]
    threads = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4))
    procs = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4, processes=2))
    assert procs == threads
    assert [code for _, _, code in procs] == [None] * 6 + ["not_found"]


def test_the_workers_ask_the_embedding_cache_like_the_threads(tiny_model, server, fetcher, tmp_path) -> None:
    """Each worker opens the run's store again (``EmbeddingCache.origin``); a rerun sees only
    304s and embeds nothing, and the workers' counts reach the run's stats."""
    from similarity.cache import open_cache
    from similarity.config import CacheConfig
    from support.conditional import ConditionalImages

    images = ConditionalImages(server)
    urls = [images.put(f"/proc-cache/{i}.png", _img(i)) for i in range(10)]
    records = [Record(u, f"a {SHAPES[i % 4][0]} {SHAPES[i % 4][1]}") for i, u in enumerate(urls)]
    fetched_by: list[int | None] = []  # which process made each request: the workers, not this one

    def noting(route):
        def wrapped(h: Handler) -> None:
            children = [p.pid for p in multiprocessing.active_children()]
            fetched_by.append(pid_with_local_port(h.client_address[1], [os.getpid(), *children]))
            route(h)

        return wrapped

    for i in range(10):
        server.routes[f"/proc-cache/{i}.png"] = noting(server.routes[f"/proc-cache/{i}.png"])
    cache = open_cache(CacheConfig(store=f"sqlite:///{tmp_path / 'cache.db'}"))
    assert cache is not None and cache.origin is not None

    def run() -> tuple[list, dict]:
        stats: list = []
        out = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4, processes=2, cache=cache, stats_out=stats.append))  # fmt: skip
        return out, stats[0]

    plain = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4))  # the cache-less threads'
    images.reset_log()
    assert fetched_by == [os.getpid()] * 10
    fetched_by.clear()
    first, s1 = run()
    assert first == plain
    assert images.statuses() == [200] * 10
    assert s1.images_embedded == 10 and s1.cache["image_misses"] == 10 and s1.cache["url_misses"] == 10
    images.reset_log()
    second, s2 = run()
    assert second == first and images.statuses() == [304] * 10
    assert s2.images_embedded == 0
    assert (s2.cache["image_hits"], s2.cache["url_not_modified"]) == (10, 10)
    assert len(fetched_by) == 20 and None not in fetched_by and os.getpid() not in fetched_by
    cache.close()


def test_the_workers_check_cache_hits_against_the_runs_pixel_limit(tiny_model, server, fetcher, tmp_path) -> None:
    """A run whose ``PreprocessConfig`` sets its own pixel limit: the workers decode under it, so
    their cache hits are checked against it too, not against the process's limit."""
    import copy

    from similarity.cache import open_cache
    from similarity.config import CacheConfig
    from similarity.model.preprocess import set_decode_limits
    from support.conditional import ConditionalImages

    images = ConditionalImages(server)
    urls = [images.put(f"/proc-limit/{i}.png", _img(i)) for i in range(4)]
    records = [Record(u, f"a {SHAPES[i][0]} {SHAPES[i][1]}") for i, u in enumerate(urls)]
    model = copy.copy(tiny_model)
    model.preprocess = dataclasses.replace(tiny_model.preprocess, max_pixels=10**7)
    cache = open_cache(CacheConfig(store=f"sqlite:///{tmp_path / 'cache.db'}"))
    assert cache is not None
    before = decode_limits()
    set_decode_limits(dataclasses.replace(before, max_pixels=100))  # the process's: below every image
    try:
        plain = _scores(score_pairs(records, model, fetcher, batch_size=4))
        runs = [_scores(score_pairs(records, model, fetcher, batch_size=4, processes=2, cache=cache)) for _ in "ab"]
    finally:
        set_decode_limits(before)
        cache.close()
    assert [e for _, _, e in plain] == [None] * 4
    assert runs == [plain, plain]  # before: the second run's hits were too_many_pixels


def _killing_route(data: bytes, kills: int):
    """A route that SIGKILLs the worker process downloading it, its first ``kills`` times."""
    seen = {"n": 0}

    def route(h: Handler) -> None:
        seen["n"] += 1
        if seen["n"] <= kills:
            pid = pid_with_local_port(h.client_address[1], [p.pid for p in multiprocessing.active_children()])
            assert pid is not None and pid != os.getpid()
            os.kill(pid, signal.SIGKILL)
            return
        h.send_plain(200, data, "image/png")

    return route


def test_a_worker_killed_mid_download_loses_nothing(tiny_model, server, fetcher) -> None:
    urls = [server.image(f"/kill1/{i}.png", _img(i)) for i in range(24)]
    server.routes["/kill1/victim.png"] = _killing_route(_img(5), kills=1)
    urls.insert(9, server.url("/kill1/victim.png"))
    records = [Record(u, "a red circle", row=[i]) for i, u in enumerate(urls)]
    server.image("/kill1/same-as-victim.png", _img(5))
    plain = [Record(u.replace("victim", "same-as-victim"), r.caption, row=r.row) for u, r in zip(urls, records)]
    expected = _scores(score_pairs(plain, tiny_model, fetcher, batch_size=4))
    got = _scores(score_pairs(records, tiny_model, fetcher, batch_size=4, workers=4, processes=2))
    assert got == expected
    assert server.hits["/kill1/victim.png"] == 2  # killed once, then loaded alone


def test_a_url_sent_alone_gets_a_second_try(tiny_model, server, fetcher) -> None:
    """A small window sends one URL per chunk: a worker dying once under it is not the URL's fault yet."""
    urls = [server.image(f"/kill3/{i}.png", _img(i)) for i in range(3)]
    server.routes["/kill3/victim.png"] = _killing_route(_img(5), kills=1)
    urls.insert(1, server.url("/kill3/victim.png"))
    results = list(score_pairs([Record(u, "a red circle") for u in urls], tiny_model, fetcher, processes=2))
    assert [r.error_code for r in results] == [None] * 4
    assert server.hits["/kill3/victim.png"] == 2


def test_an_image_that_kills_its_worker_alone_gets_worker_crashed(tiny_model, server, fetcher) -> None:
    urls = [server.image(f"/kill2/{i}.png", _img(i)) for i in range(24)]
    server.routes["/kill2/poison.png"] = _killing_route(b"", kills=10**6)
    urls.insert(13, server.url("/kill2/poison.png"))
    records = [Record(u, "a blue square", row=[i]) for i, u in enumerate(urls)]
    results = list(score_pairs(records, tiny_model, fetcher, batch_size=4, workers=4, processes=2))
    assert [r.record.row for r in results] == [[i] for i in range(25)]
    assert results[13].error_code == "worker_crashed"
    assert "died" in (results[13].error_text or "")
    assert all(r.ok for i, r in enumerate(results) if i != 13)  # its chunk-mates were sent again
    assert server.hits["/kill2/poison.png"] == 2  # in its chunk, then alone: never more


def test_workers_that_cannot_start_end_the_run(fetcher, tiny_model) -> None:
    spec = LoaderSpec.of(fetcher, tiny_model.preprocess, uint8=False, threads=4, processes=1)
    loader = ProcessLoader(dataclasses.replace(spec, threads=0), 1)  # the initializer raises in every worker
    try:
        handles = loader.load(["data:,x"])
        with pytest.raises(WorkersFailing, match="3 times in a row"):
            loader.result(handles[0])
    finally:
        loader.close()


def test_the_workers_fetch_within_the_parents_end(tiny_model, server, fetcher) -> None:
    """A request's end (``Fetcher.until``) reaches the loader processes: images not fetched by
    then are ``timeout`` rows there too, not fetched for their whole deadline."""
    import time

    slow = [server.drip(f"/proc-end/{i}.png", _img(i), interval=0.2) for i in range(4)]
    records = [Record(u, "a red circle") for u in slow]
    started = time.monotonic()
    out = _scores(score_pairs(records, tiny_model, fetcher.until(started + 1.0), batch_size=4, processes=2))
    assert [e for _, _, e in out] == ["timeout"] * 4
    assert time.monotonic() - started < 3.5  # fast_settings' own deadline is 4 s per image


def test_workers_share_the_decode_budget(fetcher, tiny_model) -> None:
    spec = LoaderSpec.of(fetcher, tiny_model.preprocess, uint8=True, threads=16, processes=4)
    assert spec.limits.budget_megapixels == pytest.approx(decode_limits().budget_megapixels / 4)
    assert spec.limits.max_pixels == decode_limits().max_pixels
    assert spec.threads == 4 and spec.uint8
    assert spec.policy == fetcher.policy and spec.fetch.deadline == fetcher.settings.deadline
