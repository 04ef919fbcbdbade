"""The whole S3 batch pipeline on this machine, in one command (``make local-job``):

    python -m handler.local_job [--examples examples] [--model DIR] [--chunk-rows 2]

Starts moto's S3/SQS server on 127.0.0.1 (the ``dev`` extra), creates the bucket (versioned) and
the chunk queue with its dead-letter queue, uploads ``examples/images`` and drops
``examples/challenge_set.csv`` (its image paths rewritten to ``s3://`` URIs) under ``incoming/``.
Then it runs the real handlers in process, on the sample events' shapes, as Lambda would: the
splitter on the S3 put event, a worker per chunk message until the queue is empty (the last one
merges), and ``GET /jobs/{id}`` on the API; it prints the job's status and the scored CSV.
Nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import urllib.parse
from pathlib import Path
from typing import Any

from .invoke import LocalContext

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "events"
BUCKET = "local-123456789012-data"


def _event(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EVENTS / name).read_text(encoding="utf-8"))
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m handler.local_job", description=__doc__.splitlines()[0])
    ap.add_argument("--examples", default=str(ROOT / "examples"), help="directory with challenge_set.csv and images/")
    ap.add_argument("--model", help="model directory (default: CLIP_MODEL_DIR, else the tiny test model)")
    ap.add_argument("--chunk-rows", type=int, default=2, help="rows per chunk (small, so the job has several)")
    args = ap.parse_args(argv)
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        print("moto is not installed: pip install -e '.[dev]' (make test installs it)", file=sys.stderr)
        return 2
    model = args.model or os.environ.get("CLIP_MODEL_DIR", "")
    if not model or not (Path(model) / "config.json").is_file():
        fallback = ROOT / "tests" / "fixtures" / "tiny-clip"
        print(
            f"model directory {model or '(unset)'!r} not found: using the tiny test model {fallback}", file=sys.stderr
        )
        model = str(fallback)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        return _run(f"http://{host}:{port}", Path(args.examples), model, args.chunk_rows)
    finally:
        server.stop()


def _run(endpoint: str, examples: Path, model: str, chunk_rows: int) -> int:
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local",
        AWS_DEFAULT_REGION="us-east-1",
        CLIP_MODEL_DIR=model,
        BUCKET=BUCKET,
        CHUNK_ROWS=str(chunk_rows),
        PRELOAD_MODEL="0",
        POWERTOOLS_TRACE_DISABLED="true",
        POWERTOOLS_LOG_LEVEL=os.environ.get("POWERTOOLS_LOG_LEVEL", "WARNING"),
        ECS_CLUSTER="",
        ECS_TASK_DEFINITION="",
    )
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    from similarity.aws import make_client

    s3, sqs = make_client("s3"), make_client("sqs")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    dlq = sqs.create_queue(QueueName="local-chunks-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(
        QueueName="local-chunks",
        Attributes={
            "VisibilityTimeout": "1800",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}),
        },
    )["QueueUrl"]
    os.environ["CHUNK_QUEUE_URL"] = queue
    print(f"moto on {endpoint}: bucket {BUCKET}, queue {queue}")

    # the examples, with their image paths as s3:// URIs (the services never read local paths)
    for image in sorted((examples / "images").glob("*")):
        s3.put_object(Bucket=BUCKET, Key=f"examples/images/{image.name}", Body=image.read_bytes())
    rows = list(csv.reader(io.StringIO((examples / "challenge_set.csv").read_text(encoding="utf-8"), newline="")))
    url = rows[0].index("url")
    for row in rows[1:]:
        if row and not row[url].startswith(("http://", "https://", "s3://", "data:")):
            row[url] = f"s3://{BUCKET}/examples/{row[url]}"
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows(rows)
    key = "incoming/challenge_set.csv"
    s3.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue().encode())
    head = s3.head_object(Bucket=BUCKET, Key=key)
    print(f"dropped s3://{BUCKET}/{key} ({len(rows) - 1} rows)")

    from . import api, s3_event, worker

    event = _event("s3_put.json")
    record = event["Records"][0]["s3"]
    record["bucket"].update(name=BUCKET, arn=f"arn:aws:s3:::{BUCKET}")
    record["object"].update(
        key=urllib.parse.quote_plus(key, safe="/"),
        eTag=head["ETag"].strip('"'),
        versionId=head["VersionId"],
        size=head["ContentLength"],
    )
    [job] = s3_event.lambda_handler(event, LocalContext(timeout_s=900, function_name="S3EventFunction"))["jobs"]
    print(f"S3EventFunction: job {job['job_id']} {job['state']}, {job['chunks']} chunks of {chunk_rows} rows")

    template = _event("sqs_chunk.json")["Records"][0]
    for _round in range(100):
        messages = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=1, AttributeNames=["All"]).get(
            "Messages", []
        )
        if not messages:
            break
        m = messages[0]
        record = {
            **template,
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "md5OfBody": m["MD5OfBody"],
            "attributes": m.get("Attributes", {}),
        }
        out = worker.lambda_handler({"Records": [record]}, LocalContext(timeout_s=300, function_name="WorkerFunction"))
        chunk = json.loads(m["Body"]).get("chunk")
        if out["batchItemFailures"]:
            print(f"WorkerFunction: chunk {chunk} failed (it comes back; see the log above)")
        else:
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])
            print(f"WorkerFunction: chunk {chunk} done")

    status_event = _event("api_jobs_status.json")
    status_event["rawPath"] = status_event["requestContext"]["http"]["path"] = f"/jobs/{job['job_id']}"
    status_event["pathParameters"] = {"id": job["job_id"]}
    resp = api.lambda_handler(status_event, LocalContext(function_name="ApiFunction"))
    status = json.loads(resp["body"])
    print(f"GET /jobs/{job['job_id']} -> {resp['statusCode']}")
    print(json.dumps(status, indent=2))
    if status.get("state") != "done":
        return 1
    bucket, out_key = status["output"][len("s3://") :].split("/", 1)
    print(f"--- {status['output']}")
    sys.stdout.write(s3.get_object(Bucket=bucket, Key=out_key)["Body"].read().decode("utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
