"""The pipeline, the API, the model sync and the GPU task against moto with IAM enforced.

Each handler runs with the credentials of a role whose policies are the SAM-translated template's,
resolved to this stack's names (tests/support/aws_template.py), in the environment the template
gives that function; moto is patched with the rules of AWS it lacks (tests/support/moto_iam.py,
e.g. 403 instead of 404 for a missing key without s3:ListBucket), and its Lambda runs nothing on
an invoke but records it (tests/support/moto_lambda.py), so the start POST /jobs hands the splitter
is run here as that function. Two things are proven for every
principal (each function's execution role, and the GPU task's role):

* with the template's policies, every one of its scenarios works;
* without any single action the template grants it, at least one scenario fails: each grant is
  needed and exercised, except those AWS itself uses (SERVICE_USED, with the reason).

What moto cannot evaluate (Conditions such as iam:PassedToService, the EFS file-system policy) is
checked as template invariants in test_template.py.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from handler import runtime
from handler.invoke import LocalContext
from similarity.jobs.objects import MIN_PART
from support import moto_lambda
from support.aws_template import ACCOUNT_ID, Stack
from support.imageserver import png_bytes
from support.moto_ecs import register_instance
from support.moto_iam import (
    allow_actions,
    client,
    credentials_env,
    put_policies,
    role_credentials,
    set_auth,
    without_action,
)
from support.shapes import draw
from support.sqs_events import sqs_event

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
EVENTS = ROOT / "events"
TINY_CLIP = ROOT / "tests" / "fixtures" / "tiny-clip"
#: The GPU path on (so its grants are exercised), chunks of 2 rows, more than 6 rows to the GPU.
PARAMS = {
    "GpuImageUri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/similarity-gpu:latest",
    "ChunkRows": "2",
    "GpuMinRows": "6",
}
PRINCIPALS = [
    "S3EventFunction",
    "WorkerFunction",
    "ApiFunction",
    "ModelSyncFunction",
    "GpuTaskStoppedFunction",
    "GpuTaskRole",
]
#: What the handlers cannot run as in moto, set over the template's environment.
LOCAL_ENV = {
    "CLIP_MODEL_DIR": str(TINY_CLIP),
    "SIMILARITY_BACKEND": "torch",
    "SIMILARITY_DEVICE": "cpu",
    "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
    "POWERTOOLS_TRACE_DISABLED": "true",
    "PRELOAD_MODEL": "0",
    "ECS_CAPACITY_PROVIDER": "",  # moto has no managed scaling; the task goes on a registered instance
    "WORKER_RESERVE_SECONDS": "5",
    "WORKER_HANDBACK_SECONDS": "1",
    "WORKER_RETRY_SECONDS": "0",
}


def service_used(principal: str, action: str, resource: Any) -> str | None:
    """Grants the code never exercises because AWS itself acts with them."""
    if action.startswith("elasticfilesystem:"):
        return "Lambda and ECS mount the file system with it (moto has no EFS)"
    if action.startswith("sqs:SendMessage") and "failures" in json.dumps(resource):
        return "Lambda sends a failed asynchronous event to the OnFailure destination with it"
    return None


class Deployment:
    """The template's bucket, queues, ECS cluster and task definition, and one role per principal,
    on moto with IAM enforced."""

    def __init__(
        self,
        endpoint: str,
        admin: dict[str, str],
        mp: pytest.MonkeyPatch,
        image_url: str,
        invokes: moto_lambda.Invokes,
    ) -> None:
        self.endpoint, self.admin, self.mp, self.image_url = endpoint, admin, mp, image_url
        self.invokes = invokes
        self.name = f"t{uuid.uuid4().hex[:8]}"
        # Every handler run builds its clients anew (a fresh environment per principal); one loader
        # shared by their botocore sessions parses each service model once instead of per client
        # (~0.5 s each). Credentials are still resolved per session.
        import botocore.loaders
        import botocore.session

        loader = botocore.loaders.create_loader()
        mp.setattr(botocore.session, "create_loader", lambda *_a, **_k: loader)
        # AWS (and moto by default) allows one PurgeQueue a minute; scenarios empty the queues
        # between them more often than that.
        mp.setenv("MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR", "false")
        set_auth(endpoint, True)
        mp.setenv("AWS_ACCESS_KEY_ID", admin["AccessKeyId"])  # the dummy keys are refused from now on
        mp.setenv("AWS_SECRET_ACCESS_KEY", admin["SecretAccessKey"])
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        self.s3, self.sqs = client(endpoint, "s3", admin), client(endpoint, "sqs", admin)
        self.ecs, ec2 = client(endpoint, "ecs", admin), client(endpoint, "ec2", admin)
        # The network the template is given: RunTask checks that its subnets and group exist.
        vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # moto's ENIs need it
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"us-east-1{az}")["Subnet"][
                "SubnetId"
            ]
            for i, az in enumerate("ab")
        ]
        group = ec2.create_security_group(GroupName=f"{self.name}-fn", Description="functions", VpcId=vpc)["GroupId"]
        params = {**PARAMS, "VpcId": vpc, "SubnetA": subnets[0], "SubnetB": subnets[1], "SubnetIds": ",".join(subnets)}
        self.stack = Stack.of(TEMPLATE, self.name, params, physical={("FunctionSecurityGroup", "Ref"): group})
        r = self.stack.r
        self.bucket = r.name("DataBucket")
        self.s3.create_bucket(Bucket=self.bucket)
        self.s3.put_bucket_versioning(Bucket=self.bucket, VersioningConfiguration={"Status": "Enabled"})
        queues = sorted(
            self.stack.of_type("AWS::SQS::Queue"), key=lambda q: "RedrivePolicy" in str(self.stack.resources[q])
        )
        self.queue_urls: dict[str, str] = {}
        for q in queues:
            props = self.stack.resolve(self.stack.resources[q].get("Properties", {}))
            attrs = {k: str(props[k]) for k in ("VisibilityTimeout", "MessageRetentionPeriod") if k in props}
            if "RedrivePolicy" in props:
                attrs["RedrivePolicy"] = json.dumps(props["RedrivePolicy"])
            self.queue_urls[q] = self.sqs.create_queue(QueueName=r.name(q), Attributes=attrs)["QueueUrl"]
        self.queue = self.queue_urls["ChunkQueue"]
        self.dlq = self.queue_urls["ChunkDeadLetterQueue"]
        self.cluster = self.ecs.create_cluster(clusterName=r.name("GpuCluster"))["cluster"]["clusterName"]
        register_instance(self.ecs, ec2, self.cluster, ACCOUNT_ID)
        td = self.stack.resolve(self.stack.resources["GpuTaskDefinition"]["Properties"])
        [container] = td["ContainerDefinitions"]
        arn = self.ecs.register_task_definition(
            family=td.get("Family") or r.name("GpuTaskDefinition"),
            taskRoleArn=td["TaskRoleArn"],
            executionRoleArn=td["ExecutionRoleArn"],
            networkMode="awsvpc",
            requiresCompatibilities=["EC2"],
            containerDefinitions=[{"name": container["Name"], "image": container["Image"], "memory": 512}],
        )["taskDefinition"]["taskDefinitionArn"]
        assert arn == self.stack.resolve({"Ref": "GpuTaskDefinition"})  # the name the template's grants use
        self.roles: dict[str, str] = {}
        self.creds: dict[str, dict[str, str]] = {}
        for p in PRINCIPALS:
            if p not in self.stack.resources:
                continue  # its tests fail: the template lacks it
            kind = self.stack.resources[p]["Type"]
            role = self.stack.function_role(p) if kind == "AWS::Lambda::Function" else p
            self.roles[p] = r.name(role)
            self.creds[p] = role_credentials(endpoint, admin, self.roles[p], self.stack.policies(p))
        # The splitter, for POST /jobs to invoke (asynchronously; moto runs nothing, the test hands
        # the recorded payload to the handler: ``start``).
        self.splitter = client(endpoint, "lambda", admin).create_function(
            FunctionName=r.name("S3EventFunction"),
            Runtime="python3.12",
            Role=f"arn:aws:iam::{ACCOUNT_ID}:role/{self.roles['S3EventFunction']}",
            Handler="handler.s3_event.lambda_handler",
            Code={"ZipFile": _zip()},
        )["FunctionName"]

    def close(self) -> None:
        set_auth(self.endpoint, False)
        runtime.reset()

    # -- acting as a principal
    @contextlib.contextmanager
    def acting_as(self, principal: str) -> Iterator[None]:
        """The principal's environment (the template's variables) and credentials; handlers and
        their clients are built anew inside, as in a fresh execution environment."""
        if self.stack.resources[principal]["Type"] == "AWS::Lambda::Function":
            env = self.stack.env(principal)
        else:
            env = self.stack.container_env("GpuTaskDefinition")
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**env, **LOCAL_ENV}.items():
                mp.setenv(k, v)
            with credentials_env(self.creds[principal], self.endpoint):
                runtime.reset()
                try:
                    yield
                finally:
                    runtime.reset()

    def set_policies(self, principal: str, docs: list[dict[str, Any]]) -> None:
        put_policies(self.endpoint, self.admin, self.roles[principal], docs)

    # -- what the event sources do
    def csv(self, rows: int, header_only: bool = False) -> bytes:
        lines = ["id,url,caption"] + (
            [] if header_only else [f"{i},{self.image_url},a red circle {i}" for i in range(rows)]
        )
        return ("\n".join(lines) + "\n").encode()

    def put(self, key: str, body: bytes) -> dict[str, Any]:
        self.s3.put_object(Bucket=self.bucket, Key=key, Body=body)
        return dict(self.s3.head_object(Bucket=self.bucket, Key=key))

    def s3_event(self, key: str, head: dict[str, Any]) -> dict[str, Any]:
        event = json.loads((EVENTS / "s3_put.json").read_text())
        rec = event["Records"][0]["s3"]
        rec["bucket"] = {
            "name": self.bucket,
            "arn": f"arn:aws:s3:::{self.bucket}",
            "ownerIdentity": {"principalId": "X"},
        }
        rec["object"].update(
            key=urllib.parse.quote_plus(key, safe="/"),
            eTag=head["ETag"].strip('"'),
            versionId=head["VersionId"],
            size=head["ContentLength"],
        )
        return event

    def split(self, key: str, body: bytes, as_principal: str = "S3EventFunction") -> dict[str, Any]:
        import handler.s3_event as s3_event

        head = self.put(key, body)
        with self.acting_as(as_principal):
            [job] = s3_event.lambda_handler(self.s3_event(key, head), LocalContext(timeout_s=900))["jobs"]
        return dict(job)

    def start(self, payload: dict[str, Any], as_principal: str = "S3EventFunction") -> dict[str, Any]:
        """The splitter run on a start payload (what POST /jobs invokes it with)."""
        import handler.s3_event as s3_event

        with self.acting_as(as_principal):
            [job] = s3_event.lambda_handler(payload, LocalContext(timeout_s=900))["jobs"]
        return dict(job)

    def handed_off(self) -> dict[str, Any]:
        """The one start payload POST /jobs handed the splitter since the last call."""
        [(function, kind, payload)] = self.invokes.take()
        assert (function, kind) == (self.splitter, "Event")
        return dict(json.loads(payload))

    def receive(self, n: int = 10, queue: str | None = None) -> list[dict[str, Any]]:
        resp = self.sqs.receive_message(QueueUrl=queue or self.queue, MaxNumberOfMessages=n, AttributeNames=["All"])
        return list(resp.get("Messages", []))

    def work(
        self, messages: list[dict[str, Any]], timeout: float = 300, as_principal: str = "WorkerFunction"
    ) -> list[str]:
        """One invocation per message (BatchSize 1), deleting what succeeded, as the ESM does."""
        import handler.worker as worker

        failed: list[str] = []
        with self.acting_as(as_principal):
            for m in messages:
                event = sqs_event([m], self.stack.resolve({"Fn::GetAtt": ["ChunkQueue", "Arn"]}))
                resp = worker.lambda_handler(event, LocalContext(timeout_s=timeout))
                if resp["batchItemFailures"]:
                    failed.append(m["MessageId"])
                else:
                    self.sqs.delete_message(QueueUrl=self.queue, ReceiptHandle=m["ReceiptHandle"])
        return failed

    def purge(self) -> None:
        """Empty both queues, messages in flight included (what earlier scenarios left)."""
        for url in (self.queue, self.dlq):
            self.sqs.purge_queue(QueueUrl=url)

    def queued(self, queue: str | None = None) -> int:
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=queue or self.queue,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    def manifest(self, job_id: str) -> dict[str, Any]:
        body = self.s3.get_object(Bucket=self.bucket, Key=f"jobs/{job_id}/manifest.json")["Body"].read()
        return dict(json.loads(body))

    def exists(self, key: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError:
            return False
        return True

    def api(
        self, event_file: str, body: dict[str, Any] | None = None, job_id: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        import handler.api as api

        event = json.loads((EVENTS / event_file).read_text())
        if body is not None:
            event["body"] = json.dumps(body)
        if job_id is not None:
            event["rawPath"] = event["requestContext"]["http"]["path"] = f"/jobs/{job_id}"
            event["pathParameters"] = {"id": job_id}
        with self.acting_as("ApiFunction"):
            resp = api.lambda_handler(event, LocalContext())
        return int(resp["statusCode"]), dict(json.loads(resp["body"]))

    def drain(self) -> None:
        for _ in range(30):
            msgs = self.receive(10)
            if not msgs:
                return
            self.work(msgs)
        raise AssertionError("queue did not drain")


def _zip() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("handler.py", "def lambda_handler(event, context):\n    return {}\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dep(moto_endpoint, moto_admin, server) -> Iterator[Deployment]:
    import random

    url = server.image("/iam/red.png", png_bytes(draw("red", "circle", random.Random(3))))
    invokes, undo_lambda = moto_lambda.install()
    with pytest.MonkeyPatch.context() as mp:
        try:
            d = Deployment(moto_endpoint, moto_admin, mp, url, invokes)
        except BaseException:
            set_auth(moto_endpoint, False)  # never leave enforcement on for the rest of the suite
            undo_lambda()
            raise
        try:
            yield d
        finally:
            d.close()
            undo_lambda()


def uid() -> str:
    return uuid.uuid4().hex[:8]


# ------------------------------------------------------------------------------ scenarios per principal
def s3_split(d: Deployment) -> None:
    d.purge()
    job = d.split(f"incoming/{uid()}.csv", d.csv(3))
    assert job["state"] == "running" and job["chunks"] == 2, job
    assert d.exists(f"jobs/{job['job_id']}/fanout.json") and d.queued() == 2


def s3_header_only(d: Deployment) -> None:
    name = uid()
    job = d.split(f"incoming/{name}.csv", d.csv(0, header_only=True))
    assert job["state"] == "done", job
    assert d.exists(f"scored/{name}_scored.csv")


def s3_gpu(d: Deployment) -> None:
    job = d.split(f"incoming/{uid()}.csv", d.csv(8))
    assert job["state"] == "gpu", job
    tasks = d.ecs.describe_tasks(cluster=d.cluster, tasks=d.ecs.list_tasks(cluster=d.cluster)["taskArns"])["tasks"]
    assert f"job-{job['job_id']}"[:36] in {t.get("startedBy") for t in tasks}


def _payload(d: Deployment, key: str, body: bytes, output: str | None = None) -> dict[str, Any]:
    head = d.put(key, body)
    out = {"bucket": d.bucket, "key": output} if output else None
    return {
        "bucket": d.bucket,
        "key": key,
        "version_id": head["VersionId"],
        "etag": head["ETag"].strip('"'),
        "output": out,
    }


def s3_start_payload(d: Deployment) -> None:
    """POST /jobs's hand-off: an input anywhere in the bucket, the output where the request says."""
    d.purge()
    job = d.start(_payload(d, f"uploads/{uid()}/x.csv", d.csv(3), output=f"results/{uid()}.csv"))
    assert job["state"] == "running" and job["chunks"] == 2, job
    assert d.queued() == 2
    d.purge()


