"""http(s) fetching hardened for untrusted URLs.

- one pooled ``requests`` session; env proxies and .netrc ignored (a proxy would bypass the guard);
- the address guard runs inside the connection: the host is resolved once, each address checked,
  and the socket connects to a checked address while TLS still verifies the host name;
- redirects are followed by hand (each hop re-resolved and re-checked, http/https only);
- a total deadline per image (``deadline``);
- a byte cap on Content-Length and on the streamed, decompressed body (gzip bombs);
- retries with exponential backoff and full jitter on connection errors, 429 and 5xx, honouring
  ``Retry-After`` up to a cap and never sleeping past the deadline;
- a per-host concurrency cap so one slow host cannot take every worker.
"""

from __future__ import annotations

import http.cookiejar
import random
import socket
import threading
import time
from collections.abc import Generator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NewConnectionError
from urllib3.util import parse_url

from ..errors import (
    ConnectionFailed,
    FetchTimeout,
    HttpStatusError,
    RowError,
    TooLarge,
    TooManyRedirects,
    UnsupportedSource,
)
from .conditional import Fetched, Validators
from .deadline import Deadline, remaining, set_current, watch
from .guard import AddressPolicy
from .settings import FetchSettings

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


# --------------------------------------------------------------------------- guarded connections
def _guarded_connection(base: type[HTTPConnection], policy: AddressPolicy) -> type[HTTPConnection]:
    class Guarded(base):  # type: ignore[valid-type,misc]  # a class made per policy
        def _new_conn(self) -> socket.socket:
            # Resolve once, check, and connect to an address that passed. ``self.host`` stays the
            # name, so SNI and certificate verification use it. The lookup is bounded by the
            # fetch's deadline: a hung resolver costs the row its deadline, no more.
            targets = policy.resolve(self._dns_host, self.port, timeout=remaining())
            last: OSError | None = None
            for family, sockaddr in targets:
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    for opt in self.socket_options or ():
                        sock.setsockopt(*opt)
                    if isinstance(self.timeout, (int, float)):
                        sock.settimeout(self.timeout)
                    watch(sock)
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
            watch(self.sock)  # a kept-alive socket serves this fetch too
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


class _Session(requests.Session):
    """Redirects are followed by hand (``HttpSource._follow``); requests would still work out the
    request after every redirect for ``Response.next``, and fail on a ``Location`` it cannot read
    (not UTF-8, an unbalanced bracket) before the answer is seen."""

    def resolve_redirects(self, *args: Any, **kwargs: Any) -> Generator[requests.Response, None, None]:
        yield from ()


