"""The S3 batch pipeline: a CSV dropped in the bucket is split into chunks, fanned out over a
queue, scored chunk by chunk, and merged back in order. ``models`` holds the records, ``store``
the only code that knows the key layout, ``objects`` the object-store port and its S3 adapter,
``ports`` the queue, the GPU launcher and the chunk scorer (AWS adapters), ``service`` the logic."""

from __future__ import annotations

from typing import Any

from ..config import JobSettings
from .models import ChunkMarker, ChunkMessage, JobPath, JobState, Location, Manifest
from .objects import Blob, ObjectChanged, ObjectInfo, ObjectMissing, ObjectStore, PreconditionFailed, S3ObjectStore
from .ports import ChunkQueue, ChunkScorer, EcsGpuLauncher, GpuLauncher, SqsChunkQueue, pipeline_scorer
from .service import ChunkDeadline, JobService, JobSuperseded, JobTooLarge, MergeBusy, StartOvertaken
from .store import JobStore


def make_service(settings: JobSettings, s3: Any, sqs: Any = None, ecs: Any = None) -> JobService:
    """A ``JobService`` on AWS clients (made by ``similarity.aws``)."""
    queue = SqsChunkQueue(sqs, settings.chunk_queue_url) if sqs is not None and settings.chunk_queue_url else None
    launcher = EcsGpuLauncher(ecs, settings) if ecs is not None and settings.gpu_enabled else None
    objects = S3ObjectStore(s3, part_size=settings.merge_part_mb * 1024 * 1024)
    return JobService(settings, JobStore(objects, settings.jobs_prefix), queue, launcher)


__all__ = [
    "Blob",
    "ChunkDeadline",
    "ChunkMarker",
    "ChunkMessage",
    "ChunkQueue",
    "ChunkScorer",
    "EcsGpuLauncher",
    "GpuLauncher",
    "JobPath",
    "JobService",
    "JobState",
    "JobStore",
    "JobSuperseded",
    "JobTooLarge",
    "Location",
    "Manifest",
    "MergeBusy",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectMissing",
    "ObjectStore",
    "PreconditionFailed",
    "S3ObjectStore",
    "SqsChunkQueue",
    "StartOvertaken",
    "make_service",
    "pipeline_scorer",
]