def s3_start_header_only_elsewhere(d: Deployment) -> None:
    out_key = f"results/{uid()}.csv"
    job = d.start(_payload(d, f"uploads/{uid()}.csv", d.csv(0, header_only=True), output=out_key))
    assert job["state"] == "done", job
    assert d.exists(out_key)


def worker_job(d: Deployment) -> None:
    d.purge()
    job = d.split(f"incoming/{uid()}.csv", d.csv(3), as_principal="S3EventFunction")
    msgs = d.receive(10)
    assert len(msgs) == 2 and d.work(msgs) == []
    m = d.manifest(job["job_id"])
    assert m["state"] == "done" and m["scored"] == 3, m
    out = d.s3.get_object(Bucket=d.bucket, Key=m["output"]["key"])["Body"].read().decode()
    assert len(out.splitlines()) == 4


def worker_handback(d: Deployment) -> None:
    d.purge()
    d.split(f"incoming/{uid()}.csv", d.csv(3), as_principal="S3EventFunction")
    msgs = d.receive(1)
    assert d.work(msgs, timeout=3) == [msgs[0]["MessageId"]]  # under the 5 s reserve: handed back
    time.sleep(1.5)  # WORKER_HANDBACK_SECONDS is 1; the queue's own visibility timeout is 30 min
    assert [m["MessageId"] for m in d.receive(1)] == [msgs[0]["MessageId"]]
    d.purge()


