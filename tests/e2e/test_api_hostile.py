"""The API handler against hostile requests: every client error is a 4xx with the error envelope
(never a 500), wrong methods are 405, and concurrent invocations from threads each get their own
answer. Invoked as Lambda invokes it, with the events in events/."""

from __future__ import annotations

import base64
import json
import random
import re
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler import runtime
from handler.invoke import LocalContext
from support.imageserver import png_bytes
from support.lambda_env import tiny_api_env
from support.shapes import COLOURS, SHAPES, draw

EVENTS = Path(__file__).resolve().parents[2] / "events"
SCORE_EVENT = json.loads((EVENTS / "api_score.json").read_text())


@pytest.fixture(scope="module")
def api(tiny_clip_dir, moto_endpoint):
    """The handler with the tiny model; module-scoped so the property test's examples share it."""
    mp = pytest.MonkeyPatch()
    for name, value in tiny_api_env(
        tiny_clip_dir, MAX_PAIRS="8", MAX_BODY_BYTES="200000", POWERTOOLS_METRICS_DISABLED="true"
    ).items():
        mp.setenv(name, value)
    runtime.reset()
    import handler.api as mod

    yield mod
    runtime.reset()
    mp.undo()


def event(body: object = None, *, method: str = "POST", path: str = "/score", b64: bool = False) -> dict:
    http = {**SCORE_EVENT["requestContext"]["http"], "method": method, "path": path}
    ev = {
        **SCORE_EVENT,
        "rawPath": path,
        "routeKey": f"{method} {path}",
        "requestContext": {**SCORE_EVENT["requestContext"], "http": http},
        "isBase64Encoded": b64,
    }
    ev["body"] = body if body is None or isinstance(body, str) else json.dumps(body)
    return ev


def call(mod, ev: dict, timeout: float = 29.0) -> tuple[int, dict, dict]:
    resp = mod.lambda_handler(ev, LocalContext(timeout_s=timeout))
    return resp["statusCode"], json.loads(resp["body"]), resp.get("headers") or {}


def assert_client_error(status: int, out: dict, expected: int | None = None) -> None:
    assert 400 <= status < 500, (status, out)
    if expected is not None:
        assert status == expected, (status, out)
    assert isinstance(out["error"]["code"], str) and isinstance(out["error"]["message"], str)
    assert out["error"]["message"]


def data_uri(colour: str = "red", shape: str = "circle", seed: int = 1) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(draw(colour, shape, random.Random(seed)))).decode()


DEEP = 10_000


# ------------------------------------------------------------------ 10: nesting
@pytest.mark.parametrize(
    "body",
    [
        "[" * DEEP,
        "[" * DEEP + "]" * DEEP,
        '{"pairs": ' + "[" * DEEP + "]" * DEEP + "}",
        '{"pairs": [' + "[" * DEEP,
        '{"a":' * DEEP + "1" + "}" * DEEP,
        '{"pairs": [{"image": "", "caption": ' + '{"x":' * DEEP + "0" + "}" * DEEP + "}]}",
        "[" * 65 + "]" * 65,  # just over the limit
    ],
    ids=["open", "closed", "in-pairs", "in-pairs-open", "objects", "in-caption", "65-levels"],
)
def test_deep_nesting_is_400(api, body) -> None:
    status, out, _ = call(api, event(body))
    assert_client_error(status, out, 400)


def test_nesting_under_the_limit_is_validated_not_refused(api) -> None:
    status, out, _ = call(api, event('{"pairs": ' + "[" * 60 + "]" * 60 + "}"))
    assert_client_error(status, out, 400)
    assert out["error"]["message"] == "request failed validation"
    # brackets inside strings are text, not nesting
    status, out, _ = call(api, event({"pairs": [{"image": "[" * 5000, "caption": "{" * 5000}]}))
    assert status == 200 and out["results"][0]["error_code"] == "local_path_disabled"


@pytest.mark.parametrize("body", ['{"' + '\\"' * 95_000, '{"pairs": "' + '\\"' * 40_000 + '"}'])
def test_a_string_that_never_closes_is_400_within_the_functions_timeout(api, body) -> None:
    # Before: the nesting scan failed at the end of the unclosed string and started again from
    # every later quote, quadratic in the body: about two minutes for these 190 kB, past the
    # function's 29 s (API Gateway's 5xx, not a 400). The second body is valid JSON.
    import time

    started = time.monotonic()
    status, out, _ = call(api, event(body))
    assert time.monotonic() - started < 29.0
    assert_client_error(status, out, 400)
    closed = body.endswith("}")
    assert (out["error"]["message"] == "request failed validation") == closed


@pytest.mark.parametrize(
    "body",
    [
        '{"pairs": 1' + "0" * 5000 + "}",
        "-" + "9" * 4400,
        '{"pairs": [{"image": "", "caption": "x"}], "n": 1' + "0" * 9000 + "}",
    ],
)
def test_numbers_python_will_not_convert_are_400(api, body) -> None:
    status, out, _ = call(api, event(body))
    assert_client_error(status, out, 400)


