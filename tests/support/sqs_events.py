"""The event Lambda's SQS event source hands the worker, from messages as ``receive_message``
returns them (asked with ``AttributeNames=["All"]``, as the event source does)."""

from __future__ import annotations

from typing import Any

QUEUE_ARN = "arn:aws:sqs:us-east-1:123456789012:chunks"


def sqs_event(messages: list[dict[str, Any]], queue_arn: str = QUEUE_ARN) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m["MD5OfBody"],
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
    }
