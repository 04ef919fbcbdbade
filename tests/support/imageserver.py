"""A real HTTP image server on a loopback address, with the fault modes the fetcher must survive."""

from __future__ import annotations

import gzip
import io
import socketserver
import struct
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

Route = Callable[["Handler"], None]


class Handler(BaseHTTPRequestHandler):
    server: ImageServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed
    # ACK of the headers (~30-40 ms per response on keep-alive connections), which real servers avoid.
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.hits[path] += 1
        route = self.server.routes.get(path)
        if route is None:
            self.send_plain(404, b"not found")
            return
        try:
            route(self)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up (deadline, cap): expected in fault tests

    def send_plain(
        self, status: int, body: bytes, ctype: str = "text/plain", headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str = "127.0.0.1", port: int = 0, reuse_port: bool = False) -> None:
        # reuse_port: several processes serve one port, the kernel spreading connections over them
        # (bench/gpu.py: one Python process cannot serve as fast as many cores fetch).
        self.allow_reuse_port = reuse_port
        super().__init__((host, port), Handler)
        self.routes: dict[str, Route] = {}
        self.hits: defaultdict[str, int] = defaultdict(int)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hanging up mid-body is what the fault tests do on purpose

    def server_bind(self) -> None:
        # HTTPServer.server_bind names the server with socket.getfqdn(host): for 127.0.0.2, which
        # /etc/hosts does not list, that is a reverse DNS query to the system resolver, off loopback.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    @property
    def base(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    # ---------------------------------------------------------------- route builders
    def image(self, path: str, data: bytes, ctype: str = "image/png") -> str:
        self.routes[path] = lambda h: h.send_plain(200, data, ctype)
        return self.url(path)

    def status(self, path: str, status: int) -> str:
        self.routes[path] = lambda h: h.send_plain(status, b"nope")
        return self.url(path)

    def fail_then_serve(
        self, path: str, data: bytes, first_status: int, times: int = 1, headers: dict[str, str] | None = None
    ) -> str:
        def route(h: Handler) -> None:
            if self.hits[path] <= times:
                h.send_plain(first_status, b"try again", headers=headers)
            else:
                h.send_plain(200, data, "image/png")

        self.routes[path] = route
        return self.url(path)

    def drip(self, path: str, data: bytes, interval: float = 0.5) -> str:
        def route(h: Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            for i in range(len(data)):
                h.wfile.write(data[i : i + 1])
                h.wfile.flush()
                time.sleep(interval)

        self.routes[path] = route
        return self.url(path)

    def huge(self, path: str, size: int, declare: bool = True, gzipped: bool = False) -> str:
        """A body over the cap: declared in Content-Length, or streamed chunked, or a gzip bomb."""
        raw = b"\0" * size
        body = gzip.compress(raw, compresslevel=9) if gzipped else raw

        def route(h: Handler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            if gzipped:
                h.send_header("Content-Encoding", "gzip")
            if declare or gzipped:
                h.send_header("Content-Length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)
            else:
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                for i in range(0, len(body), 65536):
                    part = body[i : i + 65536]
                    h.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                h.wfile.write(b"0\r\n\r\n")

        self.routes[path] = route
        return self.url(path)

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.routes[path] = lambda h: h.send_plain(status, b"", headers={"Location": location})
        return self.url(path)


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but carries almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def banded_png(width: int, height: int, seed: int, band: int = 500) -> bytes:
    """A real, fully decodable RGB PNG of ``width x height``, fast to make at any size and small on
    the wire (rows repeat within bands, PNG's Up filter turns them into zeros), different for each
    ``seed``. Decoding it costs what any PNG of that size costs: every pixel is inflated."""
    import random

    rng = random.Random(seed)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    parts = []
    same = b"\x02" + bytes(3 * width)  # filter 2 (Up): this row equals the one above
    for y in range(height):
        if y % band == 0:
            palette = bytes(rng.randrange(256) for _ in range(3 * 64))
            shift = rng.randrange(64)
            row = b"".join(
                palette[3 * ((x * 64 // width + shift) % 64) : 3 * ((x * 64 // width + shift) % 64) + 3]
                for x in range(width)
            )
            parts.append(comp.compress(b"\x00" + row))
        else:
            parts.append(comp.compress(same))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
