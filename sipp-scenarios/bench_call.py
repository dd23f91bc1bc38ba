"""Micro-benchmark: whole calls through the running proxy's code, without sockets.

    .venv/bin/python sipp-scenarios/bench_call.py [POLICY] [--calls N] [--repeats R] [--profile]

A SipGuard is built from POLICY (default bench_plain.yaml: no rules) as ``sipguard run``
builds it and started on a loopback port, then its sends are captured instead of sent.
Each call is the message sequence bench_proxy.py's SIPp peers exchange, handed to
``SipGuard.deliver`` as the UDP transport would: the INVITE from the UAC at 127.0.0.2
(SIPp uac_mix.xml's headers, a new caller of the bench account each call), the PBX's 180
and 200 (built from the INVITE as forwarded, so they carry sipguard's Via and
Record-Route), the ACK and BYE along the Record-Route, the PBX's 200 to the BYE. Printed:
microseconds per call spent inside ``deliver`` (flood guard, parse, core, policies,
actions; no system calls), min and median over the repeats, and the fastest repeat split
by message (the INVITE's share includes the verdict and its forwarding); building the PBX's
responses is outside the timed part. Against bench_proxy.py's CPU per call this tells the SIP work
from what the same work costs live, where SIPp shares the two cores.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import itertools
import pstats
import re
import statistics
import sys
import time
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

from sipsim import response  # noqa: E402 - the PBX's answers, built from the request

from proxy.app import ProxySettings, SipGuard  # noqa: E402
from proxy.cli import build_store  # noqa: E402
from proxy.engine import PolicyEngine  # noqa: E402
from proxy.logs import configure_logging  # noqa: E402
from proxy.policyfile import load_policy  # noqa: E402
from proxy.sip import COMPILED  # noqa: E402
from proxy.sip.events import Address  # noqa: E402

UAC = Address("udp", "127.0.0.2", 5080)
PBX = Address("udp", "127.0.0.1", 5070)
CALLEE = "+12125551234"
FIRST_CALLER = 14155500000  # bench_policy.yaml's account owns 20,000 numbers from here
CALLERS = 20_000
SDP = (
    b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\n"
    b"t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)


def uac_request(
    method: str, n: int, proxy: Address, *, cseq: int, to_tag: str = "", routes: list[str]
) -> bytes:
    """A request of call ``n`` as uac_mix.xml writes it."""
    caller = f"+{FIRST_CALLER + n % CALLERS}"
    target = (
        f"{CALLEE}@{proxy.host}:{proxy.port}" if method == "INVITE" else f"{CALLEE}@{PBX.host}:{PBX.port}"
    )
    lines = [
        f"{method} sip:{target} SIP/2.0",
        f"Via: SIP/2.0/UDP {UAC.host}:{UAC.port};branch=z9hG4bK-{n}-{cseq}-{method}",
        f"From: <sip:{caller}@{UAC.host}:{UAC.port};user=phone>;tag={n}SIPpTag001",
        f"To: <sip:{CALLEE}@{proxy.host}:{proxy.port}>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {n}-bench@{UAC.host}",
        f"CSeq: {cseq} {method}",
        *(f"Route: {route}" for route in routes),
        f"Contact: sip:{caller}@{UAC.host}:{UAC.port}",
        "Max-Forwards: 70",
    ]
    body = SDP if method == "INVITE" else b""
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class CallDriver:
    """Plays calls into a SipGuard and times its ``deliver``."""

    def __init__(self, guard: SipGuard, proxy: Address) -> None:
        self.guard = guard
        self.proxy = proxy
        self.sent: list[tuple[bytes, Address]] = []
        guard.transports.send = lambda data, destination, local: self.sent.append((data, destination))
        self.spent: collections.defaultdict[str, float] = collections.defaultdict(float)  # s, by message

    def _deliver(self, message: str, data: bytes, source: Address) -> None:
        started = time.perf_counter()
        self.guard.deliver(data, source, self.proxy)
        self.spent[message] += time.perf_counter() - started

    def _taken(self, to: Address) -> bytes:
        sent = [data for data, destination in self.sent if destination == to]
        self.sent.clear()
        if len(sent) != 1:
            raise SystemExit(f"bench_call: expected one message to {to}, sipguard sent {len(sent)}")
        return sent[0]

    def call(self, n: int) -> None:
        self._deliver("INVITE", uac_request("INVITE", n, self.proxy, cseq=1, routes=[]), UAC)
        invite = self._taken(PBX)  # (and the 100 Trying to the UAC, dropped)
        to_tag = f"pbx{n}"
        self._deliver("180", response(invite, 180, to_tag=to_tag), PBX)
        answer = response(invite, 200, to_tag=to_tag, contact=f"sip:{CALLEE}@{PBX.host}:{PBX.port}")
        self._deliver("200 INVITE", answer, PBX)
        ok = self.sent[-1][0]
        self.sent.clear()
        routes = [value.decode() for value in re.findall(rb"Record-Route: ([^\r]*)", ok)]
        self._deliver("ACK", uac_request("ACK", n, self.proxy, cseq=1, to_tag=to_tag, routes=routes), UAC)
        self._taken(PBX)
        self._deliver("BYE", uac_request("BYE", n, self.proxy, cseq=2, to_tag=to_tag, routes=routes), UAC)
        bye = self._taken(PBX)
        self._deliver("200 BYE", response(bye, 200, to_tag=None), PBX)
        self._taken(UAC)


async def measure(policy_path: Path, calls: int, repeats: int, profile: bool) -> list[dict[str, float]]:
    """µs per call inside ``deliver``, by message, for each repeat."""
    configure_logging("warning", "json")
    policy = load_policy(str(policy_path))
    settings = ProxySettings.from_policy(policy, listen=[Address("udp", "127.0.0.1", 0)], upstream=PBX)
    guard = SipGuard(settings, PolicyEngine(policy, build_store(policy), wall_offset=0.0))
    proxy = (await guard.start())[0]
    driver = CallDriver(guard, proxy)
    numbers = itertools.count()
    for _ in range(200):  # warm-up
        driver.call(next(numbers))
    profiler = cProfile.Profile() if profile else None
    per_call: list[dict[str, float]] = []
    for _ in range(repeats):
        driver.spent.clear()
        if profiler:
            profiler.enable()
        for _ in range(calls):
            driver.call(next(numbers))
        if profiler:
            profiler.disable()
        per_call.append({message: spent / calls * 1e6 for message, spent in driver.spent.items()})
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    await guard.transports.close()
    return per_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", nargs="?", type=Path, default=HERE / "bench_plain.yaml")
    parser.add_argument("--calls", type=int, default=2000, help="calls per repeat (default 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats (default 5)")
    parser.add_argument("--profile", action="store_true", help="cProfile the timed calls (inflates them)")
    args = parser.parse_args(argv)
    if args.calls * (args.repeats + 1) > 3 * CALLERS:
        parser.error(f"at most {3 * CALLERS} calls in all: a caller would exceed bench_policy.yaml's burst")
    repeats = uvloop.run(measure(args.policy, args.calls, args.repeats, args.profile))
    totals = [sum(repeat.values()) for repeat in repeats]
    core = "compiled" if COMPILED else "interpreted"
    print(f"{args.policy.name}: {args.calls} calls x {args.repeats}, proxy/sip {core}")
    print(f"us per call in SipGuard.deliver: min {min(totals):.1f}, median {statistics.median(totals):.1f}")
    fastest = repeats[totals.index(min(totals))]
    print("  by message (fastest repeat): " + ", ".join(f"{name} {us:.1f}" for name, us in fastest.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