def _aborted_upload(d: Deployment, principal: str) -> None:
    """A streamed output that fails after its first part must leave no upload behind."""
    from similarity.aws import make_client
    from similarity.jobs import S3ObjectStore

    key = f"scored/abort-{uid()}.csv"
    with d.acting_as(principal):
        store = S3ObjectStore(make_client("s3"), part_size=MIN_PART, sleep=lambda _s: None)
        with pytest.raises(RuntimeError), store.writer(d.bucket, key, "text/csv") as w:
            w.write(b"x" * (MIN_PART + 1))
            raise RuntimeError("a part could not be read")
    left = d.s3.list_multipart_uploads(Bucket=d.bucket, Prefix=key).get("Uploads", [])
    assert left == [], f"{principal} left {len(left)} incomplete upload(s)"


def worker_abort(d: Deployment) -> None:
    _aborted_upload(d, "WorkerFunction")


def api_start_and_status(d: Deployment) -> None:
    """POST /jobs answers `splitting` having split nothing, and hands the split to the splitter."""
    d.purge()
    d.invokes.take()
    key = f"uploads/{uid()}.csv"
    d.put(key, d.csv(3))
    status, out = d.api("api_jobs_start.json", {"input": f"s3://{d.bucket}/{key}"})
    assert status == 202 and out["state"] == "splitting", out
    status, st = d.api("api_jobs_status.json", job_id=out["job_id"])
    assert status == 200 and st["state"] == "splitting" and d.queued() == 0, st
    job = d.start(d.handed_off())
    assert job["job_id"] == out["job_id"] and job["state"] == "running", job
    status, st = d.api("api_jobs_status.json", job_id=out["job_id"])
    assert status == 200 and st["chunks"] == {"done": 0, "total": 2}, st
    d.purge()


