"""The one place AWS clients are created.

boto3 reads the standard environment (credentials, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``), so pointing the same code at a local endpoint
(moto in the tests) needs no code change. Retries use botocore's adaptive mode.
"""

from __future__ import annotations

import os
from typing import Any


def _config(max_pool: int = 32) -> Any:
    from botocore.config import Config

    return Config(retries={"max_attempts": 5, "mode": "adaptive"}, max_pool_connections=max_pool)


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def make_client(service: str, max_pool: int = 32) -> Any:
    import boto3

    return boto3.session.Session().client(service, region_name=_region(), config=_config(max_pool))


def make_s3_client(max_pool: int = 32) -> Any:
    return make_client("s3", max_pool)
