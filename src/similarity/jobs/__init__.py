"""The S3 batch pipeline: a CSV dropped in the bucket is split into chunks, fanned out over a
queue, scored chunk by chunk, and merged back in order. ``models`` holds the records, ``store``
the only code that knows the S3 layout, ``ports`` the queue and GPU launcher (AWS adapters),
``service`` the logic."""

from __future__ import annotations

from typing import Any

from ..config import JobSettings
from .models import ChunkMarker, ChunkMessage, JobPath, JobState, Location, Manifest
from .ports import ChunkQueue, EcsGpuLauncher, GpuLauncher, SqsChunkQueue
from .service import ChunkDeadline, JobService
from .store import JobStore


def make_service(settings: JobSettings, s3: Any, sqs: Any = None, ecs: Any = None) -> JobService:
    """A ``JobService`` on AWS clients (made by ``similarity.aws``)."""
    queue = SqsChunkQueue(sqs, settings.chunk_queue_url) if sqs is not None and settings.chunk_queue_url else None
    launcher = EcsGpuLauncher(ecs, settings) if ecs is not None and settings.gpu_enabled else None
    return JobService(settings, JobStore(s3, settings.jobs_prefix), queue, launcher)


__all__ = [
    "ChunkDeadline",
    "ChunkMarker",
    "ChunkMessage",
    "ChunkQueue",
    "EcsGpuLauncher",
    "GpuLauncher",
    "JobPath",
    "JobService",
    "JobState",
    "JobStore",
    "Location",
    "Manifest",
    "SqsChunkQueue",
    "make_service",
]