def make_session(policy: AddressPolicy, settings: FetchSettings) -> requests.Session:
    session = _Session()
    session.trust_env = False  # no env proxies / .netrc: a proxy would be checked instead of the target
    session.cookies = requests.cookies.RequestsCookieJar(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = GuardedAdapter(policy, settings.pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": settings.user_agent, "Accept": "image/*,*/*;q=0.5"})
    return session


# --------------------------------------------------------------------------- URLs
def parse(url: str, redirected: bool = False) -> tuple[str, str]:
    """``(normalised URL, host)`` as urllib3, which makes the connection, reads ``url``.

    Every later step (the per-host slot, messages, joining a redirect's Location, the request)
    uses the normalised form, so no two parsers can disagree on the host: urllib.parse takes
    ``http://a\\@b/`` to name ``b`` where urllib3, like browsers, connects to ``a``.
    """
    what = "redirect to" if redirected else "URL"
    try:
        parts = parse_url(url)
    except (LocationParseError, ValueError) as exc:
        raise UnsupportedSource(f"{what} {url[:100]!r} cannot be parsed: {short(exc)}") from None
    scheme = (parts.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise UnsupportedSource(f"{what} {url[:100]!r}: only http(s) is followed")
    if not parts.host:
        raise UnsupportedSource(f"{what} {url[:100]!r} has no host (expected {scheme}://host/...)")
    return str(parts.url), parts.host.lower()


def redirect_target(url: str, location: str) -> str:
    """``location`` (a ``Location`` header) resolved against ``url``.

    http.client reads header bytes as latin-1, so a raw UTF-8 ``/é.png`` arrives as ``/Ã©.png``
    and would be percent-encoded twice; like requests' ``get_redirect_target``, the bytes are read
    again as UTF-8 (a Location that is not UTF-8 stays as it came).
    """
    try:
        location = location.encode("latin-1").decode("utf-8")
    except UnicodeError:
        pass
    try:
        return urljoin(url, location)
    except ValueError as exc:  # urlsplit: an unbalanced bracket in the host ("http://[::1/")
        raise UnsupportedSource(f"redirect to {location[:100]!r} cannot be parsed: {short(exc)}") from None


# --------------------------------------------------------------------------- fetching
class HttpSource:
    """Thread-safe; one per fetcher. ``with_settings`` views share the session and host slots."""

    def __init__(self, settings: FetchSettings, policy: AddressPolicy) -> None:
        self.settings = settings
        self.session = make_session(policy, settings)
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._hosts_lock = threading.Lock()

    def close(self) -> None:
        self.session.close()

    def _host_slot(self, host: str) -> threading.BoundedSemaphore:
        with self._hosts_lock:
            sem = self._hosts.get(host)
            if sem is None:
                sem = self._hosts[host] = threading.BoundedSemaphore(self.settings.per_host)
            return sem

    def fetch(self, url: str, settings: FetchSettings) -> bytes:
        return self.fetch_conditional(url, settings).data or b""

    def fetch_conditional(self, url: str, settings: FetchSettings, validators: Validators | None = None) -> Fetched:
        """Like ``fetch``; with ``validators`` a 304 answer comes back as ``Fetched(None, ...)``."""
        url, host = parse(url)
        # Started before the wait for a slot: the deadline is the image's total, waiting included.
        deadline = Deadline(settings.deadline)
        slot = self._host_slot(host)
        if not slot.acquire(timeout=max(deadline.remaining(), 0.0)):
            deadline.cancel()
            raise FetchTimeout(f"waited {settings.deadline:g}s for a connection slot to {host}")
        set_current(deadline)
        try:
            return self._follow(url, host, deadline, settings, validators)
        except RowError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing but a RowError may leave a row
            if deadline.expired:
                raise FetchTimeout(f"deadline of {settings.deadline:g}s passed") from None
            raise ConnectionFailed(short(exc)) from None
        finally:
            deadline.cancel()
            set_current(None)
            slot.release()

    def _follow(
        self, url: str, host: str, deadline: Deadline, s: FetchSettings, validators: Validators | None = None
    ) -> Fetched:
        # The validators go on every hop: they belong to where the redirects end.
        headers = validators.headers() if validators else None
        via: list[str] = []
        for _hop in range(s.max_redirects + 1):
            resp = self._request_with_retries(url, host, deadline, s, headers)
            if resp.status_code in REDIRECTS and resp.headers.get("Location"):
                resp.close()
                url, host = parse(redirect_target(url, resp.headers["Location"]), redirected=True)
                via.append(url)
                continue
            try:
                etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
                if resp.status_code == 304 and headers:
                    return Fetched(None, etag, modified, tuple(via))
                if not 200 <= resp.status_code < 300:  # an unasked 304, a 3xx without Location, 4xx, 5xx
                    raise HttpStatusError(resp.status_code, f"{resp.reason or ''} from {host}".strip())
                return Fetched(self._read_body(resp, deadline, s), etag, modified, tuple(via))
            finally:
                resp.close()
        raise TooManyRedirects(f"more than {s.max_redirects} redirects")

    def _request_with_retries(
        self, url: str, host: str, deadline: Deadline, s: FetchSettings, headers: dict[str, str] | None = None
    ) -> requests.Response:
        attempt = 0
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise FetchTimeout(f"deadline of {s.deadline:g}s passed")
            try:
                resp = self.session.get(
                    url,
                    headers=headers,
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
                    error = ConnectionFailed(short(exc))
                if attempt >= s.max_retries:
                    raise error from None
                _sleep(_backoff(attempt, s), deadline, error)
                attempt += 1
                continue
            except requests.Timeout:
                raise FetchTimeout(f"no data from {host} within {s.read_timeout:g}s") from None

            if resp.status_code == 429 or resp.status_code >= 500:
                if attempt >= s.max_retries:
                    return resp
                wait = _backoff(attempt, s)
                if resp.status_code == 429:
                    wait = retry_after(resp.headers.get("Retry-After"), s.retry_after_cap) or wait
                resp.close()
                _sleep(wait, deadline, HttpStatusError(resp.status_code, f"from {host}, retries exhausted"))
                attempt += 1
                continue
            return resp

    @staticmethod
    def _read_body(resp: requests.Response, deadline: Deadline, s: FetchSettings) -> bytes:
        cap = s.max_bytes
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
                raise FetchTimeout(f"deadline of {s.deadline:g}s passed while reading") from None
            if isinstance(exc, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
                raise FetchTimeout(f"read timed out after {s.read_timeout:g}s") from None
            raise ConnectionFailed(f"body read failed: {short(exc)}") from None
        if deadline.expired:
            raise FetchTimeout(f"deadline of {s.deadline:g}s passed while reading")
        return bytes(buf)


def _backoff(attempt: int, s: FetchSettings) -> float:
    # "Full jitter": uniform in [0, min(cap, base * 2**attempt)].
    return random.uniform(0, min(s.backoff_max, s.backoff_base * 2**attempt))


def _sleep(seconds: float, deadline: Deadline, error: RowError) -> None:
    if seconds >= deadline.remaining():
        raise error  # waiting would overrun the deadline: report the real cause now
    time.sleep(seconds)


def retry_after(value: str | None, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), capped."""
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


def short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
