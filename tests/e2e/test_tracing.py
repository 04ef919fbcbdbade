"""What the Lambda functions' X-Ray tracer records, read from the UDP packets its emitter sends.

A fresh process plays a sampled Lambda invocation (the variables the Lambda runtime sets, the
X-Ray daemon address pointed at a socket on 127.0.0.1 here), imports the handlers, then fetches
images from the loopback image server (or answers the API's /score) and calls moto's S3 through
the handlers' clients.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from PIL import Image

from support.imageserver import png_bytes
from support.lambda_env import runtime_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from handler.runtime import Clients  # the handlers' composition root and tracer
from similarity import Fetcher, FetchSettings
from similarity.fetch.guard import AddressPolicy, parse_networks

fetcher = Fetcher(FetchSettings(), AddressPolicy(parse_networks("127.0.0.1/32")))
for url in sys.argv[1:]:
    assert fetcher.fetch(url)
Clients().get("s3").list_buckets()
print("done")
"""

# The API function's cold start as Lambda runs it: the init imports the handler (which loads the
# model), then a /score that needs no AWS call; an S3 call later is still traced.
API_SCRIPT = """
import base64, json, sys
import handler.api as api
from handler import runtime
from handler.invoke import LocalContext

assert runtime.services().run.loaded, "the model was not preloaded"
ev = json.load(open(sys.argv[1]))
ev["body"] = json.dumps({"pairs": [{"image": "data:image/png;base64," + sys.argv[2], "caption": "a red square"}]})
ev["isBase64Encoded"] = False
r = api.lambda_handler(ev, LocalContext(function_name="ApiFunction"))
assert r["statusCode"] == 200 and json.loads(r["body"])["results"][0]["cosine"] is not None, r
# (powertools imports the bare botocore package, 1 ms, to add its user agent if botocore is there)
sdk = sorted(m for m in sys.modules if m.startswith(("botocore.", "boto3")))
print("AWS SDK imported by the cold start:", sdk[:3])
runtime.services().clients.get("s3").list_buckets()
"""


def _subsegments(sock: socket.socket) -> list[dict]:
    found = []
    try:
        while True:
            packet = sock.recv(1 << 16).decode()
            _header, _, body = packet.partition("\n")  # '{"format": "json", "version": 1}' first
            doc = json.loads(body)
            stack = [doc]
            while stack:  # a streamed subsegment may carry closed children of its own
                entity = stack.pop()
                found.append(entity)
                stack.extend(entity.get("subsegments", []))
    except BlockingIOError:
        return found


def _traced_run(args: list[str], moto_endpoint: str, **env: str) -> tuple[str, list[dict]]:
    """Runs ``python -c *args`` as a sampled Lambda invocation: its stdout, and what it traced."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        env = {
            **os.environ,
            **runtime_env("tracing-test", os.getcwd(), sock.getsockname()[1]),
            "AWS_ENDPOINT_URL": moto_endpoint,
            **env,
        }
        env.pop("POWERTOOLS_TRACE_DISABLED", None)
        r = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        sock.setblocking(False)
        return r.stdout, _subsegments(sock)
    finally:
        sock.close()


def test_tracer_records_aws_calls_not_each_image_fetch(server, moto_endpoint) -> None:
    urls = [server.image(f"/trace/{i}.png", png_bytes(Image.new("RGB", (32, 32), "red"))) for i in range(5)]
    _, entities = _traced_run([SCRIPT, *urls], moto_endpoint)
    aws = [e for e in entities if e.get("namespace") == "aws"]
    assert [e["name"] for e in aws] == ["s3"], entities  # the AWS SDK call is traced
    fetched = [e for e in entities if server.base in json.dumps(e) or "/trace/" in json.dumps(e)]
    assert fetched == [], f"image fetches were traced: {fetched[:2]}"


def test_api_cold_start_imports_no_aws_sdk_until_a_client_is_needed(tiny_onnx_dir, moto_endpoint) -> None:
    """Patching botocore for X-Ray at import imported it (~0.1 s of the API function's cold start
    on a Zen 4) although /score needs no AWS call; the patch now comes with the first client."""
    image = base64.b64encode(png_bytes(Image.new("RGB", (40, 40), "red"))).decode()
    event = str(ROOT / "events" / "api_score.json")
    out, entities = _traced_run(
        [API_SCRIPT, event, image],
        moto_endpoint,
        CLIP_MODEL_DIR=str(tiny_onnx_dir),
        SIMILARITY_BACKEND="onnx",
        SIMILARITY_DTYPE="fp32",
        PYTHONPATH=str(ROOT / "src"),
    )
    assert "AWS SDK imported by the cold start: []" in out, out
    assert [e["name"] for e in entities if e.get("namespace") == "aws"] == ["s3"], entities
