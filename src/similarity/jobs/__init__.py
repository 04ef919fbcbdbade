"""The S3 batch pipeline: a CSV dropped in the bucket is split into chunks, fanned out over a
queue, scored chunk by chunk, and merged back in order. ``models`` holds the records, ``store``
the only code that knows the key layout, ``objects`` the object-store port and its S3 adapter,
``ports`` the queue, the GPU launcher, the splitter's starter and the chunk scorer (AWS adapters), ``service`` the logic."""

from __future__ import annotations

from typing import Any

from ..config import JobSettings
from .models import ChunkMarker, ChunkMessage, JobPath, JobState, Location, Manifest, StartRequest
from .objects import Blob, ObjectChanged, ObjectInfo, ObjectMissing, ObjectStore, PreconditionFailed, S3ObjectStore
from .ports import (
    ChunkQueue,
    ChunkScorer,
    EcsGpuLauncher,
    GpuLauncher,
    LambdaSplitStarter,
    SplitNotStarted,
    SplitStarter,
    SqsChunkQueue,
    pipeline_scorer,
)
from .service import ChunkDeadline, JobService, JobSuperseded, JobTooLarge, MergeBusy, StartOvertaken
from .store import JobStore


def make_service(
    settings: JobSettings, s3: Any, sqs: Any = None, ecs: Any = None, lambda_client: Any = None
) -> JobService:
    """A ``JobService`` on AWS clients (made by ``similarity.aws``). With ``lambda_client`` and
    SPLITTER_FUNCTION, ``submit`` hands the split to that function; without, it splits inline."""
    queue = SqsChunkQueue(sqs, settings.chunk_queue_url) if sqs is not None and settings.chunk_queue_url else None
    launcher = EcsGpuLauncher(ecs, settings) if ecs is not None and settings.gpu_enabled else None
    objects = S3ObjectStore(s3, part_size=settings.merge_part_mb * 1024 * 1024)
    splitter = (
        LambdaSplitStarter(lambda_client, settings.splitter_function)
        if lambda_client is not None and settings.splitter_function
        else None
    )
    return JobService(settings, JobStore(objects, settings.jobs_prefix), queue, launcher, splitter=splitter)


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
    "LambdaSplitStarter",
    "Location",
    "Manifest",
    "MergeBusy",
    "ObjectChanged",
    "ObjectInfo",
    "ObjectMissing",
    "ObjectStore",
    "PreconditionFailed",
    "S3ObjectStore",
    "SplitNotStarted",
    "SplitStarter",
    "SqsChunkQueue",
    "StartOvertaken",
    "StartRequest",
    "make_service",
    "pipeline_scorer",
]
