"""SQS chunk worker: one message = one chunk. Partial batch responses through powertools'
BatchProcessor, so one bad message never fails its neighbours; a chunk that cannot finish before the
deadline is reported failed and returns to the queue, its part never half-written."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from similarity.jobs import ChunkMessage

from . import runtime
from .observability import logger, metrics_for, tracer

metrics = metrics_for("worker")
# All-failed batches are reported item by item too, rather than as an invocation error.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@tracer.capture_method(capture_response=False)
def record_handler(record: SQSRecord, lambda_context: Any = None) -> None:
    msg = ChunkMessage.model_validate_json(record.body)  # a malformed body fails -> retried -> DLQ
    s = runtime.services()
    run = s.run
    reserve = s.settings.jobs.worker_reserve_seconds
    # No single image may outlive the margin kept before the Lambda deadline.
    fetcher = run.fetcher.with_settings(deadline=min(run.fetcher.settings.deadline, max(1.0, reserve / 2)))

    def time_left() -> float:
        return lambda_context.get_remaining_time_in_millis() / 1000 if lambda_context else float("inf")

    try:
        complete = s.jobs.process_chunk(
            msg,
            run.model,
            fetcher,
            record.message_id,
            time_left,
            batch_size=run.batch_size,
            workers=run.workers,
            cache=run.cache,
        )
    finally:
        for name, n in run.cache_metrics().items():  # CacheImageHits, ..., CacheStoreErrors
            metrics.add_metric(name=name, unit=MetricUnit.Count, value=n)
    metrics.add_metric(name="ChunksScored", unit=MetricUnit.Count, value=1)
    if complete:
        logger.info("job complete", extra={"job_id": msg.job_id})


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return dict(
        process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
    )


if runtime.in_lambda():
    runtime.preload()
