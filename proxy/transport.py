"""UDP and TCP transports: the thin asyncio layer between sockets and the sans-I/O core.

Each transport hands every datagram or framed stream message to ``deliver(data,
source, local)`` and sends what it is told to. TCP connections are kept by the peer's
address, so a response goes back on the connection its request came in on (RFC 3261
§18.2.2), and a connection to a next hop is opened on first use and reused. DNS names
are resolved by the event loop, never inside the core. A next hop that cannot be reached
(a failed connect, a name that does not resolve) is reported through ``unreachable``, so
that what was sent there fails at once rather than by timeout.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import cast

import structlog

from .sip import FramingLostError, KeepAlivePing, StreamFramer
from .sip.events import Address
from .sip.hosts import is_ip, normal_host

log = structlog.get_logger("sipguard.transport")
Deliver = Callable[[bytes, Address, Address], None]
Unreachable = Callable[[Address], None]  # a next hop that could not be reached, as the core named it

MAX_DATAGRAM = 65535
# A pause of the event loop (a GC pass, a slow policy) must not become kernel drops: at
# 1,000 calls/s a 208 KiB default buffer holds ~15 ms of traffic, 8 MiB about half a second.
# The kernel caps it at net.core.rmem_max / wmem_max (raise those for more).
SOCKET_BUFFER = 8 * 1024 * 1024
TCP_CONNECT_TIMEOUT = 5.0
# Connections accepted from peers, and apart from them those sipguard opens (to the PBX,
# to a customer's Contact): peers holding every accepted connection open must not stop
# sipguard from reaching the PBX.
MAX_TCP_CONNECTIONS = 10_000
# Bytes written to a TCP peer and not yet taken by its kernel. A peer that stops reading
# (while it still sends, or leaves its requests to time out) would otherwise make sipguard
# hold everything sent to it; past this the connection is aborted. 4 MiB is thousands
# of messages: a PBX that only pauses never comes near it.
MAX_TCP_WRITE_BUFFER = 4 * 1024 * 1024
# Bytes waiting, over all outgoing connects in progress, for their connection (each connect
# takes up to TCP_CONNECT_TIMEOUT). Next hops that take SYNs and never answer (a black-holed
# Contact) would otherwise hold everything sent to them meanwhile; past this a message is
# dropped, and its transaction's own timer answers for it. ~16,000 typical messages.
MAX_TCP_CONNECT_BACKLOG = 16 * 1024 * 1024
MAX_SOURCES = 100_000  # UDP peers whose Address is reused (UdpEndpoint._sources)
# A name is resolved again this long after it was: a PBX moved by DNS (a failover) is
# followed within a minute, not at the next restart. A failed connect forgets it at once.
DNS_CACHE_SECONDS = 60.0
_FAMILIES = (socket.AF_UNSPEC, socket.AF_INET, socket.AF_INET6)  # what a name is resolved to


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, local: Address, deliver: Deliver) -> None:
        self.local = local
        self._deliver = deliver
        self.transport: asyncio.DatagramTransport | None = None
        # One Address per peer, not per datagram: transactions keep their source for 32 s
        # after they end, and tens of thousands of copies are that much more for every
        # full garbage collection to walk. Emptied when full (a scan must not grow it).
        self._sources: dict[tuple[str, int], Address] = {}
        self.takes_ipv4 = False  # a dual-stack socket: IPv4 peers as ::ffff:a.b.c.d (Transports.listen)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the asyncio interfaces without subclassing them
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError as error:
                    log.warning("udp.buffer_not_set", error=str(error))
            log.debug("udp.buffers", receive=sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def datagram_received(self, data: bytes, addr: tuple[str, int] | tuple[str, int, int, int]) -> None:
        peer = (addr[0], addr[1])
        source = self._sources.get(peer)
        if source is None:
            if len(self._sources) >= MAX_SOURCES:
                self._sources.clear()
            source = self._sources[peer] = Address("udp", addr[0], addr[1])
        self._deliver(data, source, self.local)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a peer that went away: nothing to do but note it
        log.debug("udp.error", error=str(exc), local=str(self.local))

    def send(self, data: bytes, host: str, port: int) -> None:
        if self.transport is not None:
            if self.takes_ipv4 and ":" not in host:  # an IPv4 peer of a dual-stack socket
                host = "::ffff:" + host
            self.transport.sendto(data, (host, port))


class TcpConnection(asyncio.Protocol):
    def __init__(self, pool: TcpPool, local: Address, peer: Address | None = None) -> None:
        self._pool = pool
        self.local = local
        self.peer = peer
        self.accepted = peer is None  # from a peer's connect, not one of ours
        self._framer = StreamFramer()
        self.transport: asyncio.Transport | None = None
        # when a whole message (or a keep-alive) last went either way: bytes alone do not
        # count, or a peer trickling one byte at a time would hold the connection for ever
        self.last_active = pool.clock()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.peer is None:
            host, port = transport.get_extra_info("peername")[:2]
            self.peer = Address("tcp", host, port)
        self._pool.register(self)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.transport is not None
        try:
            frames = self._framer.feed(data)
        except FramingLostError as error:
            # the framing is lost: no later byte can be trusted to start a message. What
            # came before it is delivered; the header section that broke it too, so that
            # the core answers it (400, 513) before the connection closes (close() sends
            # what is written first).
            log.info("tcp.framing_lost", peer=str(self.peer), status=error.status, reason=error.reason)
            self._deliver(error.frames)
            if error.head is not None:
                self._pool.deliver(error.head, self.peer, self.local)
            self.transport.close()
            return
        self._deliver(frames)

    def _deliver(self, frames: list[bytes | KeepAlivePing]) -> None:
        assert self.peer is not None and self.transport is not None
        if frames:
            self.last_active = self._pool.clock()
        for frame in frames:
            if isinstance(frame, KeepAlivePing):
                self.transport.write(b"\r\n")  # RFC 5626 §4.4.1 pong
            else:
                self._pool.deliver(frame, self.peer, self.local)

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.unregister(self)

    def send(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        buffered = transport.get_write_buffer_size()
        if buffered + len(data) > MAX_TCP_WRITE_BUFFER:
            log.warning(
                "tcp.write_backlog", peer=str(self.peer), buffered=buffered, limit=MAX_TCP_WRITE_BUFFER
            )
            transport.abort()  # close() would wait to flush what the peer does not read
            return
        transport.write(data)
        self.last_active = self._pool.clock()


class _Connect:
    """An outgoing connect in progress: what waits for it, the next hops it was sent to as
    the core named them (a DNS name, or the address itself), and how much was dropped."""

    __slots__ = ("dropped", "messages", "next_hops", "size")

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.size = 0
        self.next_hops: set[Address] = set()
        self.dropped = 0


class TcpPool:
    """Open TCP connections by peer address, plus outgoing connects in progress."""

    def __init__(
        self, deliver: Deliver, unreachable: Unreachable, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.deliver = deliver
        self.unreachable = unreachable
        self.clock = clock  # seconds, for idle connections
        self._connections: dict[tuple[str, int], TcpConnection] = {}
        # MAX_TCP_CONNECTIONS each: the connections peers opened to us, and ours to them
        self._accepted: set[TcpConnection] = set()
        self._opened: set[TcpConnection] = set()
        self._connecting: dict[tuple[str, int], _Connect] = {}  # by peer
        self._connect_backlog = 0  # bytes in every _Connect's messages
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, connection: TcpConnection) -> None:
        assert connection.peer is not None and connection.transport is not None
        same_way = self._same_way(connection)
        if len(same_way) >= MAX_TCP_CONNECTIONS:
            connection.transport.close()
            return
        same_way.add(connection)
        self._connections[(connection.peer.host, connection.peer.port)] = connection

    def unregister(self, connection: TcpConnection) -> None:
        assert connection.peer is not None
        self._same_way(connection).discard(connection)
        key = (connection.peer.host, connection.peer.port)
        if self._connections.get(key) is connection:
            del self._connections[key]

    def _same_way(self, connection: TcpConnection) -> set[TcpConnection]:
        return self._accepted if connection.accepted else self._opened

    def send(
        self, data: bytes, destination: Address, local: Address | None, named: Address | None = None
    ) -> None:
        key = (destination.host, destination.port)
        connection = self._connections.get(key)
        if connection is not None:
            connection.send(data)
            return
        pending = self._connecting.get(key)
        if pending is None:
            pending = self._connecting[key] = _Connect()
            task = asyncio.get_running_loop().create_task(self._connect(destination, local))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        pending.next_hops.add(named or destination)
        if self._connect_backlog + len(data) > MAX_TCP_CONNECT_BACKLOG:
            pending.dropped += 1  # said once the connect ends, not once per message
            return
        pending.messages.append(data)
        pending.size += len(data)
        self._connect_backlog += len(data)

    async def _connect(self, destination: Address, local: Address | None) -> None:
        key = (destination.host, destination.port)
        loop = asyncio.get_running_loop()
        local_address = local or Address("tcp", "0.0.0.0", 0)
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(
                    lambda: TcpConnection(self, local_address, destination),
                    destination.host,
                    destination.port,
                ),
                TCP_CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as error:
            pending = self._take_pending(key, destination)
            log.warning("tcp.connect_failed", destination=str(destination), error=str(error),
                        dropped=len(pending.messages) + pending.dropped)  # fmt: skip
            for next_hop in pending.next_hops:
                self.unreachable(next_hop)
            return
        for data in self._take_pending(key, destination).messages:
            connection.send(data)

    def _take_pending(self, key: tuple[str, int], destination: Address) -> _Connect:
        """The connect to ``key`` is over: what waited for it, out of the backlog."""
        pending = self._connecting.pop(key, None) or _Connect()
        self._connect_backlog -= pending.size
        if pending.dropped:
            log.warning("tcp.connect_backlog", destination=str(destination), dropped=pending.dropped,
                        limit=MAX_TCP_CONNECT_BACKLOG)  # fmt: skip
        return pending

    def close_idle(self, idle_timeout: float) -> int:
        """Close the connections no whole message went through for ``idle_timeout`` seconds,
        as Kamailio's tcp_connection_lifetime does: left open, idle and half-sent connections
        would fill MAX_TCP_CONNECTIONS and lock new peers out. Returns how many."""
        idle_since = self.clock() - idle_timeout
        idle = [c for c in self._connections.values() if c.last_active < idle_since and c.transport]
        for connection in idle:
            assert connection.transport is not None
            connection.transport.close()
        return len(idle)

    def close(self) -> None:
        for connection in list(self._connections.values()):
            if connection.transport is not None:
                connection.transport.close()


def _dual_stack(sock: socket.socket, host: str) -> bool:
    """A socket bound to the IPv6 wildcard that IPv4 peers reach too (IPV6_V6ONLY off, the
    Linux default for UDP; asyncio turns it on for TCP listeners)."""
    if sock.family != socket.AF_INET6 or normal_host(host) != "::":
        return False
    return not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


class Transports:
    """Every listener sipguard has, and the one send() the core's Send actions go through."""

    def __init__(
        self, deliver: Deliver, unreachable: Unreachable, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._deliver = deliver
        self.unreachable = unreachable
        self.udp: dict[Address, UdpEndpoint] = {}
        self.tcp = TcpPool(deliver, self._unreachable, clock)
        self._servers: list[asyncio.Server] = []
        # (name, address family) -> its address, resolved when
        self._resolved: dict[tuple[str, int], tuple[str, float]] = {}

    def _unreachable(self, next_hop: Address) -> None:
        for family in _FAMILIES:  # the name may lead elsewhere by now
            self._resolved.pop((next_hop.host, family), None)
        self.unreachable(next_hop)

    async def listen(self, address: Address) -> Address:
        """Bind a listener; returns its address with the real port (when 0 was asked for)."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        if address.transport == "udp":
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UdpEndpoint(address, self._deliver),
                local_addr=(address.host, address.port),
                family=family,
            )
            port = transport.get_extra_info("sockname")[1]
            bound = Address("udp", address.host, port)
            endpoint = cast(UdpEndpoint, transport.get_protocol())
            endpoint.local = bound
            endpoint.takes_ipv4 = _dual_stack(transport.get_extra_info("socket"), address.host)
            self.udp[bound] = endpoint
            return bound
        bound_tcp = [address]  # the factory runs after binding, when the real port is known
        server = await loop.create_server(
            lambda: TcpConnection(self.tcp, bound_tcp[0]),
            address.host,
            address.port,
            family=family,
            reuse_address=True,
        )
        self._servers.append(server)
        bound_tcp[0] = Address("tcp", address.host, server.sockets[0].getsockname()[1])
        return bound_tcp[0]

    def takes_ipv4(self, address: Address) -> bool:
        """Whether the listener bound at ``address`` is a dual-stack one (see _dual_stack)."""
        endpoint = self.udp.get(address)
        return endpoint is not None and endpoint.takes_ipv4

    def send(
        self, data: bytes, destination: Address, local: Address | None, named: Address | None = None
    ) -> None:
        """``named``: the next hop as the core named it, when ``destination`` is what its
        DNS name resolved to."""
        if not is_ip(destination.host):
            self._send_after_resolving(data, destination, local)
            return
        if destination.transport == "udp":
            endpoint = self.udp.get(local) if local is not None else None
            if endpoint is None:
                endpoint = self._udp_for(destination)
            if endpoint is None:
                log.warning("udp.no_listener", destination=str(destination))
                return
            endpoint.send(data, destination.host, destination.port)
        else:
            self.tcp.send(data, destination, local, named)

    def _udp_for(self, destination: Address) -> UdpEndpoint | None:
        wants_ipv6 = ":" in destination.host
        for address, endpoint in self.udp.items():
            if (":" in address.host) == wants_ipv6:
                return endpoint
        return None

    def _sendable_family(self, destination: Address, local: Address | None) -> int:
        """The address family ``destination`` must resolve to for ``local`` to send there:
        a UDP socket sends to its own family only (a dual-stack one to either). A name with
        both A and AAAA records usually resolves to its IPv6 address first (localhost to ::1)."""
        endpoint = self.udp.get(local) if destination.transport == "udp" and local is not None else None
        if endpoint is None or endpoint.takes_ipv4:
            return socket.AF_UNSPEC  # TCP connects over either; without a listener, _udp_for picks
        return socket.AF_INET6 if ":" in endpoint.local.host else socket.AF_INET

    def _send_after_resolving(self, data: bytes, destination: Address, local: Address | None) -> None:
        key = (destination.host, self._sendable_family(destination, local))
        cached = self._resolved.get(key)
        if cached is not None and self.tcp.clock() - cached[1] < DNS_CACHE_SECONDS:
            address = Address(destination.transport, cached[0], destination.port)
            self.send(data, address, local, destination)
            return

        async def resolve() -> None:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    destination.host, destination.port, family=key[1], type=socket.SOCK_DGRAM
                )
            except (OSError, UnicodeError) as error:  # UnicodeError: not a valid name ("a..b")
                log.warning("dns.failed", host=destination.host, error=str(error))
                self.unreachable(destination)
                return
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[key] = (str(infos[0][4][0]), self.tcp.clock())
            self.send(data, destination, local)

        task = asyncio.get_running_loop().create_task(resolve())
        self.tcp._tasks.add(task)
        task.add_done_callback(self.tcp._tasks.discard)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for endpoint in self.udp.values():
            if endpoint.transport is not None:
                endpoint.transport.close()
        self.tcp.close()
