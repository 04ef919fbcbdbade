"""S3 ObjectCreated on incoming/*.csv, or a start that ``POST /jobs`` hands over (an asynchronous
invoke with a ``StartRequest``: bucket, key, version_id, etag, output, excel_safe): create the job
or carry on from its ``splitting`` manifest, split the CSV into chunks, fan out over SQS (or hand a
very large file to the GPU task). Bad input fails the job with a reason in its manifest; only
infrastructure errors raise (Lambda retries them, then the on-failure destination keeps them)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event

from similarity.jobs import JobService, JobState, Manifest, StartRequest

from . import runtime
from .observability import logger, metrics_for, tracer

metrics = metrics_for("s3_event")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    s = runtime.services()
    if "Records" not in event:
        # POST /jobs's hand-off: any key it accepted (no prefix filter); a malformed one raises.
        req = StartRequest.model_validate(event)
        return {"jobs": [_report(_start(s.jobs, req))]}
    started = []
    for record in S3Event(event).records:
        key = unquote_plus(record.s3.get_object.key)  # S3 event keys are URL-encoded ('+' is a space)
        if not key.startswith(s.settings.jobs.input_prefix) or not key.lower().endswith(".csv"):
            logger.warning("ignored object outside the input prefix", extra={"key": key})
            continue
        obj = record.s3.get_object
        req = StartRequest(
            bucket=record.s3.bucket.name,
            key=key,
            version_id=obj.version_id,
            etag=obj.etag or None,
            excel_safe=s.settings.score.excel_safe,
        )
        started.append(_report(_start(s.jobs, req)))
    return {"jobs": started}


def _start(jobs: JobService, req: StartRequest) -> Manifest:
    return jobs.start(
        req.bucket, req.key, version_id=req.version_id, etag=req.etag, output=req.output, excel_safe=req.excel_safe
    )


def _report(m: Manifest) -> dict[str, Any]:
    logger.info(
        "job",
        extra={
            "job_id": m.job_id,
            "state": m.state.value,
            "chunks": m.chunk_count,
            "rows": m.row_count,
            "reason": m.reason,
        },
    )
    metrics.add_metric(name="JobsStarted", unit=MetricUnit.Count, value=1)
    if m.state == JobState.FAILED:
        metrics.add_metric(name="JobsRejected", unit=MetricUnit.Count, value=1)
    return {
        "job_id": m.job_id,
        "state": m.state.value,
        "chunks": m.chunk_count,
        "rows": m.row_count,
        "path": m.path.value,
        "reason": m.reason,
    }
