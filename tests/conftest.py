"""Shared fixtures: the tiny CLIP, real loopback HTTP servers, moto's S3/SQS server on 127.0.0.1.

Everything here talks to loopback addresses only. The guard is opened for 127.0.0.1/32 alone, so
a second server on 127.0.0.2 plays the forbidden internal host.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from similarity.fetch import Fetcher, FetchSettings  # noqa: E402
from similarity.fetch.guard import AddressPolicy, parse_networks  # noqa: E402
from support.imageserver import ImageServer  # noqa: E402

TINY_CLIP = TESTS / "fixtures" / "tiny-clip"
LOOPBACK_ONLY = AddressPolicy(parse_networks("127.0.0.1/32"))

# Never let a test reach a real AWS endpoint or a hub.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["HF_HUB_OFFLINE"] = "1"
# The CLI caches embeddings in the user's cache directory by default; tests that want a cache
# ask for one (tests/*/test_cache*.py), so one test's entries never change another's counts.
os.environ.setdefault("SIMILARITY_CACHE", "off")
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_clip_dir() -> Path:
    return TINY_CLIP


@pytest.fixture(scope="session")
def tiny_model():
    from similarity.model import load_model

    return load_model(TINY_CLIP, backend="torch", device="cpu")


@pytest.fixture(scope="session")
def server() -> Iterator[ImageServer]:
    srv = ImageServer("127.0.0.1").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def forbidden_server() -> Iterator[ImageServer]:
    """Stands in for an internal host: a real server the guard must refuse to reach."""
    srv = ImageServer("127.0.0.2").start()
    yield srv
    srv.stop()


@pytest.fixture
def fast_settings() -> FetchSettings:
    return FetchSettings(
        connect_timeout=2,
        read_timeout=2,
        deadline=4,
        max_bytes=2 * 1024 * 1024,
        backoff_base=0.05,
        backoff_max=0.2,
        retry_after_cap=2,
        allow_local_paths=True,
    )


@pytest.fixture
def fetcher(fast_settings: FetchSettings) -> Iterator[Fetcher]:
    f = Fetcher(fast_settings, LOOPBACK_ONLY)
    yield f
    f.close()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto in server mode: a real HTTP endpoint on 127.0.0.1 for S3 and SQS."""
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    old = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    if old is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = old
    srv.stop()


@pytest.fixture
def s3(moto_endpoint: str):
    from similarity.aws import make_client

    return make_client("s3")


@pytest.fixture
def bucket(s3) -> str:
    import uuid

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name