# ------------------------------------------------------------------ 11: lone surrogates
def test_raw_lone_surrogate_in_the_body_is_400(api) -> None:
    body = '{"pairs": [{"image": "", "caption": "a \ud800 b"}]}'  # a real surrogate, as Lambda hands it over
    status, out, _ = call(api, event(body))
    assert_client_error(status, out, 400)
    assert "U+D800" in out["error"]["message"]
    status, out, _ = call(api, event("\udc00"))
    assert_client_error(status, out, 400)


def test_escaped_lone_surrogate_costs_only_its_row(api) -> None:
    """13 through the API: the JSON escape \\ud800 is valid JSON; only its row fails."""
    pairs = [
        {"image": data_uri("red", "circle"), "caption": "a red circle"},
        {"image": data_uri("blue", "square", 2), "caption": "a blue \ud800 square"},
        {"image": data_uri("green", "triangle", 3), "caption": "a green triangle"},
    ]
    body = json.dumps({"pairs": pairs})  # ensure_ascii writes the surrogate as the escape \ud800
    assert "\\ud800" in body
    status, out, _ = call(api, event(body))
    assert status == 200
    assert [r["error_code"] for r in out["results"]] == [None, "invalid_caption", None]
    assert out["results"][0]["similarity"] > 0 and out["results"][2]["similarity"] > 0


def test_surrogates_in_names_and_paths_come_back_escaped(api) -> None:
    status, out, _ = call(api, event('{"pairs": [{"image": "", "caption": "x", "\\udc80": 1}]}'))
    assert_client_error(status, out, 400)
    assert out["error"]["fields"]  # and the answer is JSON any client can read
    status, out, _ = call(api, event(None, method="GET", path="/jobs/\ud800"))
    assert_client_error(status, out)


# ------------------------------------------------------------------ 12: base64 bodies
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!!!! not base64 !!!!", 400),
        ("eyJwYWlycyI6", 400),  # truncated base64 (bad padding)
        ("eyJwYWlycyI6W119\u00e9", 400),  # a non-ASCII character
        (base64.b64encode(b'{"pairs": [{"image": "", "caption": "caf\xe9"}]}').decode(), 400),  # Latin-1
        (base64.b64encode('{"pairs": []}'.encode("utf-16")).decode(), 400),  # UTF-16
        (base64.b64encode(b"\xff\xfe\x00garbage").decode(), 400),
        (base64.b64encode(b"").decode(), 400),
        ("A" * 300_000, 413),
    ],
    ids=["garbage", "truncated", "non-ascii", "latin-1", "utf-16", "binary", "empty", "too-large"],
)
def test_bad_base64_bodies_are_4xx(api, body, expected) -> None:
    status, out, _ = call(api, event(body, b64=True))
    assert_client_error(status, out, expected)


def test_base64_bodies_work_for_jobs_too(api) -> None:
    status, out, _ = call(api, event("%%%", path="/jobs", b64=True))
    assert_client_error(status, out, 400)


# ------------------------------------------------------------------ smaller: 405
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/score", "POST"),
        ("PUT", "/score", "POST"),
        ("POST", "/healthz", "GET"),
        ("DELETE", "/readyz", "GET"),
        ("DELETE", "/jobs/abc123", "GET"),
        ("GET", "/jobs", "POST"),
        ("PATCH", "/jobs", "POST"),
    ],
)
def test_wrong_method_is_405_with_allow(api, method, path, allow) -> None:
    status, out, headers = call(api, event("{}", method=method, path=path))
    assert_client_error(status, out, 405)
    assert out["error"]["code"] == "method_not_allowed" and headers["Allow"] == allow


@pytest.mark.parametrize("path", ["/nope", "/score/", "/jobs/a/b", "/", "//score"])
def test_unknown_path_is_404(api, path) -> None:
    status, out, _ = call(api, event("{}", method="GET", path=path))
    assert_client_error(status, out, 404)
    assert out["error"]["code"] == "not_found"


# ------------------------------------------------------------------ property: no 500 for any body
def _text() -> st.SearchStrategy[str]:
    """Text that may hold lone surrogates and any control character."""
    return st.lists(st.integers(min_value=0, max_value=0x10FFFF), max_size=40).map(lambda cs: "".join(map(chr, cs)))


_NETWORK = re.compile(r"(https?|s3)", re.IGNORECASE)


