"""Micro-benchmark: what the policies cost per INVITE, on their own.

Run from the repository root (about 30 s; --only example about 8 s, --only patterns 22 s):

    .venv/bin/python sipp-scenarios/bench_policies.py [--json] [--iterations N] [--repeats R]
                                                      [--only example|patterns]

Two sets of rows, in microseconds per INVITE or call (min and median of the repeats), the rules
with the in-memory store and production logging (JSON, info; accepted calls log at
debug, so they write nothing).

The example: policies/example.yaml, every rule it enables (the three mission rules and
the pattern rules; its dialer monitors). Each INVITE comes from account acme's source with a From and a
P-Asserted-Identity it owns, its caller rotating over acme's 100-number range and the
clock advancing 2 s per call, so every call is accepted (checked) and every rule runs
its full path: identities normalised, slots taken, buckets hit, then the slots released.

- ``parse + core accessors``: parse_message and the headers the proxy core reads anyway
  (From, To, Max-Forwards, Via) — the baseline the policies add to;
- ``parse + policies + release``: the same, then PolicyEngine.decide_now and call_ended;
- ``policies``: the difference, the per-INVITE cost of the example's rules;
- ``policies, cold normalisation``: the same with the E.164 cache emptied before each
  INVITE: a caller never seen before (phonenumbers costs ~30 us a number).

The pattern policies (dialer, usage and whatever else bench_patterns.yaml lists) against
the mission policies, like for like: bench_policy.yaml (caller_id, concurrency,
call_rate) and bench_patterns.yaml (the same account and mission rules, plus the pattern
rules), each in engines of its own, on the same INVITEs: from the bench account's source,
callers rotating over the first 50 numbers of its range, one callee. Each engine's clock
advances 2 s per call (one call from a number every 100 s; its wall clock starts at a
fixed date), and every call has an outcome: answered 1 s after its INVITE
(engine.call_answered), ended by the caller's BYE 60 s later (engine.call_ended), which
is when the dialer's history records the call and usage adds the talk time. A number
thus holds 36 calls in the dialer's 3600 s window, so every dialer measure reaches its
min_calls and is computed on every call; none trips (checked: every call accepted with
no warning, and the measures' sample counts read back).

- ``bench: parse + core accessors``: the baseline, on these INVITEs;
- ``mission: parse + policies + outcome``, ``mission + patterns: ...``: the same, then
  decide_now, call_answered and call_ended;
- ``mission policies``, ``mission + pattern policies``: each less the baseline;
  ``pattern policies``: their difference, what the pattern rules add per call;
- ``cold:`` rows: as in the load benchmark, where every caller is new to the process:
  the E.164 cache emptied and the caller's history forgotten (CallHistory.release, in
  both engines alike) before each INVITE, so the dialer sees a number with no history
  (its quota and rate keys stay in the store).
The ratio printed is (mission + pattern policies) / mission policies.

``min`` is the closest estimate of the code's own cost on this shared, noisy machine.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO_ROOT))

from policies.numbering import _normalise  # noqa: E402
from proxy.engine import PolicyEngine  # noqa: E402
from proxy.logs import configure_logging  # noqa: E402
from proxy.policyfile import load_policy  # noqa: E402
from proxy.sip import Request, parse_message  # noqa: E402
from proxy.sip.events import (  # noqa: E402
    Accept,
    Address,
    CallAnswered,
    CallAttempt,
    CallEnded,
    CallInfo,
    EndReason,
)

SOURCE = Address("udp", "127.0.0.2", 5060)
EXAMPLE_POLICY = REPO_ROOT / "policies" / "example.yaml"
MISSION_POLICY = HERE / "bench_policy.yaml"
PATTERN_POLICY = HERE / "bench_patterns.yaml"
BENCH_CALLERS = [f"+1415550{n:04d}" for n in range(50)]  # the first 50 numbers of the bench account
STEP_S = 2.0  # the clock's advance per call
ANSWER_S = 1.0  # INVITE -> answer
TALK_S = 60.0  # answer -> the caller's BYE: not short (< 30 s), not abandoned (< 2 s)
WALL_T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z: the engines' wall clock at now = 0


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


def baseline(messages: list[bytes], cold: bool = False) -> None:
    for data in messages:
        if cold:
            _normalise.cache_clear()
        core_reads(data)


def accepted(engine: PolicyEngine, data: bytes, n: int, now: float) -> CallInfo:
    """INVITE ``n`` judged (it must be accepted: a refusal is not what is timed); its call."""
    attempt_id = f"a{now}"
    verdict = engine.decide_now(
        CallAttempt(attempt_id=attempt_id, request=core_reads(data), source=SOURCE, now=now)
    )
    if not isinstance(verdict, Accept):
        raise SystemExit(f"call {n} was not accepted: {verdict}; the benchmark would time a refusal")
    return CallInfo(call_id=f"bench-{n}", from_tag=str(n), attempt_id=attempt_id, source=SOURCE,
                    from_customer=True, started_at=now)  # fmt: skip


def release_only(
    engine: PolicyEngine, messages: list[bytes], clock: itertools.count[int], cold: bool
) -> None:
    """The rules of example.yaml: judged, then released at once (no answer)."""
    for n, data in enumerate(messages):
        if cold:
            _normalise.cache_clear()
        now = next(clock) * STEP_S
        info = accepted(engine, data, n, now)
        engine.call_ended(CallEnded(call=info, reason=EndReason.BYE, now=now + 1.0))


def with_outcome(
    engine: PolicyEngine, messages: list[bytes], callers: list[str], clock: itertools.count[int], cold: bool
) -> None:
    """Judged, answered ANSWER_S later, ended by the caller's BYE TALK_S after that."""
    history = engine.history
    for n, data in enumerate(messages):
        if cold:  # a caller new to the process: not normalised yet, no history
            _normalise.cache_clear()
            history.release(f"num:{callers[n % len(callers)]}")
        now = next(clock) * STEP_S
        info = accepted(engine, data, n, now)
        answered = now + ANSWER_S
        engine.call_answered(CallAnswered(call=info, now=answered))
        engine.call_ended(
            CallEnded(
                call=info, reason=EndReason.BYE, now=answered + TALK_S, answered_at=answered, by_caller=True
            )
        )


