"""``similarity serve`` as a real server: a subprocess on 127.0.0.1 with the tiny CLIP, talked to
over HTTP. Every route, every documented 4xx (never a 500 for a client error, never a stack trace
in a body), the micro-batching, the metrics through prometheus_client's parser, the JSON logs,
auth, and graceful shutdown under load."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support.imageserver import png_bytes
from support.serveproc import Served, tiny_env
from support.shapes import draw

TOKEN = "t0ken-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def img(seed: int, colour: str = "red", shape: str = "circle") -> bytes:
    return png_bytes(draw(colour, shape, random.Random(seed)))


def slow_image(server, path: str, data: bytes, delay: float) -> str:
    def route(h) -> None:
        time.sleep(delay)
        h.send_plain(200, data, "image/png")

    server.routes[path] = route
    return server.url(path)


@pytest.fixture(scope="module")
def aws(moto_endpoint):
    from similarity.aws import make_client

    s3, sqs = make_client("s3"), make_client("sqs")
    bucket = f"serve-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=f"chunks-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    return {"s3": s3, "sqs": sqs, "bucket": bucket, "queue": queue, "endpoint": moto_endpoint}


@pytest.fixture(scope="module")
def served(aws, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    env = tiny_env(
        MAX_PAIRS="8",
        MAX_BODY_BYTES="200000",
        BUCKET=aws["bucket"],
        CHUNK_QUEUE_URL=aws["queue"],
        CHUNK_ROWS="40",
        AWS_ENDPOINT_URL=aws["endpoint"],
        SERVER_AUTH_TOKEN_FILE=str(token_file),
        SERVER_REQUEST_TIMEOUT="6",  # the API's fetch deadline becomes 6 - 4 (reserve) = 2 s
        SERVER_BATCH_WAIT_MS="30",
        SIMILARITY_WORKERS="32",
    )
    with Served(env=env) as srv:
        srv.wait_ready()
        yield srv


def call(srv: Served, method: str, path: str, *, auth: bool = True, **kw) -> requests.Response:
    """One request, with the checks every answer must pass: JSON (or Prometheus text), a request
    id, no stack trace."""
    headers = {**(AUTH if auth else {}), **kw.pop("headers", {})}
    r = requests.request(method, srv.url + path, headers=headers, timeout=30, **kw)
    assert "Traceback" not in r.text and 'File "' not in r.text, r.text
    assert len(r.headers.get("x-request-id", "")) >= 8
    if path != "/metrics":
        assert r.headers["content-type"].startswith("application/json")
        r.json()
    return r


def metrics(srv: Served) -> dict[tuple[str, tuple], float]:
    r = call(srv, "GET", "/metrics", auth=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------------------------------ routes
def test_score_over_http(served, server) -> None:
    red, blue = server.image("/serve/red.png", img(1)), server.image("/serve/blue.png", img(2, "blue", "square"))
    pairs = [
        {"image": red, "caption": "a red circle"},
        {"image": red, "caption": "a blue square"},
        {"image": blue, "caption": "a blue square"},
    ]
    r = call(served, "POST", "/score", json={"pairs": pairs}, headers={"X-Request-Id": "client-id-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-1"
    out = r.json()
    assert out["model"] == {"id": "tiny-clip-shapes", "revision": "generated"}
    res = out["results"]
    assert [x["error"] for x in res] == [None, None, None]
    assert res[0]["similarity"] > res[1]["similarity"] and res[2]["similarity"] > res[1]["similarity"]
    assert all(0 <= x["similarity"] <= 1 and x["truncated"] is False for x in res)


def test_row_errors_do_not_fail_the_request(served, server, forbidden_server) -> None:
    pairs = [
        {"image": server.status("/serve/404.png", 404), "caption": "x"},
        {"image": forbidden_server.image("/serve/internal.png", img(3)), "caption": "x"},
        {"image": server.image("/serve/text", b"hello", "image/png"), "caption": "x"},
        {"image": "", "caption": "x"},
        {"image": "/etc/passwd", "caption": "x"},
        {"image": server.image("/serve/ok.png", img(4)), "caption": ""},
    ]
    r = call(served, "POST", "/score", json={"pairs": pairs})
    assert r.status_code == 200
    assert [x["error_code"] for x in r.json()["results"]] == [
        "http_404",
        "blocked_address",
        "not_an_image",
        "missing_url",
        "local_path_disabled",
        "missing_caption",
    ]
    assert forbidden_server.hits["/serve/internal.png"] == 0


def test_a_slow_image_costs_only_its_own_row(served, server) -> None:
    drip = server.drip("/serve/drip.png", img(5), interval=0.5)
    fast = server.image("/serve/fast.png", img(6))

    def timed(body: dict) -> tuple[float, dict]:
        t = time.monotonic()
        r = call(served, "POST", "/score", json=body)
        assert r.status_code == 200
        return time.monotonic() - t, r.json()

    with ThreadPoolExecutor(2) as pool:
        slow_req = pool.submit(timed, {"pairs": [{"image": drip, "caption": "x"}, {"image": fast, "caption": "x"}]})
        time.sleep(0.2)  # the slow request's rows are in the batcher first
        other = pool.submit(timed, {"pairs": [{"image": fast, "caption": "a red circle"}]})
        other_s, other_out = other.result()
        slow_s, slow_out = slow_req.result()
    assert other_out["results"][0]["error"] is None and other_s < 1.5  # not held back by the drip
    assert [x["error_code"] for x in slow_out["results"]] == ["timeout", None]
    assert 1.5 < slow_s < 6  # the fetch deadline (2 s here), inside the request's 6 s


def test_health_ready_and_canary(served) -> None:
    r = call(served, "GET", "/healthz", auth=False)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = call(served, "GET", "/readyz", auth=False)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready"
    assert body["model"]["id"] == "tiny-clip-shapes" and body["model"]["backend"] == "torch"
    canary = body["canary"]
    assert canary["drift"] <= canary["tolerance"] and canary["cosine"] == pytest.approx(canary["expected"], abs=1e-3)


def test_jobs_start_and_status(served, aws) -> None:
    b = aws["bucket"]
    rows = "\n".join(f"https://example.invalid/{i}.png,caption {i}" for i in range(50))
    aws["s3"].put_object(Bucket=b, Key="uploads/serve.csv", Body=f"url,caption\n{rows}\n".encode())
    r = call(served, "POST", "/jobs", json={"input": f"s3://{b}/uploads/serve.csv", "output": f"s3://{b}/out/x.csv"})
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["state"] == "running" and started["chunks"] == {"done": 0, "total": 2}
    assert started["output"] == f"s3://{b}/out/x.csv"
    msgs = aws["sqs"].receive_message(QueueUrl=aws["queue"], MaxNumberOfMessages=10).get("Messages", [])
    assert len(msgs) == 2  # fanned out to the chunk workers (Lambda), as the Lambda API does
    r = call(served, "GET", f"/jobs/{started['job_id']}")
    assert r.status_code == 200 and r.json()["rows"] == {"done": 0, "total": 50}


# ------------------------------------------------------------------------------------ client errors
def _chunked(parts: int, size: int):
    for _ in range(parts):
        yield b"x" * size


CLIENT_ERRORS = [
    # (method, path, request kwargs, auth, status, code)
    ("POST", "/score", {"data": "{"}, True, 400, "bad_request"),
    ("POST", "/score", {"data": ""}, True, 400, "bad_request"),
    ("POST", "/score", {"data": "[]"}, True, 400, "bad_request"),
    ("POST", "/score", {"json": {"pairs": []}}, True, 400, "bad_request"),
    ("POST", "/score", {"json": {"pairs": "nope"}}, True, 400, "bad_request"),
    ("POST", "/score", {"json": {"pairs": [{"image": "a", "caption": "b", "bogus": 1}]}}, True, 400, "bad_request"),
    ("POST", "/score", {"json": {"pairs": [{"image": "a", "caption": "b"}] * 9}}, True, 413, "payload_too_large"),
    ("POST", "/score", {"json": {"pairs": [{"image": "a" * 250_000, "caption": "b"}]}}, True, 413, "payload_too_large"),
    ("POST", "/score", {"data": _chunked(30, 10_000)}, True, 413, "payload_too_large"),  # no Content-Length
    ("POST", "/score", {"json": {"pairs": [{"image": "", "caption": "x"}]}}, False, 401, "unauthorized"),
    ("POST", "/score", {"headers": {"Authorization": "Bearer wrong-token-0123456789"}}, False, 401, "unauthorized"),
    ("POST", "/score", {"headers": {"Authorization": f"Basic {TOKEN}"}}, False, 401, "unauthorized"),
    ("POST", "/jobs", {"json": {"input": "s3://x/y.csv"}}, False, 401, "unauthorized"),
    ("GET", "/jobs/abc", {}, False, 401, "unauthorized"),
    ("GET", "/nope", {}, True, 404, "not_found"),
    ("GET", "/score", {}, True, 405, "method_not_allowed"),
    ("DELETE", "/jobs/abc", {}, True, 405, "method_not_allowed"),
    ("GET", "/jobs/not-a-job", {}, True, 400, "bad_request"),
    ("GET", "/jobs/" + "0" * 20, {}, True, 404, "not_found"),
    ("POST", "/jobs", {"json": {"input": "not-a-uri"}}, True, 400, "bad_request"),
    ("POST", "/jobs", {"json": {"input": "s3://other-bucket/a.csv"}}, True, 400, "bad_request"),
    ("POST", "/jobs", {"json": {"input": "s3://]bad/a.csv"}}, True, 400, "bad_request"),  # was a 500
    ("POST", "/jobs", {"data": "{"}, True, 400, "bad_request"),
]


@pytest.mark.parametrize(("method", "path", "kw", "auth", "status", "code"), CLIENT_ERRORS)
def test_client_errors(served, method, path, kw, auth, status, code) -> None:
    r = call(served, method, path, auth=auth, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert r.headers["allow"]


def test_field_level_messages(served) -> None:
    r = call(served, "POST", "/score", json={"pairs": [{"image": "x"}, {"caption": 5, "image": "y"}]})
    assert r.status_code == 400
    assert {"pairs.0.caption", "pairs.1.caption"} <= {f["field"] for f in r.json()["error"]["fields"]}


def test_jobs_input_that_does_not_exist(served, aws) -> None:
    r = call(served, "POST", "/jobs", json={"input": f"s3://{aws['bucket']}/uploads/missing.csv"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = call(
        served,
        "POST",
        "/jobs",
        json={"input": f"s3://{aws['bucket']}/a.csv", "output": f"s3://{aws['bucket']}/jobs/x.csv"},
    )
    assert r.status_code == 400 and r.json()["error"]["fields"] == [{"field": "output", "message": "reserved prefix"}]
    # Before: an output equal to the input was accepted, and the scored file replaced the input.
    same = f"s3://{aws['bucket']}/uploads/a.csv"
    r = call(served, "POST", "/jobs", json={"input": same, "output": same})
    assert r.status_code == 400 and r.json()["error"]["fields"] == [{"field": "output", "message": "same as input"}]
    # Before: a .jsonl or .csv.gz input was accepted and failed later with a misleading reason.
    for name in ("a.jsonl", "a.csv.gz", "a.parquet"):
        r = call(served, "POST", "/jobs", json={"input": f"s3://{aws['bucket']}/uploads/{name}"})
        assert r.status_code == 400 and r.json()["error"]["fields"] == [{"field": "input", "message": "not .csv"}]


def test_a_body_that_never_arrives_is_408(served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=20) as s:
        head = (
            f"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        s.sendall(head.encode() + b'{"pairs"')
        start = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data and time.monotonic() - start < 10


# ------------------------------------------------------------------------------------ batching, metrics, logs
def test_concurrent_requests_are_batched_and_counted(served, server) -> None:
    before = metrics(served)
    urls = [server.image(f"/serve/c{i}.png", img(100 + i)) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(
                lambda u: call(served, "POST", "/score", json={"pairs": [{"image": u, "caption": "a red circle"}]}),
                urls,
            )
        )
    assert [r.status_code for r in statuses] == [200] * 16
    call(served, "POST", "/score", json={"pairs": [{"image": server.status("/serve/m404.png", 404), "caption": "x"}]})
    call(served, "POST", "/score", json={"pairs": []})
    after = metrics(served)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("similarity_requests_total", route="/score", method="POST", status="200") == 17
    assert delta("similarity_requests_total", route="/score", method="POST", status="400") == 1
    assert delta("similarity_rows_scored_total") == 16
    assert delta("similarity_row_errors_total", code="http_404") == 1
    assert delta("similarity_request_duration_seconds_count", route="/score", method="POST") == 18
    # 16 single-pair requests at once went through fewer model calls than 16
    calls = delta("similarity_batch_size_count", tower="image")
    rows = delta("similarity_batch_size_sum", tower="image")
    assert rows == 16 and calls < 16
    assert delta("similarity_image_fetch_seconds_count", outcome="ok") == 16
    assert delta("similarity_image_fetch_seconds_count", outcome="error") == 1
    assert value(after, "similarity_queue_depth") == 0 and value(after, "similarity_rows_in_flight") == 0
    assert value(after, "similarity_model_load_seconds") > 0
    info = [k for k in after if k[0] == "similarity_model_info"]
    assert len(info) == 1 and dict(info[0][1]) == {
        "model_id": "tiny-clip-shapes",
        "revision": "generated",
        "backend": "torch",
        "device": "cpu",
        "dtype": "fp32",
    }
    assert value(after, "similarity_model_ready") == 1
    assert value(after, "similarity_requests_in_flight") == 1  # the scrape itself


def test_json_logs_with_request_ids(served) -> None:
    rid = "log-" + uuid.uuid4().hex[:12]
    call(served, "POST", "/score", json={"pairs": [{"image": "", "caption": "x"}]}, headers={"X-Request-Id": rid})
    call(served, "GET", "/healthz", headers={"X-Request-Id": "bad id with spaces"})
    time.sleep(0.3)
    lines = [line for line in served.lines if line.strip()]
    logs = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(x) for x in logs)
    mine = [x for x in logs if x.get("request_id") == rid]
    assert any(x["message"] == "request" and x["route"] == "/score" and x["status"] == 200 for x in mine)
    assert not any(x.get("request_id") == "bad id with spaces" for x in logs)  # replaced, never echoed
    assert TOKEN not in "\n".join(lines)


# ------------------------------------------------------------------------------------ other servers
def test_without_a_model_liveness_answers_and_the_rest_is_503(tmp_path) -> None:
    env = tiny_env(CLIP_MODEL_DIR=str(tmp_path / "empty-volume"), SERVER_LOAD_RETRY_SECONDS="60")
    with Served(env=env) as srv:
        assert requests.get(srv.url + "/healthz", timeout=10).status_code == 200
        end = time.monotonic() + 60
        while time.monotonic() < end:  # "loading" first, then the load's failure
            r = requests.get(srv.url + "/readyz", timeout=10)
            if "does not exist" in r.json()["reason"]:
                break
            time.sleep(0.2)
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert r.json()["reason"].startswith("model_not_found: model directory")
        r = requests.post(srv.url + "/score", json={"pairs": [{"image": "", "caption": "x"}]}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
        assert r.headers["retry-after"] == "1"
        m = {
            (s.name): s.value
            for f in text_string_to_metric_families(requests.get(srv.url + "/metrics").text)
            for s in f.samples
        }
        assert m["similarity_model_ready"] == 0


def test_overloaded_server_sheds_with_503(server) -> None:
    env = tiny_env(SERVER_MAX_QUEUE_ROWS="2", SERVER_REQUEST_TIMEOUT="10")
    slow = slow_image(server, "/serve/overload.png", img(9), delay=2.0)
    with Served(env=env) as srv:
        srv.wait_ready()
        body = {"pairs": [{"image": slow, "caption": "x"}, {"image": slow + "?b", "caption": "y"}]}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(requests.post, srv.url + "/score", json=body, timeout=30)
            time.sleep(0.5)
            r = requests.post(srv.url + "/score", json={"pairs": [{"image": slow, "caption": "z"}]}, timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert first.result().status_code == 200


def test_probes_answer_while_every_request_slot_is_taken(server) -> None:
    env = tiny_env(SERVER_MAX_CONCURRENCY="1", SERVER_REQUEST_TIMEOUT="20")
    slow = slow_image(server, "/serve/slot.png", img(10), delay=3.0)
    with Served(env=env) as srv:
        srv.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(
                requests.post, srv.url + "/score", json={"pairs": [{"image": slow, "caption": "x"}]}, timeout=30
            )
            time.sleep(0.5)
            waiting = pool.submit(
                requests.post, srv.url + "/score", json={"pairs": [{"image": "", "caption": "x"}]}, timeout=30
            )
            start = time.monotonic()
            r = requests.get(srv.url + "/readyz", timeout=30)
            assert r.status_code == 200 and time.monotonic() - start < 1.5  # not behind the requests
            assert not waiting.done()  # the one request slot is taken: it waits for it
            assert first.result().status_code == 200 and waiting.result().status_code == 200


def test_graceful_shutdown_under_load_loses_no_request(server) -> None:
    """SIGTERM with requests in flight and new connections arriving: every request the server
    took in is answered in full. New connections after the signal are refused, or reset when the
    kernel had queued them and the listener closed before the server accepted them; the server
    never saw those (their ids are in no log line), so the client knows to retry. On Kubernetes the
    preStop sleep takes the pod out of the endpoints first, so none arrive."""
    env = tiny_env(SIMILARITY_WORKERS="32", SERVER_GRACEFUL_TIMEOUT="20", SERVER_REQUEST_TIMEOUT="20")
    srv = Served(env=env).start()
    try:
        srv.wait_ready()
        slow = [slow_image(server, f"/serve/shutdown{i}.png", img(200 + i), delay=1.5) for i in range(12)]
        fast = server.image("/serve/shutdown-fast.png", img(300))
        outcomes: list[tuple[str, str]] = []  # (request id, outcome)
        stop = threading.Event()

        def in_flight(url: str) -> requests.Response:
            return requests.post(srv.url + "/score", json={"pairs": [{"image": url, "caption": "x"}]}, timeout=60)

        def steady() -> None:  # new connections all the time, before and after SIGTERM
            while not stop.is_set():
                rid = uuid.uuid4().hex
                try:
                    with requests.Session() as s:
                        r = s.post(
                            srv.url + "/score",
                            json={"pairs": [{"image": fast, "caption": "x"}]},
                            headers={"X-Request-Id": rid},
                            timeout=60,
                        )
                    outcomes.append((rid, f"{r.status_code}:{r.json()['results'][0]['error_code']}"))
                except requests.ConnectionError as exc:
                    refused = "refused" in str(exc).lower()
                    outcomes.append((rid, "refused" if refused else "reset"))
                    if refused:
                        return

        with ThreadPoolExecutor(16) as pool:
            loaders = [pool.submit(steady) for _ in range(3)]
            waves = [pool.submit(in_flight, u) for u in slow]
            end = time.monotonic() + 20
            while sum(server.hits[f"/serve/shutdown{i}.png"] for i in range(12)) < 12 and time.monotonic() < end:
                time.sleep(0.05)  # every slow request is being fetched: in flight
            srv.terminate()
            answered = [f.result() for f in waves]
            stop.set()
            for f in loaders:
                f.result()
        assert [r.status_code for r in answered] == [200] * 12
        assert all(r.json()["results"][0]["error"] is None for r in answered)
        srv.proc.wait(30)
        seen = {x.get("request_id") for x in srv.logs()}
        kinds = [o for _, o in outcomes]
        assert set(kinds) <= {"200:None", "refused", "reset"}, kinds
        assert "200:None" in kinds and "refused" in kinds  # load before the signal, and new connections after
        assert all(rid in seen for rid, o in outcomes if o == "200:None")
        assert not [rid for rid, o in outcomes if o == "reset" and rid in seen]  # taken in, then dropped: lost
        with pytest.raises(requests.ConnectionError):
            requests.get(srv.url + "/healthz", timeout=5)
        messages = [x["message"] for x in srv.logs()]
        assert "batcher closed" in messages and f"Finished server process [{srv.proc.pid}]" in messages
        # ended by the signal as a stopped server is, every line a JSON log line to the last
        assert srv.proc.returncode == -signal.SIGTERM and len(srv.logs()) == len([x for x in srv.lines if x.strip()])
    finally:
        srv.stop()


@pytest.mark.slow
def test_workers_add_their_metrics_up(server) -> None:
    with Served("--workers", "2", env=tiny_env()) as srv:
        srv.wait_ready()
        end = time.monotonic() + 120
        while time.monotonic() < end:  # the gauge adds up as a minimum: 1 once every worker is ready
            text = requests.get(srv.url + "/metrics", timeout=10).text
            if any(
                s.name == "similarity_model_ready" and s.value == 1
                for f in text_string_to_metric_families(text)
                for s in f.samples
            ):
                break
            time.sleep(0.3)
        url = server.image("/serve/workers.png", img(400))
        for _ in range(12):
            r = requests.post(srv.url + "/score", json={"pairs": [{"image": url, "caption": "x"}]}, timeout=60)
            assert r.status_code == 200
        totals = []
        for _ in range(4):  # each scrape lands on one worker; every one sees the sum
            m = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(requests.get(srv.url + "/metrics", timeout=10).text)
                for s in f.samples
            }
            totals.append(value(m, "similarity_requests_total", route="/score", method="POST", status="200"))
        assert totals == [12.0] * 4
        assert value(m, "similarity_rows_scored_total") == 12


# ------------------------------------------------------------------------------------ the command
def _serve_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "similarity", "serve", *args],
        env=tiny_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--workers", "0"], {}, "--workers"),
        ([], {"SERVER_BATCH_WAIT_MS": "soon"}, "SERVER_BATCH_WAIT_MS"),
        ([], {"SERVER_AUTH_TOKEN_FILE": "/nonexistent/token"}, "SERVER_AUTH_TOKEN_FILE"),
        ([], {"SERVER_AUTH_TOKEN": "short"}, "SERVER_AUTH_TOKEN"),
    ],
)
def test_bad_settings_exit_2_naming_them(args, env, named) -> None:
    r = _serve_cli(*args, **env)
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and "Traceback" not in r.stderr


def test_openapi_document_is_the_committed_one(served) -> None:
    from similarity.server.openapi import document

    committed = json.loads((Path(__file__).resolve().parents[2] / "docs" / "openapi.json").read_text())
    # regenerate with: python -m similarity.server.openapi docs/openapi.json
    assert document() == committed
    assert call(served, "GET", "/openapi.json", auth=False).json() == committed
