"""The example Airflow DAG against the deployment's real job routes.

A loopback "deployment": the API Lambda handler behind an HTTP adapter on 127.0.0.1, moto's S3
and SQS, a thread that plays Lambda's asynchronous invoke of the splitter (POST /jobs answers
`splitting` and hands the split over, as deployed), and one that plays SQS's event source for the
worker handler. The DAG's client
(examples/airflow/similarity_jobs.py) is tested here in the project's venv; the DAG itself runs
in the separate Airflow venv (``make airflow-venv``; CI builds it in .ci/run): it must load in a
DagBag, run a job to ``done``, and fail its run with the job's reason.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from queue import Empty, Queue

import pytest

from handler import runtime
from handler.invoke import LocalContext
from support.imageserver import png_bytes
from support.shapes import draw
from support.sqs_events import sqs_event

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "examples" / "airflow"
EVENTS = ROOT / "events"
AIRFLOW_PY = Path(os.environ.get("AIRFLOW_PYTHON", ROOT / ".venv-airflow" / "bin" / "python"))
sys.path.insert(0, str(DAGS))

from similarity_jobs import ApiError, JobFailed, JobsApi  # noqa: E402

pytestmark = pytest.mark.slow


class AsyncLambda:
    """The API's Lambda client: an asynchronous invoke is accepted at once (202) and runs later.
    Each hand-off is released to the splitter only once its POST /jobs has been answered."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pending: dict[int, list[dict]] = {}
        self.ready: Queue[dict] = Queue()

    def invoke(self, **kwargs: object) -> dict:
        with self.lock:
            self.pending.setdefault(threading.get_ident(), []).append(json.loads(str(kwargs["Payload"], "utf-8")))
        return {"StatusCode": 202}

    def release(self) -> None:
        with self.lock:
            for payload in self.pending.pop(threading.get_ident(), []):
                self.ready.put(payload)


