"""``similarity serve``'s app on Ray Serve (``similarity.engines.ray_serve``), on a local Ray
(num_cpus=2) started only through ``similarity.engines.local.local_ray`` (loopback only, no
cloud-metadata probe) with Serve's proxy on 127.0.0.1: the Lambda API's sample events
(events/api_*.json) posted to Serve answer what the Lambda handler, invoked in-process, answers;
the Open Inference Protocol and /metrics through Serve; one model per replica; every socket of
every Ray process on loopback; and examples/ray_serve.yaml deployed as ``serve run`` deploys a
config file. One ray.init for the module (about a minute on two busy cores: marked slow)."""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from similarity.engines.local import local_ray  # first: it sets Ray's environment before ray is imported

pytest.importorskip("ray.serve", reason="the [ray-serve] extra is not installed")

from handler import runtime
from handler.invoke import LocalContext
from similarity.errors import ConfigError
from support.compare import same
from support.engines import load_records, off_loopback, pids_mentioning, sockets_of
from support.imageserver import png_bytes
from support.shapes import draw

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
EXAMPLES = ROOT / "examples"
BUCKET = "text-image-similarity-dev-123456789012-data"  # the sample events' bucket
SAMPLES = (
    "api_score.json",
    "api_score_invalid.json",
    "api_score_malformed.json",
    "api_jobs_start.json",
    "api_jobs_status.json",
    "api_healthz.json",
    "api_readyz.json",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def env(moto_endpoint, tiny_clip_dir, tmp_path_factory) -> dict[str, str]:
    """What the Lambda and the replicas both read: the tiny model, the guard open to 127.0.0.1,
    the sample events' bucket (with the CSV api_jobs_start.json names) on moto."""
    from similarity.aws import make_client

    s3, sqs = make_client("s3"), make_client("sqs")
    if BUCKET not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=BUCKET)
    rows = "\n".join(f"https://example.invalid/{i}.png,caption {i}" for i in range(5))
    s3.put_object(Bucket=BUCKET, Key="incoming/captions.csv", Body=f"url,caption\n{rows}\n".encode())
    queue = sqs.create_queue(QueueName=f"serve-chunks-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    return {
        "CLIP_MODEL_DIR": str(tiny_clip_dir),
        "SIMILARITY_BACKEND": "torch",
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "SIMILARITY_CACHE": "off",
        "MAX_PAIRS": "8",
        "MAX_BODY_BYTES": "200000",
        "BUCKET": BUCKET,
        "CHUNK_QUEUE_URL": queue,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SERVER_CANARY_INTERVAL": "0",
        "OMP_NUM_THREADS": "1",
        "SIMILARITY_ENGINE_LOAD_LOG": str(tmp_path_factory.mktemp("serve-loads")),
    }


@pytest.fixture(scope="module")
def serve_app(env, monkeypatch_module):
    """examples/ray_serve.py's deployment (two replicas at half a CPU each) on a local Ray."""
    for k, v in env.items():
        monkeypatch_module.setenv(k, v)  # the example hands these to the replicas
    sys.path.insert(0, str(EXAMPLES))
    import ray_serve as example

    with local_ray(2, env=env) as info:
        from ray import serve

        port = free_port()
        args = example.parse(["--model", env["CLIP_MODEL_DIR"], "--replicas", "2", "--num-cpus", "0.5"])
        args.port = port
        url = example.run(args)
        try:
            yield {"url": url, "port": port, "info": info}
        finally:
            serve.shutdown()
    sys.path.remove(str(EXAMPLES))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture
