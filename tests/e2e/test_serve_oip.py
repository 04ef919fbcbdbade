"""The Open Inference Protocol (KServe v2, Triton's REST API) of ``similarity serve``, against a real
server on 127.0.0.1 with the tiny CLIP: health and metadata, infer answering what ``POST /score``
answers for the same pairs (through the same batcher, limits and metrics), the protocol's error
format for bad tensors, the binary tensor extension, and Triton's own HTTP client calling it."""

from __future__ import annotations

import base64
import json
import random
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from support.imageserver import png_bytes
from support.serveproc import Served, tiny_env
from support.shapes import draw

TOKEN = "oip-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "tiny-clip"  # SERVER_MODEL_NAME, not the default: the setting is seen to work
INFER = f"/v2/models/{MODEL}/infer"


def img(seed: int, colour: str = "red", shape: str = "circle") -> bytes:
    return png_bytes(draw(colour, shape, random.Random(seed)))


@pytest.fixture(scope="module")
def served():
    env = tiny_env(
        MAX_PAIRS="8",
        MAX_BODY_BYTES="200000",
        SERVER_AUTH_TOKEN=TOKEN,
        SERVER_MODEL_NAME=MODEL,
        SERVER_BATCH_WAIT_MS="30",
        SERVER_REQUEST_TIMEOUT="8",
        SIMILARITY_WORKERS="16",
    )
    with Served(env=env) as srv:
        srv.wait_ready()
        yield srv


def get(srv: Served, path: str, **kw) -> requests.Response:
    r = requests.get(srv.url + path, timeout=30, **kw)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    return r


def infer(srv: Served, body: object = None, *, auth: bool = True, data: bytes | None = None, **kw) -> requests.Response:
    headers = {**(AUTH if auth else {}), **kw.pop("headers", {})}
    payload = data if data is not None else json.dumps(body).encode()
    # tritonclient sends no Content-Type: neither does this
    return requests.post(srv.url + kw.pop("path", INFER), data=payload, headers=headers, timeout=60, **kw)


def tensors(images: list[str], captions: list[str], **extra: object) -> dict:
    return {
        "inputs": [
            {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images},
            {"name": "caption", "shape": [len(captions)], "datatype": "BYTES", "data": captions},
        ],
        **extra,
    }


