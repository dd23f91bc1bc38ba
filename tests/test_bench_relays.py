"""The benchmark's two yardsticks beside bench_proxy.py, over real loopback UDP:
sipp-scenarios/udp_relay.py (a bare relay) and sipp-scenarios/sip_floor.py (a relay doing SIP
work on bytes, whose module docstring is the spec checked here).

Each test runs one uvloop loop holding the relay on an ephemeral 127.0.0.1 port, an upstream
socket and one or two client sockets, plain datagram endpoints whose datagrams queue up. Nothing
sleeps: a datagram that must arrive is awaited with a bounded timeout, and one that must not be
forwarded is followed by one from the same socket that is, which must arrive first (loopback keeps
one socket's order), with the relay's counters. Both command lines are also run as the benchmark
runs them: a subprocess, ready on its relay.started line, reporting its counters on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import pytest
import uvloop
from sipp import LOOPBACK, REPO, free_ports

SCENARIOS = REPO / "sipp-scenarios"
sys.path.insert(0, str(SCENARIOS))  # sip_floor.py imports udp_relay beside it, as when run as a script

import sip_floor  # noqa: E402
import udp_relay  # noqa: E402
from sip_floor import Floor  # noqa: E402
from udp_relay import Relay  # noqa: E402

Address = tuple[str, int]
RelayT = TypeVar("RelayT", bound=Relay)

TIMEOUT = 2.0  # seconds for a datagram or a log line that must come; loopback takes microseconds
CRLF = "\r\n"
DIGEST = re.compile(r"[0-9a-f]{20}")  # the floor's branch after z9hG4bK-sf: a 10-byte blake2b in hex


class Peer(asyncio.DatagramProtocol):
    """A loopback socket playing a client or the upstream: what it receives queues up."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[bytes, Address]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inbox.put_nowait((data, (addr[0], addr[1])))

    @property
    def address(self) -> Address:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return host, port

    def via(self, branch: str = "z9hG4bK-uac1") -> str:
        """The Via value a UAC on this socket writes."""
        return f"SIP/2.0/UDP {self.address[0]}:{self.address[1]};branch={branch}"

    def send(self, data: bytes, to: Address) -> None:
        assert self.transport is not None
        self.transport.sendto(data, to)

    async def receive_from(self) -> tuple[bytes, Address]:
        return await asyncio.wait_for(self.inbox.get(), TIMEOUT)

    async def receive(self) -> bytes:
        return (await self.receive_from())[0]


async def open_peer(transports: list[asyncio.BaseTransport]) -> Peer:
    transport, peer = await asyncio.get_running_loop().create_datagram_endpoint(
        Peer, local_addr=(LOOPBACK, 0)
    )
    transports.append(transport)
    return peer


@dataclass
class Relayed(Generic[RelayT]):
    """A relay under test between its upstream and a first client, and every socket opened."""

    relay: RelayT
    address: Address
    upstream: Peer
    client: Peer
    transports: list[asyncio.BaseTransport]

    @property
    def me(self) -> str:
        """The relay's HOST:PORT, as the floor writes it in its Via and Record-Route."""
        return f"{self.address[0]}:{self.address[1]}"

    async def peer(self) -> Peer:
        """One more client."""
        return await open_peer(self.transports)

    async def forward(self, message: bytes, client: Peer | None = None) -> bytes:
        """Send from a client (the first by default); what the upstream then receives."""
        (client or self.client).send(message, self.address)
        return await self.upstream.receive()

    def close(self) -> None:
        for transport in self.transports:
            transport.close()


@asynccontextmanager
async def relayed(factory: Callable[[Address, Address], RelayT]) -> AsyncIterator[Relayed[RelayT]]:
    """A relay built by ``factory`` between an upstream and a first client; every socket
    is closed on the way out."""
    transports: list[asyncio.BaseTransport] = []
    upstream = await open_peer(transports)
    client = await open_peer(transports)
    # bound to port 0 first, so that the relay is built with the port it really has (the
    # floor writes it in its Via), as serve() builds it with --listen
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    listen = cast(Address, sock.getsockname())
    transport, relay = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: factory(listen, upstream.address), sock=sock
    )
    transports.append(transport)
    setup = Relayed(relay, listen, upstream, client, transports)
    try:
        yield setup
    finally:
        setup.close()


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a test's coroutine on uvloop, as both relays run."""
    uvloop.run(scenario())


