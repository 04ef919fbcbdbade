"""Property-based fuzzing of ``similarity serve`` from its committed OpenAPI document
(docs/openapi.json) with schemathesis, against the real server: no 5xx, and every answer
conforms to the document (status documented, body matching its schema).

The schema is loaded from the file at import (no server needed to collect); the server is a
module fixture. Generated http(s) image URLs (in /score's pairs and in the Open Inference
Protocol's tensors) are pointed at the loopback image server before each call, so fuzzing never
resolves or contacts a host beyond 127.0.0.1; s3:// goes to moto.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from support.imageserver import png_bytes
from support.serveproc import Served, tiny_env
from support.shapes import draw

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
TOKEN = "fuzz-" + uuid.uuid4().hex
schema = schemathesis.openapi.from_path(str(DOC))


@pytest.fixture(scope="module")
def fuzzed(moto_endpoint, server):
    from similarity.aws import make_client

    bucket = f"fuzz-{uuid.uuid4().hex[:10]}"
    make_client("s3").create_bucket(Bucket=bucket)
    env = tiny_env(
        BUCKET=bucket,
        AWS_ENDPOINT_URL=moto_endpoint,
        SERVER_AUTH_TOKEN=TOKEN,
        MAX_PAIRS="16",
        SERVER_REQUEST_TIMEOUT="6",
        SIMILARITY_MAX_RETRIES="0",
    )
    image = server.image("/fuzz/red.png", png_bytes(draw("red", "circle", random.Random(1))))
    with Served(env=env) as srv:
        srv.wait_ready()
        with requests.Session() as http:
            yield {"server": srv, "http": http, "image": image}


def fetchable(value: object) -> bool:
    """What the fetcher would request: a string whose scheme (as urlsplit reads it, or more) is http(s)."""
    return isinstance(value, str) and value.strip().split(":", 1)[0].lower() in ("http", "https")


def loopback_only(body: object, image: str) -> None:
    """Generated URLs with an http(s) scheme become the test image: in /score's pairs, and in any
    element of an infer request's tensors (nested lists included)."""
    if isinstance(body, dict) and isinstance(body.get("pairs"), list):
        for pair in body["pairs"]:
            if isinstance(pair, dict) and fetchable(pair.get("image")):
                pair["image"] = image
    if isinstance(body, dict) and isinstance(body.get("inputs"), list):
        for tensor in body["inputs"]:
            if isinstance(tensor, dict) and isinstance(tensor.get("data"), list):
                tensor["data"] = _pointed(tensor["data"], image)


def _pointed(data: list, image: str) -> list:
    return [_pointed(v, image) if isinstance(v, list) else image if fetchable(v) else v for v in data]


@schema.parametrize()
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_document(case, fuzzed) -> None:
    loopback_only(case.body, fuzzed["image"])
    case.call_and_validate(
        base_url=fuzzed["server"].url,
        session=fuzzed["http"],
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=30,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