def api_missing_input(d: Deployment) -> None:
    d.invokes.take()
    status, out = d.api("api_jobs_start.json", {"input": f"s3://{d.bucket}/uploads/missing-{uid()}.csv"})
    assert status == 404 and d.invokes.take() == [], out


def api_header_only_output(d: Deployment) -> None:
    d.invokes.take()
    key, out_key = f"uploads/{uid()}.csv", f"results/{uid()}.csv"
    d.put(key, d.csv(0, header_only=True))
    status, out = d.api(
        "api_jobs_start.json", {"input": f"s3://{d.bucket}/{key}", "output": f"s3://{d.bucket}/{out_key}"}
    )
    assert status == 202 and out["state"] == "splitting", out
    assert d.start(d.handed_off())["state"] == "done"
    assert d.exists(out_key)


def api_gpu(d: Deployment) -> None:
    d.invokes.take()
    key = f"uploads/{uid()}.csv"
    d.put(key, d.csv(8))
    status, out = d.api("api_jobs_start.json", {"input": f"s3://{d.bucket}/{key}"})
    assert status == 202 and out["state"] == "splitting", out
    assert d.start(d.handed_off())["state"] == "gpu"


def model_sync(d: Deployment, tmp: Path | None = None) -> None:
    import tempfile

    import handler.model_sync as model_sync
    from similarity.model import check_model_dir

    prefix = f"models/{uid()}"
    for f in TINY_CLIP.iterdir():
        d.s3.put_object(Bucket=d.bucket, Key=f"{prefix}/{f.name}", Body=f.read_bytes())
    with tempfile.TemporaryDirectory() as tmpdir, d.acting_as("ModelSyncFunction"):
        dest = Path(tmpdir) / "model"
        event = {"model_dir": str(dest), "source_s3_uri": f"s3://{d.bucket}/{prefix}", "export": False}
        result = model_sync.lambda_handler(event, LocalContext(timeout_s=900))
        assert result["files"] == len(list(TINY_CLIP.iterdir())), result
        check_model_dir(dest)


