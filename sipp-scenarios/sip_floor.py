"""A minimal SIP-aware relay that works on bytes only: the floor for a proxy that does SIP work.

    .venv/bin/python sipp-scenarios/sip_floor.py --listen 127.0.0.1:5060 --upstream 127.0.0.1:5070

What bench_proxy.py --with-floor runs as ``sip-floor``, beside udp_relay.py and sipguard. It
is a yardstick, not a product: the floor for a proxy that does SIP work on bytes. It does
what any proxy in the path of the benchmark's calls must do to them (its Via, Max-Forwards,
Record-Route, the route back to the caller), with ``bytes.find`` and slicing, and nothing
else. So its CPU per call over udp_relay.py's is what that work costs at least in Python on
uvloop, and sipguard's above it is what sipguard's per-message object model, transactions,
timers and policies add.

One socket, as sipguard has. Per message:

- a request from a client: forget every remembered call when the map is full (see
  ``MAX_CALLS``), remember its Call-ID -> source address; decrement Max-Forwards (drop it
  at 0 or when the header is missing); insert our Via on top, ``SIP/2.0/UDP LISTEN;branch=``
  ``z9hG4bK-sf`` + a blake2b digest of the top Via line (as sipguard derives its branch
  with blake2b: a CANCEL or an ACK to a non-2xx, carrying its INVITE's Via, gets the
  INVITE's branch); add ``Record-Route: <sip:LISTEN;lr>`` to an INVITE; remove the first
  ``Route: <sip:LISTEN;lr>`` (ours, which the UAC's in-dialog ACK and BYE carry once it has
  learnt the route set from a 200 that echoes the Record-Route, as uas_pbx.xml's does; the
  built-in uas that bench_proxy.py runs echoes none, so there the search finds nothing but
  is paid all the same); send it to the upstream;
- a response: check that its top Via is ours and pop it (the whole line, or only our
  value when the UAS folded the Vias into one line), look up the client by Call-ID, and
  send it there; a final response to a BYE forgets the Call-ID.

What it leaves out compared with sipguard: no validation (a malformed message is dropped
or forwarded as it is, never answered 400), no transactions and so no retransmission
handling (a retransmission is forwarded again), no timers, no dialog state beyond
Call-ID -> client address, no policies and no flood guard, no logging per packet. It
drops, counting them in ``relay.stopped``'s ``dropped``, a message without a Call-ID, a
request without Max-Forwards or at 0 hops, a request from the upstream (the benchmark's
callee never sends one, and sending it upstream again would loop), and a response whose
top Via is not its own or whose Call-ID it does not know.

It is only correct for the benchmark's traffic shape: SIPp's messages, with canonical
header names as SIPp writes them (``Via:``, ``Call-ID:``, ``Max-Forwards:``, ``CSeq:``,
``Route:``; no compact forms, no other case), UDP, one upstream, calls the client places
and ends.

Prints one JSON line ``{"event": "relay.started", ...}`` on stderr once the socket is
bound (the benchmark's readiness signal) and ``relay.stopped`` with its counters on
SIGTERM/SIGINT, then exits 0: udp_relay.py's command line and lifecycle, with this relay.
"""

from __future__ import annotations

import asyncio
import sys
from hashlib import blake2b
from typing import Any

import udp_relay  # beside this file: the command line and lifecycle both relays share

# Bounds the Call-ID map, which keeps every call that never gets a final response to its
# BYE (failed calls, a stopped UAC). Clearing it all is O(1) amortised, where evicting the
# oldest entry in dict order slows down as deleted entries pile up at its front. The
# benchmark has at most 2 s of calls up at once (SIPp -l: 40,000 at its highest rate), so a
# clear takes at least 60,000 calls that never ended; a live call it forgets has its
# responses dropped, and SIPp counts it failed, so it never goes unseen.
MAX_CALLS = 100_000

