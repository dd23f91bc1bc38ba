"""The transports below the core. The UDP endpoint's handling of sources, without
sockets: datagrams are handed to it as uvloop would, and what it delivers to the core is
recorded. The TCP pool's failed connects and idle connections, over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import uvloop
from sipp import free_ports
from structlog.testing import capture_logs

from proxy import transport
from proxy.sip.events import Address
from proxy.transport import DNS_CACHE_SECONDS, TcpConnection, TcpPool, Transports, UdpEndpoint

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


def test_a_dual_stack_udp_listener_talks_to_ipv4_peers() -> None:
    """A UDP listener on [::] (IPV6_V6ONLY off, Linux's default) hears IPv4 peers as
    ::ffff:a.b.c.d and must answer, and forward, to IPv4 addresses: sendto refused a plain
    IPv4 address on that socket."""
    expected = Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "0"

    async def round_trip() -> tuple[bool, list[tuple[bytes, Address]], bytes]:
        delivered: list[tuple[bytes, Address]] = []
        heard = asyncio.Event()

        def deliver(data: bytes, source: Address, local: Address) -> None:
            delivered.append((data, source))
            heard.set()

        transports = Transports(deliver, lambda hop: None)
        bound = await transports.listen(Address("udp", "::", 0))
        takes_ipv4 = transports.takes_ipv4(bound)
        answered = b""
        if takes_ipv4:
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                peer.bind(("127.0.0.1", 0))
                peer.setblocking(False)
                peer.sendto(b"hello", ("127.0.0.1", bound.port))
                await asyncio.wait_for(heard.wait(), 5)
                transports.send(b"back", Address("udp", "127.0.0.1", peer.getsockname()[1]), bound)
                answered = await asyncio.wait_for(loop.sock_recv(peer, 100), 5)
        await transports.close()
        return takes_ipv4, delivered, answered

    takes_ipv4, delivered, answered = uvloop.run(round_trip())
    assert takes_ipv4 is expected
    if takes_ipv4:
        assert delivered[0][1].host == "::ffff:127.0.0.1"
        assert answered == b"back"


# -- TCP --------------------------------------------------------------------------------------------
OPTIONS_START = b"OPTIONS sip:127.0.0.1 SIP/2.0\r\n"  # a message's first line, its rest never sent


def test_a_failed_connect_reports_each_next_hop_as_the_core_named_it() -> None:
    [closed] = free_ports(1)  # nothing listens there: the connect is refused
    address = Address("tcp", "127.0.0.1", closed)
    by_name = Address("tcp", "pbx.example.net", closed)  # what the core asked for, resolved
    reported: list[Address] = []

    async def connect_and_fail() -> None:
        pool = TcpPool(lambda data, source, local: None, reported.append)
        pool.send(b"INVITE ...", address, None, by_name)
        pool.send(b"CANCEL ...", address, None)  # queued behind the same connect
        await asyncio.gather(*pool._tasks)

    uvloop.run(connect_and_fail())
    assert sorted(reported, key=str) == [address, by_name]


def test_what_waits_for_connects_is_bounded_and_freed_when_they_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages for next hops still being connected to were queued without bound (a
    black-holed Contact holds its connect for 5 s). Past MAX_TCP_CONNECT_BACKLOG in all
    they are dropped and said once per connect; a connect's end frees its share."""
    monkeypatch.setattr(transport, "MAX_TCP_CONNECT_BACKLOG", 10 * 1024)
    message = b"x" * 1024

    async def queue_then_connect() -> tuple[bytes, int, int, list[dict[str, object]]]:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        address = Address("tcp", "127.0.0.1", listener.getsockname()[1])
        pool = TcpPool(lambda data, source, local: None, lambda next_hop: None)
        with capture_logs() as logs:
            for _ in range(30):  # all before the connect can finish: it needs the loop
                pool.send(message, address, None)
            waiting = pool._connect_backlog
            accepted, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
            await asyncio.gather(*pool._tasks)
        received = b""
        while len(received) < 10 * 1024:
            chunk = await asyncio.wait_for(loop.sock_recv(accepted, 65536), 5)
            assert chunk, "the connection closed early"
            received += chunk
        backlog_after = pool._connect_backlog
        pool.close()
        accepted.close()
        listener.close()
        return received, waiting, backlog_after, [e for e in logs if e["event"] == "tcp.connect_backlog"]

    received, waiting, backlog_after, said = uvloop.run(queue_then_connect())
    assert waiting == 10 * 1024 and len(received) == 10 * 1024  # the first ten, sent once connected
    assert backlog_after == 0
    assert len(said) == 1 and said[0]["dropped"] == 20


def test_idle_and_half_sent_connections_are_closed_and_active_ones_kept() -> None:
    now = [0.0]  # the pool's clock, set by the test

    async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """An RFC 5626 keep-alive; its answer shows the pool has read all sent before it."""
        writer.write(b"\r\n\r\n")
        return await asyncio.wait_for(reader.readexactly(2), 5)

    async def three_peers() -> tuple[int, list[bytes], bytes]:
        pool = TcpPool(lambda data, source, local: None, lambda next_hop: None, clock=lambda: now[0])
        local = Address("tcp", "127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(
            lambda: TcpConnection(pool, local), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        peers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in peers:  # at 0 s
            assert await ping(reader, writer) == b"\r\n"
        now[0] = 100.0
        (idle, _), (trickling, trickling_writer), alive = peers
        trickling_writer.write(OPTIONS_START)  # bytes since, but never a whole message
        await ping(*alive)  # (and the pool has read the trickle too: it was sent first)
        closed = pool.close_idle(60.0)
        ends = [await asyncio.wait_for(reader.read(), 5) for reader in (idle, trickling)]
        still_answers = await ping(*alive)
        alive[1].close()
        server.close()
        return closed, ends, still_answers

    closed, ends, still_answers = uvloop.run(three_peers())
    assert closed == 2
    assert ends == [b"", b""]  # end of file: sipguard closed them
    assert still_answers == b"\r\n"


def count_lookups(loop: asyncio.AbstractEventLoop, lookups: list[str]) -> None:
    """Record each name the loop resolves (for real)."""
    real_getaddrinfo = loop.getaddrinfo

    async def counted(host: str, *args: object, **kwargs: object) -> object:
        lookups.append(host)
        return await real_getaddrinfo(host, *args, **kwargs)  # type: ignore[arg-type]

    loop.getaddrinfo = counted  # type: ignore[method-assign, assignment]


def test_a_name_is_resolved_again_after_a_minute() -> None:
    """A PBX given by name and moved by DNS is followed: its address is cached for
    DNS_CACHE_SECONDS. (The name is localhost, so the move itself is not shown.)"""
    now = [0.0]
    lookups: list[str] = []

    async def send_three() -> list[bytes]:
        loop = asyncio.get_running_loop()
        count_lookups(loop, lookups)
        # localhost is 127.0.0.1 or ::1, as the machine's resolver has it
        family, _, _, _, (loopback, *_) = socket.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)[0]
        pbx = socket.socket(family, socket.SOCK_DGRAM)
        pbx.bind((loopback, 0))
        pbx.setblocking(False)
        transports = Transports(lambda data, source, local: None, lambda next_hop: None, lambda: now[0])
        await transports.listen(Address("udp", str(loopback), 0))
        by_name = Address("udp", "localhost", pbx.getsockname()[1])
        received: list[bytes] = []
        for moment in (0.0, DNS_CACHE_SECONDS - 1, DNS_CACHE_SECONDS + 1):
            now[0] = moment
            transports.send(b"OPTIONS %d" % len(received), by_name, None)
            received.append(await asyncio.wait_for(loop.sock_recv(pbx, 100), 5))
        await transports.close()
        pbx.close()
        return received

    received = uvloop.run(send_three())
    assert received == [b"OPTIONS 0", b"OPTIONS 1", b"OPTIONS 2"]
    assert lookups == ["localhost", "localhost"]  # the first send, and the one after expiry


def resolve_as_dual_stack(loop: asyncio.AbstractEventLoop, addresses: tuple[str, ...]) -> None:
    """Resolve every name to ``addresses`` in that order, as a resolver does a name with A
    and AAAA records (localhost, a dual-stack PBX), honouring getaddrinfo's ``family``."""

    async def resolve(host: str, port: int, *, family: int = 0, **kwargs: object) -> list[object]:
        found = [
            (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", (address, port, 0, 0))
            if ":" in address
            else (socket.AF_INET, socket.SOCK_DGRAM, 17, "", (address, port))
            for address in addresses
        ]
        found = [info for info in found if family in (socket.AF_UNSPEC, info[0])]
        if not found:
            raise socket.gaierror(socket.EAI_ADDRFAMILY, "Address family for hostname not supported")
        return found

    loop.getaddrinfo = resolve  # type: ignore[method-assign, assignment]


@pytest.mark.parametrize(
    ("listener", "resolved"),
    [("127.0.0.1", ("::1", "127.0.0.1")), ("::1", ("127.0.0.1", "::1"))],
    ids=["ipv4-listener-aaaa-first", "ipv6-listener-a-first"],
)
def test_a_name_with_both_families_is_reached_from_a_one_family_listener(
    listener: str, resolved: tuple[str, ...]
) -> None:
    """``upstream: udp:localhost:5070`` (or a dual-stack PBX's name) with IPv4 listeners
    only: the name resolved to ::1 first, sendto on the IPv4 socket raised ValueError
    (socket family mismatch) and nothing reached the PBX, every message an internal error.
    The name is now resolved to the family of the socket that sends there."""
    family = socket.AF_INET6 if ":" in listener else socket.AF_INET

    async def send() -> bytes:
        loop = asyncio.get_running_loop()
        resolve_as_dual_stack(loop, resolved)
        with socket.socket(family, socket.SOCK_DGRAM) as pbx:
            pbx.bind((listener, 0))
            pbx.setblocking(False)
            transports = Transports(lambda data, source, local: None, lambda next_hop: None)
            bound = await transports.listen(Address("udp", listener, 0))
            by_name = Address("udp", "pbx.example.net", pbx.getsockname()[1])
            transports.send(b"OPTIONS ...", by_name, bound)
            received = await asyncio.wait_for(loop.sock_recv(pbx, 100), 5)
            await transports.close()
        return received

    assert uvloop.run(send()) == b"OPTIONS ..."


def test_a_name_without_an_address_the_listener_can_reach_is_unreachable() -> None:
    """An IPv4 listener and a name with only an IPv6 address: reported unreachable (its
    requests get 503 at once) and logged, not a ValueError on every message."""
    reported: list[Address] = []

    async def send() -> None:
        resolve_as_dual_stack(asyncio.get_running_loop(), ("::1",))
        failed = asyncio.Event()

        def unreachable(next_hop: Address) -> None:
            reported.append(next_hop)
            failed.set()

        transports = Transports(lambda data, source, local: None, unreachable)
        bound = await transports.listen(Address("udp", "127.0.0.1", 0))
        transports.send(b"OPTIONS ...", Address("udp", "pbx.example.net", 5070), bound)
        await asyncio.wait_for(failed.wait(), 5)
        await transports.close()

    with capture_logs() as logs:
        uvloop.run(send())
    assert reported == [Address("udp", "pbx.example.net", 5070)]
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["dns.failed"]


def test_a_failed_connect_forgets_what_the_name_resolved_to() -> None:
    [closed] = free_ports(1)
    by_name = Address("tcp", "localhost", closed)
    lookups: list[str] = []
    reported: list[Address] = []

    async def connect_twice() -> None:
        count_lookups(asyncio.get_running_loop(), lookups)
        failed = asyncio.Event()

        def unreachable(next_hop: Address) -> None:
            reported.append(next_hop)
            failed.set()

        transports = Transports(lambda data, source, local: None, unreachable)
        for _ in range(2):
            failed.clear()
            transports.send(b"INVITE ...", by_name, None)
            await asyncio.wait_for(failed.wait(), 10)
        await transports.close()

    uvloop.run(connect_twice())
    assert reported == [by_name, by_name]  # as the core named it: its requests get 503
    assert lookups == ["localhost", "localhost"]  # resolved again after the failure


@pytest.mark.parametrize("name", ["a..b", "a" * 64 + ".example", "."])
def test_a_name_the_resolver_refuses_as_text_is_reported_unreachable(name: str) -> None:
    """getaddrinfo raises UnicodeError, not OSError, for a name with an empty or overlong
    label; that escaped the lookup task, so the next hop was never reported and what was
    sent there waited for its timeout instead of getting 503 at once."""
    reported: list[Address] = []

    async def send() -> None:
        failed = asyncio.Event()

        def unreachable(next_hop: Address) -> None:
            reported.append(next_hop)
            failed.set()

        transports = Transports(lambda data, source, local: None, unreachable)
        await transports.listen(Address("udp", "127.0.0.1", 0))
        transports.send(b"OPTIONS ...", Address("udp", name, 5060), None)
        await asyncio.wait_for(failed.wait(), 10)
        await transports.close()

    uvloop.run(send())
    assert reported == [Address("udp", name, 5060)]


def test_peers_holding_every_connection_open_cannot_stop_sipguard_reaching_the_pbx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One pool held both ways: a peer that opened MAX_TCP_CONNECTIONS connections (no
    message needed, so the flood guard never sees it) made sipguard close its own connect
    to the PBX, and what it sent there was lost. Accepted connections have their own limit."""
    monkeypatch.setattr(transport, "MAX_TCP_CONNECTIONS", 3)
    request = b"OPTIONS sip:pbx SIP/2.0\r\nContent-Length: 0\r\n\r\n"

    async def fill_then_reach_the_pbx() -> tuple[list[bytes], bytes, bytes]:
        loop = asyncio.get_running_loop()
        pool = TcpPool(lambda data, source, local: None, lambda next_hop: None)
        local = Address("tcp", "127.0.0.1", 0)
        server = await loop.create_server(lambda: TcpConnection(pool, local), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        # a keep-alive answered: the connection is registered (or was refused: end of file)
        answers = []
        for reader, writer in held:
            writer.write(b"\r\n\r\n")
            answers.append(await asyncio.wait_for(reader.read(2), 5))
        pbx = socket.create_server(("127.0.0.1", 0))
        pbx.setblocking(False)
        pool.send(request, Address("tcp", "127.0.0.1", pbx.getsockname()[1]), None)
        accepted, _ = await asyncio.wait_for(loop.sock_accept(pbx), 5)
        received = b""
        while len(received) < len(request):
            chunk = await asyncio.wait_for(loop.sock_recv(accepted, 65536), 5)
            if not chunk:
                break
            received += chunk
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\r\n\r\n")
        refused_again = await asyncio.wait_for(reader.read(2), 5)
        for _, held_writer in [*held, (reader, writer)]:
            held_writer.close()
        pool.close()
        server.close()
        accepted.close()
        pbx.close()
        return answers, received, refused_again

    answers, received, refused_again = uvloop.run(fill_then_reach_the_pbx())
    assert answers == [b"\r\n", b"\r\n", b"\r\n", b""]  # the fourth peer is refused
    assert received == request
    assert refused_again == b""  # still full for peers


def test_a_peer_that_never_reads_cannot_grow_the_write_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes to a TCP peer that stops reading were buffered without bound, in sipguard's
    memory. Past MAX_TCP_WRITE_BUFFER the connection is aborted instead."""
    monkeypatch.setattr(transport, "MAX_TCP_WRITE_BUFFER", 256 * 1024)
    chunk = b"x" * 16384

    async def flood_a_sleeper() -> tuple[int, int, bool]:
        loop = asyncio.get_running_loop()
        sleeper = socket.socket()
        sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sleeper.bind(("127.0.0.1", 0))
        sleeper.listen()
        sleeper.setblocking(False)
        address = Address("tcp", "127.0.0.1", sleeper.getsockname()[1])
        pool = TcpPool(lambda data, source, local: None, lambda next_hop: None)
        pool.send(chunk, address, None)
        accepted, _ = await asyncio.wait_for(loop.sock_accept(sleeper), 5)  # and never read
        await asyncio.gather(*pool._tasks)  # connected: the first chunk is written
        connection = pool._connections[(address.host, address.port)]
        assert connection.transport is not None
        most = 0
        sent = 1
        while sent < 4096 and not connection.transport.is_closing():  # 64 MiB at most
            pool.send(chunk, address, None)
            sent += 1
            most = max(most, connection.transport.get_write_buffer_size())
        closing = connection.transport.is_closing()
        pool.close()
        accepted.close()
        sleeper.close()
        return most, sent, closing

    most, sent, closing = uvloop.run(flood_a_sleeper())
    assert closing and sent < 4096
    assert most <= 256 * 1024


def test_framing_lost_delivers_what_came_before_and_the_header_section_to_answer() -> None:
    """A valid request and one with Content-Length -1 in one segment: the valid one is
    delivered, then the bad one's header section (the core answers it 400 from the
    partial message), and only then is the connection closed."""
    good = (
        b"OPTIONS sip:127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:1;branch=z9hG4bKa\r\n"
        b"From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>\r\nCall-ID: c\r\n"
        b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    )
    bad_head = good.replace(b"Content-Length: 0", b"Content-Length: -1").replace(b"CSeq: 1", b"CSeq: 2")
    delivered: list[bytes] = []

    async def pipeline() -> bytes:
        pool = TcpPool(lambda data, source, local: delivered.append(data), lambda next_hop: None)
        server = await asyncio.get_running_loop().create_server(
            lambda: TcpConnection(pool, Address("tcp", "127.0.0.1", 0)), "127.0.0.1", 0
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(good + bad_head + b"body")
        end = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        server.close()
        return end

    assert uvloop.run(pipeline()) == b""  # closed by sipguard
    assert delivered == [good, bad_head]
