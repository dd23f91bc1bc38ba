"""Micro-benchmark: what the flood guard (proxy/flood.py) costs per message.

Run from the repository root (about 5 s):

    .venv/bin/python sipp-scenarios/bench_flood.py [--json] [--iterations N] [--repeats R]

``FloodGuard.admit`` runs on every datagram and every framed TCP message, before the
parser; its target is about 1 us. Rows, in microseconds per call (min and median over the
repeats, each repeat ``--iterations`` calls, round-robin over the rows; GC off):

- ``admitted, INVITE with User-Agent``: a known source under its rate sending
  bench_parser.py's 927-byte INVITE (a Yealink User-Agent, not a scanner): the usual path,
  header search and signature check included;
- ``admitted, 200 OK without User-Agent``: bench_parser.py's 200 OK from a known source;
- ``exempt (upstream PBX)``: a source in an exempt network: nothing counted or searched;
- ``banned, dropped``: a banned source's message, counted and dropped;
- ``new source each message``: a spoofed-source flood, every message from an address
  never seen, through a table bounded at 100,000 (evictions included);
- ``loop only``: the same loop and pretend clock calling a function that does nothing;
  the last column, each row less this one, is what ``admit`` itself costs.

Before timing, each path is checked to do what it claims (admitted, dropped, no ban, a ban) so a broken path
cannot be timed; ``min`` is the figure to compare with the target on this noisy machine.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench_parser import INVITE, OK_200  # noqa: E402 - the same messages as the parser benchmark

from proxy.flood import FloodGuard, FloodSettings  # noqa: E402

TARGET_US = 1.0
KNOWN = "198.51.100.7"
PBX = "203.0.113.5"
SCANNER = "192.0.2.66"
SCANNER_MESSAGE = INVITE.replace(b"Yealink SIP-T46S 66.86.0.15", b"friendly-scanner")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # rates far above the loop's own speed: the admitted rows must never ban
    settings = FloodSettings(
        messages_per_second=1e9, burst=10**9, exempt=(ipaddress.ip_network(f"{PBX}/32"),)
    )
    flood = FloodGuard(settings)
    clock = [0.0]

    def now() -> float:  # a message every microsecond of pretend time
        clock[0] += 1e-6
        return clock[0]

    check(flood.admit(KNOWN, INVITE, now()), "a known source's INVITE is admitted")
    check(flood.admit(KNOWN, OK_200, now()), "a known source's 200 OK is admitted")
    check(flood.admit(PBX, SCANNER_MESSAGE, now()), "the exempt PBX is admitted, whatever it sends")
    check(not flood.admit(SCANNER, SCANNER_MESSAGE, now()), "a scanner is banned at once")
    check(not flood.admit(SCANNER, INVITE, now()), "a banned source is dropped")
    check([ban.host for ban in flood.bans] == [SCANNER], "exactly one ban, the scanner's")
    flood.take_events()
    spoofed = (f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(1 << 24))

    def nothing(host: str, data: bytes, at: float) -> bool:
        return True

    rows: dict[str, Callable[[], Callable[[], object]]] = {
        "admitted, INVITE with User-Agent": lambda: lambda: flood.admit(KNOWN, INVITE, now()),
        "admitted, 200 OK without User-Agent": lambda: lambda: flood.admit(KNOWN, OK_200, now()),
        "exempt (upstream PBX)": lambda: lambda: flood.admit(PBX, INVITE, now()),
        "banned, dropped": lambda: lambda: flood.admit(SCANNER, INVITE, now()),
        "new source each message": lambda: lambda: flood.admit(next(spoofed), INVITE, now()),
        "loop only": lambda: lambda: nothing(KNOWN, INVITE, now()),
    }
    timings: dict[str, list[float]] = {name: [] for name in rows}
    for make in rows.values():  # warm-up
        run(make(), 1000)
    gc.disable()
    try:
        for _ in range(args.repeats):
            for name, make in rows.items():
                timings[name].append(run(make(), args.iterations))
    finally:
        gc.enable()
    check(
        [ban.host for ban in flood.bans] == [SCANNER] and not flood.take_events(),
        "no ban or unban while timing: every row timed the path it names",
    )
    check(flood.tracked <= settings.max_sources, "the source table stayed bounded")
    per = {name: {"min": min(times), "median": statistics.median(times)} for name, times in timings.items()}
    loop = per["loop only"]
    for figures in per.values():  # what admit itself costs: the row less the loop and clock
        figures["admit_min"] = figures["min"] - loop["min"]
    report = {
        "python": platform.python_version(),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "target_us": TARGET_US,
        "us_per_message": per,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Python {report['python']}; FloodGuard.admit, {args.iterations} calls x {args.repeats} repeats; "
          f"target about {TARGET_US:g} us")  # fmt: skip
    print(f"{'us per message':<40} {'min':>7} {'median':>7} {'min - loop':>11}")
    for name, figures in per.items():
        print(f"{name:<40} {figures['min']:7.2f} {figures['median']:7.2f} {figures['admit_min']:11.2f}")
    return 0


def run(call: Callable[[], object], iterations: int) -> float:
    """Microseconds per call of ``iterations`` calls."""
    started = time.perf_counter_ns()
    for _ in range(iterations):
        call()
    return (time.perf_counter_ns() - started) / 1000 / iterations


def check(condition: bool, claim: str) -> None:
    if not condition:
        raise SystemExit(f"broken: not true that {claim}; the timings would be meaningless")


if __name__ == "__main__":
    sys.exit(main())
