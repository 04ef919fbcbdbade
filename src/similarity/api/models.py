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


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: str = Field(pattern=r"^s3://[^/]+/.+", description="s3://bucket/key of a CSV")
    output: str | None = Field(default=None, pattern=r"^s3://[^/]+/.+")
    excel_safe: bool = Field(default=False, description="prefix cells starting with = + - @ with '")
