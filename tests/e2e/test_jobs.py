"""The batch path end to end against moto's server (S3, SQS, ECS on 127.0.0.1) and the loopback
image server: S3 drop -> split -> SQS -> workers -> ordered merge, under duplicates and failures.

The ``faults`` fixture puts tests/support/faultproxy.py between the handlers' boto3 clients and
moto (500/503, dropped connections before and after moto acts, cut-off bodies); the tests' own
clients talk to moto directly, as an operator's would."""

from __future__ import annotations

import csv
import io
import json
import random
import threading
import urllib.parse
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from handler import runtime
from handler.invoke import LocalContext
from similarity.cli import main as cli_main
from similarity.jobs import ChunkMessage, JobService, Location, MergeBusy, pipeline_scorer
from support.faultproxy import KINDS, FaultProxy
from support.imageserver import png_bytes
from support.moto_ecs import register_instance
from support.shapes import COLOURS, SHAPES, draw
from support.sqs_events import sqs_event

pytestmark = pytest.mark.slow

EVENTS = Path(__file__).resolve().parents[2] / "events"
CHUNK_ROWS = 40


@pytest.fixture
def env(monkeypatch, moto_endpoint, tiny_clip_dir, s3):
    from similarity.aws import make_client

    sqs = make_client("sqs")
    bucket = f"data-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    dlq = sqs.create_queue(QueueName=f"dlq-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    queue = sqs.create_queue(
        QueueName=f"chunks-{uuid.uuid4().hex[:8]}",
        Attributes={
            "VisibilityTimeout": "60",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}),
        },
    )["QueueUrl"]
    for k, v in {
        "CLIP_MODEL_DIR": str(tiny_clip_dir),
        "SIMILARITY_BACKEND": "torch",
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "BUCKET": bucket,
        "CHUNK_QUEUE_URL": queue,
        "CHUNK_ROWS": str(CHUNK_ROWS),
        "PRELOAD_MODEL": "0",
        "WORKER_RESERVE_SECONDS": "5",
        "WORKER_HANDBACK_SECONDS": "1",
        "WORKER_RETRY_SECONDS": "0",
        "ECS_CLUSTER": "",
        "ECS_TASK_DEFINITION": "",
    }.items():
        monkeypatch.setenv(k, v)
    runtime.reset()
    import handler.s3_event as s3_event
    import handler.worker as worker

    yield {"s3": s3, "sqs": sqs, "bucket": bucket, "queue": queue, "dlq": dlq, "s3_event": s3_event, "worker": worker}
    runtime.reset()


def make_csv(server, forbidden_server, rows: int = 230) -> str:
    rng = random.Random(11)
    urls = []
    for i in range(6):
        c, s = list(COLOURS)[i % 4], SHAPES[i % 3]
        urls.append((server.image(f"/jobs/{i}.png", png_bytes(draw(c, s, rng))), f"a {c} {s}"))
    bad = server.status("/jobs/missing.png", 404)
    blocked = forbidden_server.image("/jobs/internal.png", b"x")
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["id", "url", "caption"])
    for i in range(rows):
        url, cap = urls[i % len(urls)]
        kind = i % 23
        if kind == 5:
            url = bad
        elif kind == 7:
            url = blocked
        elif kind == 9:
            cap = f'a caption\nwith a newline, "quotes" and a comma {i}'
        elif kind == 13:
            cap = ""
        w.writerow([str(i), url, cap])
    return buf.getvalue()


def s3_event_for(bucket: str, key: str, head: dict) -> dict:
    event = json.loads((EVENTS / "s3_put.json").read_text())
    obj = event["Records"][0]["s3"]
    obj["bucket"] = {"name": bucket, "arn": f"arn:aws:s3:::{bucket}", "ownerIdentity": {"principalId": "X"}}
    obj["object"].update(
        {
            "key": urllib.parse.quote_plus(key, safe="/"),
            "eTag": head["ETag"].strip('"'),
            "versionId": head.get("VersionId"),
            "size": head["ContentLength"],
        }
    )
    return event


def drop(env, key: str, body: str | bytes) -> dict:
    data = body.encode() if isinstance(body, str) else body
    env["s3"].put_object(Bucket=env["bucket"], Key=key, Body=data)
    head = env["s3"].head_object(Bucket=env["bucket"], Key=key)
    return env["s3_event"].lambda_handler(s3_event_for(env["bucket"], key, head), LocalContext(timeout_s=900))


def receive(env, n: int = 10, queue: str | None = None) -> list[dict]:
    return (
        env["sqs"]
        .receive_message(QueueUrl=queue or env["queue"], MaxNumberOfMessages=n, AttributeNames=["All"])
        .get("Messages", [])
    )


def run_worker(env, messages: list[dict], timeout: float = 300, delete: bool = True, release: bool = True) -> list[str]:
    """As Lambda's SQS event source does: invoke, then delete what succeeded. ``release``: make
    failed messages visible at once (rather than after the delay the worker handed them back for)."""
    resp = env["worker"].lambda_handler(sqs_event(messages), LocalContext(timeout_s=timeout))
    failed = {f["itemIdentifier"] for f in resp["batchItemFailures"]}
    for m in messages:
        if m["MessageId"] in failed:
            if release:
                env["sqs"].change_message_visibility(
                    QueueUrl=env["queue"], ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
                )
        elif delete:
            env["sqs"].delete_message(QueueUrl=env["queue"], ReceiptHandle=m["ReceiptHandle"])
    return sorted(failed)


def drain(env, batch: int = 3, rounds: int = 50) -> None:
    for _ in range(rounds):
        msgs = receive(env, batch)
        if not msgs:
            return
        run_worker(env, msgs)
    raise AssertionError("queue did not drain")


def output_rows(env, key: str) -> list[list[str]]:
    body = env["s3"].get_object(Bucket=env["bucket"], Key=key)["Body"].read().decode()
    return list(csv.reader(io.StringIO(body, newline="")))


def cli_rows(tmp_path, tiny_clip_dir, body: str) -> list[list[str]]:
    inp = tmp_path / "same.csv"
    inp.write_text(body, encoding="utf-8", newline="")
    out = tmp_path / "same_scored.csv"
    assert (
        cli_main(
            [
                "score",
                str(inp),
                "-o",
                str(out),
                "--model",
                str(tiny_clip_dir),
                "--backend",
                "torch",
                "--allow-network",
                "127.0.0.1/32",
                "--no-progress",
                "--no-local-paths",
            ]
        )
        == 0
    )
    return list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"), newline="")))


def job_status(env, job_id: str) -> dict:
    return runtime.services().jobs.status(env["bucket"], job_id)


