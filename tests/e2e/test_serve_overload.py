"""``similarity serve`` under load that is not the model's: every request slot taken, clients that
go away, slow image hosts. A real server on 127.0.0.1 with one request slot and short deadlines
(SERVER_REQUEST_TIMEOUT 5 s, API_RESERVE_SECONDS 1 s: a request's fetch deadline is 4 s, and it
waits for a slot while 2 s of its time is left), images from a loopback HTTP server. Each test
waits for its own downloads to end, so none leaves the next one a busy fetch pool."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support.imageserver import ImageServer, png_bytes
from support.serveproc import Served, tiny_env
from support.shapes import draw

TIMEOUT = 5.0  # SERVER_REQUEST_TIMEOUT
TRIVIAL = {"pairs": [{"image": "", "caption": "x"}]}  # answered without a fetch or the model


def img(seed: int) -> bytes:
    return png_bytes(draw("red", "circle", random.Random(seed)))


def slow(server: ImageServer, path: str, delay: float) -> str:
    """An image its host sends after ``delay`` seconds (longer than 4 s: the fetch times out)."""
    data = img(len(path))

    def route(h) -> None:
        time.sleep(delay)
        h.send_plain(200, data, "image/png")

    server.routes[path] = route
    return server.url(path)


@pytest.fixture(scope="module")
def one_slot() -> Iterator[Served]:
    env = tiny_env(
        SERVER_MAX_CONCURRENCY="1",
        SERVER_REQUEST_TIMEOUT=str(TIMEOUT),
        API_RESERVE_SECONDS="1",
        SIMILARITY_WORKERS="4",
    )
    with Served(env=env) as srv:
        srv.wait_ready()
        yield srv


def metrics(srv: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def fetches(srv: Served) -> float:
    m = metrics(srv)
    return sum(value(m, "similarity_image_fetch_seconds_count", outcome=o) for o in ("ok", "error"))


def settle(srv: Served, before: float, started: int, timeout: float = 15.0) -> None:
    """Wait until the ``started`` downloads since ``before`` have ended and no row is in flight."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = metrics(srv)
        done = sum(value(m, "similarity_image_fetch_seconds_count", outcome=o) for o in ("ok", "error"))
        if done - before >= started and value(m, "similarity_rows_in_flight") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("the server's downloads did not end")


def fetching(server: ImageServer, *paths: str, timeout: float = 10.0) -> None:
    """Wait until the server is downloading each of ``paths`` (its request holds its slot)."""
    end = time.monotonic() + timeout
    while any(server.hits[p] == 0 for p in paths):
        assert time.monotonic() < end, f"never fetched: {paths}"
        time.sleep(0.02)


def score(srv: Served, body: dict, **kw) -> requests.Response:
    return requests.post(srv.url + "/score", json=body, timeout=kw.pop("timeout", 30), **kw)


def timed(fn, *args, **kw) -> tuple[requests.Response, float]:
    start = time.monotonic()
    r = fn(*args, **kw)
    return r, time.monotonic() - start


def test_liveness_never_waits_behind_client_requests(one_slot, server) -> None:
    before = fetches(one_slot)
    url = slow(server, "/overload/live.png", 3.0)
    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(score, one_slot, {"pairs": [{"image": url, "caption": "x"}]})
        fetching(server, "/overload/live.png")
        waiter = pool.submit(score, one_slot, TRIVIAL)  # waits for the one slot
        time.sleep(0.2)
        for path in ("/healthz", "/v2/health/live"):
            r, took = timed(requests.get, one_slot.url + path, timeout=30)
            assert r.status_code == 200 and took < 1.0, (path, took)
        assert not holder.done()  # the slot was taken all along
        assert holder.result().status_code == 200 and waiter.result().status_code == 200
    settle(one_slot, before, 1)


def test_no_slot_before_the_deadline_is_503_overloaded(one_slot, server) -> None:
    before, m0 = fetches(one_slot), metrics(one_slot)
    url = slow(server, "/overload/hold.png", TIMEOUT)  # holds the slot for its 4 s fetch deadline
    infer = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [""]},
            {"name": "caption", "shape": [1], "datatype": "BYTES", "data": ["x"]},
        ]
    }
    with ThreadPoolExecutor(3) as pool:
        holder = pool.submit(score, one_slot, {"pairs": [{"image": url, "caption": "x"}]})
        fetching(server, "/overload/hold.png")
        oip = pool.submit(timed, requests.post, one_slot.url + "/v2/models/clip/infer", json=infer, timeout=30)
        r, took = timed(score, one_slot, TRIVIAL)
        # it waited while 2 s of its 5 were left (API_RESERVE_SECONDS + 1), then was shed
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
        assert r.headers["retry-after"] == "1"
        assert 2.5 < took < TIMEOUT, took
        o, took = oip.result()
        assert o.status_code == 503 and o.json()["error"].startswith("overloaded:"), o.text
        assert o.headers["retry-after"] == "1" and took < TIMEOUT
        assert holder.result().json()["results"][0]["error_code"] == "timeout"
    m1 = metrics(one_slot)
    assert (
        value(m1, "similarity_requests_total", route="/score", method="POST", status="503")
        - value(m0, "similarity_requests_total", route="/score", method="POST", status="503")
        == 1
    )
    settle(one_slot, before, 1)