class Deployment(ThreadingHTTPServer):
    """POST /jobs and GET /jobs/{id} as API Gateway hands them to the API function."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.headers_seen: list[dict[str, str]] = []
        #: When set, the next job started fails with this reason while it is in progress (as a GPU
        #: task that dies does), so the DAG meets the failure while it waits.
        self.fail_next_job: str | None = None
        self.lambda_client = AsyncLambda()

    def server_bind(self) -> None:  # no getfqdn: no DNS
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Deployment  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _invoke(self, method: str) -> None:
        import handler.api as api

        self.server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode() if length else None
        event = json.loads((EVENTS / "api_jobs_start.json").read_text())
        event["rawPath"] = event["requestContext"]["http"]["path"] = self.path
        event["requestContext"]["http"]["method"] = method
        event["routeKey"] = f"{method} {self.path}"
        event["body"] = body
        resp = api.lambda_handler(event, LocalContext(timeout_s=29))
        if method == "POST" and resp["statusCode"] == 202 and self.server.fail_next_job:
            jobs = runtime.services().jobs
            m = jobs.load(runtime.services().settings.jobs.bucket, json.loads(resp["body"])["job_id"])
            jobs.fail(m, self.server.fail_next_job)
            self.server.fail_next_job = None
        self.server.lambda_client.release()
        out = (resp.get("body") or "").encode()
        self.send_response(resp["statusCode"])
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_GET(self) -> None:
        self._invoke("GET")

    def do_POST(self) -> None:
        self._invoke("POST")


@pytest.fixture(scope="module")
def deployment(moto_endpoint, tiny_clip_dir) -> Iterator[dict]:
    from similarity.aws import make_client

    s3, sqs = make_client("s3"), make_client("sqs")
    bucket = f"data-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=f"chunks-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    env = {
        "CLIP_MODEL_DIR": str(tiny_clip_dir),
        "SIMILARITY_BACKEND": "torch",
        "SIMILARITY_ALLOWED_NETWORKS": "127.0.0.1/32",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "BUCKET": bucket,
        "CHUNK_QUEUE_URL": queue,
        "CHUNK_ROWS": "20",
        "PRELOAD_MODEL": "0",
        "WORKER_RESERVE_SECONDS": "5",
        "ECS_CLUSTER": "",
        "ECS_TASK_DEFINITION": "",
        "SPLITTER_FUNCTION": "splitter",  # as template.yaml sets it
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        runtime.reset()
        import handler.s3_event as s3_event
        import handler.worker as worker

        srv = Deployment()
        runtime.services().clients._made["lambda"] = srv.lambda_client
        stop, paused = threading.Event(), threading.Event()

        def splitter() -> None:  # Lambda running the asynchronous invokes of the splitter
            while not stop.is_set():
                try:
                    payload = srv.lambda_client.ready.get(timeout=0.2)
                except Empty:
                    continue
                try:
                    s3_event.lambda_handler(payload, LocalContext(timeout_s=900))
                except Exception:  # noqa: BLE001 - Lambda would retry; the job's status shows it stuck
                    traceback.print_exc()

        def event_source() -> None:  # SQS -> worker, as Lambda's event source mapping does
            while not stop.is_set():
                if paused.is_set():
                    time.sleep(0.2)
                    continue
                msgs = sqs.receive_message(
                    QueueUrl=queue, MaxNumberOfMessages=3, WaitTimeSeconds=1, AttributeNames=["All"]
                ).get("Messages", [])
                if not msgs:
                    continue
                resp = worker.lambda_handler(sqs_event(msgs), LocalContext(timeout_s=300))
                failed = {f["itemIdentifier"] for f in resp["batchItemFailures"]}
                for m in msgs:
                    if m["MessageId"] not in failed:
                        sqs.delete_message(QueueUrl=queue, ReceiptHandle=m["ReceiptHandle"])

        threads = [
            threading.Thread(target=srv.serve_forever, daemon=True),
            threading.Thread(target=event_source),
            threading.Thread(target=splitter),
        ]
        for t in threads:
            t.start()
        yield {"s3": s3, "bucket": bucket, "server": srv, "paused": paused}
        stop.set()
        srv.shutdown()
        srv.server_close()
        for t in threads[1:]:
            t.join(timeout=30)
        runtime.reset()


def put_csv(deployment: dict, key: str, server, rows: int = 45, header: str = "id,url,caption") -> str:
    import random

    url = server.image("/airflow/a.png", png_bytes(draw("red", "circle", random.Random(3))))
    body = header + "\n" + "".join(f"{i},{url},a red circle {i % 3}\n" for i in range(rows))
    deployment["s3"].put_object(Bucket=deployment["bucket"], Key=key, Body=body.encode())
    return f"s3://{deployment['bucket']}/{key}"


def wait_done(api: JobsApi, job_id: str, timeout: float = 180) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = api.check(job_id)
        if st is not None:
            return st
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish")


def test_client_runs_a_job_to_done(deployment, server) -> None:
    api = JobsApi(deployment["server"].url, auth="none")
    job = api.start(put_csv(deployment, "exports/a.csv", server))
    assert job["state"] == "splitting", job  # answered before the split: the splitter does it
    st = wait_done(api, job["job_id"])
    assert st["chunks"] == {"done": 3, "total": 3}
    assert st["rows"] == {"done": 45, "total": 45} and st["output"].endswith("/scored/_/exports/a_scored.csv")
    key = st["output"].split("/", 3)[3]
    text = deployment["s3"].get_object(Bucket=deployment["bucket"], Key=key)["Body"].read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["id"] for r in rows] == [str(i) for i in range(45)] and all(r["error"] == "" for r in rows)


def test_client_raises_the_jobs_reason(deployment, server) -> None:
    api = JobsApi(deployment["server"].url, auth="none")
    job = api.start(put_csv(deployment, "exports/bad.csv", server, header="id,link,caption"))
    with pytest.raises(JobFailed, match="no image URL column"):
        wait_done(api, job["job_id"])  # the splitter fails it, after POST /jobs answered


def test_client_reports_api_errors(deployment) -> None:
    api = JobsApi(deployment["server"].url, auth="none")
    with pytest.raises(ApiError, match=r"HTTP 400 bad_request: input and output must be in s3://"):
        api.start("s3://another-bucket/x.csv")
    with pytest.raises(ApiError, match="HTTP 404"):
        api.status("0123456789abcdef")


def test_client_signs_for_iam_or_sends_a_token(deployment) -> None:
    srv = deployment["server"]
    for auth, token in (("sigv4", None), ("bearer", "tok3n")):
        srv.headers_seen.clear()
        with pytest.raises(ApiError, match="HTTP 404"):
            JobsApi(srv.url, auth=auth, region="eu-west-1", token=token).status("0123456789abcdef")
        seen = srv.headers_seen[-1]
        if auth == "sigv4":
            assert seen["authorization"].startswith("AWS4-HMAC-SHA256 Credential=")
            assert "/eu-west-1/execute-api/aws4_request" in seen["authorization"] and "x-amz-date" in seen
        else:
            assert seen["authorization"] == "Bearer tok3n"
    with pytest.raises(ApiError, match="unknown auth"):
        JobsApi(srv.url, auth="basic").status("x")


# --------------------------------------------------------------------------------- Airflow venv
needs_airflow = pytest.mark.skipif(
    not AIRFLOW_PY.exists(), reason=f"no Airflow venv at {AIRFLOW_PY}: run `make airflow-venv` (CI does)"
)

RUNNER = """
import json, sys
from datetime import datetime, timezone
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
if bag.import_errors:
    print("IMPORT_ERRORS", json.dumps(bag.import_errors)); sys.exit(3)