def test_end_to_end_matches_cli(env, server, forbidden_server, tmp_path, tiny_clip_dir) -> None:
    body = make_csv(server, forbidden_server)
    key = "incoming/batch one+é.csv"  # space, plus and unicode survive the URL-encoded event
    out = drop(env, key, body)
    [job] = out["jobs"]
    assert job["state"] == "running" and job["rows"] == 230 and job["chunks"] == 6
    st = job_status(env, job["job_id"])
    assert st["chunks"] == {"done": 0, "total": 6}
    run_worker(env, receive(env, 3))
    jobs = runtime.services().jobs
    m = jobs.load(env["bucket"], job["job_id"])
    done = jobs.store.read_markers(m, jobs.store.done_keys(m))
    st = job_status(env, job["job_id"])  # mid-way: rows done follow from the chunks done
    assert st["state"] == "running" and st["chunks"]["done"] == len(done) == 3
    assert st["rows"]["done"] == sum(d.rows for d in done)
    drain(env)
    rows = output_rows(env, "scored/batch one+é_scored.csv")
    assert rows == cli_rows(tmp_path, tiny_clip_dir, body)  # same rows, same order, same scores
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(230)]
    errors = {r[5].split(":")[0] for r in rows[1:] if r[5]}
    assert errors == {"http_404", "blocked_address", "missing_caption"}
    assert forbidden_server.hits["/jobs/internal.png"] == 0
    st = job_status(env, job["job_id"])
    assert st["state"] == "done" and st["rows"] == {"done": 230, "total": 230}
    assert st["chunks"] == {"done": 6, "total": 6} and st["errors"]["http_404"] == 10
    assert st["estimated_cost_usd"] > 0 and st["elapsed_seconds"] > 0


@pytest.mark.parametrize("excel_safe", [False, True])
def test_s3_path_writes_the_clis_bytes(
    env, server, forbidden_server, tmp_path, tiny_clip_dir, monkeypatch, excel_safe
) -> None:
    """The same input gives the same output file, byte for byte, through the CLI and through the
    S3 drop, with formula-like cells (escaped or not) in the header and the rows."""
    rng = random.Random(5)
    url = server.image("/jobs/xl.png", png_bytes(draw("red", "circle", rng)))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["@note", "url", "caption"])
    for i in range(90):
        w.writerow([["=1+1", "+cmd", "-2", "@SUM(A1)", "plain"][i % 5], url, ["=HYPERLINK(x)", "a red circle"][i % 2]])
    body = buf.getvalue()
    if excel_safe:
        monkeypatch.setenv("SIMILARITY_EXCEL_SAFE", "1")  # the deployment's setting, read by the splitter
        runtime.reset()
    [job] = drop(env, "incoming/formulas.csv", body)["jobs"]
    assert job["chunks"] == 3
    drain(env)
    s3_bytes = env["s3"].get_object(Bucket=env["bucket"], Key="scored/formulas_scored.csv")["Body"].read()
    inp, out = tmp_path / "formulas.csv", tmp_path / "formulas_scored.csv"
    inp.write_text(body, encoding="utf-8", newline="")
    args = [
        "score",
        str(inp),
        "-o",
        str(out),
        "--model",
        str(tiny_clip_dir),
        "--backend",
        "torch",
        "--allow-network",
        "127.0.0.1/32",
        "--no-progress",
        "--no-local-paths",
    ]
    assert cli_main(args + (["--excel-safe"] if excel_safe else [])) == 0
    assert s3_bytes == out.read_bytes()
    assert s3_bytes.startswith(b"'@note," if excel_safe else b"@note,")


@pytest.mark.parametrize("field", [None, False, True])
def test_post_jobs_excel_safe_defaults_to_the_deployments_setting(env, server, monkeypatch, field) -> None:
    """POST /jobs without ``excel_safe`` follows SIMILARITY_EXCEL_SAFE, as an S3 drop does; the
    field, when given, decides."""
    import handler.api as api

    monkeypatch.setenv("SIMILARITY_EXCEL_SAFE", "1")
    runtime.reset()
    url = server.image("/jobs/xl-api.png", png_bytes(draw("red", "circle", random.Random(6))))
    b = env["bucket"]
    env["s3"].put_object(Bucket=b, Key="uploads/xl.csv", Body=f"@note,url,caption\n=1+1,{url},a red circle\n".encode())
    req = {"input": f"s3://{b}/uploads/xl.csv", "output": f"s3://{b}/results/xl-{field}.csv"}
    if field is not None:
        req["excel_safe"] = field
    status, out = _api_call(api, "api_jobs_start.json", req)
    assert status == 202, out
    drain(env)
    data = env["s3"].get_object(Bucket=b, Key=f"results/xl-{field}.csv")["Body"].read()
    assert data.startswith(b"@note," if field is False else b"'@note,"), data[:40]


def test_duplicate_deliveries_and_lost_deletes(env, server, forbidden_server, tmp_path, tiny_clip_dir) -> None:
    body = make_csv(server, forbidden_server, rows=120)
    [job] = drop(env, "incoming/dupes.csv", body)["jobs"]
    # the same S3 event again: same job, no new messages
    head = env["s3"].head_object(Bucket=env["bucket"], Key="incoming/dupes.csv")
    again = env["s3_event"].lambda_handler(s3_event_for(env["bucket"], "incoming/dupes.csv", head), LocalContext())
    assert again["jobs"][0]["job_id"] == job["job_id"]
    # a chunk delivered twice
    env["sqs"].send_message(
        QueueUrl=env["queue"],
        MessageBody=ChunkMessage(job_id=job["job_id"], bucket=env["bucket"], chunk=1, chunks=3).model_dump_json(),
    )
    # a worker that writes its part and then dies before the message is deleted
    first = receive(env, 1)
    run_worker(env, first, delete=False)
    env["sqs"].change_message_visibility(
        QueueUrl=env["queue"], ReceiptHandle=first[0]["ReceiptHandle"], VisibilityTimeout=0
    )
    drain(env)
    rows = output_rows(env, "scored/dupes_scored.csv")
    assert rows == cli_rows(tmp_path, tiny_clip_dir, body)
    assert len(rows) == 121  # every row once


