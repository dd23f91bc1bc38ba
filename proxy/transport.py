"""UDP and TCP transports: the thin asyncio layer between sockets and the sans-I/O core.

Each transport hands every datagram or framed stream message to ``deliver(data,
source, local)`` and sends what it is told to. TCP connections are kept by the peer's
address, so a response goes back on the connection its request came in on (RFC 3261
§18.2.2), and a connection to a next hop is opened on first use and reused. DNS names
are resolved by the event loop, never inside the core.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

import structlog

from .sip import KeepAlivePing, ParseError, StreamFramer
from .sip.events import Address
from .sip.hosts import is_ip

log = structlog.get_logger("sipguard.transport")
Deliver = Callable[[bytes, Address, Address], None]

MAX_DATAGRAM = 65535
# A pause of the event loop (a GC pass, a slow policy) must not become kernel drops: at
# 1,000 calls/s a 208 KiB default buffer holds ~15 ms of traffic, 8 MiB about half a second.
# The kernel caps it at net.core.rmem_max / wmem_max (raise those for more).
SOCKET_BUFFER = 8 * 1024 * 1024
TCP_CONNECT_TIMEOUT = 5.0
MAX_TCP_CONNECTIONS = 10_000
MAX_SOURCES = 100_000  # UDP peers whose Address is reused (UdpEndpoint._sources)


class UdpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, local: Address, deliver: Deliver) -> None:
        self.local = local
        self._deliver = deliver
        self.transport: asyncio.DatagramTransport | None = None
        # One Address per peer, not per datagram: transactions keep their source for 32 s
        # after they end, and tens of thousands of copies are that much more for every
        # full garbage collection to walk. Emptied when full (a scan must not grow it).
        self._sources: dict[tuple[str, int], Address] = {}

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
            self.transport.sendto(data, (host, port))


class TcpConnection(asyncio.Protocol):
    def __init__(self, pool: TcpPool, local: Address, peer: Address | None = None) -> None:
        self._pool = pool
        self.local = local
        self.peer = peer
        self._framer = StreamFramer()
        self.transport: asyncio.Transport | None = None

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
        except ParseError as error:
            # the framing is lost: no later byte can be trusted to start a message
            log.info("tcp.framing_lost", peer=str(self.peer), status=error.status, reason=error.reason)
            self.transport.close()
            return
        for frame in frames:
            if isinstance(frame, KeepAlivePing):
                self.transport.write(b"\r\n")  # RFC 5626 §4.4.1 pong
            else:
                self._pool.deliver(frame, self.peer, self.local)

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.unregister(self)

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class TcpPool:
    """Open TCP connections by peer address, plus outgoing connects in progress."""

    def __init__(self, deliver: Deliver) -> None:
        self.deliver = deliver
        self._connections: dict[tuple[str, int], TcpConnection] = {}
        self._connecting: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, connection: TcpConnection) -> None:
        assert connection.peer is not None and connection.transport is not None
        if len(self._connections) >= MAX_TCP_CONNECTIONS:
            connection.transport.close()
            return
        self._connections[(connection.peer.host, connection.peer.port)] = connection

    def unregister(self, connection: TcpConnection) -> None:
        assert connection.peer is not None
        key = (connection.peer.host, connection.peer.port)
        if self._connections.get(key) is connection:
            del self._connections[key]

    def send(self, data: bytes, destination: Address, local: Address | None) -> None:
        key = (destination.host, destination.port)
        connection = self._connections.get(key)
        if connection is not None:
            connection.send(data)
            return
        queued = self._connecting.get(key)
        if queued is not None:
            queued.append(data)
            return
        self._connecting[key] = [data]
        task = asyncio.get_running_loop().create_task(self._connect(destination, local))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            dropped = self._connecting.pop(key, [])
            log.warning(
                "tcp.connect_failed", destination=str(destination), error=str(error), dropped=len(dropped)
            )
            return
        for data in self._connecting.pop(key, []):
            connection.send(data)

    def close(self) -> None:
        for connection in list(self._connections.values()):
            if connection.transport is not None:
                connection.transport.close()


class Transports:
    """Every listener sipguard has, and the one send() the core's Send actions go through."""

    def __init__(self, deliver: Deliver) -> None:
        self._deliver = deliver
        self.udp: dict[Address, UdpEndpoint] = {}
        self.tcp = TcpPool(deliver)
        self._servers: list[asyncio.Server] = []
        self._resolved: dict[str, str] = {}

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

    def send(self, data: bytes, destination: Address, local: Address | None) -> None:
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
            self.tcp.send(data, destination, local)

    def _udp_for(self, destination: Address) -> UdpEndpoint | None:
        wants_ipv6 = ":" in destination.host
        for address, endpoint in self.udp.items():
            if (":" in address.host) == wants_ipv6:
                return endpoint
        return None

    def _send_after_resolving(self, data: bytes, destination: Address, local: Address | None) -> None:
        cached = self._resolved.get(destination.host)
        if cached is not None:
            self.send(data, Address(destination.transport, cached, destination.port), local)
            return

        async def resolve() -> None:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(destination.host, destination.port, type=socket.SOCK_DGRAM)
            except OSError as error:
                log.warning("dns.failed", host=destination.host, error=str(error))
                return
            if len(self._resolved) > 10_000:
                self._resolved.clear()
            self._resolved[destination.host] = str(infos[0][4][0])
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