def check_clean(name: str, engine: PolicyEngine) -> None:
    """Every call accepted with no rule failing, warning or boxing: the benchmark times the
    allowed path, or it is broken."""
    counters = engine.counters
    accepted = counters.verdicts["accepted"]
    others = {verdict: n for verdict, n in counters.verdicts.items() if verdict != "accepted"}
    noisy = {"verdicts": others, "findings": dict(counters.findings), "penalised": dict(counters.penalised)}
    if engine.held or accepted == 0 or any(noisy.values()) or engine.live:
        raise SystemExit(
            f"{name}: accepted {accepted}, other counters {noisy}, slots held "
            f"{len(engine.held)}, calls live {len(engine.live)}: the benchmark is broken"
        )


def measures(engine: PolicyEngine, now: float) -> dict[str, int]:
    """How many calls the dialer's measures of the first bench number had to go on, at the end."""
    subject = engine.history.subject(f"num:{BENCH_CALLERS[0]}", now)
    if subject is None:
        return {}
    return {"ended": subject.ended, "answered": subject.answered, "gaps": len(subject.gaps)}


def timed(cases: dict[str, Callable[[], None]], repeats: int, iterations: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    for case in cases.values():  # warm-up
        case()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, case in cases.items():
                started = time.perf_counter_ns()
                case()
                rows.setdefault(name, []).append((time.perf_counter_ns() - started) / 1000 / iterations)
    finally:
        gc.enable()
    return rows


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def difference(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {"min": a["min"] - b["min"], "median": a["median"] - b["median"]}


def rule_names(path: Path) -> list[str]:
    return [rule.name for rule, _ in load_policy(path).rules]


def example_rows(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """The rules of example.yaml, callers warm and cold, against the parse alone."""
    engine = PolicyEngine(load_policy(EXAMPLE_POLICY))
    callers = [f"+141555501{n:02d}" for n in range(100)]
    messages = [invite(callers[n % 100], n) for n in range(args.iterations)]
    clock = itertools.count()
    rows = timed(
        {
            "parse + core accessors": lambda: baseline(messages),
            "parse + policies + release": lambda: release_only(engine, messages, clock, cold=False),
            "cold: parse + core accessors": lambda: baseline(messages, cold=True),
            "cold: parse + policies + release": lambda: release_only(engine, messages, clock, cold=True),
        },
        args.repeats,
        args.iterations,
    )
    check_clean(EXAMPLE_POLICY.name, engine)
    per = {name: summary(values) for name, values in rows.items()}
    for label, prefix in (("policies", ""), ("policies, cold normalisation", "cold: ")):
        per[label] = difference(
            per[f"{prefix}parse + policies + release"], per[f"{prefix}parse + core accessors"]
        )
    return per


def pattern_rows(args: argparse.Namespace) -> dict[str, Any]:
    """bench_policy.yaml against bench_patterns.yaml on the same calls, with their outcomes."""
    mission, patterns = load_policy(MISSION_POLICY), load_policy(PATTERN_POLICY)
    bench_messages = [invite(BENCH_CALLERS[n % len(BENCH_CALLERS)], n) for n in range(args.iterations)]
    engines = {
        (name, cold): (PolicyEngine(policy, wall_offset=WALL_T0), itertools.count())
        for name, policy in (("mission", mission), ("mission + patterns", patterns))
        for cold in (False, True)
    }
    cases: dict[str, Callable[[], None]] = {}
    for cold in (False, True):
        prefix = "cold: " if cold else ""
        cases[f"{prefix}bench: parse + core accessors"] = lambda cold=cold: baseline(bench_messages, cold)
        for name in ("mission", "mission + patterns"):
            bench_engine, bench_clock = engines[name, cold]
            cases[f"{prefix}{name}: parse + policies + outcome"] = (
                lambda e=bench_engine, c=bench_clock, cold=cold: with_outcome(
                    e, bench_messages, BENCH_CALLERS, c, cold
                )
            )
    timings = timed(cases, args.repeats, args.iterations)
    for (name, cold), (bench_engine, _) in engines.items():
        check_clean(f"{name}{' (cold)' if cold else ''}", bench_engine)
    warm_patterns, warm_clock = engines["mission + patterns", False]
    seen = measures(warm_patterns, next(warm_clock) * STEP_S)
    dialer = next((config for rule, config in patterns.rules if rule.name == "dialer"), None)
    if dialer is not None:  # every measure had its samples: the rows time the dialer's full path
        signatures = (dialer.short_calls, dialer.answer_seizure, dialer.abandonment, dialer.pacing)
        needed = max((s.min_calls for s in signatures if s is not None), default=0)
        if min(seen.get("ended", 0), seen.get("answered", 0), seen.get("gaps", 0) + 1) < needed:
            print(
                f"bench_policies: dialer samples of a number {seen} below min_calls {needed}: the ratio "
                "signatures were skipped on some calls: raise --iterations or --repeats",
                file=sys.stderr,
            )
    pat = {name: summary(values) for name, values in timings.items()}
    ratios: dict[str, dict[str, float]] = {}
    for prefix in ("", "cold: "):
        base = pat[f"{prefix}bench: parse + core accessors"]
        mission_cost = difference(pat[f"{prefix}mission: parse + policies + outcome"], base)
        both_cost = difference(pat[f"{prefix}mission + patterns: parse + policies + outcome"], base)
        pat[f"{prefix}mission policies"] = mission_cost
        pat[f"{prefix}mission + pattern policies"] = both_cost
        pat[f"{prefix}pattern policies"] = difference(both_cost, mission_cost)
        ratios[f"{prefix}mission + patterns / mission"] = {
            stat: both_cost[stat] / mission_cost[stat] if mission_cost[stat] > 0 else math.nan
            for stat in ("min", "median")
        }

    return {
        "mission_file": str(MISSION_POLICY.relative_to(REPO_ROOT)),
        "patterns_file": str(PATTERN_POLICY.relative_to(REPO_ROOT)),
        "mission_rules": rule_names(MISSION_POLICY),
        "rules": rule_names(PATTERN_POLICY),
        "callers": len(BENCH_CALLERS),
        "dialer_samples": seen,
        "us_per_invite": pat,
        "ratio": ratios,
    }


def print_patterns(section: dict[str, Any]) -> None:
    added = [rule for rule in section["rules"] if rule not in section["mission_rules"]]
    print(
        f"\nmission: {section['mission_file']} ({', '.join(section['mission_rules'])}); mission + patterns: "
        f"{section['patterns_file']} (+ {', '.join(added)});\n{section['callers']} callers in turn, "
        f"answered after {ANSWER_S:g} s, BYE by the caller {TALK_S:g} s later; dialer samples of a number "
        f"at the end: {section['dialer_samples']}"
    )
    print(f"{'us per call (INVITE, answer, end)':<52} {'min':>8} {'median':>8}")
    for name, figures in section["us_per_invite"].items():
        print(f"{name:<52} {figures['min']:8.1f} {figures['median']:8.1f}")
    for name, figures in section["ratio"].items():
        print(f"{name:<52} {figures['min']:7.2f}x {figures['median']:7.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--only", choices=("example", "patterns"),
        help="one set of rows: the rules of example.yaml, or mission vs mission + patterns",
    )  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging("info", "json")
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "iterations": args.iterations,
        "repeats": args.repeats,
    }
    if args.only != "patterns":
        report["us_per_invite"] = example_rows(args)
    if args.only != "example":
        report["patterns"] = pattern_rows(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"Python {report['python']}; {args.iterations} INVITEs x {args.repeats} repeats")
    if "us_per_invite" in report:
        rules = ", ".join(rule_names(EXAMPLE_POLICY))
        print(f"\npolicies/example.yaml ({rules}), judged then released")
        print(f"{'us per INVITE':<52} {'min':>8} {'median':>8}")
        for name, figures in report["us_per_invite"].items():
            print(f"{name:<52} {figures['min']:8.1f} {figures['median']:8.1f}")
    if "patterns" in report:
        print_patterns(report["patterns"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