def test_two_workers_finishing_last_at_once(env, server, forbidden_server, tmp_path, tiny_clip_dir) -> None:
    body = make_csv(server, forbidden_server, rows=80)  # two chunks
    [job] = drop(env, "incoming/race.csv", body)["jobs"]
    msgs = receive(env, 10)
    assert len(msgs) == 2
    jobs = runtime.services().jobs
    model, fetcher = runtime.services().run.model, runtime.services().run.fetcher
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def work(m: dict) -> None:
        msg = ChunkMessage.model_validate_json(m["Body"])
        barrier.wait()
        try:
            results[msg.chunk] = jobs.process_chunk(msg, pipeline_scorer(model, fetcher), m["MessageId"], lambda: 300.0)
        except MergeBusy as exc:  # the other one is merging: this message must come back, not be acked
            results[msg.chunk] = exc

    threads = [threading.Thread(target=work, args=(m,)) for m in msgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert output_rows(env, "scored/race_scored.csv") == cli_rows(tmp_path, tiny_clip_dir, body)
    assert job_status(env, job["job_id"])["state"] == "done"
    # one merged; the other finished first (False), saw the job done (True) or found the lock held
    assert True in results.values() and all(isinstance(r, (bool, MergeBusy)) for r in results.values())
    # the lock lets exactly one concurrent merger through; its holder may take it again
    m = jobs.load(env["bucket"], job["job_id"])
    env["s3"].delete_object(Bucket=env["bucket"], Key=f"{jobs.store.prefix(m.job_id)}merge.lock")
    assert jobs.take_lock(m, "a", ttl=60)
    with pytest.raises(MergeBusy):
        jobs.take_lock(m, "b", ttl=60)
    assert jobs.take_lock(m, "a", ttl=60)


def test_a_record_without_attributes_is_still_scored(env, server, forbidden_server) -> None:
    """Lambda always sends ApproximateReceiveCount; a hand-made event (sam local, a replay tool)
    may not, and its chunk is scored all the same instead of failing on every delivery."""
    [job] = drop(env, "incoming/bare.csv", make_csv(server, forbidden_server, rows=10))["jobs"]
    msgs = receive(env, 10)
    for m in msgs:
        m.pop("Attributes", None)
    assert msgs and run_worker(env, msgs) == []
    assert job_status(env, job["job_id"])["state"] == "done"


def test_worker_near_deadline_hands_chunk_back(env, server, forbidden_server) -> None:
    body = make_csv(server, forbidden_server, rows=30)
    [job] = drop(env, "incoming/late.csv", body)["jobs"]
    msgs = receive(env, 1)
    failed = run_worker(env, msgs, timeout=3)  # less than the 5 s reserve
    assert failed == [msgs[0]["MessageId"]]
    jobs = runtime.services().jobs
    listed = env["s3"].list_objects_v2(Bucket=env["bucket"], Prefix=f"{jobs.store.prefix(job['job_id'])}parts/")
    assert listed.get("KeyCount", 0) == 0  # never half-written
    drain(env)
    assert len(output_rows(env, "scored/late_scored.csv")) == 31


def test_poison_message_goes_to_dlq(env) -> None:
    env["sqs"].send_message(QueueUrl=env["queue"], MessageBody="this is not a chunk")
    env["sqs"].send_message(
        QueueUrl=env["queue"],
        MessageBody=json.dumps({"job_id": "nope", "bucket": env["bucket"], "chunk": 0, "chunks": 1}),
    )
    for _ in range(4):
        msgs = receive(env, 10)
        if msgs:
            assert len(run_worker(env, msgs)) == len(msgs)  # each one reported, none crashes the batch
    assert receive(env, 10) == []
    dead = receive(env, 10, queue=env["dlq"])
    assert sorted(m["Body"][:4] for m in dead) == ["this", '{"jo']


def test_partial_batch_one_good_one_poison(env, server, forbidden_server) -> None:
    body = make_csv(server, forbidden_server, rows=20)
    drop(env, "incoming/mixed.csv", body)
    good = receive(env, 1)
    env["sqs"].send_message(QueueUrl=env["queue"], MessageBody="garbage")
    bad = receive(env, 1)
    failed = run_worker(env, good + bad)
    assert failed == [bad[0]["MessageId"]]
    assert len(output_rows(env, "scored/mixed_scored.csv")) == 21


@pytest.mark.parametrize(
    ("name", "body", "state", "reason"),
    [
        ("empty.csv", "", "failed", "empty"),
        ("header-only.csv", "url,caption\r\n", "done", None),
        ("no-url.csv", "link,caption\nx,y\n", "failed", "no image URL column"),
    ],
)
def test_degenerate_inputs(env, name, body, state, reason) -> None:
    [job] = drop(env, f"incoming/{name}", body)["jobs"]
    assert job["state"] == state
    assert (reason is None and job["reason"] is None) or reason in job["reason"]
    assert receive(env, 10) == []
    if state == "done":
        assert output_rows(env, f"scored/{name[:-4]}_scored.csv") == [
            ["url", "caption", "similarity", "cosine", "error", "truncated"]
        ]
    st = job_status(env, job["job_id"])
    assert st["state"] == state and (reason is None or reason in st["reason"])


def test_objects_outside_prefix_are_ignored(env) -> None:
    env["s3"].put_object(Bucket=env["bucket"], Key="scored/x_scored.csv", Body=b"url,caption\n")
    head = env["s3"].head_object(Bucket=env["bucket"], Key="scored/x_scored.csv")
    out = env["s3_event"].lambda_handler(s3_event_for(env["bucket"], "scored/x_scored.csv", head), LocalContext())
    assert out == {"jobs": []}


@pytest.fixture
def gpu(env, monkeypatch):
    """ECS on moto: a cluster with a registered GPU instance and the task definition; the
    splitter sends files over 50 rows there."""
    from similarity.aws import make_client

    ecs, ec2 = make_client("ecs"), make_client("ec2")
    cluster = ecs.create_cluster(clusterName=f"gpu-{uuid.uuid4().hex[:6]}")["cluster"]["clusterName"]
    register_instance(ecs, ec2, cluster)
    td = ecs.register_task_definition(
        family="gpu",
        networkMode="awsvpc",
        requiresCompatibilities=["EC2"],
        containerDefinitions=[
            {"name": "scorer", "image": "x", "memory": 512, "resourceRequirements": [{"type": "GPU", "value": "1"}]}
        ],
    )["taskDefinition"]["taskDefinitionArn"]
    monkeypatch.setenv("ECS_CLUSTER", cluster)
    monkeypatch.setenv("ECS_TASK_DEFINITION", td)
    subnets = [x["SubnetId"] for x in ec2.describe_subnets()["Subnets"][:2]]
    sg = ec2.describe_security_groups()["SecurityGroups"][0]["GroupId"]
    monkeypatch.setenv("ECS_SUBNETS", ",".join(subnets))
    monkeypatch.setenv("ECS_SECURITY_GROUPS", sg)
    monkeypatch.setenv("GPU_MIN_ROWS", "50")
    runtime.reset()
    return {"ecs": ecs, "cluster": cluster, "td": td}


def test_large_file_routes_to_gpu_and_gpu_task_matches_lambda(
    env, gpu, server, forbidden_server, tmp_path, tiny_clip_dir
) -> None:
    ecs, cluster, td = gpu["ecs"], gpu["cluster"], gpu["td"]
    body = make_csv(server, forbidden_server, rows=90)
    [job] = drop(env, "incoming/huge.csv", body)["jobs"]
    assert job["state"] == "gpu" and job["path"] == "gpu"
    assert receive(env, 10) == []  # nothing fanned out
    # Nothing split either (before: the chunks of the first 50 rows, never read), and the status
    # counts the rows seen before the GPU path was chosen (before: 0 rows in total until done).
    chunks = env["s3"].list_objects_v2(Bucket=env["bucket"], Prefix=f"jobs/{job['job_id']}/chunks/")
    assert chunks["KeyCount"] == 0
    st = job_status(env, job["job_id"])
    assert st["state"] == "gpu" and st["rows"]["done"] == 0 and 50 < st["rows"]["total"] <= 90, st
    [task] = ecs.describe_tasks(cluster=cluster, tasks=ecs.list_tasks(cluster=cluster)["taskArns"])["tasks"]
    assert task["startedBy"] == f"job-{job['job_id']}"[:36]
    assert task["taskDefinitionArn"] == td
    [override] = task["overrides"]["containerOverrides"]
    assert override["name"] == "scorer"
    cmd = override["command"]
    assert cmd[cmd.index("--input-key") + 1] == "incoming/huge.csv"
    assert cmd[cmd.index("--output-key") + 1] == "scored/huge_scored.csv"
    # the GPU entry point, on CPU here, with the arguments RunTask carried
    from handler.gpu_task import main as gpu_main

    assert gpu_main(cmd) == 0
    rows = output_rows(env, "scored/huge_scored.csv")
    assert rows == cli_rows(tmp_path, tiny_clip_dir, body)
    st = job_status(env, job["job_id"])
    assert st["state"] == "done" and st["rows"] == {"done": 90, "total": 90}


def _api_call(mod, name: str, body: dict | None = None, job_id: str | None = None) -> tuple[int, dict]:
    event = json.loads((EVENTS / name).read_text())
    if body is not None:
        event["body"] = json.dumps(body)
    if job_id is not None:
        event["rawPath"] = event["requestContext"]["http"]["path"] = f"/jobs/{job_id}"
        event["pathParameters"] = {"id": job_id}
    resp = mod.lambda_handler(event, LocalContext())
    return resp["statusCode"], json.loads(resp["body"])


def test_jobs_api_start_and_status(env, server, forbidden_server, monkeypatch) -> None:
    import handler.api as api

    body = make_csv(server, forbidden_server, rows=50)
    env["s3"].put_object(Bucket=env["bucket"], Key="uploads/already-there.csv", Body=body.encode())
    b = env["bucket"]
    status, out = _api_call(
        api,
        "api_jobs_start.json",
        {"input": f"s3://{b}/uploads/already-there.csv", "output": f"s3://{b}/results/x.csv"},
    )
    assert status == 202 and out["state"] == "running" and out["chunks"] == {"done": 0, "total": 2}
    drain(env)
    status, st = _api_call(api, "api_jobs_status.json", job_id=out["job_id"])
    assert status == 200 and st["state"] == "done" and st["rows"] == {"done": 50, "total": 50}
    assert len(output_rows(env, "results/x.csv")) == 51
    assert _api_call(api, "api_jobs_status.json", job_id="0" * 20)[0] == 404
    assert _api_call(api, "api_jobs_status.json", job_id="../etc")[0] in (400, 404)
    assert _api_call(api, "api_jobs_start.json", {"input": "s3://other-bucket/a.csv"})[0] == 400
    assert (
        _api_call(
            api,
            "api_jobs_start.json",
            {"input": f"s3://{b}/uploads/already-there.csv", "output": f"s3://{b}/incoming/loop.csv"},
        )[0]
        == 400
    )
    assert _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/uploads/missing.csv"})[0] == 404
    assert _api_call(api, "api_jobs_start.json", {"input": "not-a-uri"})[0] == 400
    # found by the schema fuzzer: a key that urlsplit emptied ("?" read as a query), and none at all
    fuzzed = {"output": "s3://y3m/?\u00a3\u0080\u00fa\U000ea369", "input": "s3://03zgm-kr21i/\u001d`"}
    assert _api_call(api, "api_jobs_start.json", fuzzed)[0] == 400
    assert _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}//"})[0] == 400


