"""Address guard: classification as pure functions (no sockets), connections to loopback only."""

from __future__ import annotations

import ipaddress

import pytest

from similarity.errors import BlockedAddress
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
