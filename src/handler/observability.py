"""Logger, metrics and tracer for the Lambda functions, configured once from the standard
``POWERTOOLS_*`` variables (the template sets them; these are the defaults)."""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics, Tracer

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "text-image-similarity")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "TextImageSimilarity")

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)


def metrics_for(function: str) -> Metrics:
    """Metrics with the function as the ``service`` dimension (each Lambda imports one handler)."""
    return Metrics(namespace=NAMESPACE, service=function)