# ------------------------------------------------------------------------------ faults between boto3 and moto
@pytest.fixture
def faults(env, moto_endpoint, monkeypatch):
    """The handlers' clients go through the fault proxy. botocore's waits between its retries (up
    to 20 s) are cut to 10 ms: what is tested is what happens when botocore gives up or cannot
    help (a body cut off), not its waiting."""
    from botocore.retries import standard

    monkeypatch.setattr(standard.ExponentialBackoff, "delay_amount", lambda self, context: 0.01)
    proxy = FaultProxy(moto_endpoint, seed=7).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    runtime.reset()
    yield proxy
    proxy.stop()
    runtime.reset()


def as_lambda_retries(fn, attempts: int = 3):
    """An async invocation as Lambda runs it: the event again after an error, three tries in all."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def drain_until_done(env, job_id: str, rounds: int = 300) -> None:
    for _ in range(rounds):
        st = job_status(env, job_id)
        if st["state"] in ("done", "failed"):
            return
        msgs = receive(env, 3)
        if msgs:
            run_worker(env, msgs)
    raise AssertionError(f"job {job_id} did not finish: {job_status(env, job_id)}")


def redrive(env) -> int:
    """What `aws sqs start-message-move-task --source-arn <dlq-arn>` does (moto does not implement
    it): each dead-lettered message is sent back to its source queue, as a new message with a new
    message id, and deleted from the DLQ."""
    moved = 0
    while True:
        msgs = receive(env, 10, queue=env["dlq"])
        if not msgs:
            return moved
        for m in msgs:
            env["sqs"].send_message(QueueUrl=env["queue"], MessageBody=m["Body"])
            env["sqs"].delete_message(QueueUrl=env["dlq"], ReceiptHandle=m["ReceiptHandle"])
            moved += 1


def queued(env, queue: str | None = None) -> int:
    attrs = env["sqs"].get_queue_attributes(
        QueueUrl=queue or env["queue"],
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def cli_bytes(tmp_path, tiny_clip_dir, body: str) -> bytes:
    cli_rows(tmp_path, tiny_clip_dir, body)
    return (tmp_path / "same_scored.csv").read_bytes()


def test_job_through_injected_faults_writes_the_clis_bytes(
    env, faults, server, forbidden_server, tmp_path, tiny_clip_dir, monkeypatch
) -> None:
    """A job of 2,000 rows with one request in ten failing (500, 503, connections dropped before
    and after moto acts, bodies cut off half-way) gives the CLI's output byte for byte."""
    monkeypatch.setenv("CHUNK_ROWS", "200")
    runtime.reset()
    body = make_csv(server, forbidden_server, rows=2000)
    faults.configure(0.1)
    [job] = as_lambda_retries(lambda: drop(env, "incoming/faulty.csv", body))["jobs"]
    drain_until_done(env, job["job_id"])
    faults.off()
    st = job_status(env, job["job_id"])
    assert st["state"] == "done" and st["rows"] == {"done": 2000, "total": 2000} and st["chunks"]["total"] == 10
    s3_bytes = env["s3"].get_object(Bucket=env["bucket"], Key="scored/faulty_scored.csv")["Body"].read()
    assert s3_bytes == cli_bytes(tmp_path, tiny_clip_dir, body)
    assert all(faults.stats[k] > 0 for k in KINDS), faults.stats  # every kind of fault happened
    assert queued(env) == 0 and queued(env, env["dlq"]) == 0


def test_fan_out_failing_midway_is_sent_again_by_lambdas_retry(env, faults, server, forbidden_server) -> None:
    """A1: the second SendMessageBatch fails on every botocore attempt. The job is not counted as
    fanned out; Lambda's retry of the S3 event sends every message (workers are idempotent)."""
    body = make_csv(server, forbidden_server, rows=500)  # 13 chunks: two batches of messages
    second_batch = lambda m, p, h, b: h.get("x-amz-target", "").endswith(".SendMessageBatch") and b'"Id": "10"' in b  # noqa: E731
    faults.configure(1.0, ["500"], match=second_batch)
    env["s3"].put_object(Bucket=env["bucket"], Key="incoming/fanout.csv", Body=body.encode())
    head = env["s3"].head_object(Bucket=env["bucket"], Key="incoming/fanout.csv")
    event = s3_event_for(env["bucket"], "incoming/fanout.csv", head)
    with pytest.raises(ClientError):
        env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))
    assert queued(env) == 10
    job_id = JobService.job_id_for(
        Location(bucket=env["bucket"], key="incoming/fanout.csv", version_id=head["VersionId"])
    )
    assert job_status(env, job_id)["state"] == "running"
    faults.off()
    [again] = env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))["jobs"]  # Lambda's retry
    assert again["job_id"] == job_id and queued(env) == 23  # all 13 again (10 duplicates)
    drain_until_done(env, job_id)
    assert job_status(env, job_id)["state"] == "done"
    assert len(output_rows(env, "scored/fanout_scored.csv")) == 501