def _gpu_job(d: Deployment) -> tuple[dict[str, Any], dict[str, Any]]:
    job = d.split(f"incoming/{uid()}.csv", d.csv(8), as_principal="S3EventFunction")
    assert job["state"] == "gpu", job
    tasks = d.ecs.describe_tasks(cluster=d.cluster, tasks=d.ecs.list_tasks(cluster=d.cluster)["taskArns"])["tasks"]
    [task] = [t for t in tasks if t.get("startedBy") == f"job-{job['job_id']}"[:36]]
    return job, task


def gpu_task_run(d: Deployment) -> None:
    from handler.gpu_task import main as gpu_main

    job, task = _gpu_job(d)
    [override] = task["overrides"]["containerOverrides"]
    with d.acting_as("GpuTaskRole"):
        assert gpu_main(override["command"]) == 0
    m = d.manifest(job["job_id"])
    assert m["state"] == "done" and m["scored"] == 8, m
    assert d.exists(m["output"]["key"])


def gpu_task_input_overwritten(d: Deployment) -> None:
    """The input is uploaded again while the task runs, and the new version has no job yet: the
    task's check for a newer job must read "no such manifest" (404), not AccessDenied."""
    from handler.gpu_task import main as gpu_main

    job, task = _gpu_job(d)
    [override] = task["overrides"]["containerOverrides"]
    cmd = override["command"]
    d.put(cmd[cmd.index("--input-key") + 1], d.csv(9))
    with d.acting_as("GpuTaskRole"):
        assert gpu_main(cmd) == 0
    m = d.manifest(job["job_id"])
    assert m["state"] == "done" and m["scored"] == 8, m


