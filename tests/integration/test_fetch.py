"""The fetcher against a real HTTP server on 127.0.0.1 with fault modes (loopback only)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from typing import Any

import pytest
from PIL import Image

from similarity.errors import (
    BlockedAddress,
    ConnectionFailed,
    FetchTimeout,
    HttpStatusError,
    InvalidDataUri,
    LocalPathsDisabled,
    NotFound,
    TooLarge,
    TooManyRedirects,
    UnsupportedSource,
)
from similarity.fetch import Fetcher, FetchSettings
from similarity.fetch.http import retry_after
from support.imageserver import png_bytes

PNG = png_bytes(Image.new("RGB", (20, 10), (200, 10, 10)))


def test_plain_fetch(server, fetcher) -> None:
    assert fetcher.fetch(server.image("/ok.png", PNG)) == PNG


def test_404_is_http_404(server, fetcher) -> None:
    with pytest.raises(HttpStatusError) as exc:
        fetcher.fetch(server.status("/missing.png", 404))
    assert exc.value.code == "http_404"
    assert server.hits["/missing.png"] == 1  # 4xx other than 429 is not retried


def test_500_then_success_is_retried(server, fetcher) -> None:
    url = server.fail_then_serve("/flaky.png", PNG, 500)
    assert fetcher.fetch(url) == PNG
    assert server.hits["/flaky.png"] == 2


def test_persistent_503_gives_http_503_after_retries(server, fetcher) -> None:
    url = server.fail_then_serve("/down.png", PNG, 503, times=100)
    with pytest.raises(HttpStatusError) as exc:
        fetcher.fetch(url)
    assert exc.value.code == "http_503"
    assert server.hits["/down.png"] == 1 + fetcher.settings.max_retries


def test_429_honoursretry_after(server, fetcher) -> None:
    url = server.fail_then_serve("/limited.png", PNG, 429, headers={"Retry-After": "1"})
    start = time.monotonic()
    assert fetcher.fetch(url) == PNG
    assert time.monotonic() - start >= 0.9  # waited as told, not the tiny backoff
    assert server.hits["/limited.png"] == 2


def test_retry_after_parsing() -> None:
    assert retry_after("3", 10) == 3
    assert retry_after("3600", 10) == 10  # capped
    assert retry_after("garbage", 10) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 10) == 0  # in the past


def test_slow_drip_hits_the_deadline(server, fast_settings, fetcher) -> None:
    url = server.drip("/drip.png", PNG, interval=0.3)  # would take ~20 s in full
    f = Fetcher(FetchSettings(**{**fast_settings.__dict__, "deadline": 1.5}), fetcher.policy)
    start = time.monotonic()
    with pytest.raises(FetchTimeout):
        f.fetch(url)
    assert time.monotonic() - start < 3.0  # the row is released at the deadline, not after the body
    f.close()


def test_declared_body_over_cap(server, fetcher) -> None:
    with pytest.raises(TooLarge, match="Content-Length"):
        fetcher.fetch(server.huge("/huge.png", 3 * 1024 * 1024))


def test_streamed_body_over_cap(server, fetcher) -> None:
    with pytest.raises(TooLarge, match="body exceeds"):
        fetcher.fetch(server.huge("/huge-chunked.png", 3 * 1024 * 1024, declare=False))


def test_gzip_bomb_counts_inflated_bytes(server, fetcher) -> None:
    url = server.huge("/bomb.gz", 50 * 1024 * 1024, gzipped=True)  # ~50 KB on the wire
    with pytest.raises(TooLarge, match="body exceeds"):
        fetcher.fetch(url)


def test_redirect_chain_is_followed(server, fetcher) -> None:
    server.image("/final.png", PNG)
    for i in range(3):
        server.redirect(f"/hop{i}", f"/hop{i + 1}" if i < 2 else "/final.png")
    assert fetcher.fetch(server.url("/hop0")) == PNG


def test_too_many_redirects(server, fetcher) -> None:
    server.redirect("/loop", "/loop")
    with pytest.raises(TooManyRedirects):
        fetcher.fetch(server.url("/loop"))
    assert server.hits["/loop"] == 6  # first request + 5 redirects, then stop


def test_redirect_to_forbidden_host_is_blocked(server, forbidden_server, fetcher) -> None:
    secret = forbidden_server.image("/secret.png", PNG)
    url = server.redirect("/to-internal", secret)
    with pytest.raises(BlockedAddress, match="127.0.0.2"):
        fetcher.fetch(url)
    assert forbidden_server.hits["/secret.png"] == 0  # never connected


def test_direct_forbidden_host_is_blocked(forbidden_server, fetcher) -> None:
    url = forbidden_server.image("/direct.png", PNG)
    with pytest.raises(BlockedAddress):
        fetcher.fetch(url)
    assert forbidden_server.hits["/direct.png"] == 0


def test_guard_on_by_default_refuses_loopback(server, fast_settings) -> None:
    url = server.image("/default-guard.png", PNG)
    f = Fetcher(fast_settings)  # no allow-list
    with pytest.raises(BlockedAddress):
        f.fetch(url)
    f.close()
    assert server.hits["/default-guard.png"] == 0


def test_redirect_to_other_scheme_refused(server, fetcher) -> None:
    url = server.redirect("/to-file", "file:///etc/passwd")
    with pytest.raises(UnsupportedSource):
        fetcher.fetch(url)


def test_connection_refused_is_connection_error(fetcher) -> None:

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionFailed):
        fetcher.fetch(f"http://127.0.0.1:{port}/x.png")


def test_data_uri(fetcher) -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetcher.fetch(uri) == PNG
    with pytest.raises(InvalidDataUri):
        fetcher.fetch("data:image/png,rawbytes")


def test_local_paths(tmp_path, fast_settings) -> None:
    p = tmp_path / "a.png"
    p.write_bytes(PNG)
    f = Fetcher(fast_settings, base_dir=tmp_path)
    assert f.fetch(str(p)) == PNG
    assert f.fetch("a.png") == PNG  # relative to base_dir (the CSV's folder)
    assert f.fetch(p.as_uri()) == PNG
    with pytest.raises(NotFound):
        f.fetch(str(tmp_path / "nope.png"))
    off = Fetcher(FetchSettings(allow_local_paths=False))
    with pytest.raises(LocalPathsDisabled):
        off.fetch(str(p))
    with pytest.raises(LocalPathsDisabled):
        off.fetch(p.as_uri())


def test_unsupported_scheme(fetcher) -> None:
    with pytest.raises(UnsupportedSource):
        fetcher.fetch("ftp://example.invalid/x.png")
    with pytest.raises(UnsupportedSource):
        fetcher.fetch("gopher://127.0.0.1/")


def test_s3_source_through_moto(s3, bucket, fast_settings) -> None:
    s3.put_object(Bucket=bucket, Key="imgs/a b.png", Body=PNG)
    f = Fetcher(fast_settings, s3_client=s3)
    assert f.fetch(f"s3://{bucket}/imgs/a%20b.png") == PNG
    with pytest.raises(NotFound):
        f.fetch(f"s3://{bucket}/imgs/missing.png")
    s3.put_object(Bucket=bucket, Key="big.bin", Body=b"\0" * (fast_settings.max_bytes + 1))
    with pytest.raises(TooLarge):
        f.fetch(f"s3://{bucket}/big.bin")


def test_redirect_status_without_location_is_an_error(server, fetcher) -> None:
    server.routes["/no-location"] = lambda h: h.send_plain(302, b"")
    with pytest.raises(HttpStatusError) as exc:
        fetcher.fetch(server.url("/no-location"))
    assert exc.value.code == "http_302"


# ------------------------------------------------------------------ one URL parser
@pytest.mark.parametrize("url", ["http:/host/x.png", "https:/host", "http:///x.png", "http://", "http://:80/x"])
def test_url_without_host_is_named_as_such(fetcher, url) -> None:
    with pytest.raises(UnsupportedSource) as exc:
        fetcher.fetch(url)
    assert "has no host" in exc.value.detail and "redirect" not in exc.value.detail


def test_redirect_without_host_says_redirect(server, fetcher) -> None:
    url = server.redirect("/to-hostless", "https:///x.png")
    with pytest.raises(UnsupportedSource, match="redirect to .*has no host"):
        fetcher.fetch(url)


def _host_confusions(port: int) -> list[str]:
    """URLs that urllib.parse and urllib3 read with different hosts; 127.0.0.1:port is the one
    urllib3 (the connection) contacts in each."""
    return [
        f"http://127.0.0.1:{port}\\@127.0.0.2/missing.png",  # backslash before @: a path to urllib3
        f"http://127.0.0.1:{port}\\\\@127.0.0.2/missing.png",
        f"http://127.0.0.1:{port}\\x@127.0.0.2:{port}/missing.png",
        f"http://%31%32%37.0.0.1:{port}/missing.png",  # percent-encoded host: decoded by urllib3 only
        f"http://127.0.0.2@127.0.0.1:{port}/missing.png",  # userinfo that looks like a host
    ]


def test_error_names_the_host_that_was_contacted(server, fetcher) -> None:
    port = server.server_address[1]
    for url in _host_confusions(port):
        before = sum(server.hits.values())
        with pytest.raises(HttpStatusError) as exc:
            fetcher.fetch(url)
        assert sum(server.hits.values()) == before + 1, url  # 127.0.0.1 answered the 404
        assert exc.value.detail.endswith("from 127.0.0.1"), (url, exc.value.detail)


def test_backslash_cannot_smuggle_a_forbidden_host(server, forbidden_server, fetcher) -> None:
    secret = forbidden_server.image("/secret.png", PNG)
    port = forbidden_server.server_address[1]
    for url in (f"http://127.0.0.2:{port}\\@127.0.0.1:{server.server_address[1]}/secret.png", secret):
        with pytest.raises(BlockedAddress, match="127.0.0.2"):
            fetcher.fetch(url)
    assert forbidden_server.hits["/secret.png"] == 0


# ------------------------------------------------------------------ the deadline is the total
def test_waiting_for_a_host_slot_counts_in_the_deadline(server, fast_settings, fetcher) -> None:
    url = server.drip("/slot-drip.png", PNG * 50, interval=0.2)  # holds its slot to the deadline
    f = Fetcher(FetchSettings(**{**fast_settings.__dict__, "deadline": 1.5, "per_host": 1}), fetcher.policy)
    first = threading.Thread(target=lambda: pytest.raises(FetchTimeout, f.fetch, url), daemon=True)
    first.start()
    for _ in range(200):
        if server.hits["/slot-drip.png"]:
            break
        time.sleep(0.01)
    start = time.monotonic()
    with pytest.raises(FetchTimeout):
        f.fetch(url)  # waits for the first's slot, then has no time left
    assert time.monotonic() - start < 1.5 + 0.5  # not the wait plus a fresh 1.5 s
    first.join(5)
    f.close()


@pytest.fixture
def slow_dns(monkeypatch):
    """getaddrinfo patched (never real DNS): ``slow.test`` answers 127.0.0.1 after 3 s (or when
    the test ends), ``fast.test`` at once; other names do not resolve."""
    done = threading.Event()

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "slow.test":
            done.wait(3)
        if host in ("slow.test", "fast.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        raise socket.gaierror(socket.EAI_NONAME, f"fake resolver: unknown {host}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    done.set()


def test_a_slow_resolver_costs_the_deadline_not_more(server, fast_settings, fetcher, slow_dns) -> None:
    server.image("/dns.png", PNG)
    port = server.server_address[1]
    f = Fetcher(FetchSettings(**{**fast_settings.__dict__, "deadline": 1.0}), fetcher.policy)
    start = time.monotonic()
    with pytest.raises(FetchTimeout, match="resolving slow.test"):
        f.fetch(f"http://slow.test:{port}/dns.png")
    assert time.monotonic() - start < 1.0 + 0.5
    assert server.hits["/dns.png"] == 0
    assert f.fetch(f"http://fast.test:{port}/dns.png") == PNG  # a prompt answer is used as before
    f.close()


# ------------------------------------------------------------------ redirects
def test_redirect_location_in_raw_utf8_is_read_as_utf8(server, fetcher) -> None:
    server.image("/%C3%A9.png", PNG)  # what /é.png is asked for as
    # http.client reads header bytes as latin-1: this str goes out as the raw UTF-8 bytes of /é.png.
    server.routes["/to-utf8"] = lambda h: h.send_plain(
        302, b"", headers={"Location": "/é.png".encode().decode("latin-1")}
    )
    assert fetcher.fetch(server.url("/to-utf8")) == PNG
    server.redirect("/to-latin1", "/é.png")  # a latin-1 byte, not UTF-8: kept as it came
    assert fetcher.fetch(server.url("/to-latin1")) == PNG
    assert "/%C3%83%C2%A9.png" not in server.hits


# ------------------------------------------------------------------ malformed URLs
@pytest.mark.parametrize(
    "url", ["http://[::1/", "https://[x/", "HTTP://]/a", "s3://]/a", "s3://[/a", "ftp://[/x", "file://[x/a.png"]
)
def test_unbalanced_brackets_are_an_unparsable_url(fetcher, url) -> None:
    with pytest.raises(UnsupportedSource, match="cannot be parsed"):
        fetcher.fetch(url)


def test_redirect_with_unbalanced_brackets_is_an_unparsable_url(server, fetcher) -> None:
    url = server.redirect("/to-bracket", "http://[::1/x.png")
    with pytest.raises(UnsupportedSource, match="redirect to .*cannot be parsed"):
        fetcher.fetch(url)


# ------------------------------------------------------------------ data: URIs
BLOB = bytes(range(256)) * 2  # its base64 has "+" and "/" (URL-safe: "-" and "_") and "=" padding


@pytest.mark.parametrize(
    "payload",
    [
        base64.b64encode(BLOB).decode(),
        base64.b64encode(BLOB).decode().rstrip("="),
        base64.urlsafe_b64encode(BLOB).decode(),
        base64.urlsafe_b64encode(BLOB).decode().rstrip("="),
        "".join(f"%{c:02X}" for c in base64.b64encode(BLOB)),  # percent-encoded throughout
        "\r\n".join(base64.b64encode(BLOB).decode()[i : i + 76] for i in range(0, 684, 76)),
    ],
    ids=["padded", "unpadded", "urlsafe", "urlsafe-unpadded", "percent-encoded", "line-broken"],
)
def test_data_uri_forms_decode(fast_settings, payload) -> None:
    f = Fetcher(FetchSettings(**{**fast_settings.__dict__, "max_bytes": len(BLOB)}))
    assert f.fetch("data:application/octet-stream;base64," + payload) == BLOB


@pytest.mark.parametrize(
    "payload",
    ["ab+c-d==", "ab*d", "[", "AAAA=AAA", "AAAAA", "AA===", "AAA\u00e9"],
    ids=["mixed-alphabets", "star", "bracket", "inner-padding", "dangling-char", "three-pads", "non-ascii"],
)
def test_bad_base64_is_invalid_data_uri(fetcher, payload) -> None:
    with pytest.raises(InvalidDataUri, match="bad base64"):
        fetcher.fetch("data:image/png;base64," + payload)


def test_data_uri_cap_is_on_the_decoded_size(fast_settings, monkeypatch) -> None:
    from similarity.fetch import sources

    f = Fetcher(FetchSettings(**{**fast_settings.__dict__, "max_bytes": len(BLOB) - 1}))
    with pytest.raises(TooLarge):
        f.fetch("data:image/png;base64," + base64.b64encode(BLOB).decode())

    def no_decoding(_text: str) -> str:
        raise AssertionError("an oversize payload was percent-decoded")

    monkeypatch.setattr(sources, "unquote", no_decoding)
    with pytest.raises(TooLarge):  # refused on its length, before any copy is made
        f.fetch("data:image/png;base64," + "%41" * (4 * len(BLOB)))


# ------------------------------------------------------------------ S3 keys
class _RecordingS3:
    """Records what ``get_object`` is asked for; never contacts anything."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def get_object(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        return {"ContentLength": 3, "Body": io.BytesIO(b"abc")}


@pytest.mark.parametrize(
    ("url", "bucket", "key"),
    [
        ("s3://b/photos/a#1.jpg", "b", "photos/a#1.jpg"),  # urlsplit read a fragment
        ("s3://b/q?x=1.jpg", "b", "q?x=1.jpg"),  # and a query
        ("S3://b//lead.jpg", "b", "lead.jpg"),
        ("s3://b/100%25%23.jpg", "b", "100%#.jpg"),
    ],
)
def test_s3_keys_keep_question_marks_and_hashes(fast_settings, url, bucket, key) -> None:
    client = _RecordingS3()
    assert Fetcher(fast_settings, s3_client=client).fetch(url) == b"abc"
    assert client.calls == [{"Bucket": bucket, "Key": key}]


def test_s3_key_with_hash_through_moto(s3, bucket, fast_settings) -> None:
    s3.put_object(Bucket=bucket, Key="imgs/a#1?v=2.png", Body=PNG)
    assert Fetcher(fast_settings, s3_client=s3).fetch(f"s3://{bucket}/imgs/a#1?v=2.png") == PNG
