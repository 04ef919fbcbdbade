"""The API and the chunk workers share one Redis (as the template wires them): what one encoded,
the others reuse. Handlers are invoked as Lambda invokes them, each "function" with a fresh
runtime (its own model and Redis connection), against moto's S3/SQS and a real redis-server."""

from __future__ import annotations

import csv
import io
import json
import random
import uuid
from collections import Counter

import pytest

from handler import runtime
from handler.invoke import LocalContext
from similarity.model import ClipModel
from support.conditional import ConditionalImages
from support.imageserver import png_bytes
from support.redis_server import running
from support.shapes import draw

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server():
    yield from running()


@pytest.fixture
def encodes(monkeypatch) -> Counter:
    """How many captions and images went through the towers, whichever function ran them."""
    seen: Counter = Counter()
    texts, images = ClipModel.embed_texts, ClipModel.embed_images

    def embed_texts(self, captions):
        seen.update(captions)
        seen["<captions>"] += len(captions)
        return texts(self, captions)

    def embed_images(self, pixels):
        seen["<images>"] += len(pixels)
        return images(self, pixels)

    monkeypatch.setattr(ClipModel, "embed_texts", embed_texts)
    monkeypatch.setattr(ClipModel, "embed_images", embed_images)
    return seen


@pytest.fixture
def env(monkeypatch, moto_endpoint, tiny_clip_dir, s3, redis_server):
    from similarity.aws import make_client

    sqs = make_client("sqs")
    bucket = f"cache-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=f"chunks-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    for k, v in {
        "CLIP_MODEL_DIR": str(tiny_clip_dir),
        "SIMILARITY_BACKEND": "torch",
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "SIMILARITY_CACHE": redis_server.url,
        "POWERTOOLS_TRACE_DISABLED": "true",
        "BUCKET": bucket,
        "CHUNK_QUEUE_URL": queue,
        "CHUNK_ROWS": "3",
        "PRELOAD_MODEL": "0",
        "WORKER_RESERVE_SECONDS": "5",
        "ECS_CLUSTER": "",
        "ECS_TASK_DEFINITION": "",
    }.items():
        monkeypatch.setenv(k, v)
    runtime.reset()
    import handler.api as api
    import handler.worker as worker

    yield {"s3": s3, "sqs": sqs, "bucket": bucket, "queue": queue, "api": api, "worker": worker}
    runtime.reset()


def _score_via_api(env, pairs: list[dict]) -> list[dict]:
    event = {
        "version": "2.0",
        "routeKey": "POST /score",
        "rawPath": "/score",
        "rawQueryString": "",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/score"}, "requestId": "r1", "stage": "$default"},
        "body": json.dumps({"pairs": pairs}),
        "isBase64Encoded": False,
    }
    resp = env["api"].lambda_handler(event, LocalContext(timeout_s=29))
    assert resp["statusCode"] == 200, resp
    return json.loads(resp["body"])["results"]


def _run_job(env, name: str, rows: list[tuple[str, str]]) -> list[list[str]]:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["url", "caption"])
    w.writerows(rows)
    key = f"incoming/{name}.csv"
    env["s3"].put_object(Bucket=env["bucket"], Key=key, Body=buf.getvalue().encode())
    job = runtime.services().jobs.start(env["bucket"], key)
    while msgs := env["sqs"].receive_message(QueueUrl=env["queue"], MaxNumberOfMessages=10).get("Messages", []):
        for m in msgs:
            runtime.reset()  # every chunk on a fresh worker: only Redis connects them
            record = {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": {"ApproximateReceiveCount": "1"},
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:chunks",
                "awsRegion": "us-east-1",
            }
            resp = env["worker"].lambda_handler({"Records": [record]}, LocalContext(timeout_s=300))
            assert resp["batchItemFailures"] == []
            env["sqs"].delete_message(QueueUrl=env["queue"], ReceiptHandle=m["ReceiptHandle"])
    out = runtime.services().jobs.load(env["bucket"], job.job_id).output
    body = env["s3"].get_object(Bucket=env["bucket"], Key=out.key)["Body"].read().decode()
    return list(csv.reader(io.StringIO(body, newline="")))[1:]


def test_api_and_workers_share_embeddings_through_redis(env, server, encodes, redis_server, capsys) -> None:
    images = ConditionalImages(server)
    red = images.put("/svc/red.png", png_bytes(draw("red", "circle", random.Random(1))))
    blue = images.put("/svc/blue.png", png_bytes(draw("blue", "square", random.Random(2))))
    green = images.put("/svc/green.png", png_bytes(draw("green", "triangle", random.Random(3))))

    api = _score_via_api(env, [{"image": red, "caption": "a red circle"}, {"image": blue, "caption": "a blue square"}])
    assert all(r["error"] is None for r in api)
    assert (encodes["<captions>"], encodes["<images>"]) == (2, 2)
    assert "CacheCaptionMisses" in capsys.readouterr().out  # the API's metrics say what the cache did

    runtime.reset()  # the workers are other functions: nothing in memory is shared
    job1 = _run_job(
        env,
        "one",
        [(red, "a red circle"), (blue, "a blue square"), (green, "a red circle"), (green, "a green triangle")],
    )
    assert [r[-2] for r in job1] == [""] * 4  # no errors
    # Only what the API had not seen went through the towers: the green image and its caption.
    assert (encodes["<captions>"], encodes["<images>"]) == (3, 3)
    assert encodes["a red circle"] == 1 and encodes["a green triangle"] == 1
    assert [float(r[2]) for r in job1[:2]] == [r["similarity"] for r in api]
    assert "CacheImageHits" in capsys.readouterr().out  # the workers publish theirs too

    job2 = _run_job(env, "two", [(green, "a green triangle"), (red, "a blue square"), (blue, "a red circle")])
    assert [r[-2] for r in job2] == [""] * 3
    assert (encodes["<captions>"], encodes["<images>"]) == (3, 3)  # the same captions in a second job: not again
    assert images.statuses().count(200) == 3  # each image downloaded once across all functions
    assert redis_server.client().dbsize() == 3 + 3 + 3  # images, captions, URL records