# --- SIP messages, written as SIPp writes them (canonical header names, CRLF) ---


def request(
    method: str,
    call_id: str,
    via: str,
    *,
    max_forwards: int | None = 70,
    routes: Sequence[str] = (),
    cseq: int = 1,
    body: str = "",
) -> bytes:
    lines = [
        f"{method} sip:bob@pbx.example.com SIP/2.0",
        f"Via: {via}",
        *(f"Route: {route}" for route in routes),
        *([f"Max-Forwards: {max_forwards}"] if max_forwards is not None else []),
        "From: <sip:alice@example.com>;tag=uac-tag",
        "To: <sip:bob@pbx.example.com>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {'INVITE' if method == 'ACK' else method}",
        "Contact: <sip:alice@127.0.0.1>",
        *(["Content-Type: application/sdp"] if body else []),
        f"Content-Length: {len(body)}",
        "",
        body,
    ]
    return CRLF.join(lines).encode()


def answer(forwarded: bytes, status: str, *, fold_vias: bool = False) -> bytes:
    """The UAS's response to a request it received: its Vias, From, To, Call-ID and CSeq copied
    (RFC 3261 8.2.6.2); with ``fold_vias`` the Vias in one line, as SIPp's [last_Via:] writes them."""
    vias = header_values(forwarded, "Via")
    via_lines = [f"Via: {', '.join(vias)}"] if fold_vias else [f"Via: {via}" for via in vias]
    copied = [
        line for line in header_lines(forwarded) if line.split(":")[0] in ("From", "To", "Call-ID", "CSeq")
    ]
    return CRLF.join([f"SIP/2.0 {status}", *via_lines, *copied, "Content-Length: 0", "", ""]).encode()


def header_lines(message: bytes) -> list[str]:
    head = message.decode().split(CRLF + CRLF)[0]
    return head.split(CRLF)[1:]


def header_values(message: bytes, name: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in header_lines(message) if line.split(":")[0] == name]


def without_lines(message: bytes, *lines: str) -> bytes:
    """The message with each of these whole header lines taken out once."""
    text = message.decode()
    for line in lines:
        assert CRLF + line + CRLF in text, line
        text = text.replace(CRLF + line + CRLF, CRLF, 1)
    return text.encode()


def floor_via(setup: Relayed[Floor], forwarded: bytes) -> str:
    """The floor's Via value on top of a request it forwarded, checked to be its own."""
    top = header_values(forwarded, "Via")[0]
    ours = f"SIP/2.0/UDP {setup.me};branch=z9hG4bK-sf"
    assert top.startswith(ours), top
    assert DIGEST.fullmatch(top[len(ours) :]), top
    return top


# --- udp_relay.py ---


def test_relay_forwards_client_to_upstream_and_back_and_counts_both() -> None:
    async def scenario() -> None:
        async with relayed(Relay) as setup:
            setup.client.send(b"ping", setup.address)
            assert await setup.upstream.receive_from() == (b"ping", setup.address)  # one socket, as sipguard
            setup.upstream.send(b"pong", setup.address)
            assert await setup.client.receive_from() == (b"pong", setup.address)
            assert setup.relay.counters() == {"to_upstream": 1, "to_client": 1, "dropped": 0}

    run(scenario)


def test_relay_sends_upstream_datagrams_to_the_last_client_seen() -> None:
    async def scenario() -> None:
        async with relayed(Relay) as setup:
            second = await setup.peer()
            assert await setup.forward(b"from first") == b"from first"
            assert await setup.forward(b"from second", second) == b"from second"
            setup.upstream.send(b"to second", setup.address)
            assert await second.receive() == b"to second"
            assert await setup.forward(b"first again") == b"first again"
            setup.upstream.send(b"to first", setup.address)
            assert await setup.client.receive() == b"to first"  # "to second" never came here before it
            assert setup.relay.counters() == {"to_upstream": 3, "to_client": 2, "dropped": 0}

    run(scenario)


