"""The one place AWS clients are created; everything else receives them.

boto3 reads the standard environment and profile (credentials, region, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3``), so pointing the same code at a local endpoint (moto in the tests) needs
no code change. Retries use botocore's ``standard`` mode, which AWS recommends for services shared
by many clients (``adaptive`` throttles the client itself on the first 503s).
"""

from __future__ import annotations

from typing import Any

DEFAULT_REGION = "us-east-1"


def make_client(service: str, max_pool: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    return session.client(
        service,
        # The environment's or the profile's region; us-east-1 only when neither names one.
        region_name=session.region_name or DEFAULT_REGION,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=max_pool),
    )
