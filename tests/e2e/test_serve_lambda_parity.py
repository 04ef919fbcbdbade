"""One implementation behind both fronts: the same bodies posted to the Lambda handler (invoked as
Lambda invokes it) and to ``similarity serve`` (over HTTP) get the same status and the same body.

The only differences allowed: scores within one unit of their 4th decimal (the server embeds a
request's rows in other batches than the Lambda, and float sums differ in the last bits), the
server's canary in ``/readyz``, and timings (load seconds, a job's elapsed seconds)."""

from __future__ import annotations

import base64
import json
import random
import uuid
from pathlib import Path

import pytest
import requests

from handler import runtime
from handler.invoke import LocalContext
from support.compare import same
from support.imageserver import png_bytes
from support.serveproc import Served, tiny_env
from support.shapes import draw

EVENTS = Path(__file__).resolve().parents[2] / "events"
LIMITS = {"MAX_PAIRS": "8", "MAX_BODY_BYTES": "200000"}


@pytest.fixture(scope="module")
def stack(moto_endpoint, tmp_path_factory):
    from similarity.aws import make_client

    s3, sqs = make_client("s3"), make_client("sqs")
    bucket = f"parity-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=f"chunks-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    env = tiny_env(**LIMITS, BUCKET=bucket, CHUNK_QUEUE_URL=queue, AWS_ENDPOINT_URL=moto_endpoint)
    with Served(env=env) as srv:
        srv.wait_ready()
        yield {"server": srv, "env": env, "s3": s3, "bucket": bucket}


@pytest.fixture
def lam(stack, monkeypatch):
    for k in (
        *LIMITS,
        "BUCKET",
        "CHUNK_QUEUE_URL",
        "CLIP_MODEL_DIR",
        "SIMILARITY_BACKEND",
        "SIMILARITY_ALLOWED_NETWORKS",
    ):
        monkeypatch.setenv(k, stack["env"][k])
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    runtime.reset()
    import handler.api as mod

    yield mod
    runtime.reset()


def lambda_call(mod, method: str, path: str, body: str | None) -> tuple[int, dict]:
    name = {"/score": "api_score.json", "/jobs": "api_jobs_start.json", "/healthz": "api_healthz.json"}.get(path)
    event = json.loads((EVENTS / (name or "api_jobs_status.json")).read_text())
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["requestContext"]["http"]["method"] = method
    event["routeKey"] = f"{method} {path}"
    if path.startswith("/jobs/"):
        event["pathParameters"] = {"id": path.rsplit("/", 1)[1]}
    event["body"] = body
    event["isBase64Encoded"] = False
    resp = mod.lambda_handler(event, LocalContext(timeout_s=30))
    return resp["statusCode"], json.loads(resp["body"])


def server_call(srv: Served, method: str, path: str, body: str | None) -> tuple[int, dict]:
    r = requests.request(method, srv.url + path, data=body.encode() if body is not None else None, timeout=60)
    return r.status_code, r.json()


def img(seed: int, colour: str, shape: str) -> bytes:
    return png_bytes(draw(colour, shape, random.Random(seed)))


def score_bodies(server, forbidden_server) -> list[str]:
    red = server.image("/parity/red.png", img(1, "red", "circle"))
    blue = server.image("/parity/blue.png", img(2, "blue", "square"))
    data = "data:image/png;base64," + base64.b64encode(img(3, "green", "triangle")).decode()
    pairs = [
        {"image": red, "caption": "a red circle"},
        {"image": red, "caption": "a blue square"},
        {"image": blue, "caption": "a blue square"},
        {"image": data, "caption": "a green triangle"},
        {"image": red, "caption": "a red circle " * 40},  # over the token limit: truncated
        {"image": server.status("/parity/404.png", 404), "caption": "x"},
        {"image": forbidden_server.image("/parity/internal.png", b"x"), "caption": "x"},
        {"image": server.image("/parity/text", b"hello", "image/png"), "caption": "x"},
    ]
    odd = [
        {"image": "", "caption": "x"},
        {"image": red, "caption": "   "},
        {"image": "/etc/hosts", "caption": "x"},
        {"image": "ftp://example.invalid/a.png", "caption": "x"},
        {"image": "data:image/png,notbase64", "caption": "x"},
        {"image": "  " + blue + "  ", "caption": "  a blue square  "},
    ]
    return [
        json.dumps({"pairs": pairs}),
        json.dumps({"pairs": odd}),
        json.dumps({"pairs": [{"image": red, "caption": "un cercle rouge, é ü 漢字"}]}),
        json.dumps({"pairs": [{"image": red, "caption": "bad \ud800 caption"}, {"image": blue, "caption": "ok"}]}),
        "",
        "{",
        "[]",
        "null",
        '{"pairs": []}',
        '{"pairs": "nope"}',
        '{"pairs": [{"image": "a", "caption": "b", "bogus": 1}]}',
        '{"pairs": [{"image": "x"}, {"caption": 5, "image": "y"}]}',
        json.dumps({"pairs": [{"image": "a", "caption": "b"}] * 9}),
        json.dumps({"pairs": [{"image": "a" * 250_000, "caption": "b"}]}),
    ]


