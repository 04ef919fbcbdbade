"""The API handler, invoked as Lambda invokes it, with the events in events/ and variations."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from handler import runtime
from handler.invoke import LocalContext
from support.imageserver import png_bytes
from support.lambda_env import tiny_api_env
from support.shapes import draw

EVENTS = Path(__file__).resolve().parents[2] / "events"


def load_event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


def with_body(event: dict, body: object) -> dict:
    return {**event, "body": body if isinstance(body, str) else json.dumps(body)}


@pytest.fixture
def api(monkeypatch, tiny_clip_dir, moto_endpoint):
    for name, value in tiny_api_env(tiny_clip_dir, MAX_PAIRS="8", MAX_BODY_BYTES="200000").items():
        monkeypatch.setenv(name, value)
    runtime.reset()
    import handler.api as mod

    yield mod
    runtime.reset()


def call(mod, event: dict, timeout: float = 29.0) -> tuple[int, dict]:
    resp = mod.lambda_handler(event, LocalContext(timeout_s=timeout))
    return resp["statusCode"], json.loads(resp["body"]) if resp.get("body") else {}


def test_score_event_from_events_dir(api, server, forbidden_server) -> None:
    event = load_event("api_score.json")
    body = json.loads(event["body"])
    img = png_bytes(draw("red", "circle", random.Random(1)))
    for pair in body["pairs"]:
        if pair["image"].startswith("http"):  # tests reach loopback only
            pair["image"] = server.image("/api/cat.png", img)
    status, out = call(api, with_body(event, body))
    assert status == 200, out
    results = out["results"]
    assert len(results) == len(body["pairs"])
    assert results[0]["error"] is None and results[1]["error"] is None
    assert results[0]["similarity"] > results[1]["similarity"]  # "a red circle" vs "a blue square"
    assert results[2]["error"] is None and 0 <= results[2]["similarity"] <= 1
    assert results[3]["error_code"] == "local_path_disabled"
    assert out["model"] == {"id": "tiny-clip-shapes", "revision": "generated"}


def test_row_errors_do_not_fail_the_request(api, server, forbidden_server) -> None:
    pairs = [
        {"image": server.status("/api/404.png", 404), "caption": "x"},
        {"image": forbidden_server.image("/api/internal.png", b"x"), "caption": "x"},
        {"image": server.image("/api/text", b"hello", "image/png"), "caption": "x"},
        {"image": "", "caption": "x"},
        {
            "image": "data:image/png;base64,"
            + base64.b64encode(png_bytes(draw("blue", "square", random.Random(2)))).decode(),
            "caption": "",
        },
    ]
    status, out = call(api, with_body(load_event("api_score.json"), {"pairs": pairs}))
    assert status == 200
    assert [r["error_code"] for r in out["results"]] == [
        "http_404",
        "blocked_address",
        "not_an_image",
        "missing_url",
        "missing_caption",
    ]
    assert all(r["similarity"] is None for r in out["results"])
    assert forbidden_server.hits["/api/internal.png"] == 0


def test_s3_images_through_moto(api, s3, bucket) -> None:
    s3.put_object(Bucket=bucket, Key="img/a.png", Body=png_bytes(draw("green", "circle", random.Random(3))))
    pairs = [
        {"image": f"s3://{bucket}/img/a.png", "caption": "a green circle"},
        {"image": f"s3://{bucket}/img/none.png", "caption": "a green circle"},
    ]
    status, out = call(api, with_body(load_event("api_score.json"), {"pairs": pairs}))
    assert status == 200
    assert out["results"][0]["error"] is None and out["results"][1]["error_code"] == "not_found"


@pytest.mark.parametrize("event_name", ["api_score_malformed.json", "api_score_invalid.json"])
def test_bad_requests_from_events_dir(api, event_name) -> None:
    status, out = call(api, load_event(event_name))
    assert status == 400
    assert out["error"]["code"] == "bad_request"


def test_field_level_messages(api) -> None:
    status, out = call(
        api, with_body(load_event("api_score.json"), {"pairs": [{"image": "x"}, {"caption": 5, "image": "y"}]})
    )
    assert status == 400
    fields = {f["field"] for f in out["error"]["fields"]}
    assert {"pairs.0.caption", "pairs.1.caption"} <= fields


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("", 400),
        ("[]", 400),
        ('{"pairs": []}', 400),
        ('{"pairs": "nope"}', 400),
        ('{"pairs": [{"image": "a", "caption": "b", "bogus": 1}]}', 400),
        (json.dumps({"pairs": [{"image": "a", "caption": "b"}] * 9}), 413),
        (json.dumps({"pairs": [{"image": "a" * 250_000, "caption": "b"}]}), 413),
    ],
)
def test_validation_and_limits(api, body, status) -> None:
    code, out = call(api, with_body(load_event("api_score.json"), body))
    assert code == status, out
    assert "error" in out and out["error"]["message"]


def test_base64_encoded_body(api) -> None:
    raw = json.dumps({"pairs": [{"image": "", "caption": "x"}]}).encode()
    event = {**load_event("api_score.json"), "body": base64.b64encode(raw).decode(), "isBase64Encoded": True}
    status, out = call(api, event)
    assert status == 200 and out["results"][0]["error_code"] == "missing_url"


def test_slow_image_becomes_timeout_within_request_budget(api, server, monkeypatch) -> None:
    import time

    url = server.drip("/api/drip.png", png_bytes(draw("red", "circle", random.Random(4))), interval=0.5)
    start = time.monotonic()
    # 6 s left in the invocation, 4 s reserve: the fetch deadline shrinks to ~2 s
    status, out = call(
        api, with_body(load_event("api_score.json"), {"pairs": [{"image": url, "caption": "x"}]}), timeout=6
    )
    assert status == 200 and out["results"][0]["error_code"] == "timeout"
    assert time.monotonic() - start < 5


def test_healthz_and_readyz(api) -> None:
    status, out = call(api, load_event("api_healthz.json"))
    assert status == 200 and out == {"status": "ok"}
    status, out = call(api, load_event("api_readyz.json"))
    assert status == 200 and out["status"] == "ready"
    assert out["model"]["id"] == "tiny-clip-shapes" and out["model"]["backend"] == "torch"


def test_readyz_without_model(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tmp_path / "empty-mount"))
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    runtime.reset()
    import handler.api as mod

    runtime.preload()  # the Lambda init phase must survive a missing model
    status, out = call(mod, load_event("api_readyz.json"))
    assert status == 503 and out["status"] == "unavailable" and "does not exist" in out["reason"]
    status, _ = call(mod, load_event("api_healthz.json"))
    assert status == 200
    status, out = call(mod, with_body(load_event("api_score.json"), {"pairs": [{"image": "", "caption": "x"}]}))
    assert status == 503 and out["error"]["code"] == "model_unavailable"
    runtime.reset()


def test_internal_errors_do_not_leak(api, monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("secret path /opt/internal/thing")

    monkeypatch.setattr("similarity.bootstrap.score_pairs", boom)
    status, out = call(api, with_body(load_event("api_score.json"), {"pairs": [{"image": "", "caption": "x"}]}))
    assert status == 500
    assert "secret" not in json.dumps(out) and out["error"]["code"] == "internal_error"


def test_unknown_route_is_404(api) -> None:
    event = load_event("api_healthz.json")
    event = {
        **event,
        "rawPath": "/nope",
        "requestContext": {**event["requestContext"], "http": {**event["requestContext"]["http"], "path": "/nope"}},
    }
    status, _ = call(api, event)
    assert status == 404


def test_invoke_cli_runs_event_file(tiny_clip_dir, tmp_path) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "CLIP_MODEL_DIR": str(tiny_clip_dir),
        "SIMILARITY_BACKEND": "torch",
        "POWERTOOLS_TRACE_DISABLED": "true",
    }
    r = subprocess.run(
        [sys.executable, "-m", "handler.invoke", "handler.api", str(EVENTS / "api_readyz.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{\n") :])
    assert out["statusCode"] == 200 and json.loads(out["body"])["status"] == "ready"


def test_emf_metrics(api, server, capsys) -> None:
    url = server.image("/api/metrics.png", png_bytes(draw("red", "circle", random.Random(8))))
    pairs = [{"image": url, "caption": "a red circle"}, {"image": server.status("/api/m404.png", 404), "caption": "x"}]
    capsys.readouterr()
    status, _ = call(api, with_body(load_event("api_score.json"), {"pairs": pairs}))
    assert status == 200
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"_aws"')]
    values = {k: v for b in blobs for k, v in b.items() if not k.startswith("_")}
    assert values["PairsScored"] == [1.0]
    assert values["RowError_http_404"] == [1.0]
    assert values["ModelLoadTime"][0] > 0