def test_redriven_merge_message_completes_the_job_right_after_the_redrive(
    env, faults, server, forbidden_server, tmp_path, tiny_clip_dir
) -> None:
    """A2: every read of one part is cut off, so the message that should merge fails on each
    receive and dead-letters. After the cause is fixed, the README's redrive sends it back with a
    new message id; the first delivery completes the job."""
    body = make_csv(server, forbidden_server, rows=80)  # two chunks
    [job] = drop(env, "incoming/redrive.csv", body)["jobs"]
    faults.configure(1.0, ["cut_body"], match=lambda m, p, h, b: "parts/part-00001" in p)
    for _ in range(10):
        msgs = receive(env, 10)
        if not msgs and queued(env) == 0:
            break
        run_worker(env, msgs)
    assert queued(env) == 0 and queued(env, env["dlq"]) == 1
    assert job_status(env, job["job_id"])["state"] == "merging"
    faults.off()  # the cause is fixed
    assert redrive(env) == 1
    msgs = receive(env, 10)
    assert len(msgs) == 1 and run_worker(env, msgs) == []
    assert job_status(env, job["job_id"])["state"] == "done"
    assert output_rows(env, "scored/redrive_scored.csv") == cli_rows(tmp_path, tiny_clip_dir, body)


def test_output_written_but_done_write_failing_is_finished_by_the_retry(env, faults, server, forbidden_server) -> None:
    """A3: the output is complete, then every try of the manifest write that marks the job done
    fails. The message comes back and the retry writes only the manifest, not the output again."""
    body = make_csv(server, forbidden_server, rows=80)
    [job] = drop(env, "incoming/final.csv", body)["jobs"]
    out_path = "/scored/final_scored.csv"

    def after_output(m: str, p: str, h: dict, b: bytes) -> bool:
        written = any(r[0] == "PUT" and out_path in r[1] and r[2] == "passed" for r in faults.requests)
        return m == "PUT" and p.endswith("/manifest.json") and written

    faults.configure(1.0, ["500"], match=after_output)
    msgs = receive(env, 10)
    assert len(msgs) == 2 and len(run_worker(env, msgs)) == 1  # the merging message failed
    assert job_status(env, job["job_id"])["state"] == "merging"
    faults.off()
    drain_until_done(env, job["job_id"])
    assert job_status(env, job["job_id"])["state"] == "done"
    uploads = [r for r in faults.requests if r[0] in ("PUT", "POST") and out_path in r[1] and r[2] == "passed"]
    assert len(uploads) == 1, uploads
    assert len(output_rows(env, "scored/final_scored.csv")) == 81


def test_latin1_file_fails_the_job_with_the_reason(env) -> None:
    """A4: a file that is not UTF-8 fails its job at the first attempt, with the reason, instead
    of raising on every attempt and staying 'splitting'."""
    body = "id,url,caption\n1,https://img.example/a.png,caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1")
    [job] = drop(env, "incoming/latin1.csv", body)["jobs"]
    assert job["state"] == "failed" and job["reason"].startswith(
        "bad_encoding: the input is not valid utf-8 at byte 46 "
    )
    assert receive(env, 10) == []
    import handler.api as api

    status, st = _api_call(api, "api_jobs_status.json", job_id=job["job_id"])
    assert status == 200 and st["state"] == "failed" and st["reason"] == job["reason"]


def test_unclosed_quote_fails_the_job_as_malformed_csv(env) -> None:
    """B6 in the S3 path: a quote left open to the end of the file would swallow the rest of it
    into one caption; the job fails with the line, as the CLI exits 2, and sends no chunk."""
    body = b'id,url,caption\n1,https://img.example/a.png,"a red circle\n2,https://img.example/b.png,a square\n'
    [job] = drop(env, "incoming/unclosed.csv", body)["jobs"]
    assert job["state"] == "failed" and job["reason"].startswith("malformed_csv: "), job
    assert "line 2" in job["reason"], job["reason"]
    assert receive(env, 10) == []


def test_split_raising_on_every_attempt_fails_the_job_on_lambdas_last_retry(env, faults) -> None:
    """A4, any cause: the source cannot be read (here every GET of it fails). The first two
    invocations raise for Lambda to retry; the third fails the job with the error as its reason."""
    env["s3"].put_object(Bucket=env["bucket"], Key="incoming/unreadable.csv", Body=b"url,caption\nx,y\n")
    head = env["s3"].head_object(Bucket=env["bucket"], Key="incoming/unreadable.csv")
    event = s3_event_for(env["bucket"], "incoming/unreadable.csv", head)
    faults.configure(1.0, ["503"], match=lambda m, p, h, b: m == "GET" and "/incoming/unreadable.csv" in p)
    for _ in range(2):
        with pytest.raises(ClientError):
            env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))
    [job] = env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))["jobs"]
    assert job["state"] == "failed" and "start_failed" in job["reason"] and "SlowDown" in job["reason"]
    assert job_status(env, job["job_id"])["reason"] == job["reason"]


def test_chunk_handed_back_at_the_deadline_is_visible_again_within_seconds(env, server, forbidden_server) -> None:
    """Item 5: the worker shortens the message's visibility (WORKER_HANDBACK_SECONDS, 1 s here)
    instead of leaving it for the queue's whole visibility timeout (60 s here, 30 min deployed)."""
    import time

    drop(env, "incoming/handback.csv", make_csv(server, forbidden_server, rows=10))
    msgs = receive(env, 1)
    assert run_worker(env, msgs, timeout=3, release=False) == [msgs[0]["MessageId"]]
    assert receive(env, 1) == []
    time.sleep(1.5)
    again = receive(env, 1)
    assert [m["MessageId"] for m in again] == [msgs[0]["MessageId"]]


def test_a_failed_message_logs_its_cause(env, server, forbidden_server, monkeypatch) -> None:
    """A worker whose calls fail (here: no credentials at all) reports the message failed and
    logs why, instead of an empty batchItemFailures entry and nothing in the log."""
    import logging

    from handler.observability import logger

    [job] = drop(env, "incoming/nocreds.csv", make_csv(server, forbidden_server, rows=10))["jobs"]
    msgs = receive(env, 1)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    runtime.reset()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    logging.getLogger(logger.name).addHandler(keep)  # the powertools logger's own std logger
    try:
        assert run_worker(env, msgs) == [msgs[0]["MessageId"]]
    finally:
        logging.getLogger(logger.name).removeHandler(keep)
    [failure] = [r for r in records if r.getMessage() == "chunk failed"]
    assert failure.levelno == logging.ERROR and "NoCredentialsError" in failure.error
    assert failure.exc_info is not None and failure.exc_info[0].__name__ == "NoCredentialsError"  # with the traceback
    assert failure.job_id == job["job_id"] and failure.message_id == msgs[0]["MessageId"]


def test_sample_events_chain() -> None:
    """events/: the S3 put, the SQS message its job sends first, and the status request all name
    the same job (the id derives from the bucket, the key and the version in the put)."""
    put = json.loads((EVENTS / "s3_put.json").read_text())["Records"][0]["s3"]
    key = urllib.parse.unquote_plus(put["object"]["key"])
    job_id = JobService.job_id_for(
        Location(bucket=put["bucket"]["name"], key=key, version_id=put["object"]["versionId"])
    )
    msg = ChunkMessage.model_validate_json(json.loads((EVENTS / "sqs_chunk.json").read_text())["Records"][0]["body"])
    assert (msg.job_id, msg.bucket, msg.chunk) == (job_id, put["bucket"]["name"], 0)
    status = json.loads((EVENTS / "api_jobs_status.json").read_text())
    assert status["pathParameters"]["id"] == job_id and status["rawPath"] == f"/jobs/{job_id}"
    stopped = json.loads((EVENTS / "ecs_task_stopped.json").read_text())["detail"]
    assert stopped["startedBy"] == f"job-{job_id}"[:36]