BRANCH_PREFIX = b"z9hG4bK-sf"
BRANCH_DIGEST_SIZE = 10  # bytes, as sipguard's: 20 hex characters
CALL_ID = b"\r\nCall-ID:"
VIA = b"\r\nVia:"
CSEQ = b"\r\nCSeq:"
MAX_FORWARDS = b"\r\nMax-Forwards:"
CRLF = b"\r\n"


class Floor(udp_relay.Relay):
    """udp_relay.py's Relay (its socket, counters, stop line), doing SIP work on each datagram."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        super().__init__(listen, upstream)
        me = f"{listen[0]}:{listen[1]}".encode()
        # what we write, and so what comes back to us, built once from the --listen address
        self.via_value = b"SIP/2.0/UDP " + me + b";branch=" + BRANCH_PREFIX
        self.via_head = VIA + b" " + self.via_value
        self.via_length = len(self.via_value) + 2 * BRANCH_DIGEST_SIZE
        self.record_route = b"\r\nRecord-Route: <sip:" + me + b";lr>"
        self.our_route = b"\r\nRoute: <sip:" + me + b";lr>"
        self.calls: dict[bytes, Any] = {}  # Call-ID -> the client's address

    def datagram_received(self, data: bytes, addr: Any) -> None:
        transport = self.transport
        call_id_at = data.find(CALL_ID)
        if transport is None or call_id_at < 0:
            self.dropped += 1
            return
        call_id = data[call_id_at + len(CALL_ID) : data.find(CRLF, call_id_at + 2)].strip()
        if data.startswith(b"SIP/2.0 "):
            self._response(transport, data, call_id)
        elif addr == self.upstream:
            self.dropped += 1
        else:
            self._request(transport, data, call_id, addr)

    def _request(self, transport: asyncio.DatagramTransport, data: bytes, call_id: bytes, addr: Any) -> None:
        max_forwards_at = data.find(MAX_FORWARDS)
        if max_forwards_at < 0:
            self.dropped += 1
            return
        max_forwards_end = data.find(CRLF, max_forwards_at + 2)
        hops = int(data[max_forwards_at + len(MAX_FORWARDS) : max_forwards_end]) - 1
        if hops < 0:
            self.dropped += 1
            return
        if len(self.calls) >= MAX_CALLS:
            self.calls.clear()
        self.calls[call_id] = addr
        line_end = data.find(CRLF)
        via_at = data.find(VIA)
        top_via = data[via_at : data.find(CRLF, via_at + 2)]
        branch = blake2b(top_via, digest_size=BRANCH_DIGEST_SIZE).hexdigest().encode()
        record_route = self.record_route if data.startswith(b"INVITE ") else b""
        headers = (
            data[line_end:max_forwards_at]
            + b"\r\nMax-Forwards: "
            + str(hops).encode()
            + data[max_forwards_end:]
        ).replace(self.our_route, b"", 1)
        transport.sendto(data[:line_end] + self.via_head + branch + record_route + headers, self.upstream)
        self.to_upstream += 1

    def _response(self, transport: asyncio.DatagramTransport, data: bytes, call_id: bytes) -> None:
        via_at = data.find(VIA)
        via_end = data.find(CRLF, via_at + 2)
        ours_at = data.find(self.via_value, via_at, via_end)
        client = self.calls.get(call_id)
        if via_at < 0 or ours_at < 0 or client is None:
            self.dropped += 1
            return
        after_ours = ours_at + self.via_length
        if data.startswith(b",", after_ours):  # SIPp's [last_Via:] folds the Vias into one line
            popped = data[:ours_at] + data[after_ours + 1 :].lstrip(b" ")
        else:
            popped = data[:via_at] + data[via_end:]
        cseq_at = data.find(CSEQ)
        if data[8:9] != b"1" and data.find(b" BYE", cseq_at, data.find(CRLF, cseq_at + 2)) > 0:
            del self.calls[call_id]
        transport.sendto(popped, client)
        self.to_client += 1

    def counters(self) -> dict[str, int]:
        return {**super().counters(), "calls_remembered": len(self.calls)}


def main(argv: list[str] | None = None) -> int:
    return udp_relay.main(argv, factory=Floor, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
