"""What the job service needs from the outside besides object storage (``objects``): a queue for
chunk messages, a launcher for the GPU task, a starter for the splitter (``POST /jobs`` hands the
split to it), and a scorer for one chunk. AWS adapters here;
in-memory fakes in the tests (``tests/unit/fakes.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TextIO

from ..cache import EmbeddingCache
from ..config import JobSettings
from ..fetch import Fetcher
from ..model import ClipModel
from ..pipeline import FileResult, score_stream
from .models import ChunkMessage, Manifest, StartRequest


class ChunkQueue(Protocol):
    def send(self, messages: Sequence[ChunkMessage]) -> None:
        """Send every message or raise."""

    def hand_back(self, receipt: str, delay_seconds: int) -> None:
        """Make a received message visible again after ``delay_seconds`` (instead of the queue's
        whole visibility timeout)."""


class GpuLauncher(Protocol):
    def launch(self, m: Manifest) -> str:
        """Start the GPU task for the job (at most one per job, however often it is called);
        return its id (ARN) or raise."""


class SplitNotStarted(Exception):
    """The splitter could not be handed the job (the invoke was refused or failed)."""


class SplitStarter(Protocol):
    def start(self, request: StartRequest) -> None:
        """Hand the split to the splitter, without waiting for it; raise ``SplitNotStarted`` when
        it was not accepted."""


class ChunkScorer(Protocol):
    def __call__(self, src: TextIO, dst: TextIO, *, excel_safe: bool, on_row: Callable[[int], None]) -> FileResult:
        """Score the CSV ``src`` into ``dst`` (headerless), calling ``on_row`` after each row."""


def pipeline_scorer(
    model: ClipModel,
    fetcher: Fetcher,
    batch_size: int = 32,
    workers: int = 16,
    cache: EmbeddingCache | None = None,
) -> ChunkScorer:
    """The library's scorer, as the worker runs it. ``cache``: the embedding cache (shared by the
    workers through Redis in the deployment)."""

    def score(src: TextIO, dst: TextIO, *, excel_safe: bool, on_row: Callable[[int], None]) -> FileResult:
        return score_stream(
            src,
            dst,
            model,
            fetcher,
            batch_size=batch_size,
            workers=workers,
            excel_safe=excel_safe,
            write_header=False,
            on_row=on_row,
            cache=cache,
        )

    return score


class SqsChunkQueue:
    def __init__(self, sqs: Any, queue_url: str) -> None:
        self.sqs = sqs
        self.queue_url = queue_url

    def send(self, messages: Sequence[ChunkMessage]) -> None:
        entries = [{"Id": str(i), "MessageBody": msg.model_dump_json()} for i, msg in enumerate(messages)]
        for start in range(0, len(entries), 10):
            batch = entries[start : start + 10]
            for _attempt in range(5):
                resp = self.sqs.send_message_batch(QueueUrl=self.queue_url, Entries=batch)
                failed = {f["Id"] for f in resp.get("Failed", [])}
                batch = [e for e in batch if e["Id"] in failed]
                if not batch:
                    break
                time.sleep(0.2)
            if batch:
                raise RuntimeError(f"could not enqueue {len(batch)} chunk messages")

    def hand_back(self, receipt: str, delay_seconds: int) -> None:
        self.sqs.change_message_visibility(
            QueueUrl=self.queue_url, ReceiptHandle=receipt, VisibilityTimeout=max(0, min(delay_seconds, 43200))
        )


class EcsGpuLauncher:
    def __init__(self, ecs: Any, settings: JobSettings) -> None:
        self.ecs = ecs
        self.settings = settings

    def launch(self, m: Manifest) -> str:
        s = self.settings
        command = [
            "--bucket",
            m.source.bucket,
            "--input-key",
            m.source.key,
            "--output-bucket",
            m.output.bucket,
            "--output-key",
            m.output.key,
            "--job-id",
            m.job_id,
        ]
        kwargs: dict[str, Any] = {
            "cluster": s.ecs_cluster,
            "taskDefinition": s.ecs_task_definition,
            "count": 1,
            "startedBy": f"job-{m.job_id}"[:36],
            # ECS starts one task per token: a start retried after its answer was lost starts none.
            "clientToken": m.job_id,
            "overrides": {"containerOverrides": [{"name": s.ecs_container_name, "command": command}]},
            "networkConfiguration": {
                "awsvpcConfiguration": {
                    "subnets": list(s.ecs_subnets),
                    "securityGroups": list(s.ecs_security_groups),
                    "assignPublicIp": "DISABLED",
                }
            },
        }
        if s.ecs_capacity_provider:
            kwargs["capacityProviderStrategy"] = [{"capacityProvider": s.ecs_capacity_provider, "weight": 1}]
        resp = self.ecs.run_task(**kwargs)
        if resp.get("failures") or not resp.get("tasks"):
            raise RuntimeError(f"RunTask failed for job {m.job_id}: {resp.get('failures')}")
        return str(resp["tasks"][0]["taskArn"])


class LambdaSplitStarter:
    """Invokes the splitter function asynchronously: Lambda queues the event and answers 202 at
    once, retries a failed run (EventInvokeConfig) and keeps the last failure (OnFailure)."""

    def __init__(self, lambda_client: Any, function_name: str) -> None:
        self.lambda_client = lambda_client
        self.function_name = function_name

    def start(self, request: StartRequest) -> None:
        payload = json.dumps(request.model_dump(mode="json")).encode()
        try:
            resp = self.lambda_client.invoke(FunctionName=self.function_name, InvocationType="Event", Payload=payload)
        except Exception as exc:  # botocore's ClientError or a connection error, after its retries
            raise SplitNotStarted(f"invoking {self.function_name}: {type(exc).__name__}: {exc}") from exc
        if resp.get("StatusCode") != 202:  # an Event invoke is accepted with 202, or not at all
            raise SplitNotStarted(f"invoking {self.function_name}: status {resp.get('StatusCode')}")
