"""The client's address: the TCP peer, or X-Forwarded-For when the peer is a trusted proxy.

X-Forwarded-For is read right to left (each proxy appends the address it saw), skipping
trusted proxies; the first untrusted address is the client. Everything left of it was
written by the client and may be forged, so it is never used.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
UNKNOWN = "unknown"


def parse_networks(entries: Iterable[str]) -> tuple[IPNetwork, ...]:
    """'127.0.0.1', '10.0.0.0/8', '::1' -> networks; raises ValueError on a bad entry."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    # An IPv4-mapped IPv6 peer (::ffff:1.2.3.4) is the IPv4 host.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback(text: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms; False for anything unparsable."""
    address = _ip(text)
    return address is not None and address.is_loopback


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
             networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == net.version and address in net for net in networks)


def _forwarded_for(scope: Mapping[str, Any]) -> list[str]:
    hops: list[str] = []
    for name, value in scope.get("headers", ()):
        if name.lower() == b"x-forwarded-for":
            hops.extend(part for part in value.decode("latin-1").split(","))
    return hops


def client_ip(scope: Mapping[str, Any], trusted: tuple[IPNetwork, ...]) -> str:
    client = scope.get("client")
    peer = _ip(str(client[0])) if client else None
    if peer is None:
        return str(client[0]) if client else UNKNOWN
    if not _trusted(peer, trusted):
        return str(peer)
    candidate = peer
    for hop in reversed(_forwarded_for(scope)):
        address = _ip(hop)
        if address is None:
            break  # garbage: stop at the last address a trusted hop vouched for
        candidate = address
        if not _trusted(address, trusted):
            break
    return str(candidate)
