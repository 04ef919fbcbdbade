"""A fault-injecting HTTP proxy on 127.0.0.1 between boto3 and moto's server.

Point ``AWS_ENDPOINT_URL`` at ``proxy.endpoint``; each request is forwarded verbatim (so SigV4
signatures, which cover the Host header, stay valid) unless the proxy picks it for a fault:

    "500" / "503"   an error answer without forwarding (S3's XML or the JSON protocol's body)
    "drop_before"   the connection closes before the request reaches moto
    "drop_after"    moto performs the request, then the connection closes without an answer
                    (a write that happened but whose answer was lost: retries repeat it)
    "cut_body"      moto's answer is sent with its full Content-Length but only half its body,
                    then the connection closes (only S3 GetObject: botocore never retries an
                    error raised while a streamed body is read, so the caller must)

Requests are picked with a seeded RNG at ``rate`` among those ``match`` accepts, and given the
kinds in turn; ``stats`` counts what happened, ``requests`` lists it. botocore retries 500/503 and dropped connections itself (standard mode, 5 attempts),
so a rate of 10% makes most calls pass after a retry and a few fail outright.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("500", "503", "drop_before", "drop_after", "cut_body")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}

#: (method, path, lower-cased headers, body) -> whether the request may be faulted
Matcher = Callable[[str, str, dict[str, str], bytes], bool]


def is_s3_get_object(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bool:
    parts = urlsplit(path)
    return method == "GET" and "x-amz-target" not in headers and parts.path.strip("/").count("/") >= 1


class FaultProxy:
    def __init__(self, upstream: str, seed: int = 0) -> None:
        self.upstream = urlsplit(upstream)
        self.rng = random.Random(seed)
        self.rate = 0.0
        self.kinds: Sequence[str] = KINDS
        self.match: Matcher = lambda _m, _p, _h, _b: True
        self.stats: Counter[str] = Counter()
        self._turn = 0
        self._owed_cut = False
        #: every request: (method, path, what happened to it)
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue for S3 uploads

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="faultproxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def configure(self, rate: float, kinds: Sequence[str] = KINDS, match: Matcher | None = None) -> None:
        with self._lock:
            self.rate, self.kinds = rate, tuple(kinds)
            self.match = match or (lambda _m, _p, _h, _b: True)

    def off(self) -> None:
        self.configure(0.0)

    # ------------------------------------------------------------------ one request
    def _pick(self, method: str, path: str, headers: dict[str, str], body: bytes) -> str | None:
        with self._lock:
            if self.rate <= 0 or not self.match(method, path, headers, body) or self.rng.random() >= self.rate:
                return None
            # Kinds in turn, so a short run still meets each one; a cut-off body is owed until
            # a request that can carry one (an S3 GetObject) is picked.
            if self._owed_cut and is_s3_get_object(method, path, headers):
                self._owed_cut = False
                return "cut_body"
            for _ in range(len(self.kinds)):
                kind = self.kinds[self._turn % len(self.kinds)]
                self._turn += 1
                if kind != "cut_body" or is_s3_get_object(method, path, headers):
                    return kind
                self._owed_cut = True
            return None

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        body = self._read_body(h)
        fault = self._pick(h.command, h.path, headers, body)
        with self._lock:
            self.stats[fault or "passed"] += 1
            self.requests.append((h.command, h.path, fault or "passed"))
        if fault == "drop_before":
            return self._drop(h)
        if fault in ("500", "503"):
            return self._error(h, int(fault), "x-amz-target" in headers)
        status, reason, resp_headers, data = self._forward(h, body)
        if fault == "drop_after":
            return self._drop(h)
        h.send_response_only(status, reason)
        for k, v in resp_headers:
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        if fault == "cut_body" and len(data) > 1:
            h.send_header("Connection", "close")
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return self._drop(h)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            fwd = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
            fwd["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body if body or h.command in ("PUT", "POST") else None, headers=fwd)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    @staticmethod
    def _drop(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _error(h: BaseHTTPRequestHandler, status: int, json_protocol: bool) -> None:
        if json_protocol:
            code = "ServiceUnavailable" if status == 503 else "InternalFailure"
            data = json.dumps({"__type": code, "message": "injected by faultproxy"}).encode()
            ctype = "application/x-amz-json-1.0"
        else:
            code = "SlowDown" if status == 503 else "InternalError"
            data = (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                "<Message>injected by faultproxy</Message><RequestId>0</RequestId></Error>"
            ).encode()
            ctype = "application/xml"
        h.send_response_only(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)
