"""Micro-benchmark: what the three policies cost per INVITE, on their own.

Run from the repository root (about 10 s):

    .venv/bin/python sipp-scenarios/bench_policies.py [--json] [--iterations N] [--repeats R]

The policy is policies/example.yaml: caller_id, concurrency and call_rate enforcing,
with the in-memory store and production logging (JSON, info; accepted calls log at
debug, so they write nothing). Each INVITE comes from account acme's source with a From
and a P-Asserted-Identity it owns, its caller rotating over acme's 100-number range and
the clock advancing 2 s per call, so every call is accepted (checked) and every rule runs
its full path: identities normalised, slots taken, buckets hit, then the slots released.

Rows, in microseconds per INVITE (min and median of the repeats):
- ``parse + core accessors``: parse_message and the headers the proxy core reads anyway
  (From, To, Max-Forwards, Via) — the baseline the policies add to;
- ``parse + policies + release``: the same, then PolicyEngine.decide_now and call_ended;
- ``policies``: the difference, the per-INVITE cost of the three policies;
- ``policies, cold normalisation``: the same with the E.164 cache emptied before each
  INVITE: a caller never seen before (phonenumbers costs ~30 us a number).
``min`` is the closest estimate of the code's own cost on this shared, noisy machine.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from policies.numbering import _normalise  # noqa: E402
from proxy.engine import PolicyEngine  # noqa: E402
from proxy.logs import configure_logging  # noqa: E402
from proxy.policyfile import load_policy  # noqa: E402
from proxy.sip import Request, parse_message  # noqa: E402
from proxy.sip.events import Accept, Address, CallAttempt, CallEnded, CallInfo, EndReason  # noqa: E402

SOURCE = Address("udp", "127.0.0.2", 5060)


def invite(caller: str, serial: int) -> bytes:
    return (
        f"INVITE sip:+14155551212@127.0.0.1:5060;user=phone SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.2:5060;branch=z9hG4bK-{serial}\r\n"
        f"Max-Forwards: 70\r\n"
        f'From: "Acme Sales" <sip:{caller}@127.0.0.2;user=phone>;tag={serial}\r\n'
        f"To: <sip:+14155551212@127.0.0.1;user=phone>\r\n"
        f"Call-ID: bench-{serial}@127.0.0.2\r\nCSeq: 1 INVITE\r\n"
        f"Contact: <sip:{caller}@127.0.0.2:5060>\r\n"
        f"P-Asserted-Identity: <sip:{caller}@127.0.0.2;user=phone>\r\n"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def core_reads(data: bytes) -> Request:
    request = parse_message(data)
    assert isinstance(request, Request)
    request.from_, request.to, request.max_forwards, request.vias  # noqa: B018 - the core's reads
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    configure_logging("info", "json")
    engine = PolicyEngine(load_policy(REPO_ROOT / "policies" / "example.yaml"))
    callers = [f"+141555501{n:02d}" for n in range(100)]
    messages = [invite(callers[n % 100], n) for n in range(args.iterations)]
    clock = itertools.count()

    def baseline(cold: bool = False) -> None:
        for data in messages:
            if cold:
                _normalise.cache_clear()
            core_reads(data)

    def with_policies(cold: bool = False) -> None:
        for n, data in enumerate(messages):
            if cold:
                _normalise.cache_clear()
            now = next(clock) * 2.0
            attempt_id = f"a{now}"
            verdict = engine.decide_now(
                CallAttempt(attempt_id=attempt_id, request=core_reads(data), source=SOURCE, now=now)
            )
            if not isinstance(verdict, Accept):
                raise SystemExit(f"call {n} was not accepted: {verdict}; the benchmark would time a refusal")
            info = CallInfo(call_id=f"bench-{n}", from_tag=str(n), attempt_id=attempt_id, source=SOURCE,
                            from_customer=True, started_at=now)  # fmt: skip
            engine.call_ended(CallEnded(call=info, reason=EndReason.BYE, now=now + 1.0))

    rows: dict[str, list[float]] = {}
    cases = {
        "parse + core accessors": lambda: baseline(),
        "parse + policies + release": lambda: with_policies(),
        "cold: parse + core accessors": lambda: baseline(cold=True),
        "cold: parse + policies + release": lambda: with_policies(cold=True),
    }
    for case in cases.values():  # warm-up
        case()
    gc.disable()
    for _ in range(args.repeats):
        for name, case in cases.items():
            started = time.perf_counter_ns()
            case()
            rows.setdefault(name, []).append((time.perf_counter_ns() - started) / 1000 / args.iterations)
    gc.enable()
    if engine.held or engine.counters["accepted"] == 0:
        raise SystemExit("slots left held or nothing accepted: the benchmark is broken")
    report = {
        "python": platform.python_version(),
        "iterations": args.iterations,
        "repeats": args.repeats,
        "us_per_invite": {name: {"min": min(v), "median": statistics.median(v)} for name, v in rows.items()},
    }
    per = report["us_per_invite"]
    for label, prefix in (("policies", ""), ("policies, cold normalisation", "cold: ")):
        with_p, base = per[f"{prefix}parse + policies + release"], per[f"{prefix}parse + core accessors"]
        per[label] = {"min": with_p["min"] - base["min"], "median": with_p["median"] - base["median"]}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Python {report['python']}; policies/example.yaml (3 rules enforcing); {args.iterations} INVITEs "
          f"x {args.repeats} repeats")  # fmt: skip
    print(f"{'us per INVITE':<36} {'min':>8} {'median':>8}")
    for name, figures in per.items():
        print(f"{name:<36} {figures['min']:8.1f} {figures['median']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
