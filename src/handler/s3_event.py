"""S3 ObjectCreated on incoming/*.csv: create the job, split the CSV into chunks, fan out over SQS
(or hand a very large file to the GPU task). Bad input fails the job with a reason in its manifest;
only infrastructure errors raise (Lambda retries them, then the on-failure destination keeps them)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.data_classes import S3Event

from . import runtime

logger = Logger(service="text-image-similarity")
metrics = Metrics(namespace="TextImageSimilarity", service="s3_event")
tracer = Tracer(service="text-image-similarity")


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict, context: Any) -> dict:
    s = runtime.settings()
    jobs = runtime.jobs()
    started = []
    for record in S3Event(event).records:
        key = unquote_plus(record.s3.get_object.key)  # S3 event keys are URL-encoded ('+' is a space)
        if not key.startswith(s.input_prefix) or not key.lower().endswith(".csv"):
            logger.warning("ignored object outside the input prefix", extra={"key": key})
            continue
        obj = record.s3.get_object
        m = jobs.start(record.s3.bucket.name, key, version_id=obj.version_id, etag=obj.etag or None)
        logger.info("job", extra={"job_id": m.job_id, "state": m.state, "chunks": m.chunk_count, "rows": m.row_count,
                                  "reason": m.reason})
        metrics.add_metric(name="JobsStarted", unit=MetricUnit.Count, value=1)
        if m.state == "failed":
            metrics.add_metric(name="JobsRejected", unit=MetricUnit.Count, value=1)
        started.append({"job_id": m.job_id, "state": m.state, "chunks": m.chunk_count, "rows": m.row_count,
                        "path": m.path, "reason": m.reason})
    return {"jobs": started}
