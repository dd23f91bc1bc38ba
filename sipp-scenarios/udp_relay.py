"""A bare UDP relay on uvloop that parses nothing: the floor for bench_proxy.py.

    .venv/bin/python sipp-scenarios/udp_relay.py --listen 127.0.0.1:5060 --upstream 127.0.0.1:5070

One socket, as sipguard has: a datagram from the upstream address goes to the last
client address seen, any other datagram goes to the upstream and makes its source the
client. No parsing, no state beyond that one address, no logging per packet: what is
left is the cost of moving a datagram through Python on uvloop (one
``datagram_received`` call and one ``sendto`` per message), which is what sipguard
pays before it does any SIP work. It is only correct with a single client, which is
what the benchmark drives.

Prints one JSON line ``{"event": "relay.started", ...}`` on stderr once the socket is
bound (the benchmark's readiness signal) and ``relay.stopped`` with its counters on
SIGTERM/SIGINT, then exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol, cast

import uvloop


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class Relay(asyncio.DatagramProtocol):
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.client: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.to_upstream = 0
        self.to_client = 0
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        transport = self.transport
        if transport is None:
            return
        if addr == self.upstream:
            if self.client is None:
                self.dropped += 1
                return
            transport.sendto(data, self.client)
            self.to_client += 1
        else:
            self.client = addr
            transport.sendto(data, self.upstream)
            self.to_upstream += 1

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a peer that went away

    def counters(self) -> dict[str, int]:
        """What ``relay.stopped`` reports."""
        return {"to_upstream": self.to_upstream, "to_client": self.to_client, "dropped": self.dropped}


class RelayProtocol(Protocol):
    """What serve() needs of a relay: this file's, or sip_floor.py's."""

    def counters(self) -> dict[str, int]: ...


def _log(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


RelayFactory = Callable[[tuple[str, int], tuple[str, int]], asyncio.DatagramProtocol]


async def serve(listen: tuple[str, int], upstream: tuple[str, int], factory: RelayFactory) -> int:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: factory(listen, upstream), local_addr=listen
    )
    relay = cast(RelayProtocol, protocol)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = transport.get_extra_info("sockname")
    _log("relay.started", listen=f"udp:{bound[0]}:{bound[1]}", upstream=f"udp:{upstream[0]}:{upstream[1]}")
    await stop.wait()
    transport.close()
    _log("relay.stopped", **relay.counters())
    return 0


def main(argv: list[str] | None = None, factory: RelayFactory = Relay, description: str = __doc__) -> int:
    """The command line of this relay, and of sip_floor.py's (``factory``, ``description``)."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("--listen", type=_host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", type=_host_port, required=True, metavar="HOST:PORT")
    args = parser.parse_args(argv)
    return uvloop.run(serve(args.listen, args.upstream, factory))


if __name__ == "__main__":
    sys.exit(main())