def gpu_task_abort(d: Deployment) -> None:
    _aborted_upload(d, "GpuTaskRole")


def _stopped_event(d: Deployment, job_id: str, task_arn: str) -> dict[str, Any]:
    event = json.loads((EVENTS / "ecs_task_stopped.json").read_text())
    detail = event["detail"]
    detail["taskArn"] = detail["containers"][0]["taskArn"] = task_arn
    detail["startedBy"] = f"job-{job_id}"[:36]
    cmd = detail["overrides"]["containerOverrides"][0]["command"]
    cmd[cmd.index("--bucket") + 1] = cmd[cmd.index("--output-bucket") + 1] = d.bucket
    cmd[cmd.index("--job-id") + 1] = job_id
    return dict(event)


def task_stopped(d: Deployment) -> None:
    import handler.task_stopped as stopped

    job, task = _gpu_job(d)
    with d.acting_as("GpuTaskStoppedFunction"):
        out = stopped.lambda_handler(_stopped_event(d, job["job_id"], task["taskArn"]), LocalContext())
    assert out["state"] == "failed", out
    m = d.manifest(job["job_id"])
    assert m["state"] == "failed" and "exit 137" in m["reason"] and "OutOfMemoryError" in m["reason"], m


def task_stopped_unknown_job(d: Deployment) -> None:
    import handler.task_stopped as stopped

    with d.acting_as("GpuTaskStoppedFunction"):
        out = stopped.lambda_handler(_stopped_event(d, "0" * 20, "arn:aws:ecs:us-east-1:1:task/x/y"), LocalContext())
    assert out == {"job_id": "0" * 20, "state": None}


SCENARIOS: dict[str, list[Callable[[Deployment], None]]] = {
    "S3EventFunction": [s3_split, s3_header_only, s3_gpu, s3_start_payload, s3_start_header_only_elsewhere],
    "WorkerFunction": [worker_job, worker_handback, worker_abort],
    "ApiFunction": [api_start_and_status, api_missing_input, api_header_only_output, api_gpu],
    "ModelSyncFunction": [model_sync],
    "GpuTaskStoppedFunction": [task_stopped, task_stopped_unknown_job],
    "GpuTaskRole": [gpu_task_run, gpu_task_input_overwritten, gpu_task_abort],
}


def run_scenarios(d: Deployment, principal: str) -> list[str]:
    """The scenarios of ``principal`` that failed, each with its error."""
    if principal not in d.creds:
        return [f"the template has no {principal}"]
    failed = []
    for scenario in SCENARIOS[principal]:
        try:
            scenario(d)
        except Exception as exc:  # noqa: BLE001 - a denial surfaces as whatever the handler makes of it
            failed.append(f"{scenario.__name__}: {type(exc).__name__}: {str(exc)[:300]}")
    return failed