def test_score_bodies_answer_the_same(stack, lam, server, forbidden_server) -> None:
    for body in score_bodies(server, forbidden_server):
        ls, lb = lambda_call(lam, "POST", "/score", body)
        ss, sb = server_call(stack["server"], "POST", "/score", body)
        assert ls == ss, (body[:200], lb, sb)
        assert ls < 500, (body[:200], lb)
        same(lb, sb, f"POST /score {body[:60]!r}")
    assert forbidden_server.hits["/parity/internal.png"] == 0


def test_job_bodies_answer_the_same(stack, lam) -> None:
    b = stack["bucket"]
    rows = "\n".join(f"https://example.invalid/{i}.png,caption {i}" for i in range(10))
    stack["s3"].put_object(Bucket=b, Key="uploads/parity.csv", Body=f"url,caption\n{rows}\n".encode())
    cases = [
        ("POST", "/jobs", json.dumps({"input": f"s3://{b}/uploads/parity.csv", "output": f"s3://{b}/out/p.csv"})),
        ("POST", "/jobs", json.dumps({"input": "s3://other-bucket/a.csv"})),
        ("POST", "/jobs", json.dumps({"input": "not-a-uri"})),
        ("POST", "/jobs", json.dumps({"input": "s3://]x/a.csv"})),  # a 500 from both before
        ("POST", "/jobs", json.dumps({"input": "s3://Upper_Case/a.csv"})),
        ("POST", "/jobs", json.dumps({"input": f"s3://{b}/a.csv", "output": f"s3://{b}/incoming/x.csv"})),
        ("POST", "/jobs", json.dumps({"input": f"s3://{b}/uploads/missing.csv"})),
        ("POST", "/jobs", "{"),
        ("GET", "/jobs/not-a-job", None),
        ("GET", "/jobs/" + "0" * 20, None),
        ("GET", "/healthz", None),
        ("GET", "/nope", None),
        ("GET", "/score", None),
        ("DELETE", "/jobs/abc", None),
        ("POST", "/score/", "{}"),
    ]
    started = None
    for method, path, body in cases:
        ls, lb = lambda_call(lam, method, path, body)
        ss, sb = server_call(stack["server"], method, path, body)
        assert ls == ss, (method, path, body, lb, sb)
        assert ls < 500, (method, path, body, lb)  # client errors, never a server error
        if ls == 202:  # the second start finds the first's job: the same job, a little older
            started = lb["job_id"]
            lb.pop("elapsed_seconds"), sb.pop("elapsed_seconds")
        same(lb, sb, f"{method} {path} {body!r}")
    ls, lb = lambda_call(lam, "GET", f"/jobs/{started}", None)
    ss, sb = server_call(stack["server"], "GET", f"/jobs/{started}", None)
    assert ls == ss == 200
    lb.pop("elapsed_seconds"), sb.pop("elapsed_seconds")
    same(lb, sb, "GET /jobs/{id}")


def test_readyz_answers_the_same(stack, lam) -> None:
    ls, lb = lambda_call(lam, "GET", "/readyz", None)
    ss, sb = server_call(stack["server"], "GET", "/readyz", None)
    assert ls == ss == 200
    assert sb.pop("canary")["drift"] <= 1e-3  # what the server adds
    lb["model"].pop("load_seconds"), sb["model"].pop("load_seconds")
    same(lb, sb, "GET /readyz")
