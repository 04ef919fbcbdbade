"""The batch pipeline's records: job state, the manifest, chunk messages and markers."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class JobState(StrEnum):
    SPLITTING = "splitting"  # the splitter is cutting the file into chunks
    RUNNING = "running"  # every chunk message is out; workers are scoring
    MERGING = "merging"  # the last part is in; one worker is writing the output
    GPU = "gpu"  # the ECS GPU task is scoring the whole file
    DONE = "done"
    FAILED = "failed"


class JobPath(StrEnum):
    LAMBDA = "lambda"
    GPU = "gpu"


class Location(BaseModel):
    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class Manifest(BaseModel):
    job_id: str
    state: JobState
    source: Location
    output: Location
    created_at: float
    updated_at: float
    path: JobPath = JobPath.LAMBDA
    chunk_rows: int = 0
    chunk_count: int = 0
    row_count: int = 0
    header: list[str] = Field(default_factory=list)
    excel_safe: bool = False
    reason: str | None = None
    scored: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    compute_seconds: float = 0.0
    finished_at: float | None = None
    ecs_task_arn: str | None = None
    #: The start (``starts/attempt-N``) that wrote this manifest: two starts never write the same
    #: bytes, so a conditional write (ETag = MD5 of the bytes) tells them apart.
    start_attempt: int = 0


class StartRequest(BaseModel):
    """What ``POST /jobs`` hands the splitter (an asynchronous invoke of the S3 event function):
    the source version it checked, and what it asked for. The splitter's ``JobService.start`` on
    it carries on from the ``splitting`` manifest the API created."""

    bucket: str
    key: str
    version_id: str | None = None
    etag: str | None = None
    output: Location | None = None
    excel_safe: bool = False


class ChunkMessage(BaseModel):
    job_id: str
    bucket: str
    chunk: int
    chunks: int


class ChunkMarker(BaseModel):
    """Written after a chunk's part: its presence means the part is final."""

    rows: int
    scored: int
    errors: dict[str, int] = Field(default_factory=dict)
    seconds: float = 0.0