def test_the_wait_for_a_slot_counts_against_the_deadline(one_slot, server) -> None:
    before = fetches(one_slot)
    first = slow(server, "/overload/first.png", 2.0)
    hung = slow(server, "/overload/hung.png", 8.0)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(score, one_slot, {"pairs": [{"image": first, "caption": "x"}]})
        fetching(server, "/overload/first.png")
        # ~2 s waiting for the slot, then a fetch deadline of what is left (less the reserve)
        r, took = timed(score, one_slot, {"pairs": [{"image": hung, "caption": "x"}]})
        assert r.status_code == 200 and r.json()["results"][0]["error_code"] == "timeout"
        assert took < TIMEOUT, f"answered {took:.2f} s after arrival; SERVER_REQUEST_TIMEOUT is {TIMEOUT}"
        assert holder.result().status_code == 200
    settle(one_slot, before, 2)


def test_a_client_that_goes_away_gives_its_slot_back(one_slot, server) -> None:
    before, m0 = fetches(one_slot), metrics(one_slot)
    url = slow(server, "/overload/abandoned.png", TIMEOUT)
    with pytest.raises(requests.Timeout):
        score(one_slot, {"pairs": [{"image": url, "caption": "x"}]}, timeout=1.0)
    time.sleep(0.2)  # the server notices the closed connection
    r, took = timed(score, one_slot, TRIVIAL)
    assert r.status_code == 200 and took < 1.0, took  # the slot went back at once
    m1 = metrics(one_slot)
    assert value(m1, "similarity_rows_in_flight") == 0  # its row was dropped, not left to its deadline

    def delta(name: str, **labels: str) -> float:
        return value(m1, name, **labels) - value(m0, name, **labels)

    assert delta("similarity_requests_total", route="/score", method="POST", status="499") == 1
    assert delta("similarity_row_errors_total", code="client_closed") == 1
    settle(one_slot, before, 1)  # the download already running ends at its fetch deadline


def test_a_client_that_disconnects_mid_body_is_499_not_500(one_slot) -> None:
    m0 = metrics(one_slot)
    lines = len(one_slot.lines)
    for path in ("/score", "/v2/models/clip/infer"):
        with socket.create_connection(("127.0.0.1", one_slot.port), timeout=10) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                'Content-Length: 1000\r\n\r\n{"pairs"'.encode()
            )
            time.sleep(0.3)

    def counted(m: dict, status: str) -> float:
        return sum(
            value(m, "similarity_requests_total", route=route, method="POST", status=status)
            - value(m0, "similarity_requests_total", route=route, method="POST", status=status)
            for route in ("/score", "/v2/models/{name}/infer")
        )

    end = time.monotonic() + 10
    while time.monotonic() < end:
        m = metrics(one_slot)
        if counted(m, "499") + counted(m, "500") >= 2:
            break
        time.sleep(0.1)
    assert (counted(m, "499"), counted(m, "500")) == (2, 0)
    logs = [json.loads(x) for x in one_slot.lines[lines:] if x.startswith("{")]
    assert not [x for x in logs if x["level"] == "ERROR" or "exception" in x], logs
    assert sorted(x["status"] for x in logs if x["message"] == "request" and x["route"] != "/metrics") == [499, 499]


def test_readiness_does_not_wait_behind_slow_image_hosts(one_slot, server) -> None:
    before = fetches(one_slot)
    urls = [slow(server, f"/overload/busy{i}.png", 3.0) for i in range(4)]  # every fetch thread
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(score, one_slot, {"pairs": [{"image": u, "caption": "x"} for u in urls]})
        fetching(server, *(f"/overload/busy{i}.png" for i in range(4)))
        r, took = timed(requests.get, one_slot.url + "/readyz", timeout=30)
        assert r.status_code == 200 and took < 1.5, (took, r.text)
        assert not busy.done()  # the fetch pool was busy all along
        assert busy.result().status_code == 200
    settle(one_slot, before, 4)


def test_readiness_during_shutdown_is_503_not_500(monkeypatch) -> None:
    """In-process: a /readyz that reaches the services after they closed (uvicorn routes none
    there by then, other fronts may), and one whose canary meets the batcher closing under it."""
    from similarity.server.services import ServerServices

    for key in ("CLIP_MODEL_DIR", "SIMILARITY_BACKEND", "SERVER_CANARY_INTERVAL", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, tiny_env()[key])
    services = ServerServices()
    services.load()
    try:
        assert services.api.handle("GET", "/readyz").response.status == 200
        assert services.batcher is not None
        services.batcher.close(timeout=1)  # the canary's submit meets a closed batcher
        r = services.api.handle("GET", "/readyz").response
        assert r.status == 503 and "shutting down" in r.body["reason"], r.body
    finally:
        services.close(timeout=1)
    r = services.api.handle("GET", "/readyz").response
    assert r.status == 503 and r.body["reason"] == "the server is shutting down", r.body
