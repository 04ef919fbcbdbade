"""What the Lambda functions' X-Ray tracer records, read from the UDP packets its emitter sends.

A fresh process plays a sampled Lambda invocation (the variables the Lambda runtime sets, the
X-Ray daemon address pointed at a socket on 127.0.0.1 here), imports the handlers' tracer, then
fetches images from the loopback image server and calls moto's S3.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from PIL import Image

from support.imageserver import png_bytes

SCRIPT = """
import sys
import handler.observability  # the handlers' tracer, patching what the Lambda functions get
from similarity import Fetcher, FetchSettings
from similarity.aws import make_client
from similarity.fetch.guard import AddressPolicy, parse_networks

fetcher = Fetcher(FetchSettings(), AddressPolicy(parse_networks("127.0.0.1/32")))
for url in sys.argv[1:]:
    assert fetcher.fetch(url)
make_client("s3").list_buckets()
print("done")
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


def test_tracer_records_aws_calls_not_each_image_fetch(server, moto_endpoint) -> None:
    urls = [server.image(f"/trace/{i}.png", png_bytes(Image.new("RGB", (32, 32), "red"))) for i in range(5)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        env = {
            **os.environ,
            "AWS_LAMBDA_FUNCTION_NAME": "tracing-test",
            "LAMBDA_TASK_ROOT": os.getcwd(),  # what tells the X-Ray SDK it runs in Lambda
            "_X_AMZN_TRACE_ID": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
            "AWS_XRAY_DAEMON_ADDRESS": f"127.0.0.1:{sock.getsockname()[1]}",
            "AWS_ENDPOINT_URL": moto_endpoint,
        }
        env.pop("POWERTOOLS_TRACE_DISABLED", None)
        r = subprocess.run([sys.executable, "-c", SCRIPT, *urls], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        sock.setblocking(False)
        entities = _subsegments(sock)
    finally:
        sock.close()
    aws = [e for e in entities if e.get("namespace") == "aws"]
    assert [e["name"] for e in aws] == ["s3"], entities  # the AWS SDK call is traced
    fetched = [e for e in entities if server.base in json.dumps(e) or "/trace/" in json.dumps(e)]
    assert fetched == [], f"image fetches were traced: {fetched[:2]}"