def test_local_job_runs_the_whole_pipeline_in_one_command(tmp_path) -> None:
    """`make local-job` (python -m handler.local_job): its own moto server, the examples dropped,
    split, workers and merge, then the status and the output."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["CLIP_MODEL_DIR"] = str(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-clip")
    r = subprocess.run(
        [sys.executable, "-m", "handler.local_job"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert '"state": "done"' in out and '"rows": {\n    "done": 12,\n    "total": 12' in out
    scored = out.split("--- s3://local-123456789012-data/scored/challenge_set_scored.csv\n", 1)[1]
    rows = list(csv.reader(io.StringIO(scored, newline="")))
    assert rows[0] == ["url", "caption", "similarity", "cosine", "error", "truncated"] and len(rows) == 13
    assert rows[1][0] == "s3://local-123456789012-data/examples/images/red_circle.png" and rows[1][2]


def test_crashed_gpu_task_fails_the_job_and_the_status_api_shows_it(env, gpu, server, forbidden_server) -> None:
    """Item 6: the GPU task dies (here: OOM-killed, exit 137). The ECS task state change (the real
    event shape, events/ecs_task_stopped.json) fails the job with the reason; GET /jobs/{id} says so."""
    import handler.api as api
    import handler.task_stopped as task_stopped

    [job] = drop(env, "incoming/crash.csv", make_csv(server, forbidden_server, rows=90))["jobs"]
    assert job["state"] == "gpu"
    [task] = gpu["ecs"].describe_tasks(
        cluster=gpu["cluster"], tasks=gpu["ecs"].list_tasks(cluster=gpu["cluster"])["taskArns"]
    )["tasks"]
    event = json.loads((EVENTS / "ecs_task_stopped.json").read_text())
    detail = event["detail"]
    detail.update(
        taskArn=task["taskArn"], clusterArn=task["clusterArn"], startedBy=task["startedBy"], overrides=task["overrides"]
    )
    out = task_stopped.lambda_handler(event, LocalContext())
    assert out["state"] == "failed"
    status, st = _api_call(api, "api_jobs_status.json", job_id=job["job_id"])
    assert status == 200 and st["state"] == "failed"
    assert (
        st["reason"].startswith("gpu_task_failed:")
        and "exit 137" in st["reason"]
        and "OutOfMemoryError" in st["reason"]
    )
    again = task_stopped.lambda_handler(event, LocalContext())  # EventBridge delivers at least once
    assert again["reason"] == out["reason"]


def test_gpu_task_that_finished_is_left_alone_by_its_stopped_event(env, gpu, server, forbidden_server) -> None:
    import handler.task_stopped as task_stopped
    from handler.gpu_task import main as gpu_main

    [job] = drop(env, "incoming/fine.csv", make_csv(server, forbidden_server, rows=90))["jobs"]
    [task] = gpu["ecs"].describe_tasks(
        cluster=gpu["cluster"], tasks=gpu["ecs"].list_tasks(cluster=gpu["cluster"])["taskArns"]
    )["tasks"]
    assert gpu_main(task["overrides"]["containerOverrides"][0]["command"]) == 0
    event = json.loads((EVENTS / "ecs_task_stopped.json").read_text())
    event["detail"].update(taskArn=task["taskArn"], startedBy=task["startedBy"], overrides=task["overrides"])
    for c in event["detail"]["containers"]:
        c.update(exitCode=0, reason=None)
    assert task_stopped.lambda_handler(event, LocalContext())["state"] == "done"


def test_splitter_reads_the_version_the_event_names(env, server, forbidden_server, tmp_path, tiny_clip_dir) -> None:
    """Item 4: the file is overwritten before the splitter runs; the job still scores the version
    its event names (the versioned bucket keeps it), never a mix or the newer upload."""
    first = make_csv(server, forbidden_server, rows=30)
    env["s3"].put_object(Bucket=env["bucket"], Key="incoming/moving.csv", Body=first.encode())
    head = env["s3"].head_object(Bucket=env["bucket"], Key="incoming/moving.csv")
    event = s3_event_for(env["bucket"], "incoming/moving.csv", head)
    env["s3"].put_object(
        Bucket=env["bucket"], Key="incoming/moving.csv", Body=make_csv(server, forbidden_server, rows=90).encode()
    )
    [job] = env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))["jobs"]
    assert job["rows"] == 30
    drain(env)
    assert output_rows(env, "scored/moving_scored.csv") == cli_rows(tmp_path, tiny_clip_dir, first)


# ------------------------------------------------------------------------------ versions, duplicate starts, outputs
def _messages_by_job(env) -> dict[str, list[dict]]:
    by_job: dict[str, list[dict]] = {}
    while msgs := receive(env, 10):
        for m in msgs:
            by_job.setdefault(json.loads(m["Body"])["job_id"], []).append(m)
    return by_job


def test_older_versions_job_finishing_last_leaves_the_newer_versions_output(
    env, server, forbidden_server, tmp_path, tiny_clip_dir
) -> None:
    """The input is overwritten while the first version's job is under way, and the newer
    version's (smaller) job finishes first. The older job, merging last, fails as superseded
    instead of replacing the output with the old rows."""
    old, new = make_csv(server, forbidden_server, rows=90), make_csv(server, forbidden_server, rows=30)
    [j1] = drop(env, "incoming/versions.csv", old)["jobs"]
    [j2] = drop(env, "incoming/versions.csv", new)["jobs"]
    assert j1["job_id"] != j2["job_id"] and (j1["chunks"], j2["chunks"]) == (3, 1)
    by_job = _messages_by_job(env)
    assert run_worker(env, by_job[j2["job_id"]]) == []
    assert job_status(env, j2["job_id"])["state"] == "done"
    assert run_worker(env, by_job[j1["job_id"]]) == []  # acknowledged: nothing more to do for them
    st1 = job_status(env, j1["job_id"])
    assert st1["state"] == "failed" and st1["reason"].startswith("superseded: "), st1
    assert j2["job_id"] in st1["reason"]
    assert job_status(env, j2["job_id"])["state"] == "done"
    assert output_rows(env, "scored/versions_scored.csv") == cli_rows(tmp_path, tiny_clip_dir, new)
    assert queued(env) == 0


def test_slow_first_start_never_moves_a_finished_job_back(env, server, forbidden_server, monkeypatch) -> None:
    """An S3 event delivered twice: the first start stalls mid-split, the duplicate splits and fans
    out, and the job is done before the first start wakes. It must not save `running` over `done`
    nor send the chunk messages again."""
    from similarity.jobs import JobStore

    key = "incoming/slow-dup.csv"
    env["s3"].put_object(Bucket=env["bucket"], Key=key, Body=make_csv(server, forbidden_server, rows=90).encode())
    event = s3_event_for(env["bucket"], key, env["s3"].head_object(Bucket=env["bucket"], Key=key))
    put_chunk, stalled, wake = JobStore.put_chunk, threading.Event(), threading.Event()

    def stalling_put_chunk(self, m, index, text):
        if not stalled.is_set():  # the first start's first chunk
            stalled.set()
            assert wake.wait(120)
        return put_chunk(self, m, index, text)

    monkeypatch.setattr(JobStore, "put_chunk", stalling_put_chunk)
    first: dict = {}
    slow = threading.Thread(
        target=lambda: first.update(env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900)))
    )
    slow.start()
    try:
        assert stalled.wait(120)
        [dup] = env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))["jobs"]
        assert dup["state"] == "running" and dup["chunks"] == 3
        drain(env)
        assert job_status(env, dup["job_id"])["state"] == "done"
    finally:
        wake.set()
        slow.join(120)
    [late] = first["jobs"]
    assert late["job_id"] == dup["job_id"] and late["state"] == "done"
    assert job_status(env, dup["job_id"])["state"] == "done"
    assert queued(env) == 0  # no chunk message sent again


def test_duplicate_start_never_resets_a_running_job(env, server, forbidden_server, monkeypatch) -> None:
    """A duplicate start reads the job while the first start is splitting; the first one then fans
    out. The duplicate must not save a fresh `splitting` manifest (0 chunks) over the running job:
    the live chunk messages would fail as out of range."""
    from similarity.jobs import JobStore

    key = "incoming/dup-running.csv"
    env["s3"].put_object(Bucket=env["bucket"], Key=key, Body=make_csv(server, forbidden_server, rows=90).encode())
    event = s3_event_for(env["bucket"], key, env["s3"].head_object(Bucket=env["bucket"], Key=key))
    claim_attempt, put_chunk = JobStore.claim_attempt, JobStore.put_chunk
    a_splitting, b_read, a_done, b_splitting, release = (threading.Event() for _ in range(5))
    claims: list[int] = []

    def claim_hook(self, *args, **kwargs):
        claims.append(1)
        if len(claims) == 2:  # the duplicate has read the first start's `splitting` manifest
            b_read.set()
            assert a_done.wait(120)
        return claim_attempt(self, *args, **kwargs)

    def put_chunk_hook(self, m, index, text):
        if not a_done.is_set():  # the first start waits until the duplicate has read the job
            a_splitting.set()
            assert b_read.wait(120)
        elif not b_splitting.is_set():  # the duplicate splitting again: hold it there
            b_splitting.set()
            assert release.wait(120)
        return put_chunk(self, m, index, text)

    monkeypatch.setattr(JobStore, "claim_attempt", claim_hook)
    monkeypatch.setattr(JobStore, "put_chunk", put_chunk_hook)
    out: dict[str, dict] = {}

    def start(name: str) -> threading.Thread:
        t = threading.Thread(
            target=lambda: out.update({name: env["s3_event"].lambda_handler(event, LocalContext(timeout_s=900))})
        )
        t.start()
        return t

    tb: threading.Thread | None = None
    ta = start("A")
    try:
        assert a_splitting.wait(120)
        tb = start("B")
        ta.join(120)
        [job] = out["A"]["jobs"]
        assert job["state"] == "running" and job["chunks"] == 3
        a_done.set()
        while tb.is_alive() and not b_splitting.is_set():
            b_splitting.wait(0.05)
        m = runtime.services().jobs.load(env["bucket"], job["job_id"])
        assert (m.state.value, m.chunk_count) == ("running", 3)
        assert run_worker(env, receive(env, 10)) == []  # the live messages are in range
    finally:
        a_done.set()
        release.set()
        if tb is not None:
            tb.join(120)
    assert out["B"]["jobs"][0]["job_id"] == job["job_id"]
    drain(env)
    st = job_status(env, job["job_id"])
    assert st["state"] == "done" and st["rows"] == {"done": 90, "total": 90}


def test_post_jobs_with_another_output_or_escaping_is_another_job(env, server) -> None:
    """POST /jobs on an input that already has a job, naming another output and excel_safe, is a
    job of its own that writes that output; the same request again is the same job."""
    import handler.api as api

    b = env["bucket"]
    url = server.image("/jobs/xl-again.png", png_bytes(draw("red", "circle", random.Random(8))))
    env["s3"].put_object(Bucket=b, Key="uploads/day.csv", Body=f"@id,url,caption\n=1,{url},a red circle\n".encode())
    first = {"input": f"s3://{b}/uploads/day.csv", "output": f"s3://{b}/results/A.csv", "excel_safe": False}
    status, a = _api_call(api, "api_jobs_start.json", first)
    assert status == 202, a
    drain(env)
    status, again = _api_call(api, "api_jobs_start.json", first)
    assert status == 202 and again["job_id"] == a["job_id"] and again["state"] == "done"
    second = {"input": f"s3://{b}/uploads/day.csv", "output": f"s3://{b}/results/B.csv", "excel_safe": True}
    status, bj = _api_call(api, "api_jobs_start.json", second)
    assert status == 202 and bj["job_id"] != a["job_id"] and bj["output"] == f"s3://{b}/results/B.csv"
    drain(env)
    assert _api_call(api, "api_jobs_status.json", job_id=bj["job_id"])[1]["state"] == "done"
    assert env["s3"].get_object(Bucket=b, Key="results/A.csv")["Body"].read().startswith(b"@id,")
    assert env["s3"].get_object(Bucket=b, Key="results/B.csv")["Body"].read().startswith(b"'@id,")


def test_post_jobs_default_output_keeps_the_inputs_folders(env, server, forbidden_server) -> None:
    """Two inputs of the same name in different folders get different default outputs: a key
    outside incoming/ keeps its whole path under scored/_/, as an S3 drop's folders under
    incoming/ are kept under scored/."""
    import handler.api as api

    b = env["bucket"]
    jobs = {}
    for year, rows in (("2024", 3), ("2025", 5)):
        key = f"uploads/{year}/data.csv"
        env["s3"].put_object(Bucket=b, Key=key, Body=make_csv(server, forbidden_server, rows=rows).encode())
        status, out = _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/{key}"})
        assert status == 202 and out["output"] == f"s3://{b}/scored/_/uploads/{year}/data_scored.csv", out
        jobs[year] = out["job_id"]
    drain(env)
    assert len(output_rows(env, "scored/_/uploads/2024/data_scored.csv")) == 4
    assert len(output_rows(env, "scored/_/uploads/2025/data_scored.csv")) == 6
    [job] = drop(env, "incoming/team/x.csv", make_csv(server, forbidden_server, rows=2))["jobs"]
    assert job_status(env, job["job_id"])["output"] == f"s3://{b}/scored/team/x_scored.csv"


def test_an_s3_drop_and_post_jobs_never_share_a_default_output(env, server, forbidden_server) -> None:
    """incoming/uploads/x.csv (an S3 drop) and uploads/x.csv (POST /jobs), or incoming/x.CSV and
    incoming/x.csv: different inputs, so different outputs. Before: both of each pair wrote one
    output (scored/uploads/x_scored.csv, scored/x_scored.csv), both jobs said done, and the one
    that merged last replaced the other's rows."""
    import handler.api as api

    b = env["bucket"]
    [dropped] = drop(env, "incoming/uploads/x.csv", make_csv(server, forbidden_server, rows=30))["jobs"]
    env["s3"].put_object(Bucket=b, Key="uploads/x.csv", Body=make_csv(server, forbidden_server, rows=10).encode())
    status, posted = _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/uploads/x.csv"})
    assert status == 202, posted
    [upper] = drop(env, "incoming/x.CSV", make_csv(server, forbidden_server, rows=4))["jobs"]
    [lower] = drop(env, "incoming/x.csv", make_csv(server, forbidden_server, rows=6))["jobs"]
    drain(env)
    expected = {
        dropped["job_id"]: ("scored/uploads/x_scored.csv", 30),
        posted["job_id"]: ("scored/_/uploads/x_scored.csv", 10),
        upper["job_id"]: ("scored/x_scored.CSV", 4),
        lower["job_id"]: ("scored/x_scored.csv", 6),
    }
    for job_id, (key, rows) in expected.items():
        st = job_status(env, job_id)
        assert st["state"] == "done" and st["output"] == f"s3://{b}/{key}", st
        assert len(output_rows(env, key)) == rows + 1, key