class WatchedRelay(Relay):
    """The relay unchanged, telling the test each time it has handled a datagram: a datagram
    from the upstream with no client yet goes nowhere, so nothing else can show it was read."""

    def __init__(self, listen: Address, upstream: Address) -> None:
        super().__init__(listen, upstream)
        self.handled: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        super().datagram_received(data, addr)
        self.handled.put_nowait(data)


def test_relay_drops_and_counts_an_upstream_datagram_before_any_client() -> None:
    async def scenario() -> None:
        async with relayed(WatchedRelay) as setup:
            setup.upstream.send(b"too early", setup.address)
            assert await asyncio.wait_for(setup.relay.handled.get(), TIMEOUT) == b"too early"
            assert setup.relay.counters() == {"to_upstream": 0, "to_client": 0, "dropped": 1}
            assert await setup.forward(b"hello") == b"hello"
            setup.upstream.send(b"reply", setup.address)
            assert await setup.client.receive() == b"reply"  # the early one was not kept for it either
            assert setup.relay.counters() == {"to_upstream": 1, "to_client": 1, "dropped": 1}

    run(scenario)


@pytest.mark.parametrize(
    "text", ["127.0.0.1", "5060", ":5060", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536"]
)
def test_command_line_refuses_an_address_that_is_not_host_colon_port(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        udp_relay._host_port(text)
    assert udp_relay._host_port("127.0.0.1:5060") == ("127.0.0.1", 5060)


@pytest.mark.parametrize("script", ["udp_relay.py", "sip_floor.py"])
def test_command_line_is_ready_on_relay_started_and_reports_its_counters_on_sigterm(script: str) -> None:
    # what bench_proxy.py relies on: the readiness line, the relay the script names (the floor's
    # Via shows it is the floor), the counters on relay.stopped and exit status 0
    async def scenario() -> None:
        transports: list[asyncio.BaseTransport] = []
        upstream = await open_peer(transports)
        client = await open_peer(transports)
        (port,) = free_ports(1)
        upstream_port = upstream.address[1]
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, str(SCENARIOS / script)),
            *("--listen", f"{LOOPBACK}:{port}", "--upstream", f"{LOOPBACK}:{upstream_port}"),
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        try:
            started = json.loads(await asyncio.wait_for(process.stderr.readline(), TIMEOUT * 5))
            assert started == {
                "event": "relay.started",
                "listen": f"udp:{LOOPBACK}:{port}",
                "upstream": f"udp:{LOOPBACK}:{upstream_port}",
            }
            options = request("OPTIONS", "cli-1", client.via())
            client.send(options, (LOOPBACK, port))
            forwarded = await upstream.receive()
            vias = header_values(forwarded, "Via")
            if script == "udp_relay.py":
                assert forwarded == options  # parsed nothing, changed nothing
            else:
                assert vias[0].startswith(f"SIP/2.0/UDP {LOOPBACK}:{port};branch=z9hG4bK-sf")
                assert vias[1:] == [client.via()]
            process.send_signal(signal.SIGTERM)
            stopped = json.loads(await asyncio.wait_for(process.stderr.readline(), TIMEOUT))
            expected = {"event": "relay.stopped", "to_upstream": 1, "to_client": 0, "dropped": 0}
            if script == "sip_floor.py":
                expected["calls_remembered"] = 1
            assert stopped == expected
            assert await asyncio.wait_for(process.wait(), TIMEOUT) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            for transport in transports:
                transport.close()

    run(scenario)


# --- sip_floor.py: requests ---


def test_floor_pushes_its_via_on_top_decrements_max_forwards_and_changes_nothing_else() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            options = request("OPTIONS", "call-1", setup.client.via())
            forwarded = await setup.forward(options)
            ours = floor_via(setup, forwarded)
            assert header_values(forwarded, "Via") == [ours, setup.client.via()]
            assert header_values(forwarded, "Max-Forwards") == ["69"]
            restored = without_lines(forwarded, f"Via: {ours}").replace(
                b"Max-Forwards: 69", b"Max-Forwards: 70"
            )
            assert restored == options
            assert header_values(forwarded, "Record-Route") == []  # an INVITE's only
            assert setup.relay.counters() == {
                "to_upstream": 1,
                "to_client": 0,
                "dropped": 0,
                "calls_remembered": 1,
            }

    run(scenario)


def test_floor_branch_is_a_digest_of_the_top_via_so_cancel_and_ack_share_their_invites() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            via = setup.client.via("z9hG4bK-invite1")
            invite = floor_via(setup, await setup.forward(request("INVITE", "call-1", via)))
            cancel = floor_via(setup, await setup.forward(request("CANCEL", "call-1", via)))
            ack = floor_via(setup, await setup.forward(request("ACK", "call-1", via)))  # to a non-2xx
            other = setup.client.via("z9hG4bK-invite2")
            another_invite = floor_via(setup, await setup.forward(request("INVITE", "call-2", other)))
            assert invite == cancel == ack
            assert another_invite != invite

    run(scenario)


def test_floor_drops_and_counts_a_request_at_zero_hops_or_without_max_forwards() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            via = setup.client.via()
            setup.client.send(request("OPTIONS", "zero-hops", via, max_forwards=0), setup.address)
            setup.client.send(request("OPTIONS", "no-max-forwards", via, max_forwards=None), setup.address)
            forwarded = await setup.forward(request("OPTIONS", "last-hop", via, max_forwards=1))
            assert header_values(forwarded, "Call-ID") == ["last-hop"]  # the two before it went nowhere
            assert header_values(forwarded, "Max-Forwards") == ["0"]
            assert setup.relay.counters()["dropped"] == 2
            assert setup.relay.counters()["to_upstream"] == 1

    run(scenario)


def test_floor_adds_record_route_to_an_invite_only() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            sdp = "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            invite = request("INVITE", "call-1", setup.client.via(), body=sdp)
            forwarded = await setup.forward(invite)
            record_route = f"<sip:{setup.me};lr>"
            assert header_values(forwarded, "Record-Route") == [record_route]
            ours = floor_via(setup, forwarded)
            restored = without_lines(forwarded, f"Via: {ours}", f"Record-Route: {record_route}")
            assert restored.replace(b"Max-Forwards: 69", b"Max-Forwards: 70") == invite  # body untouched
            bye = await setup.forward(request("BYE", "call-1", setup.client.via("z9hG4bK-bye"), cseq=2))
            assert header_values(bye, "Record-Route") == []

    run(scenario)


def test_floor_removes_its_own_route_from_an_in_dialog_request_and_keeps_the_next() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            routes = [f"<sip:{setup.me};lr>", "<sip:pbx.example.com;lr>"]
            bye = request("BYE", "call-1", setup.client.via(), routes=routes, cseq=2)
            forwarded = await setup.forward(bye)
            assert header_values(forwarded, "Route") == ["<sip:pbx.example.com;lr>"]
            assert header_values(forwarded, "Max-Forwards") == ["69"]  # the lines around it intact
            assert header_values(forwarded, "Via")[1:] == [setup.client.via()]

    run(scenario)


# --- sip_floor.py: responses ---


def test_floor_pops_its_via_and_sends_each_response_to_its_calls_client() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            second = await setup.peer()
            first_invite = await setup.forward(request("INVITE", "call-1", setup.client.via()))
            second_invite = await setup.forward(request("INVITE", "call-2", second.via()), second)
            # answered in the other order: had call-2's response gone to the first client (or
            # to the last source seen, as udp_relay.py does), it would reach it before call-1's
            second_answer = answer(second_invite, "200 OK")
            first_answer = answer(first_invite, "180 Ringing")
            setup.upstream.send(second_answer, setup.address)
            setup.upstream.send(first_answer, setup.address)
            first_received, first_source = await setup.client.receive_from()
            second_received, second_source = await second.receive_from()
            assert first_received == without_lines(first_answer, f"Via: {floor_via(setup, first_invite)}")
            assert second_received == without_lines(second_answer, f"Via: {floor_via(setup, second_invite)}")
            assert header_values(first_received, "Via") == [setup.client.via()]
            assert first_source == second_source == setup.address
            assert setup.relay.counters()["to_client"] == 2

    run(scenario)


def test_floor_pops_only_its_value_from_a_folded_via_line() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            invite = await setup.forward(request("INVITE", "call-1", setup.client.via()))
            folded = answer(invite, "200 OK", fold_vias=True)
            assert header_lines(folded)[0] == f"Via: {floor_via(setup, invite)}, {setup.client.via()}"
            setup.upstream.send(folded, setup.address)
            received = await setup.client.receive()
            assert header_lines(received)[0] == f"Via: {setup.client.via()}"
            assert header_lines(received)[1:] == header_lines(folded)[1:]

    run(scenario)


def foreign_via_on_top(response: bytes) -> bytes:
    return response.replace(
        b"\r\nVia: ", b"\r\nVia: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK-other\r\nVia: ", 1
    )


def unknown_call_id(response: bytes) -> bytes:
    return response.replace(b"Call-ID: call-1", b"Call-ID: call-unknown")


def no_call_id(response: bytes) -> bytes:
    return response.replace(b"Call-ID: call-1\r\n", b"")


def request_from_upstream(response: bytes) -> bytes:
    # the callee hanging up: the floor cannot route it, and upstream again would loop
    return request("BYE", "call-1", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-uas", cseq=1)


@pytest.mark.parametrize("spoil", [foreign_via_on_top, unknown_call_id, no_call_id, request_from_upstream])
def test_floor_drops_and_counts_what_the_upstream_sends_that_is_not_a_response_to_it(
    spoil: Callable[[bytes], bytes],
) -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            invite = await setup.forward(request("INVITE", "call-1", setup.client.via()))
            ringing = answer(invite, "180 Ringing")
            setup.upstream.send(spoil(ringing), setup.address)
            setup.upstream.send(answer(invite, "200 OK"), setup.address)
            assert (await setup.client.receive()).startswith(
                b"SIP/2.0 200 OK\r\n"
            )  # the spoilt one went nowhere
            assert setup.relay.counters()["dropped"] == 1
            assert setup.relay.counters()["to_client"] == 1

    run(scenario)


def test_floor_forgets_a_call_after_the_final_response_to_its_bye_only() -> None:
    async def scenario() -> None:
        async with relayed(Floor) as setup:
            invite = await setup.forward(request("INVITE", "call-1", setup.client.via("z9hG4bK-inv1")))
            other_invite = await setup.forward(request("INVITE", "call-2", setup.client.via("z9hG4bK-inv2")))
            # a final response to the INVITE forgets nothing: its retransmission still goes through
            for response in (answer(invite, "200 OK"), answer(invite, "200 OK")):
                setup.upstream.send(response, setup.address)
                assert await setup.client.receive() == without_lines(
                    response, f"Via: {floor_via(setup, invite)}"
                )
            bye = await setup.forward(request("BYE", "call-1", setup.client.via("z9hG4bK-bye1"), cseq=2))
            trying, ok, ok_again = answer(bye, "100 Trying"), answer(bye, "200 OK"), answer(bye, "200 OK")
            setup.upstream.send(trying, setup.address)  # provisional: not the end
            assert (await setup.client.receive()).startswith(b"SIP/2.0 100 Trying\r\n")
            setup.upstream.send(ok, setup.address)
            assert (await setup.client.receive()).startswith(b"SIP/2.0 200 OK\r\n")
            assert b"call-1" not in setup.relay.calls
            setup.upstream.send(ok_again, setup.address)  # the 200's retransmission: call-1 is forgotten
            setup.upstream.send(answer(other_invite, "180 Ringing"), setup.address)
            next_received = await setup.client.receive()
            assert next_received.startswith(b"SIP/2.0 180 Ringing\r\n")
            assert header_values(next_received, "Call-ID") == ["call-2"]
            assert setup.relay.counters() == {
                "to_upstream": 3,
                "to_client": 5,
                "dropped": 1,
                "calls_remembered": 1,
            }

    run(scenario)


def test_floor_forgets_every_call_when_its_map_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sip_floor, "MAX_CALLS", 3)

    async def scenario() -> None:
        async with relayed(Floor) as setup:
            sizes = []
            for number in range(1, 8):
                call_id = f"call-{number}"
                await setup.forward(request("INVITE", call_id, setup.client.via(f"z9hG4bK-{number}")))
                assert call_id.encode() in setup.relay.calls  # the newest call is always kept
                sizes.append(len(setup.relay.calls))
            assert sizes == [1, 2, 3, 1, 2, 3, 1]  # never more than MAX_CALLS

    run(scenario)
