"""Request and response bodies of the HTTP API (the Lambda API and ``similarity serve``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(description="http(s) URL, s3:// URI or data: URI")
    caption: str


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Pair] = Field(min_length=1)


#: s3://bucket/key with a bucket name S3 allows (3-63 of a-z 0-9 . -): anything else, such as a
#: "]" that URL parsing reads as a broken IPv6 host, is a field error, never a failure later on.
S3_URI = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+"


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(pattern=S3_URI, description="s3://bucket/key of a CSV")
    output: str | None = Field(default=None, pattern=S3_URI)
    excel_safe: bool | None = Field(
        default=None, description="prefix cells starting with = + - @ with '; default: SIMILARITY_EXCEL_SAFE"
    )


# ------------------------------------------------------------------------------- response bodies
# What the routes answer, for the OpenAPI document (``docs/openapi.json``) and the tests that hold
# the live answers to it; the service builds the bodies as plain dicts.
class RowResult(BaseModel):
    similarity: float | None = Field(description="(cos + 1) / 2, 4 decimals; null when the row has an error")
    cosine: float | None = Field(description="raw cosine, 4 decimals; null when the row has an error")
    error: str | None = Field(description="`code: detail`, or null when the row was scored")
    error_code: str | None = Field(description="the row error's code (see the README's table)")
    truncated: bool = Field(description="the caption was cut at the model's token limit")


class ModelRef(BaseModel):
    id: str
    revision: str


class ScoreResponse(BaseModel):
    results: list[RowResult] = Field(description="one per pair, in request order")
    model: ModelRef


class FieldError(BaseModel):
    field: str
    message: str


class ErrorDetail(BaseModel):
    code: str
    message: str
    fields: list[FieldError] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str


class ModelDescription(BaseModel):
    id: str
    revision: str
    backend: str
    device: str
    dtype: str
    load_seconds: float


class CanaryReport(BaseModel):
    """A built-in image and caption scored now, against the score recorded when the model loaded."""

    cosine: float | None
    expected: float | None
    drift: float | None
    tolerance: float
    seconds: float
    age_seconds: float = Field(description="how long ago this check ran (checks are reused for a few seconds)")
    reason: str | None = None


class Ready(BaseModel):
    status: str
    model: ModelDescription
    canary: CanaryReport | None = None


class NotReady(BaseModel):
    status: str
    reason: str
    canary: CanaryReport | None = None


class Progress(BaseModel):
    done: int
    total: int


class JobStatus(BaseModel):
    job_id: str
    state: str
    path: str
    reason: str | None
    input: str
    output: str
    chunks: Progress
    rows: Progress
    errors: dict[str, int]
    errors_complete: bool
    elapsed_seconds: float
    compute_seconds: float
    estimated_cost_usd: float