def _grants() -> list[Any]:
    stack = Stack.of(TEMPLATE, "collect", PARAMS)
    cases = []
    for p in PRINCIPALS:
        if p not in stack.resources:
            cases.append(pytest.param(p, -1, "", id=f"{p}-missing"))  # fails: the template lacks it
            continue
        for statement, action, resource in allow_actions(stack.policies(p)):
            if service_used(p, action, resource) is None:
                cases.append(pytest.param(p, statement, action, id=f"{p}-{statement}-{action}"))
    return cases


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("principal", PRINCIPALS)
def test_every_scenario_works_with_the_templates_policies(dep: Deployment, principal: str) -> None:
    assert run_scenarios(dep, principal) == []


@pytest.mark.parametrize(("principal", "statement", "action"), _grants())
def test_each_granted_action_is_needed(dep: Deployment, principal: str, statement: int, action: str) -> None:
    """Remove one action from one statement of the principal's translated policies: at least one
    of its scenarios must fail. A grant nothing fails without is unneeded (or untested)."""
    assert statement >= 0, f"the template has no {principal}"
    docs = dep.stack.policies(principal)
    dep.set_policies(principal, without_action(docs, statement, action))
    try:
        failed = run_scenarios(dep, principal)
    finally:
        dep.set_policies(principal, docs)
    assert failed, f"{principal} still works without {action} (statement {statement})"


def test_grants_left_out_of_the_test_are_only_those_aws_uses(dep: Deployment) -> None:
    used = {
        (p, a): service_used(p, a, r)
        for p in PRINCIPALS
        for _, a, r in allow_actions(dep.stack.policies(p))
        if service_used(p, a, r)
    }
    assert {a for _, a in used} <= {
        "elasticfilesystem:ClientMount",
        "elasticfilesystem:ClientWrite",
        "sqs:SendMessage",
        "sqs:SendMessage*",
        "sqs:ChangeMessageVisibility*",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
    }, used


@pytest.mark.parametrize("principal", ["WorkerFunction", "ApiFunction", "GpuTaskRole", "S3EventFunction"])
def test_no_principal_may_write_where_uploads_start_jobs(dep: Deployment, principal: str) -> None:
    with dep.acting_as(principal):
        from similarity.aws import make_client

        s3 = make_client("s3")
        with pytest.raises(ClientError) as denied:
            s3.put_object(Bucket=dep.bucket, Key=f"incoming/loop-{uid()}.csv", Body=b"url,caption\n")
    assert denied.value.response["Error"]["Code"] == "AccessDenied"


def test_dead_letter_runbook_after_a_permissions_change(dep: Deployment) -> None:
    """The README's dead-letter runbook under IAM: a deploy that took PutObject from the workers
    sends every chunk to the DLQ after three receives (maxReceiveCount); with the grant back, the
    operator's redrive completes the job on the first delivery of each message."""
    dep.purge()
    job = dep.split(f"incoming/{uid()}.csv", dep.csv(3), as_principal="S3EventFunction")
    docs = dep.stack.policies("WorkerFunction")
    [(put, _)] = {(i, a) for i, a, _ in allow_actions(docs) if a == "s3:PutObject"}
    dep.set_policies("WorkerFunction", without_action(docs, put, "s3:PutObject"))
    try:
        for _ in range(4):
            msgs = dep.receive(10)
            if msgs:
                assert len(dep.work(msgs)) == len(msgs)
        assert dep.queued() == 0 and dep.queued(dep.dlq) == 2
        assert dep.manifest(job["job_id"])["state"] == "running"
    finally:
        dep.set_policies("WorkerFunction", docs)  # the cause is fixed
    # What `aws sqs start-message-move-task --source-arn <dlq>` does (moto lacks it): every message
    # back to its source queue, with a new message id.
    for m in dep.receive(10, dep.dlq):
        dep.sqs.send_message(QueueUrl=dep.queue, MessageBody=m["Body"])
        dep.sqs.delete_message(QueueUrl=dep.dlq, ReceiptHandle=m["ReceiptHandle"])
    msgs = dep.receive(10)
    assert len(msgs) == 2 and dep.work(msgs) == []
    assert dep.manifest(job["job_id"])["state"] == "done"
