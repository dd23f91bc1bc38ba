"""The UDP endpoint's handling of sources, without sockets: datagrams are handed to it as
uvloop would, and what it delivers to the core is recorded."""

from __future__ import annotations

import pytest

from proxy import transport
from proxy.sip.events import Address
from proxy.transport import UdpEndpoint

LOCAL = Address("udp", "127.0.0.1", 5060)


def endpoint() -> tuple[UdpEndpoint, list[tuple[bytes, Address, Address]]]:
    delivered: list[tuple[bytes, Address, Address]] = []
    return UdpEndpoint(LOCAL, lambda data, source, local: delivered.append((data, source, local))), delivered


def test_one_address_per_peer_is_reused_for_its_datagrams() -> None:
    # completed transactions keep their source for 32 s: one object per peer, not per datagram
    udp, delivered = endpoint()
    udp.datagram_received(b"a", ("192.0.2.7", 5080))
    udp.datagram_received(b"b", ("192.0.2.7", 5080))
    udp.datagram_received(b"c", ("192.0.2.7", 5081))
    udp.datagram_received(b"d", ("2001:db8::7", 5080, 0, 0))  # IPv6: uvloop's 4-tuple
    sources = [source for _, source, _ in delivered]
    assert sources == [
        Address("udp", "192.0.2.7", 5080),
        Address("udp", "192.0.2.7", 5080),
        Address("udp", "192.0.2.7", 5081),
        Address("udp", "2001:db8::7", 5080),
    ]
    assert sources[0] is sources[1]
    assert all(local is LOCAL for _, _, local in delivered)


def test_the_peer_table_is_emptied_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    # a scan from many addresses must not grow it without bound
    monkeypatch.setattr(transport, "MAX_SOURCES", 3)
    udp, delivered = endpoint()
    for port in range(1, 8):
        udp.datagram_received(b"x", ("192.0.2.9", port))
        assert len(udp._sources) <= 3
    assert [source.port for _, source, _ in delivered] == list(range(1, 8))
