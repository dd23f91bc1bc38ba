"""Host strings as they appear in Via, URIs and socket addresses.

Every message asks these questions of the same few hosts, and ``ipaddress`` costs
microseconds per parse, so the answers are memoised (bounded; pure functions of the
string, so a memo can never be stale).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@lru_cache(maxsize=16384)
def normal_host(host: str) -> str:
    """One spelling per host: IP addresses in canonical form (``::1``), names lower-case."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower()


@lru_cache(maxsize=16384)
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=16384)
def is_routable(host: str) -> bool:
    """Never send to broadcast, multicast or unspecified addresses (RFC 4475 §3.3.10)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return True  # a name: the transport resolves it
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:224.0.0.1 is multicast too (Python 3.11 says not)
    return not (address.is_multicast or address.is_unspecified or address == _BROADCAST)


def ipv4_mapped(host: str) -> str | None:
    """How a socket bound to ``[::]`` sees the IPv4 peer ``host`` (``::ffff:10.0.0.10``),
    spelt as ``normal_host`` spells it; None when ``host`` is not an IPv4 address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if not isinstance(address, ipaddress.IPv4Address):
        return None
    return normal_host(f"::ffff:{address}")


@lru_cache(maxsize=16384)
def unmapped(host: str) -> str:
    """The IPv4 address an IPv4-mapped IPv6 address stands for (``::ffff:10.0.0.10`` is
    how a socket bound to ``[::]`` sees the IPv4 peer 10.0.0.10); any other host as it is.
    One peer, one spelling, whichever listener it reached."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return host if mapped is None else str(mapped)


def in_networks(host: str, networks: tuple[Network, ...]) -> bool:
    """Is ``host`` an address in one of ``networks``? An IPv4-mapped IPv6 address (how a
    socket bound to ``[::]`` sees an IPv4 peer: ``::ffff:10.0.0.10``) is in the IPv4
    networks its IPv4 address is in."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(
        (address.version == network.version and address in network)
        or (mapped is not None and network.version == 4 and mapped in network)
        for network in networks
    )
