"""Getting image bytes from a URL, an S3 object, a data: URI or (CLI only) a local file.

Every failure becomes a ``RowError`` with a stable code; nothing else escapes ``Fetcher.fetch``.

HTTP is hardened for untrusted URLs:
- one pooled ``requests`` session; env proxies and .netrc ignored (a proxy would bypass the guard);
- the address guard runs inside the connection: the host is resolved once, each address checked,
  and the socket connects to a checked address while TLS still verifies the host name;
- redirects are followed by hand (each hop re-resolved and re-checked, http/https only);
- a total deadline per image, enforced by shutting the socket down, so a server that drips one
  byte a second cannot hold a row past it (per-read timeouts alone would never fire);
- a byte cap on Content-Length and on the streamed, decompressed body (gzip bombs);
- retries with exponential backoff and full jitter on connection errors, 429 and 5xx, honouring
  ``Retry-After`` up to a cap and never sleeping past the deadline;
- a per-host concurrency cap so one slow host cannot take every worker.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import heapq
import http.cookiejar
import itertools
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from . import __version__
from .errors import (
    BlockedAddress,
    ConnectionFailed,
    FetchTimeout,
    HttpStatusError,
    InvalidDataUri,
    LocalPathsDisabled,
    NotFound,
    RowError,
    S3Error,
    TooLarge,
    TooManyRedirects,
    UnsupportedSource,
)
from .netguard import AddressPolicy

_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    deadline: float = 30.0  # total seconds per image, retries and redirects included
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    max_retries: int = 2
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    retry_after_cap: float = 10.0
    per_host: int = 8
    pool_size: int = 32
    allow_local_paths: bool = False
    user_agent: str = f"text-image-similarity/{__version__} (+image scoring; respects 429)"


# --------------------------------------------------------------------------- deadline watchdog
class _Deadline:
    """Sockets opened or used by one fetch; shut down when its deadline passes."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + max(seconds, 0.0)
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._done = False
        _WATCHDOG.add(self)

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            if self.expired:
                _shutdown(sock)
            elif sock not in self._socks:
                self._socks.append(sock)

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for s in self._socks:
                _shutdown(s)

    def cancel(self) -> None:
        with self._lock:
            self._done = True
            self._socks.clear()  # the heap may hold this object until its end; not the sockets


class _Watchdog:
    """One daemon thread expires every fetch's deadline, earliest first. A timer thread per fetch
    cost ~0.2 ms of CPU to start and stop, more with the GIL contended."""

    _MIN_PRUNE = 4096

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._seq = itertools.count()  # ties never compare deadlines
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._prune_at = self._MIN_PRUNE

    def add(self, deadline: _Deadline) -> None:
        with self._cond:
            if len(self._heap) >= self._prune_at:
                # Finished fetches stay in the heap until their end: ~9,000 entries at the GPU
                # task's 300 fetches a second with 30 s deadlines. Dropping them whenever the heap
                # has doubled keeps it within twice the fetches in flight, at O(1) amortised cost.
                self._heap = [entry for entry in self._heap if not entry[2]._done]
                heapq.heapify(self._heap)
                self._prune_at = max(self._MIN_PRUNE, 2 * len(self._heap))
            heapq.heappush(self._heap, (deadline.end, next(self._seq), deadline))
            if self._thread is None or not self._thread.is_alive():  # first use, or a forked child
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is deadline:
                self._cond.notify()  # earlier than what the thread sleeps towards

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, deadline = heapq.heappop(self._heap)
            deadline._expire()  # outside the lock: shutting sockets down may block briefly

    def _after_fork(self) -> None:
        self.__init__()  # type: ignore[misc]  # the parent's thread and lock do not survive a fork


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG._after_fork)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_current = threading.local()


def _watch(sock: socket.socket | None) -> None:
    dl: _Deadline | None = getattr(_current, "deadline", None)
    if dl is not None:
        dl.watch(sock)


# --------------------------------------------------------------------------- guarded connections
def _guarded_connection(base: type[HTTPConnection], policy: AddressPolicy) -> type[HTTPConnection]:
    class Guarded(base):  # type: ignore[misc,valid-type]
        def _new_conn(self) -> socket.socket:
            # Resolve once, check, and connect to an address that passed. ``self.host`` stays the
            # name, so SNI and certificate verification use it.
            targets = policy.resolve(self._dns_host, self.port)
            last: OSError | None = None
            for family, sockaddr in targets:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    for opt in self.socket_options or ():
                        sock.setsockopt(*opt)
                    if isinstance(self.timeout, (int, float)):
                        sock.settimeout(self.timeout)
                    _watch(sock)
                    sock.connect(sockaddr)
                    return sock
                except TimeoutError as exc:
                    sock.close()
                    raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from exc
                except OSError as exc:
                    sock.close()
                    last = exc
            raise NewConnectionError(self, f"cannot connect to {self.host}: {last}")

        def request(self, *args: Any, **kwargs: Any) -> Any:
            _watch(self.sock)  # a kept-alive socket serves this fetch too
            return super().request(*args, **kwargs)

    return Guarded


class GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: AddressPolicy, pool_size: int) -> None:
        self._policy = policy
        super().__init__(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **kw: Any) -> None:
        super().init_poolmanager(connections, maxsize, block=block, **kw)
        http_cls = _guarded_connection(HTTPConnection, self._policy)
        https_cls = _guarded_connection(HTTPSConnection, self._policy)
        self.poolmanager.pool_classes_by_scheme = {
            "http": type("GuardedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http_cls}),
            "https": type("GuardedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https_cls}),
        }


def make_session(policy: AddressPolicy, settings: FetchSettings) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no env proxies / .netrc: a proxy would be checked instead of the target
    session.cookies = requests.cookies.RequestsCookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = GuardedAdapter(policy, settings.pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": settings.user_agent, "Accept": "image/*,*/*;q=0.5"})
    return session


# --------------------------------------------------------------------------- the fetcher
class Fetcher:
    """Fetches image bytes for any supported source. Thread-safe; share one per run."""

    def __init__(
        self,
        settings: FetchSettings | None = None,
        policy: AddressPolicy | None = None,
        s3_client: Any = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings or FetchSettings()
        self.policy = policy or AddressPolicy()
        self.session = make_session(self.policy, self.settings)
        self._s3 = s3_client
        self._s3_lock = threading.Lock()
        self.base_dir = Path(base_dir) if base_dir else None
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._hosts_lock = threading.Lock()

    def close(self) -> None:
        self.session.close()

    def with_settings(self, **changes: Any) -> Fetcher:
        """A view with other settings (e.g. a request's deadline) sharing the pooled session, the
        per-host slots and the S3 client."""
        clone = copy.copy(self)
        clone.settings = dataclasses.replace(self.settings, **changes)
        return clone

    # -- dispatch
    def fetch(self, url: str) -> bytes:
        url = url.strip()
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme in ("http", "https"):
            return self._fetch_http(url)
        if scheme == "s3":
            return self._fetch_s3(url)
        if scheme == "data":
            return self._fetch_data(url)
        if scheme == "file" or scheme == "" or (len(scheme) == 1 and os.name == "nt"):
            return self._fetch_local(url)
        raise UnsupportedSource(f"scheme {scheme!r} is not supported")

    # -- http(s)
    def _host_slot(self, host: str) -> threading.BoundedSemaphore:
        with self._hosts_lock:
            sem = self._hosts.get(host)
            if sem is None:
                sem = self._hosts[host] = threading.BoundedSemaphore(self.settings.per_host)
            return sem

    def _fetch_http(self, url: str) -> bytes:
        host = (urlsplit(url).hostname or "").lower()
        slot = self._host_slot(host)
        if not slot.acquire(timeout=self.settings.deadline):
            raise FetchTimeout(f"waited {self.settings.deadline:g}s for a connection slot to {host}")
        deadline = _Deadline(self.settings.deadline)
        _current.deadline = deadline
        try:
            return self._follow(url, deadline)
        except RowError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing but a RowError may leave a row
            if deadline.expired:
                raise FetchTimeout(f"deadline of {self.settings.deadline:g}s passed") from None
            raise ConnectionFailed(_short(exc)) from None
        finally:
            deadline.cancel()
            _current.deadline = None
            slot.release()

    def _follow(self, url: str, deadline: _Deadline) -> bytes:
        for _hop in range(self.settings.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UnsupportedSource(f"redirect to unsupported URL {url[:100]!r}")
            resp = self._request_with_retries(url, deadline)
            if resp.status_code in _REDIRECTS and resp.headers.get("Location"):
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                continue
            try:
                if not 200 <= resp.status_code < 300:  # 304, a 3xx without Location, 4xx, 5xx
                    raise HttpStatusError(resp.status_code, f"{resp.reason or ''} from {parts.hostname}".strip())
                return self._read_body(resp, deadline)
            finally:
                resp.close()
        raise TooManyRedirects(f"more than {self.settings.max_redirects} redirects")

    def _request_with_retries(self, url: str, deadline: _Deadline) -> requests.Response:
        s = self.settings
        host = (urlsplit(url).hostname or "").lower()
        attempt = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise FetchTimeout(f"deadline of {s.deadline:g}s passed")
            try:
                resp = self.session.get(
                    url,
                    stream=True,
                    allow_redirects=False,
                    timeout=(min(s.connect_timeout, remaining), min(s.read_timeout, remaining)),
                )
            except (requests.ConnectionError, ConnectionFailed) as exc:
                if deadline.expired:
                    raise FetchTimeout(f"deadline of {s.deadline:g}s passed") from None
                if isinstance(exc, requests.ConnectTimeout):
                    error: RowError = FetchTimeout(f"connect to {host} timed out")
                elif isinstance(exc, ConnectionFailed):
                    error = exc
                else:
                    error = ConnectionFailed(_short(exc))
                if attempt >= s.max_retries:
                    raise error from None
                self._sleep(self._backoff(attempt), deadline, error)
                attempt += 1
                continue
            except requests.Timeout:
                raise FetchTimeout(f"no data from {host} within {s.read_timeout:g}s") from None

            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt >= s.max_retries:
                    return resp
                wait = self._backoff(attempt)
                if resp.status_code == 429:
                    wait = _retry_after(resp.headers.get("Retry-After"), s.retry_after_cap) or wait
                resp.close()
                self._sleep(wait, deadline, HttpStatusError(resp.status_code, f"from {host}, retries exhausted"))
                attempt += 1
                continue
            return resp

    def _backoff(self, attempt: int) -> float:
        # "Full jitter": uniform in [0, min(cap, base * 2**attempt)].
        return random.uniform(0, min(self.settings.backoff_max, self.settings.backoff_base * 2**attempt))

    @staticmethod
    def _sleep(seconds: float, deadline: _Deadline, error: RowError) -> None:
        if seconds >= deadline.remaining():
            raise error  # waiting would overrun the deadline: report the real cause now
        time.sleep(seconds)

    def _read_body(self, resp: requests.Response, deadline: _Deadline) -> bytes:
        cap = self.settings.max_bytes
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise TooLarge(f"Content-Length {declared} exceeds {cap} bytes")
        buf = bytearray()
        try:
            for chunk in resp.iter_content(_CHUNK):  # decoded: gzip counts at its inflated size
                buf += chunk
                if len(buf) > cap:
                    raise TooLarge(f"body exceeds {cap} bytes")
                if deadline.expired:
                    break
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.expired:
                raise FetchTimeout(f"deadline of {self.settings.deadline:g}s passed while reading") from None
            if isinstance(exc, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
                raise FetchTimeout(f"read timed out after {self.settings.read_timeout:g}s") from None
            raise ConnectionFailed(f"body read failed: {_short(exc)}") from None
        if deadline.expired:
            raise FetchTimeout(f"deadline of {self.settings.deadline:g}s passed while reading")
        return bytes(buf)

    # -- s3
    def _s3_client(self) -> Any:
        with self._s3_lock:
            if self._s3 is None:
                from .clients import make_s3_client

                self._s3 = make_s3_client()
            return self._s3

    def _fetch_s3(self, url: str) -> bytes:
        parts = urlsplit(url)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        if not bucket or not key:
            raise UnsupportedSource("s3 URL needs s3://bucket/key")
        from botocore.exceptions import BotoCoreError, ClientError

        cap = self.settings.max_bytes
        try:
            obj = self._s3_client().get_object(Bucket=bucket, Key=key)
            if obj.get("ContentLength", 0) > cap:
                obj["Body"].close()
                raise TooLarge(f"object is {obj['ContentLength']} bytes, cap {cap}")
            data = obj["Body"].read(cap + 1)
            obj["Body"].close()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                raise NotFound(f"s3://{bucket}/{key}: {code}") from None
            raise S3Error(f"{code or 'error'} for s3://{bucket}/{key}") from None
        except BotoCoreError as exc:
            raise S3Error(_short(exc)) from None
        if len(data) > cap:
            raise TooLarge(f"object exceeds {cap} bytes")
        return data

    # -- data:
    def _fetch_data(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header.lower():
            raise InvalidDataUri("only base64 data: URIs are accepted")
        if len(payload) * 3 // 4 > self.settings.max_bytes:
            raise TooLarge(f"data URI exceeds {self.settings.max_bytes} bytes")
        try:
            return base64.b64decode(unquote(payload).strip(), validate=False)
        except (binascii.Error, ValueError) as exc:
            raise InvalidDataUri(f"bad base64: {exc}") from None

    # -- local
    def _fetch_local(self, url: str) -> bytes:
        if not self.settings.allow_local_paths:
            raise LocalPathsDisabled("local paths are not accepted here; use http(s)://, s3:// or data:")
        path = Path(unquote(urlsplit(url).path)) if url.lower().startswith("file:") else Path(url)
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        try:
            size = path.stat().st_size
            if size > self.settings.max_bytes:
                raise TooLarge(f"file is {size} bytes, cap {self.settings.max_bytes}")
            with path.open("rb") as fh:
                return fh.read(self.settings.max_bytes + 1)
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}") from None
        except (IsADirectoryError, PermissionError, OSError) as exc:
            raise NotFound(f"cannot read {path}: {exc.strerror or exc}") from None


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, min(seconds, cap))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


__all__ = ["Fetcher", "FetchSettings", "BlockedAddress", "make_session"]