def oip_error(r: requests.Response, status: int, *fragments: str) -> str:
    """The protocol's error body: one key, ``error``, a string; never a stack trace."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert "Traceback" not in r.text and 'File "' not in r.text
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body)
    return body["error"]


def outputs_of(body: dict) -> dict[str, dict]:
    return {o["name"]: o for o in body["outputs"]}


def same_rows(oip: dict[str, list], score: list[dict]) -> None:
    """Infer's tensors against /score's results: the same rounded values (a row may share a batch
    with other rows, so the 4th decimal may move by one), the same errors and truncation."""
    assert len(oip["similarity"]) == len(score)
    for i, row in enumerate(score):
        for key in ("similarity", "cosine"):
            got, want = oip[key][i], row[key]
            assert (got is None) == (want is None), (i, key, got, want)
            if want is not None:
                assert abs(got - want) <= 1.0001e-4, (i, key, got, want)
        assert oip["error"][i] == (row["error"] or ""), (i, oip["error"][i], row)
        assert oip["truncated"][i] == row["truncated"], i


def hostile_pairs(server, forbidden_server) -> tuple[list[str], list[str]]:
    red, blue = server.image("/oip/red.png", img(1)), server.image("/oip/blue.png", img(2, "blue", "square"))
    data_uri = "data:image/png;base64," + base64.b64encode(img(3, "green", "triangle")).decode()
    pairs = [
        (red, "a red circle"),
        (red, "a blue square"),
        (blue, "a blue square"),
        (data_uri, "a green triangle"),
        (red, "a red circle " * 40),  # over the token limit: truncated
        (server.status("/oip/404.png", 404), "x"),
        (forbidden_server.image("/oip/internal.png", img(4)), "x"),
        ("", "x"),
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ------------------------------------------------------------------------------- health, metadata
def test_health_and_metadata(served) -> None:
    assert get(served, "/v2/health/live").json() == {"live": True}
    assert get(served, "/v2/health/ready").json() == {"ready": True}
    assert get(served, f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    meta = get(served, "/v2").json()
    assert meta["name"] == "text-image-similarity" and "binary_tensor_data" in meta["extensions"]
    assert get(served, f"/v2/models/{MODEL}").json() == {
        "name": MODEL,
        "platform": "text-image-similarity",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "caption", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "similarity", "datatype": "FP32", "shape": [-1]},
            {"name": "cosine", "datatype": "FP32", "shape": [-1]},
            {"name": "error", "datatype": "BYTES", "shape": [-1]},
            {"name": "truncated", "datatype": "BOOL", "shape": [-1]},
        ],
    }


def test_unknown_model_unknown_route_and_wrong_method(served) -> None:
    for path in ("/v2/models/clip", "/v2/models/clip/ready"):  # the default name is not this server's
        oip_error(get(served, path), 404, "unknown model 'clip'", f"serves '{MODEL}'")
    oip_error(infer(served, tensors(["a"], ["b"]), path="/v2/models/clip/infer"), 404, "unknown model 'clip'")
    oip_error(get(served, "/v2/models"), 404, "no route GET /v2/models")
    oip_error(get(served, f"/v2/models/{MODEL}/versions/1"), 404, "no route")  # one unversioned model
    r = requests.delete(served.url + INFER, headers=AUTH, timeout=10)
    oip_error(r, 405, "use POST")
    assert r.headers["allow"] == "POST"
    oip_error(requests.get(served.url + INFER, timeout=10), 405, "use POST")


def test_auth_on_infer_only(served) -> None:
    r = infer(served, tensors(["a"], ["b"]), auth=False)
    oip_error(r, 401, "unauthorized: a valid bearer token is required")
    assert r.headers["www-authenticate"] == "Bearer"
    oip_error(infer(served, tensors(["a"], ["b"]), auth=False, headers={"Authorization": "Bearer wrong"}), 401)
    assert get(served, f"/v2/models/{MODEL}").status_code == 200  # metadata and probes need no token
    assert get(served, "/v2/health/ready").status_code == 200


# ------------------------------------------------------------------------------------- inference
def test_infer_answers_what_score_answers(served, server, forbidden_server) -> None:
    images, captions = hostile_pairs(server, forbidden_server)
    score = requests.post(
        served.url + "/score",
        json={"pairs": [{"image": i, "caption": c} for i, c in zip(images, captions)]},
        headers=AUTH,
        timeout=60,
    ).json()
    r = infer(served, tensors(images, captions, id="req-7"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == MODEL and body["id"] == "req-7"
    assert body["parameters"] == {"model_id": "tiny-clip-shapes", "model_revision": "generated"}
    outs = outputs_of(body)
    assert [o["name"] for o in body["outputs"]] == ["similarity", "cosine", "error", "truncated"]
    assert {n: (o["datatype"], o["shape"]) for n, o in outs.items()} == {
        "similarity": ("FP32", [8]),
        "cosine": ("FP32", [8]),
        "error": ("BYTES", [8]),
        "truncated": ("BOOL", [8]),
    }
    same_rows({n: o["data"] for n, o in outs.items()}, score["results"])
    codes = [e.split(":", 1)[0] for e in outs["error"]["data"]]
    assert codes == ["", "", "", "", "", "http_404", "blocked_address", "missing_url"]  # per row, never a 4xx
    assert outs["truncated"]["data"][4] is True
    sim = outs["similarity"]["data"]
    assert sim[0] > sim[1] and sim[2] > sim[1]
    assert forbidden_server.hits["/oip/internal.png"] == 0


def test_outputs_field_selects_orders_and_asks_for_binary(served, server) -> None:
    red = server.image("/oip/sel.png", img(5))
    body = tensors([red, ""], ["a red circle", "x"])
    r = infer(served, {**body, "outputs": [{"name": "truncated"}, {"name": "similarity"}]})
    assert r.status_code == 200 and "id" not in r.json()  # no id given, none echoed
    assert [o["name"] for o in r.json()["outputs"]] == ["truncated", "similarity"]
    plain = outputs_of(infer(served, body).json())
    # every output in binary: the JSON header, then the tensors in output order
    r = infer(served, {**body, "parameters": {"binary_data_output": True}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    blob, got = r.content[n:], {}
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        raw, blob = blob[:size], blob[size:]
        assert "data" not in o
        got[o["name"]] = raw
    assert blob == b""
    sim = np.frombuffer(got["similarity"], dtype="<f4")
    assert sim[0] == np.float32(plain["similarity"]["data"][0]) and np.isnan(sim[1])
    assert np.frombuffer(got["truncated"], dtype=np.bool_).tolist() == [False, False]
    errors, raw = [], got["error"]
    while raw:
        (size,) = struct.unpack_from("<I", raw)
        errors.append(raw[4 : 4 + size].decode())
        raw = raw[4 + size :]
    assert errors == plain["error"]["data"] and errors[1].startswith("missing_url")
    # one output in binary, the other in JSON
    r = infer(
        served,
        {
            **body,
            "outputs": [{"name": "cosine", "parameters": {"binary_data": True}}, {"name": "error"}],
        },
    )
    n = int(r.headers["inference-header-content-length"])
    cos, err = json.loads(r.content[:n])["outputs"]
    assert cos["parameters"]["binary_data_size"] == 8 and err["data"] == plain["error"]["data"]
    assert np.frombuffer(r.content[n:], dtype="<f4")[0] == np.float32(plain["cosine"]["data"][0])


def binary_request(images: list[str], captions: list[str]) -> tuple[bytes, str]:
    def packed(items: list[str]) -> bytes:
        return b"".join(struct.pack("<I", len(b)) + b for b in (x.encode() for x in items))

    blobs = [packed(images), packed(captions)]
    head = {
        "inputs": [
            {"name": name, "shape": [len(v)], "datatype": "BYTES", "parameters": {"binary_data_size": len(b)}}
            for name, v, b in (("image", images, blobs[0]), ("caption", captions, blobs[1]))
        ],
        "outputs": [{"name": "similarity"}, {"name": "error"}],
    }
    header = json.dumps(head).encode()
    return header + b"".join(blobs), str(len(header))


def test_binary_inputs_score_as_json_ones(served, server) -> None:
    red = server.image("/oip/bin.png", img(6))
    images, captions = [red, red, ""], ["a red circle", "un cercle rouge, é ü 漢字", "x"]
    payload, length = binary_request(images, captions)
    r = infer(served, data=payload, headers={"Inference-Header-Content-Length": length})
    assert r.status_code == 200, r.text
    got = {o["name"]: o["data"] for o in r.json()["outputs"]}
    want = {o["name"]: o["data"] for o in infer(served, tensors(images, captions)).json()["outputs"]}
    assert got["error"] == want["error"]
    assert all(abs(a - b) <= 1.0001e-4 for a, b in zip(got["similarity"][:2], want["similarity"][:2]))


def two(shape_image: list[int], shape_caption: list[int], images: object, captions: object, dt: str = "BYTES"):
    return {
        "inputs": [
            {"name": "image", "shape": shape_image, "datatype": dt, "data": images},
            {"name": "caption", "shape": shape_caption, "datatype": "BYTES", "data": captions},
        ]
    }


BAD = [
    (
        "missing caption",
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        400,
        "missing input 'caption'",
    ),
    ("no inputs", {"inputs": []}, 400, "inputs: List should have at least 1 item"),
    (
        "wrong datatype",
        two([1], [1], [1.5], ["b"], "FP32"),
        400,
        "input 'image' has datatype FP32; the model takes BYTES",
    ),
    ("shape mismatch", two([2], [1], ["a"], ["b"]), 400, "input 'image' has 1 elements; its shape says 2"),
    ("rank 2", two([1, 1], [1], [["a"]], ["b"]), 400, "has shape [1, 1]; the model takes one dimension"),
    ("negative shape", two([-1], [1], ["a"], ["b"]), 400, "has shape [-1]; a request's shape counts its elements"),
    ("unequal lengths", two([2], [1], ["a", "a"], ["b"]), 400, "have 2 and 1 elements; one of each per pair"),
    ("zero pairs", two([0], [0], [], []), 400, "no elements; send at least one pair"),
    ("not strings", two([1], [1], [5], ["b"]), 400, "input 'image' element 0 is int; BYTES elements are strings"),
    ("string shape", two(["1"], [1], ["a"], ["b"]), 400, "inputs.0.shape.0: Input should be a valid integer"),
    ("no data", {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}, 400, "input 'image' has no data"),
    (
        "unknown input",
        {"inputs": [{"name": "url", "shape": [1], "datatype": "BYTES", "data": ["a"]}]},
        400,
        "unknown input 'url'",
    ),
    (
        "twice",
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}] * 2},
        400,
        "input 'image' is given twice",
    ),
    ("unknown field", {**two([1], [1], ["a"], ["b"]), "input": []}, 400, "input: Extra inputs are not permitted"),
    ("unknown output", {**two([1], [1], ["a"], ["b"]), "outputs": [{"name": "score"}]}, 400, "unknown output 'score'"),
    ("output twice", {**two([1], [1], ["a"], ["b"]), "outputs": [{"name": "error"}] * 2}, 400, "asked for twice"),
    (
        "bad binary flag",
        {**two([1], [1], ["a"], ["b"]), "parameters": {"binary_data_output": "yes"}},
        400,
        "binary_data_output must be true or false",
    ),
    (
        "binary without header",
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]},
        400,
        "has no Inference-Header-Content-Length",
    ),
    ("over the pair limit", two([9], [9], ["a"] * 9, ["b"] * 9), 413, "9 pairs; at most 8 per request"),
    ("not an object", [1, 2], 400, "request failed validation"),
]


@pytest.mark.parametrize(("body", "status", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_tensors_answer_the_protocols_error(served, body, status, fragment) -> None:
    oip_error(infer(served, body), status, fragment)


def test_bad_bodies_answer_the_protocols_error(served) -> None:
    oip_error(infer(served, data=b""), 400, "request body is empty")
    oip_error(infer(served, data=b"{"), 400, "body is not valid JSON")
    oip_error(infer(served, data=b"\xff\xfe"), 400, "not UTF-8")
    oip_error(infer(served, data=b'{"inputs": [' * 100 + b"]" * 100), 400, "levels deep")
    oip_error(infer(served, data=b" " * 200_001), 413, "the limit is 200000")
    payload, length = binary_request(["a"], ["b"])
    header = {"Inference-Header-Content-Length": length}
    oip_error(
        infer(served, data=payload[:-1], headers=header), 400, "input 'caption' has 5 bytes of binary data; 4 follow"
    )
    oip_error(infer(served, data=payload + b"x", headers=header), 400, "1 bytes of binary data after the inputs")
    oip_error(
        infer(served, data=payload, headers={"Inference-Header-Content-Length": "x"}), 400, "must be a byte count"
    )
    oip_error(infer(served, data=payload, headers={"Inference-Header-Content-Length": "99999"}), 400, "the body has")
    head = json.dumps(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]}
    ).encode()
    bad = head + struct.pack("<I", 1) + b"\xff"
    oip_error(infer(served, data=bad, headers={"Inference-Header-Content-Length": str(len(head))}), 400, "not UTF-8")


# ---------------------------------------------------------------------------- batcher and metrics
def metrics(srv: Served) -> dict[tuple[str, tuple], float]:
    text = requests.get(srv.url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_infer_shares_the_batcher_and_the_metrics_with_score(served, server) -> None:
    before = metrics(served)
    urls = [server.image(f"/oip/c{i}.png", img(200 + i)) for i in range(12)]

    def one(i: int) -> int:
        if i % 2:
            return infer(served, tensors([urls[i]], ["a red circle"])).status_code
        r = requests.post(
            served.url + "/score", json={"pairs": [{"image": urls[i], "caption": "a red circle"}]}, headers=AUTH
        )
        return r.status_code

    with ThreadPoolExecutor(12) as pool:
        assert list(pool.map(one, range(12))) == [200] * 12
    infer(served, tensors([server.status("/oip/m404.png", 404)], ["x"]))
    after = metrics(served)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = "/v2/models/{name}/infer"
    assert delta("similarity_requests_total", route=route, method="POST", status="200") == 7
    assert delta("similarity_rows_scored_total") == 12
    assert delta("similarity_row_errors_total", code="http_404") == 1
    # twelve single-pair requests, half of each protocol, in fewer model calls than twelve
    assert delta("similarity_batch_size_sum", tower="image") == 12
    assert delta("similarity_batch_size_count", tower="image") < 12


# ------------------------------------------------------------------------------- a real client
def test_tritonclient_calls_it_unchanged(served, server) -> None:
    # infer() writes Inference-Header-Content-Length into the headers it is given: a fresh dict each call
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    red, blue = server.image("/oip/t-red.png", img(7)), server.image("/oip/t-blue.png", img(8, "blue", "square"))
    images, captions = [red, red, blue, ""], ["a red circle", "a blue square", "a blue square", "x"]
    score = requests.post(
        served.url + "/score",
        json={"pairs": [{"image": i, "caption": c} for i, c in zip(images, captions)]},
        headers=AUTH,
        timeout=60,
    ).json()["results"]
    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.port}", connection_timeout=10, network_timeout=60)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
        meta = client.get_model_metadata(MODEL)
        assert [(t["name"], t["datatype"]) for t in meta["inputs"]] == [("image", "BYTES"), ("caption", "BYTES")]
        assert [t["name"] for t in meta["outputs"]] == ["similarity", "cosine", "error", "truncated"]
        for binary in (True, False):  # the client's default (binary tensors both ways), then pure JSON
            inputs = [httpclient.InferInput("image", [4], "BYTES"), httpclient.InferInput("caption", [4], "BYTES")]
            inputs[0].set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=binary)
            inputs[1].set_data_from_numpy(np.array(captions, dtype=np.object_), binary_data=binary)
            outputs = (
                None if binary else [httpclient.InferRequestedOutput(n, binary_data=False) for n in meta_names(meta)]
            )
            result = client.infer(MODEL, inputs, outputs=outputs, request_id=f"t-{binary}", headers=dict(AUTH))
            assert result.get_response()["id"] == f"t-{binary}"
            sim, cos = result.as_numpy("similarity"), result.as_numpy("cosine")
            assert sim.dtype == np.float32 and sim.shape == (4,) and np.isnan(sim[3]) and np.isnan(cos[3])
            errors = [e.decode() if isinstance(e, bytes) else e for e in result.as_numpy("error")]
            same_rows(
                {
                    "similarity": [None if np.isnan(v) else float(v) for v in sim],
                    "cosine": [None if np.isnan(v) else float(v) for v in cos],
                    "error": errors,
                    "truncated": result.as_numpy("truncated").tolist(),
                },
                score,
            )
        bad = httpclient.InferInput("image", [1], "FP32")
        bad.set_data_from_numpy(np.array([1.0], dtype=np.float32))
        with pytest.raises(InferenceServerException) as exc:
            client.infer(MODEL, [bad], headers=dict(AUTH))
        assert exc.value.status() == "400" and "datatype FP32" in exc.value.message()
        with pytest.raises(InferenceServerException) as exc:
            client.infer("clip", inputs, headers=dict(AUTH))
        assert exc.value.status() == "404"
        with pytest.raises(InferenceServerException) as exc:
            client.infer(MODEL, inputs)
        assert exc.value.status() == "401"
    finally:
        client.close()


def meta_names(meta: dict) -> list[str]:
    return [t["name"] for t in meta["outputs"]]


# --------------------------------------------------------------------------------- not ready yet
def test_without_a_model_the_v2_probes_say_not_ready(tmp_path) -> None:
    env = tiny_env(CLIP_MODEL_DIR=str(tmp_path / "empty-volume"), SERVER_LOAD_RETRY_SECONDS="60")
    with Served(env=env) as srv:
        assert get(srv, "/v2/health/live").json() == {"live": True}
        assert get(srv, "/v2/models/clip").status_code == 200  # metadata is static
        r = get(srv, "/v2/health/ready")
        oip_error(r, 503, "model_unavailable: the model is not ready")
        assert r.headers["retry-after"] == "1"
        oip_error(get(srv, "/v2/models/clip/ready"), 503, "the model is not ready")
        r = requests.post(srv.url + "/v2/models/clip/infer", data=json.dumps(tensors(["a"], ["b"])), timeout=10)
        oip_error(r, 503, "model_unavailable: the model is not available yet")