# ------------------------------------------------------------------------------ POST /jobs hands the split off
class RecordingLambda:
    """The Lambda client the API is composed with (``runtime.Clients``): records each asynchronous
    invoke, as Lambda queues it, for the test to hand to the splitter (moto's invoke needs Docker)."""

    def __init__(self) -> None:
        self.invokes: list[dict] = []

    def invoke(self, **kwargs) -> dict:
        self.invokes.append(kwargs)
        return {"StatusCode": 202}

    def payloads(self) -> list[dict]:
        return [json.loads(i["Payload"]) for i in self.invokes]


@pytest.fixture
def handoff(env, monkeypatch) -> RecordingLambda:
    """The deployed composition: POST /jobs with SPLITTER_FUNCTION set (template.yaml)."""
    monkeypatch.setenv("SPLITTER_FUNCTION", "stack-splitter")
    runtime.reset()
    fake = RecordingLambda()
    runtime.services().clients._made["lambda"] = fake  # where the handlers' clients are made
    return fake


def split_payload(env, payload: dict) -> dict:
    """The splitter function run on the invoke's payload, as Lambda runs it."""
    return env["s3_event"].lambda_handler(payload, LocalContext(timeout_s=900))


def test_post_jobs_answers_splitting_at_once_and_the_splitter_runs_the_job(env, handoff, server, forbidden_server):
    """POST /jobs splits nothing itself (a file of 1M rows took 93 s, API Gateway waits 29): it
    answers 202 `splitting`, and the splitter function, invoked asynchronously with the start
    payload, takes the job to `running`; the workers finish it. The same payload again is harmless."""
    import handler.api as api

    b = env["bucket"]
    body = make_csv(server, forbidden_server, rows=50)
    env["s3"].put_object(Bucket=b, Key="uploads/big.csv", Body=body.encode())
    head = env["s3"].head_object(Bucket=b, Key="uploads/big.csv")
    req = {"input": f"s3://{b}/uploads/big.csv", "output": f"s3://{b}/results/big.csv", "excel_safe": True}
    status, out = _api_call(api, "api_jobs_start.json", req)
    assert status == 202 and out["state"] == "splitting", out
    assert out["chunks"] == {"done": 0, "total": 0} and out["output"] == f"s3://{b}/results/big.csv"
    assert queued(env) == 0  # nothing split, nothing sent
    assert env["s3"].list_objects_v2(Bucket=b, Prefix=f"jobs/{out['job_id']}/chunks/")["KeyCount"] == 0
    [invoke] = handoff.invokes
    assert invoke["FunctionName"] == "stack-splitter" and invoke["InvocationType"] == "Event"
    [payload] = handoff.payloads()
    assert payload == {
        "bucket": b,
        "key": "uploads/big.csv",
        "version_id": head["VersionId"],
        "etag": head["ETag"].strip('"'),
        "output": {"bucket": b, "key": "results/big.csv", "version_id": None, "etag": None},
        "excel_safe": True,
    }
    assert _api_call(api, "api_jobs_status.json", job_id=out["job_id"])[1]["state"] == "splitting"
    # the same request while it is splitting: the same job, not handed off twice
    status, again = _api_call(api, "api_jobs_start.json", req)
    assert status == 202 and again["job_id"] == out["job_id"] and len(handoff.invokes) == 1

    [job] = split_payload(env, payload)["jobs"]
    assert job["job_id"] == out["job_id"] and job["state"] == "running" and job["chunks"] == 2
    assert queued(env) == 2
    [dup] = split_payload(env, payload)["jobs"]  # Lambda delivering the event twice
    assert dup["job_id"] == job["job_id"] and dup["state"] == "running" and queued(env) == 2
    drain(env)
    status, st = _api_call(api, "api_jobs_status.json", job_id=out["job_id"])
    assert status == 200 and st["state"] == "done" and st["rows"] == {"done": 50, "total": 50}, st
    assert split_payload(env, payload)["jobs"][0]["state"] == "done" and queued(env) == 0
    rows = output_rows(env, "results/big.csv")
    assert len(rows) == 51
    # a missing input is still a 404 at once, and nothing is handed off
    assert _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/uploads/missing.csv"})[0] == 404
    assert len(handoff.invokes) == 1