def _safe_image(s: str) -> bool:
    """No image value may lead anywhere but loopback: whatever spells http(s) or s3 after the
    characters URL parsers drop is left out (the guard would refuse it, but resolving a name
    would already ask a DNS server)."""
    return not _NETWORK.search(re.sub(r"[\x00-\x20\x7f]", "", s))


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text()
_json = st.recursive(
    _json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text(), inner, max_size=4), max_leaves=12
)
_image = st.one_of(
    st.sampled_from(["", " ", "ftp://example.invalid/a.png", "/etc/passwd", "file:///dev/zero", "data:,x"]),
    st.builds(lambda t: "data:image/png;base64," + t, _text()),
    st.builds(lambda b: "data:image/png;base64," + base64.b64encode(b).decode(), st.binary(max_size=64)),
    _text().filter(_safe_image),
)
_pair = st.fixed_dictionaries({"image": _image, "caption": _text()}, optional={"extra": _json})
_pairs_body = st.builds(lambda ps: {"pairs": ps}, st.lists(_pair, max_size=10))


@st.composite
def hostile_requests(draw_: st.DrawFn) -> tuple[str, str, str | None, bool]:
    kinds = ["pairs", "json", "text", "nesting", "number", "base64", "base64-junk", "route"]
    kind = draw_(st.sampled_from(kinds))
    method, path, b64 = "POST", "/score", False
    body: str | None
    if kind == "pairs":
        body = json.dumps(draw_(_pairs_body), ensure_ascii=draw_(st.booleans()))
    elif kind == "json":
        body = json.dumps(draw_(_json), ensure_ascii=draw_(st.booleans()))
    elif kind == "text":
        body = draw_(_text() | st.just("") | st.none())
    elif kind == "nesting":
        depth = draw_(st.integers(min_value=1, max_value=30_000))
        opener = draw_(st.sampled_from(["[", '{"a":', '{"pairs":[', '{"pairs":' + "[" * 5]))
        body = opener * depth + draw_(st.sampled_from(["", "1", "]" * depth]))
    elif kind == "number":  # literals json.loads cannot turn into Python values
        digits = "9" * draw_(st.integers(min_value=1, max_value=9000))
        literal = draw_(st.sampled_from(["", "-", "0.", "1e"])) + digits
        body = draw_(
            st.sampled_from(["{}", '{{"pairs": {}}}', '{{"pairs": [{{"image": "", "caption": {}}}]}}'])
        ).format(literal)
    elif kind == "base64":
        b64 = True
        raw = draw_(st.binary(max_size=200) | _pairs_body.map(lambda b: json.dumps(b).encode()))
        body = base64.b64encode(raw).decode()
    elif kind == "base64-junk":
        b64, body = True, draw_(_text())
    else:
        method = draw_(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "P\ud800"]))
        path = draw_(st.sampled_from(["/score", "/jobs", "/jobs/x", "/healthz", "/readyz", "/"]) | _text())
        body = draw_(_text() | st.none())
    if kind in ("pairs", "json") and draw_(st.booleans()):
        path = "/jobs"  # the same body checks guard POST /jobs
    return method, path, body, b64


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(hostile_requests())
def test_no_hostile_request_gets_a_500(api, request_) -> None:
    method, path, body, b64 = request_
    status, out, _ = call(api, event(body, method=method, path=path or "/", b64=b64))
    assert status in (200, 202) or 400 <= status < 500, (status, out)
    if status >= 400:
        assert_client_error(status, out)
    elif path == "/score":
        assert len(out["results"]) == len(json.loads(base64.b64decode(body) if b64 else body)["pairs"])


# ------------------------------------------------------------------ 14: re-entrant
def _mixed_requests() -> list[dict]:
    """50 different requests: scores of different lengths, images and captions, and other routes."""
    rng = random.Random(5)
    out = []
    for i in range(50):
        kind = i % 5
        if kind <= 2:
            pairs = [
                {
                    "image": data_uri(rng.choice(list(COLOURS)), rng.choice(SHAPES), 1000 * i + j),
                    "caption": f"a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)} {i}",
                }
                for j in range(1 + i % 4)
            ]
            out.append(event({"pairs": pairs}))
        elif kind == 3:
            out.append(event(None, method="GET", path=rng.choice(["/healthz", "/readyz", "/jobs/nope", "/score"])))
        else:
            out.append(event(rng.choice(["[" * 5000, "{}", '{"pairs": []}', "not json"])))
    return out


def test_concurrent_invocations_each_get_their_own_answer(api) -> None:
    """Threads calling the handler at once (as the coming server shares its code path) must never
    see another request's results: the module-level resolver used to keep the current event."""
    requests = _mixed_requests()
    expected = [call(api, ev)[:2] for ev in requests]  # one at a time
    got: list[tuple[int, dict] | None] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def one(i: int) -> None:
        barrier.wait()
        got[i] = call(api, requests[i])[:2]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert have is not None, f"request {i} did not finish"
        assert have[0] == want[0], (i, have, want)
        if "results" in want[1]:
            assert len(have[1]["results"]) == len(want[1]["results"]), i
            for a, b in zip(have[1]["results"], want[1]["results"], strict=True):
                assert a["error_code"] == b["error_code"] and abs(a["similarity"] - b["similarity"]) < 1e-6, i
        else:
            assert have[1] == want[1], i
