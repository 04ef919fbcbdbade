"""SQS chunk worker: one message = one chunk. Partial batch responses through powertools'
BatchProcessor, so one bad message never fails its neighbours.

A message that is not finished is never acknowledged, and never waits the queue's whole visibility
timeout (30 min) to come back: it is handed back with a short visibility first, and its cause is
logged.

* near the deadline (``ChunkDeadline``): back in ``WORKER_HANDBACK_SECONDS``, its part never
  half-written;
* every chunk done but another attempt is merging (``MergeBusy``): back when that attempt's lock
  expires;
* any other error: back in ``WORKER_RETRY_SECONDS``; the third receive sends it to the DLQ.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord

from similarity.jobs import ChunkDeadline, ChunkMessage, MergeBusy, pipeline_scorer

from . import runtime
from .observability import logger, metrics_for, tracer

metrics = metrics_for("worker")
# All-failed batches are reported item by item too, rather than as an invocation error.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@tracer.capture_method(capture_response=False)
def record_handler(record: SQSRecord, lambda_context: Any = None) -> None:
    # Lambda always sets the receive count; an event made by hand may not (the log says so).
    context = {"message_id": record.message_id, "receive_count": record.attributes.get("ApproximateReceiveCount")}
    try:
        _process(record, lambda_context, context)
    except Exception as exc:
        _hand_back(record, exc, context)
        raise  # reported in batchItemFailures: the message is not deleted


def _process(record: SQSRecord, lambda_context: Any, context: dict[str, Any]) -> None:
    msg = ChunkMessage.model_validate_json(record.body)  # a malformed body fails -> retried -> DLQ
    context.update(job_id=msg.job_id, chunk=msg.chunk)
    s = runtime.services()
    run = s.run
    reserve = s.settings.jobs.worker_reserve_seconds
    # No single image may outlive the margin kept before the Lambda deadline.
    fetcher = run.fetcher.with_settings(deadline=min(run.fetcher.settings.deadline, max(1.0, reserve / 2)))

    def time_left() -> float:
        return lambda_context.get_remaining_time_in_millis() / 1000 if lambda_context else float("inf")

    scorer = pipeline_scorer(run.model, fetcher, batch_size=run.batch_size, workers=run.workers, cache=run.cache)
    try:
        complete = s.jobs.process_chunk(msg, scorer, record.message_id, time_left)
    finally:
        for name, n in run.cache_metrics().items():  # CacheImageHits, ..., CacheStoreErrors
            metrics.add_metric(name=name, unit=MetricUnit.Count, value=n)
    metrics.add_metric(name="ChunksScored", unit=MetricUnit.Count, value=1)
    if complete:
        logger.info("job complete", extra={"job_id": msg.job_id})


def _hand_back(record: SQSRecord, exc: Exception, context: dict[str, Any]) -> None:
    """Log why the message failed and make it visible again after a delay that fits the cause."""
    if isinstance(exc, ChunkDeadline):
        logger.warning("chunk handed back at the deadline", extra={**context, "reason": str(exc)})
    elif isinstance(exc, MergeBusy):
        logger.warning("merge in progress elsewhere; message comes back", extra={**context, "reason": str(exc)})
    else:
        logger.exception("chunk failed", extra={**context, "error": f"{type(exc).__name__}: {exc}"})
    try:
        s = runtime.services()
        if isinstance(exc, ChunkDeadline):
            delay: float = s.settings.jobs.handback_seconds
        elif isinstance(exc, MergeBusy):
            delay = exc.retry_after
        else:
            delay = s.settings.jobs.retry_seconds
        s.jobs.hand_back(record.receipt_handle, delay)
    except Exception:  # noqa: BLE001 - the queue's visibility timeout brings it back anyway
        logger.exception("could not hand the message back early", extra=context)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return dict(
        process_partial_response(event=event, record_handler=record_handler, processor=processor, context=context)
    )


if runtime.in_lambda():
    runtime.preload()