def test_start_payload_for_a_version_gone_fails_the_job_with_the_reason(env, handoff) -> None:
    """The version POST /jobs checked is deleted before the splitter runs: the job fails, saying so."""
    import handler.api as api

    b = env["bucket"]
    env["s3"].put_object(Bucket=b, Key="uploads/gone.csv", Body=b"id,url,caption\n1,http://127.0.0.1:9/x.png,a\n")
    status, out = _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/uploads/gone.csv"})
    assert status == 202 and out["state"] == "splitting", out
    [payload] = handoff.payloads()
    env["s3"].delete_object(Bucket=b, Key="uploads/gone.csv", VersionId=payload["version_id"])
    [job] = split_payload(env, payload)["jobs"]
    assert job["state"] == "failed" and "does not exist" in job["reason"], job
    st = _api_call(api, "api_jobs_status.json", job_id=out["job_id"])[1]
    assert st["state"] == "failed" and st["reason"] == job["reason"] and queued(env) == 0


def test_a_refused_hand_off_is_a_503_and_the_same_request_again_starts_the_job(env, handoff) -> None:
    import handler.api as api

    b = env["bucket"]
    env["s3"].put_object(Bucket=b, Key="uploads/r.csv", Body=b"id,url,caption\n")
    refused = {"n": 1}
    record = handoff.invoke

    def invoke(**kwargs) -> dict:
        if refused["n"]:
            refused["n"] -= 1
            raise ClientError({"Error": {"Code": "TooManyRequestsException", "Message": "Rate"}}, "Invoke")
        return record(**kwargs)

    handoff.invoke = invoke
    status, out = _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/uploads/r.csv"})
    assert status == 503 and out["error"]["code"] == "splitter_unavailable", out
    status, out = _api_call(api, "api_jobs_start.json", {"input": f"s3://{b}/uploads/r.csv"})
    assert status == 202 and out["state"] == "splitting", out
    [job] = split_payload(env, handoff.payloads()[0])["jobs"]
    assert job["state"] == "done" and len(output_rows(env, "scored/_/uploads/r_scored.csv")) == 1  # the header


def test_sample_start_payload_is_what_post_jobs_hands_the_splitter() -> None:
    """events/s3_start.json (`sam local invoke S3EventFunction -e events/s3_start.json`) is a
    start payload the splitter accepts, for the same job as the sample S3 put."""
    from similarity.jobs import StartRequest

    start = StartRequest.model_validate_json((EVENTS / "s3_start.json").read_text())
    put = json.loads((EVENTS / "s3_put.json").read_text())["Records"][0]["s3"]
    assert (start.bucket, start.key, start.version_id) == (
        put["bucket"]["name"],
        urllib.parse.unquote_plus(put["object"]["key"]),
        put["object"]["versionId"],
    )
