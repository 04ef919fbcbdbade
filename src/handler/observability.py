"""Logger, metrics and tracer for the Lambda functions, configured once from the standard
``POWERTOOLS_*`` variables (the template sets them; these are the defaults)."""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "text-image-similarity")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "TextImageSimilarity")

logger = Logger(service=SERVICE)
# Patched by trace_aws_sdk, not at import (which would import botocore).
tracer = Tracer(service=SERVICE, auto_patch=False)


def trace_aws_sdk() -> None:
    """Trace AWS SDK calls; the composition root calls this before it makes a client (idempotent).
    Not at import: the patch imports botocore, ~0.1 s of a cold start whose requests may need no
    AWS call (the API's /score). Only botocore: patching all X-Ray supports would also trace every
    image fetch and local-store query, +0.3-0.5 ms of CPU per fetch (Zen 4; docs/deploy.md)."""
    tracer.patch(("botocore",))


def metrics_for(function: str) -> Metrics:
    """Metrics with the function as the ``service`` dimension (each Lambda imports one handler)."""
    return Metrics(namespace=NAMESPACE, service=function)