dag = bag.dags["similarity_score_csv"]
if sys.argv[2] == "load":
    sensor = dag.get_task("wait")
    print("DAG", json.dumps({"tasks": sorted(t.task_id for t in dag.tasks), "mode": sensor.mode,
                             "params": sorted(dag.params.keys())}))
    sys.exit(0)
run = dag.test(logical_date=datetime(2026, 12, 1, tzinfo=timezone.utc), run_conf=json.loads(sys.argv[3]))
print("STATE", run.state)
for ti in run.get_task_instances():
    print("TASK", ti.task_id, ti.state)
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "SIMILARITY_DAG_POKE_SECONDS": "1",
        "NO_PROXY": "*",
    }
    return env


def run_airflow(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(AIRFLOW_PY), "-c", RUNNER, str(DAGS), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@needs_airflow
def test_dag_loads_in_a_dagbag(airflow_env) -> None:
    r = run_airflow(airflow_env, "load")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("DAG "))
    info = json.loads(line[4:])
    assert info == {
        "tasks": ["report", "submit", "wait"],
        "mode": "reschedule",
        "params": ["excel_safe", "input", "output"],
    }


@pytest.fixture(scope="module")
def airflow_db(airflow_env, deployment) -> dict[str, str]:
    if not AIRFLOW_PY.exists():
        pytest.skip(f"no Airflow venv at {AIRFLOW_PY}: run `make airflow-venv` (CI does)")
    r = subprocess.run(
        [str(AIRFLOW_PY.parent / "airflow"), "db", "migrate"],
        capture_output=True,
        text=True,
        env=airflow_env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    conn = {"conn_type": "http", "host": deployment["server"].url, "extra": {"auth": "none"}}
    return {**airflow_env, "AIRFLOW_CONN_SIMILARITY_API": json.dumps(conn)}


def test_dag_run_waits_for_the_job_and_reports(airflow_db, deployment, server) -> None:
    put_csv(deployment, "exports/2026-12-01.csv", server, rows=30)
    conf = {"input": f"s3://{deployment['bucket']}/exports/{{ds}}.csv", "output": None, "excel_safe": False}
    r = run_airflow(airflow_db, "test", json.dumps(conf))
    out = r.stdout + r.stderr
    assert "STATE success" in r.stdout, out[-6000:]
    assert {"TASK submit success", "TASK wait success", "TASK report success"} <= set(r.stdout.splitlines())
    assert "30 rows -> s3://" in out and "scored/_/exports/2026-12-01_scored.csv" in out


def test_dag_run_fails_with_the_jobs_reason(airflow_db, deployment, server) -> None:
    put_csv(deployment, "exports/2026-12-01-bad.csv", server, header="id,picture,caption")
    conf = {"input": f"s3://{deployment['bucket']}/exports/{{ds}}-bad.csv", "output": None, "excel_safe": False}
    r = run_airflow(airflow_db, "test", json.dumps(conf))
    out = r.stdout + r.stderr
    assert "STATE failed" in r.stdout, out[-6000:]
    # POST /jobs answers `splitting`; the splitter rejects the file, and the wait meets the reason
    assert {"TASK submit success", "TASK wait failed"} <= set(r.stdout.splitlines())
    assert "no image URL column" in out


def test_dag_run_fails_when_the_job_fails_while_it_waits(airflow_db, deployment, server) -> None:
    put_csv(deployment, "exports/2026-12-01-gpu.csv", server)
    deployment["paused"].set()  # no worker picks the chunks up: the job is still in progress when it fails
    deployment["server"].fail_next_job = "GPU task stopped: OutOfMemoryError"
    try:
        conf = {"input": f"s3://{deployment['bucket']}/exports/{{ds}}-gpu.csv", "output": None, "excel_safe": False}
        r = run_airflow(airflow_db, "test", json.dumps(conf))
    finally:
        deployment["paused"].clear()
        deployment["server"].fail_next_job = None
    out = r.stdout + r.stderr
    assert "STATE failed" in r.stdout, out[-6000:]
    assert {"TASK submit success", "TASK wait failed"} <= set(r.stdout.splitlines())
    assert "failed: GPU task stopped: OutOfMemoryError" in out
