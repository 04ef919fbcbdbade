"""What the job service needs from the outside besides S3 (``JobStore``): a queue for chunk
messages and a launcher for the GPU task. AWS adapters here; in-memory fakes in the tests."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

from ..config import JobSettings
from .models import ChunkMessage, Manifest


class ChunkQueue(Protocol):
    def send(self, messages: Sequence[ChunkMessage]) -> None:
        """Send every message or raise."""


class GpuLauncher(Protocol):
    def launch(self, m: Manifest) -> str:
        """Start the GPU task for the job; return its id (ARN) or raise."""


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
