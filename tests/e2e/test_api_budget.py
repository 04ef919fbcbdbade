"""The Lambda API's time budget: a request answers within the invocation's time left less
``API_RESERVE_SECONDS``, however many of its images hang. Each image's fetch deadline starts only
when a fetch thread takes it up, so the request's end must bound every fetch: images that are
still fetching, or still waiting for a thread, when it passes become ``timeout`` rows, in order,
and the images that came are scored.

Scaled down from production (MAX_PAIRS 64, 16 workers, API_FETCH_DEADLINE 10, Timeout 29): 2
workers, a 2 s fetch deadline, a 6 s invocation and a 1 s reserve."""

from __future__ import annotations

import base64
import json
import random
import time
from pathlib import Path

import pytest

from handler import runtime
from handler.invoke import LocalContext
from similarity.errors import FetchTimeout
from similarity.fetch import Fetcher
from support.imageserver import png_bytes
from support.lambda_env import tiny_api_env
from support.shapes import draw

EVENTS = Path(__file__).resolve().parents[2] / "events"
SCORE_EVENT = json.loads((EVENTS / "api_score.json").read_text())

TIMEOUT = 6.0  # the invocation's time
RESERVE = 1.0  # API_RESERVE_SECONDS
SLACK = 0.75  # inference of a few rows with the tiny model, the answer, a loaded test machine


@pytest.fixture
def api(monkeypatch, tiny_clip_dir, moto_endpoint):
    settings = {"API_FETCH_DEADLINE": "2", "API_RESERVE_SECONDS": str(RESERVE), "SIMILARITY_WORKERS": "2"}
    for name, value in tiny_api_env(
        tiny_clip_dir, MAX_PAIRS="16", POWERTOOLS_METRICS_DISABLED="true", **settings
    ).items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    import handler.api as mod

    runtime.services().run.load()  # at Lambda init, before any invocation's clock starts
    yield mod
    runtime.reset()


def score(mod, pairs: list[dict], timeout: float) -> tuple[int, dict, float]:
    context = LocalContext(timeout_s=timeout)
    start = time.monotonic()
    resp = mod.lambda_handler({**SCORE_EVENT, "body": json.dumps({"pairs": pairs})}, context)
    return resp["statusCode"], json.loads(resp["body"]), time.monotonic() - start


def test_hanging_images_answer_within_the_invocation_less_the_reserve(api, server) -> None:
    red = {"image": server.image("/budget/red.png", png_bytes(draw("red", "circle", random.Random(11)))),
           "caption": "a red circle"}  # fmt: skip
    blue = {"image": server.image("/budget/blue.png", png_bytes(draw("blue", "square", random.Random(12)))),
            "caption": "a blue square"}  # fmt: skip
    png = png_bytes(draw("green", "triangle", random.Random(13)))
    hang = [{"image": server.drip(f"/budget/hang{i}.png", png, interval=0.25), "caption": "x"} for i in range(8)]
    # The good images alone, for their scores (and the model warm).
    status, alone, _ = score(api, [red, blue], 29)
    assert status == 200 and [r["error_code"] for r in alone["results"]] == [None, None]

    # Two threads: red and hang0 first; blue once the first pair of hanging images is given up.
    pairs = [red, hang[0], hang[1], blue, *hang[2:]]
    status, out, took = score(api, pairs, TIMEOUT)

    assert status == 200, out
    assert took < TIMEOUT - RESERVE + SLACK, f"answered after {took:.2f}s; the invocation had {TIMEOUT}s"
    results = out["results"]
    assert len(results) == len(pairs)
    assert [r["error_code"] for r in results] == [None, "timeout", "timeout", None] + ["timeout"] * 6
    assert results[0]["similarity"] == pytest.approx(alone["results"][0]["similarity"], abs=1e-6)
    assert results[3]["similarity"] == pytest.approx(alone["results"][1]["similarity"], abs=1e-6)
    # The images the request's end cut short or never started say so.
    assert any("request's time" in (r["error"] or "") for r in results[4:]), results
    assert all(r["error"] and len(r["error"]) < 200 for r in results if r["error_code"] == "timeout")


def test_a_fetch_after_the_end_is_a_timeout_at_once(server, fetcher: Fetcher) -> None:
    url = server.image("/budget/late.png", png_bytes(draw("red", "circle", random.Random(14))))
    with pytest.raises(FetchTimeout, match="request's time"):
        fetcher.until(time.monotonic() - 0.1).fetch(url)
    assert server.hits["/budget/late.png"] == 0
    assert fetcher.until(time.monotonic() + 5).fetch(url)  # time left: fetched as ever
    data = png_bytes(draw("red", "circle", random.Random(14)))
    inline = "data:image/png;base64," + base64.b64encode(data).decode()
    assert fetcher.until(time.monotonic() - 0.1).fetch(inline) == data  # waits on no network: read


def test_a_fetch_is_cut_to_the_time_left_to_the_end(server, fetcher: Fetcher) -> None:
    url = server.drip("/budget/cut.png", png_bytes(draw("red", "circle", random.Random(15))), interval=0.1)
    start = time.monotonic()
    with pytest.raises(FetchTimeout, match="request's time ran out"):
        fetcher.until(start + 0.5).fetch(url)  # its own deadline is 4 s (fast_settings)
    assert 0.4 < time.monotonic() - start < 1.5