def lam(env, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    runtime.reset()
    import handler.api as mod

    yield mod
    runtime.reset()


def sample(name: str, server) -> dict:
    event = json.loads((EVENTS / name).read_text())
    if name == "api_score.json":  # tests reach loopback only: the sample's web image becomes a local one
        body = json.loads(event["body"])
        image = server.image("/rayserve/cat.png", png_bytes(draw("red", "circle", random.Random(1))))
        for pair in body["pairs"]:
            if pair["image"].startswith("http"):
                pair["image"] = image
        event["body"] = json.dumps(body)
    return event


def lambda_answer(mod, event: dict) -> tuple[int, dict]:
    resp = mod.lambda_handler(event, LocalContext(timeout_s=30))
    return resp["statusCode"], json.loads(resp["body"])


def serve_answer(url: str, event: dict) -> tuple[int, dict]:
    body = event.get("body")
    r = requests.request(
        event["requestContext"]["http"]["method"],
        url + event["rawPath"],
        data=body.encode() if body is not None else None,
        timeout=60,
    )
    return r.status_code, r.json()


def test_sample_events_answer_as_the_lambda_does(serve_app, lam, server) -> None:
    answers = {}
    for name in SAMPLES:
        event = sample(name, server)
        ls, lb = lambda_answer(lam, event)
        ss, sb = serve_answer(serve_app["url"], event)
        assert ls == ss, (name, lb, sb)
        if name == "api_readyz.json":
            assert sb.pop("canary")["drift"] <= 1e-3  # what the server adds
            lb["model"].pop("load_seconds"), sb["model"].pop("load_seconds")
        if name == "api_jobs_start.json":  # the second start finds the first's job, a little older
            lb.pop("elapsed_seconds"), sb.pop("elapsed_seconds")
        same(lb, sb, name)
        answers[name] = ss
    assert answers == {
        "api_score.json": 200,
        "api_score_invalid.json": 400,
        "api_score_malformed.json": 400,
        "api_jobs_start.json": 202,
        "api_jobs_status.json": 404,
        "api_healthz.json": 200,
        "api_readyz.json": 200,
    }


def infer_body(images: list[str], captions: list[str]) -> dict:
    return {
        "inputs": [
            {"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images},
            {"name": "caption", "shape": [len(captions)], "datatype": "BYTES", "data": captions},
        ]
    }


def score_and_infer(url: str, images: list[str], captions: list[str]) -> tuple[list[dict], dict]:
    pairs = [{"image": i, "caption": c} for i, c in zip(images, captions)]
    score = requests.post(url + "/score", json={"pairs": pairs}, timeout=60)
    infer = requests.post(url + "/v2/models/clip/infer", json=infer_body(images, captions), timeout=60)
    assert score.status_code == infer.status_code == 200, (score.text, infer.text)
    return score.json()["results"], {o["name"]: o["data"] for o in infer.json()["outputs"]}


def test_open_inference_protocol_and_metrics_through_serve(serve_app, server) -> None:
    url = serve_app["url"]
    red = server.image("/rayserve/red.png", png_bytes(draw("red", "circle", random.Random(2))))
    images, captions = [red, red, ""], ["a red circle", "a blue square", "x"]
    results, outputs = score_and_infer(url, images, captions)
    same([r["similarity"] for r in results], outputs["similarity"], "similarity")
    assert outputs["error"] == [r["error"] or "" for r in results] and outputs["error"][2].startswith("missing_url")
    assert requests.get(url + "/v2/health/ready", timeout=30).json() == {"ready": True}
    bad = requests.post(url + "/v2/models/clip/infer", json={"inputs": []}, timeout=30)
    assert bad.status_code == 400 and list(bad.json()) == ["error"]
    metrics = requests.get(url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and "similarity_model_info{" in metrics.text  # the replica's own


def test_one_model_per_replica(serve_app, env) -> None:
    from ray import serve

    status = serve.status().applications["similarity"]
    [deployment] = status.deployments.values()
    assert deployment.replica_states == {"RUNNING": 2}
    records = load_records(Path(env["SIMILARITY_ENGINE_LOAD_LOG"]))
    pids = {r["pid"] for r in records if r["model"] == env["CLIP_MODEL_DIR"]}
    assert len(pids) == 2 and os.getpid() not in pids  # in the two replicas, once each
    assert all(r["backend"] == "torch" for r in records)


def test_every_ray_socket_is_on_loopback(serve_app) -> None:
    pids = pids_mentioning(serve_app["info"]["session_dir"])
    socks = sockets_of(pids)
    assert any(s.listening and s.local == ("127.0.0.1", serve_app["port"]) for s in socks)  # Serve's proxy
    assert off_loopback(socks) == []


def test_the_builder_refuses_unknown_args() -> None:
    from similarity.engines.ray_serve import build

    with pytest.raises(ConfigError, match="modell: Extra inputs are not permitted"):
        build({"modell": "x"})


def test_the_config_file_deploys(serve_app, env, server) -> None:
    """examples/ray_serve.yaml through the code ``serve run <config>`` runs (validated, then
    applied by the controller, which imports the builder and builds the app), changed only where
    this machine needs it: the tiny model, one replica at half a CPU, Serve's proxy on loopback,
    and a route prefix, which the app's routes must see through. Runs last: applying a config
    replaces the applications deployed before it."""
    from ray import serve
    from ray.serve._private import api as private_api
    from ray.serve.schema import ServeDeploySchema

    committed = yaml.safe_load((EXAMPLES / "ray_serve.yaml").read_text())
    ServeDeploySchema.model_validate(committed)
    config = copy.deepcopy(committed)
    config["http_options"] = {"host": "127.0.0.1", "port": serve_app["port"]}
    [app] = config["applications"]
    assert app["import_path"] == "similarity.engines.ray_serve:build"
    app["name"], app["route_prefix"], app["args"]["model"] = "from-config", "/cfg", env["CLIP_MODEL_DIR"]
    app["runtime_env"]["env_vars"].update(env)
    [deployment] = app["deployments"]
    deployment["ray_actor_options"]["num_cpus"] = 0.5
    deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    client = private_api.serve_start(http_options=config["http_options"])
    client.deploy_apps(ServeDeploySchema.model_validate(config))
    end = time.monotonic() + 180
    while time.monotonic() < end:
        state = serve.status().applications.get("from-config")
        if state is not None and state.status in ("RUNNING", "DEPLOY_FAILED"):
            break
        time.sleep(1)
    assert state is not None and state.status == "RUNNING", state
    url = f"http://127.0.0.1:{serve_app['port']}/cfg"
    red = server.image("/rayserve/cfg.png", png_bytes(draw("red", "circle", random.Random(3))))
    results, outputs = score_and_infer(url, [red, red], ["a red circle", "a blue square"])
    assert results[0]["similarity"] > results[1]["similarity"]
    same([r["cosine"] for r in results], outputs["cosine"], "cosine")
    assert requests.get(url + "/healthz", timeout=30).json() == {"status": "ok"}
    r = requests.get(url + "/nope", timeout=30)  # the router, behind the prefix, answers the API's 404
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert off_loopback(sockets_of(pids_mentioning(serve_app["info"]["session_dir"]))) == []  # its replica too
