"""Address guard against server-side request forgery.

The classification functions are pure: they look at an address and never open a socket. The fetcher
resolves a host name once, checks every address it got here, and connects to an address that passed
(see ``fetch.http``), so a DNS answer cannot change between the check and the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import BlockedAddress, ConnectionFailed, FetchTimeout
from .deadline import DeadlinePassed, run_with_deadline

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Cloud instance metadata endpoints (AWS, GCP, Azure, ...; AWS's IPv6 one on Nitro; Azure's
#: WireServer, 168.63.129.16, which is not in any special-purpose range).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_TEREDO = ipaddress.ip_network("2001::/32")
# Not left to the stdlib: before the fix for CVE-2024-4032 (3.11.10, 3.12.4) ``is_private`` covers
# only parts of 192.0.0.0/24 and the rest counts as global; fec0::/10, deprecated site-local, is
# neither private nor reserved to it.
_IETF_PROTOCOL = ipaddress.ip_network("192.0.0.0/24")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, IPv4-compatible), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr in _IPV4_COMPAT and int(addr) > 1:  # ::/128 and ::1 are not IPv4-compatible forms
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def _classify_one(addr: IPAddress) -> str | None:
    if addr in METADATA_ADDRESSES:
        return "cloud metadata"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback:
        return "loopback"
    if addr.is_link_local:
        return "link-local"
    if addr.is_multicast:
        return "multicast"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "carrier-grade NAT"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _IETF_PROTOCOL:
        return "IETF protocol assignment"
    if isinstance(addr, ipaddress.IPv6Address) and addr in _SITE_LOCAL:
        return "site-local"
    if isinstance(addr, ipaddress.IPv6Address) and addr in _TEREDO:
        return "Teredo tunnel"
    if isinstance(addr, ipaddress.IPv6Address) and addr in _NAT64_LOCAL:
        return "local-use NAT64"
    if addr.is_reserved:
        return "reserved"
    if addr.is_private:
        return "private"
    if not addr.is_global:
        return "not globally routable"
    return None


def classify(address: str | IPAddress) -> str | None:
    """Why ``address`` must not be fetched from, or ``None`` if it is a public unicast address.

    IPv4 addresses embedded in IPv6 are unwrapped first, so ``::ffff:127.0.0.1`` is loopback and
    ``64:ff9b::a9fe:a9fe`` is the metadata address.
    """
    addr = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id:
            addr = ipaddress.IPv6Address(str(addr).split("%", 1)[0])
        inner = embedded_ipv4(addr)
        if inner is not None:
            reason = _classify_one(inner)
            return f"{reason} (embedded in IPv6)" if reason else None
    return _classify_one(addr)


def parse_networks(value: str | Iterable[str] | None) -> tuple[IPNetwork, ...]:
    """Parse an allow-list given as ``"127.0.0.1/32,10.0.0.0/8"`` or a list of CIDRs."""
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[IPNetwork] = []
    for item in items:
        item = item.strip()
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError as exc:
                raise ValueError(f"invalid network in allow-list: {item!r} ({exc})") from None
    return tuple(out)


@dataclass(frozen=True)
class AddressPolicy:
    """What the guard admits: public addresses, plus the explicitly allow-listed networks."""

    allowed_networks: tuple[IPNetwork, ...] = ()
    enabled: bool = True

    def is_allowed_network(self, addr: IPAddress) -> bool:
        candidates: list[IPAddress] = [addr]
        if isinstance(addr, ipaddress.IPv6Address):
            inner = embedded_ipv4(addr)
            if inner is not None:
                candidates.append(inner)
        return any(c.version == n.version and c in n for c in candidates for n in self.allowed_networks)

    def refusal(self, address: str | IPAddress) -> str | None:
        """Reason to refuse ``address``, or ``None`` when it may be connected to."""
        if not self.enabled:
            return None
        addr = ipaddress.ip_address(address) if isinstance(address, str) else address
        if self.is_allowed_network(addr):
            return None
        return classify(addr)

    def resolve(self, host: str, port: int, timeout: float | None = None) -> list[tuple[int, tuple[Any, ...]]]:
        """Resolve ``host`` once and keep only the permitted addresses, in resolver order.

        Returns ``(family, sockaddr)`` pairs ready for ``socket.connect``. Raises ``BlockedAddress``
        when every address is refused, ``ConnectionFailed`` when the name does not resolve, and
        ``FetchTimeout`` when the resolver takes more than ``timeout`` seconds (the fetch's time
        left; None: no limit).
        """
        try:
            infos = _getaddrinfo(host, port, timeout)
        except DeadlinePassed:
            raise FetchTimeout(
                f"resolving {host} took more than {timeout:.2g}s, the time left to the deadline"
            ) from None
        except (socket.gaierror, UnicodeError) as exc:
            raise ConnectionFailed(f"cannot resolve {host}: {exc}") from None
        allowed: list[tuple[int, tuple[Any, ...]]] = []
        refused: list[str] = []
        for family, _type, _proto, _canon, sockaddr in infos:
            ip = str(sockaddr[0])
            reason = self.refusal(ip)
            if reason is None:
                if (family, sockaddr) not in allowed:
                    allowed.append((family, sockaddr))
            else:
                refused.append(f"{ip} is {reason}")
        if not allowed:
            raise BlockedAddress(f"{host}: " + "; ".join(dict.fromkeys(refused)))
        return allowed


def _getaddrinfo(host: str, port: int, timeout: float | None) -> list[Any]:
    def lookup() -> list[Any]:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    if timeout is None or _is_literal(host):  # an address literal needs no resolver
        return lookup()
    if timeout <= 0:
        raise DeadlinePassed("no time left")
    # getaddrinfo cannot be interrupted and ignores socket timeouts (glibc retries for 5 s per
    # nameserver and attempt): it runs on a thread of its own, left behind if it overruns.
    return run_with_deadline(lookup, timeout, "resolve")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
