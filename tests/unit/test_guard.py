"""Address guard: classification as pure functions (no sockets), connections to loopback only."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from similarity.errors import BlockedAddress, FetchTimeout
from similarity.fetch.guard import AddressPolicy, classify, embedded_ipv4, parse_networks

# (address, expected reason substring or None for "public, allowed"). Classified, never connected to.
TABLE = [
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("2606:4700:4700::1111", None),
    ("127.0.0.1", "loopback"),
    ("127.0.0.2", "loopback"),
    ("::1", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "cloud metadata"),
    ("169.254.170.2", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.254", "carrier-grade NAT"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", ""),
    ("192.0.2.1", ""),  # TEST-NET-1 documentation range
    ("2001:db8::1", ""),  # documentation
    ("fc00::1", "private"),
    # IPv4 embedded in IPv6 is unwrapped before the check
    ("::ffff:127.0.0.1", "loopback (embedded"),
    ("::ffff:169.254.169.254", "cloud metadata (embedded"),
    ("::ffff:10.0.0.1", "private (embedded"),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::a9fe:a9fe", "cloud metadata (embedded"),  # NAT64 of 169.254.169.254
    ("64:ff9b::808:808", None),  # NAT64 of 8.8.8.8
    ("2002:a9fe:a9fe::1", "cloud metadata (embedded"),  # 6to4 of 169.254.169.254
    ("2002:c0a8:0101::1", "private (embedded"),  # 6to4 of 192.168.1.1
    ("::127.0.0.1", "loopback (embedded"),  # IPv4-compatible
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
    ("64:ff9b:1::1", ""),
    # Hard-coded, not left to the stdlib: before CVE-2024-4032's fix (3.11.10) most of 192.0.0.0/24
    # counted as global; fec0::/10 (deprecated site-local) is neither private nor reserved.
    ("192.0.0.192", "IETF protocol assignment"),
    ("192.0.0.8", "IETF protocol assignment"),
    ("192.0.0.255", "IETF protocol assignment"),
    ("::ffff:192.0.0.192", "IETF protocol assignment (embedded"),
    ("64:ff9b::c000:c0", "IETF protocol assignment (embedded"),  # NAT64 of 192.0.0.192
    ("192.0.1.1", None),  # the /24 and nothing around it
    ("191.255.255.255", None),
    ("fec0::1", "site-local"),
    ("feff:ffff::1", "site-local"),
    ("fec0::a9fe:a9fe", "site-local"),
    ("168.63.129.16", "cloud metadata"),  # Azure WireServer
    ("::ffff:168.63.129.16", "cloud metadata (embedded"),
    ("168.63.129.17", None),
]


@pytest.mark.parametrize(("address", "expected"), TABLE)
def test_classification_table(address: str, expected: str | None) -> None:
    reason = classify(address)
    if expected is None:
        assert reason is None, f"{address} should be public, got {reason}"
    else:
        assert reason is not None, f"{address} must be refused"
        assert expected in reason


def test_embedded_ipv4_forms() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("::ffff:1.2.3.4")) == ipaddress.IPv4Address("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("64:ff9b::102:304")) == ipaddress.IPv4Address("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("2002:102:304::")) == ipaddress.IPv4Address("1.2.3.4")
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1")) is None


def test_allow_list_is_exact() -> None:
    policy = AddressPolicy(parse_networks("127.0.0.1/32, 10.20.0.0/16"))
    assert policy.refusal("127.0.0.1") is None
    assert policy.refusal("::ffff:127.0.0.1") is None  # same host, IPv6-mapped
    assert policy.refusal("127.0.0.2") == "loopback"
    assert policy.refusal("10.20.3.4") is None
    assert policy.refusal("10.21.0.1") == "private"
    assert policy.refusal("169.254.169.254") == "cloud metadata"
    assert policy.refusal("8.8.8.8") is None


def test_disabled_policy_admits_everything() -> None:
    assert AddressPolicy(enabled=False).refusal("169.254.169.254") is None


@pytest.mark.parametrize("bad", ["not-a-cidr", "300.1.1.1/8", "10.0.0.0/40"])
def test_parse_networks_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid network"):
        parse_networks(bad)


def test_resolve_keeps_only_permitted_loopback() -> None:
    policy = AddressPolicy(parse_networks("127.0.0.1/32"))
    [(family, sockaddr)] = policy.resolve("127.0.0.1", 80)
    assert sockaddr[0] == "127.0.0.1"
    with pytest.raises(BlockedAddress, match="127.0.0.2 is loopback"):
        policy.resolve("127.0.0.2", 80)


def test_resolve_refuses_loopback_by_default() -> None:
    with pytest.raises(BlockedAddress):
        AddressPolicy().resolve("127.0.0.1", 80)


# ------------------------------------------------------------------ the resolver under a timeout
@pytest.fixture
def fake_resolver(monkeypatch) -> Iterator[threading.Event]:
    """getaddrinfo patched (no real DNS): ``slow.test`` answers 127.0.0.1 once the event is set
    (the test sets it when done), ``fast.test`` at once, anything else does not resolve."""
    answer = threading.Event()

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "slow.test":
            answer.wait(3)
        if host in ("slow.test", "fast.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        raise socket.gaierror(socket.EAI_NONAME, f"fake resolver: unknown {host}")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answer
    answer.set()  # the abandoned lookup's thread ends


def test_resolve_gives_up_when_the_resolver_outlasts_the_timeout(fake_resolver) -> None:
    policy = AddressPolicy(parse_networks("127.0.0.1/32"))
    start = time.monotonic()
    with pytest.raises(FetchTimeout, match="resolving slow.test took more than"):
        policy.resolve("slow.test", 80, timeout=0.3)
    assert time.monotonic() - start < 1.0


def test_resolve_under_a_timeout_returns_what_the_resolver_answers(fake_resolver) -> None:
    policy = AddressPolicy(parse_networks("127.0.0.1/32"))
    assert policy.resolve("fast.test", 80, timeout=2.0) == [(socket.AF_INET, ("127.0.0.1", 80))]
    with pytest.raises(BlockedAddress):
        AddressPolicy().resolve("fast.test", 80, timeout=2.0)  # still checked
    with pytest.raises(FetchTimeout):
        policy.resolve("fast.test", 80, timeout=0.0)  # no time left: not even asked
