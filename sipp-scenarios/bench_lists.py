"""Benchmark of the list rules: do-not-call numbers and destination prefixes.

Run from the repository root (about 30 s; writes ~130 MB to a temporary directory and
removes it at the end):

    .venv/bin/python sipp-scenarios/bench_lists.py [--numbers 10000000] [--prefixes 100000] [--json]

- Do-not-call: a file of ``--numbers`` random US numbers (``+1NPANXXXXXX``, one a line,
  in random order: the sort's worst case) is loaded in a fresh child process, which
  reports the load time, the array's bytes per number, the process's resident memory
  growth (VmRSS after minus before) and its peak growth (VmHWM minus the RSS before), then
  a second load of the same file sorted (a registry extract usually is). Lookups: 200,000
  ``number in list`` calls, half listed, half not, and the do_not_call rule's check.
- Destinations: ``--prefixes`` distinct random prefixes of 3-8 digits (first digit 2-9) in a
  file, compiled by the destinations rule's config (read, validated, tabled); lookups are
  longest_match and the rule's check on numbers under a listed prefix (hit) and under
  none (miss: +1 numbers).
- Calling hours: the calling_hours rule's check for a New York number seen for the first
  time (phonenumbers parses it: its type decides its zones), the same number again, and
  a Tokyo number (no parse: its prefix decides).
Timings are the min over 5 repeats (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from policies.base import Account, CallContext  # noqa: E402
from policies.destinations import DestinationsConfig, DestinationsPolicy  # noqa: E402
from policies.lists import NumberFile  # noqa: E402
from policies.numbering import NumberSet  # noqa: E402
from policies.telemarketing import (  # noqa: E402
    CallingHoursConfig,
    CallingHoursPolicy,
    DoNotCallConfig,
    DoNotCallPolicy,
    callee_zones,
)
from proxy.sip import Request, parse_message  # noqa: E402

REPEATS = 5
TELEMARKETER = Account(name="dialer", numbers=NumberSet([], "US"), region="US", telemarketing=True)
REQUEST = parse_message(
    b"INVITE sip:+12125551234@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.2;branch=z9hG4bK-1\r\n"
    b"From: <sip:+14155550100@127.0.0.2>;tag=1\r\nTo: <sip:+12125551234@127.0.0.1>\r\n"
    b"Call-ID: bench@127.0.0.2\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
)
assert isinstance(REQUEST, Request)


def context(callee: str, wall_time: float = 1_781_539_200.0) -> CallContext:  # 2026-06-15 16:00 UTC
    return CallContext(
        attempt_id="a", call_id="c", now=0.0, wall_time=wall_time, source_host="127.0.0.2",
        account=TELEMARKETER, identities=(), caller="+14155550100", callee=callee,
        callee_presented=f"sip:{callee}@127.0.0.1", request=REQUEST,
    )  # fmt: skip


def per_call(function: Callable[[Any], object], items: list[Any]) -> float:
    """Microseconds per call of ``function`` over ``items``, min of the repeats."""
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e6


# -- generating -----------------------------------------------------------------------------------
def write_numbers(path: Path, numbers: np.ndarray[Any, Any]) -> None:
    """``+1`` and 10 digits a line, written a million at a time as bytes (no Python strings)."""
    with path.open("wb") as file:
        for part in np.array_split(numbers, max(1, len(numbers) // 1_000_000)):
            text = np.empty((len(part), 13), dtype=np.uint8)
            text[:, 0], text[:, 1], text[:, 12] = ord("+"), ord("1"), ord("\n")
            rest = part.copy()
            for column in range(11, 1, -1):
                text[:, column] = rest % 10 + ord("0")
                rest //= 10
            file.write(text.tobytes())


def rss_kib(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


# -- do-not-call: measured in a child process, so memory figures are the load's alone --------------
def measure_load(path: str) -> None:
    gc.collect()
    before = rss_kib()
    started = time.perf_counter()
    listed = NumberFile(Path(path))
    seconds = time.perf_counter() - started
    gc.collect()
    after, peak = rss_kib(), rss_kib("VmHWM")
    count = len(listed)
    print(json.dumps({
        "numbers": count, "seconds": seconds, "array_bytes_per_number": listed.numbers.nbytes / count,
        "rss_bytes_per_number": (after - before) * 1024 / count, "peak_growth_mib": (peak - before) / 1024,
    }))  # fmt: skip


def load_in_child(path: Path) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--measure-load", str(path)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, Any] = json.loads(output)
    return result


def bench_do_not_call(directory: Path, count: int, rng: np.random.Generator) -> dict[str, Any]:
    numbers = rng.integers(2_012_000_000, 9_899_999_999, count, dtype=np.int64)
    path = directory / "dnc.txt"
    write_numbers(path, numbers)
    result: dict[str, Any] = {"file_mib": path.stat().st_size / 2**20, "random_order": load_in_child(path)}
    write_numbers(path, np.sort(numbers))
    result["sorted"] = load_in_child(path)
    listed = NumberFile(path)
    hits = [f"+1{n}" for n in rng.choice(numbers, 100_000).tolist()]
    misses = [f"+1{n}" for n in rng.integers(1_000_000_000, 2_011_999_999, 100_000).tolist()]  # none listed
    assert all(number in listed for number in hits[:1000]) and not any(n in listed for n in misses[:1000])
    result["lookup_us"] = per_call(listed.__contains__, hits + misses)
    config = DoNotCallConfig.model_validate({"files": [str(path)]})
    rule = DoNotCallPolicy()
    contexts = [context(number) for number in hits[:20_000] + misses[:20_000]]
    result["rule_check_us"] = per_call(lambda call: rule.check(call, config), contexts)
    return result


# -- destinations ----------------------------------------------------------------------------------
def bench_destinations(directory: Path, count: int, rng: np.random.Generator) -> dict[str, Any]:
    distinct: set[str] = set()
    while len(distinct) < count:  # short prefixes collide: draw until there are ``count``
        length = int(rng.integers(3, 9))
        distinct.add(f"+{rng.integers(2, 10)}{rng.integers(0, 10 ** (length - 1)):0{length - 1}d}")
    prefixes = sorted(distinct)
    text = "# random destination prefixes\n" + "\n".join(prefixes) + "\n"
    best = float("inf")
    for repeat in range(REPEATS):  # a new file each time: a loaded one would be shared, not read
        path = directory / f"prefixes-{repeat}.txt"
        path.write_text(text)
        gc.collect()
        started = time.perf_counter()
        config = DestinationsConfig.model_validate({"block_files": [str(path)]})
        best = min(best, time.perf_counter() - started)
    table = config.table
    hits = [prefix + f"{rng.integers(0, 10**6):06d}" for prefix in rng.choice(prefixes, 100_000).tolist()]
    misses = [f"+1{rng.integers(2_000_000_000, 9_999_999_999)}" for _ in range(100_000)]
    assert table.longest_match(hits[0]) is not None and table.longest_match(misses[0]) is None
    rule = DestinationsPolicy()

    def check(call: CallContext) -> object:
        return rule.check(call, config)

    return {
        "prefixes": len(table),
        "load_seconds": best,
        "longest_match_hit_us": per_call(table.longest_match, hits),
        "longest_match_miss_us": per_call(table.longest_match, misses),
        "rule_check_hit_us": per_call(check, [context(number) for number in hits[:20_000]]),
        "rule_check_miss_us": per_call(check, [context(number) for number in misses[:20_000]]),
    }


def bench_calling_hours() -> dict[str, Any]:
    config, rule = CallingHoursConfig(), CallingHoursPolicy()
    new_york = [context(f"+1212555{n:04d}") for n in range(10_000)]
    first_seen = float("inf")
    for _ in range(REPEATS):
        callee_zones.cache_clear()  # every number new again
        started = time.perf_counter()
        for call in new_york:
            rule.check(call, config)
        first_seen = min(first_seen, (time.perf_counter() - started) / len(new_york) * 1e6)
    tokyo = [context(f"+8131234{n:04d}") for n in range(10_000)]
    return {
        "new_york_first_call_us": first_seen,
        "new_york_again_us": per_call(lambda call: rule.check(call, config), new_york),
        "tokyo_us": per_call(lambda call: rule.check(call, config), tokyo),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--numbers", type=int, default=10_000_000)
    parser.add_argument("--prefixes", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--measure-load", metavar="FILE", help=argparse.SUPPRESS)  # the child's job
    args = parser.parse_args(argv)
    if args.measure_load:
        measure_load(args.measure_load)
        return 0
    rng = np.random.default_rng(2026)
    with tempfile.TemporaryDirectory(prefix="bench_lists-") as directory:
        report = {
            "do_not_call": bench_do_not_call(Path(directory), args.numbers, rng),
            "destinations": bench_destinations(Path(directory), args.prefixes, rng),
            "calling_hours": bench_calling_hours(),
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    dnc, dst, hours = report["do_not_call"], report["destinations"], report["calling_hours"]
    for order in ("random_order", "sorted"):
        load = dnc[order]
        print(
            f"do-not-call, {load['numbers']:,} numbers ({dnc['file_mib']:.0f} MiB file, "
            f"{order.replace('_', ' ')}): load {load['seconds']:.2f} s; "
            f"{load['array_bytes_per_number']:.1f} bytes/number in the array, "
            f"{load['rss_bytes_per_number']:.1f} bytes/number RSS growth; "
            f"peak growth while loading {load['peak_growth_mib']:.0f} MiB"
        )
    print(f"do-not-call lookup {dnc['lookup_us']:.2f} us; rule check {dnc['rule_check_us']:.2f} us")
    print(
        f"destinations, {dst['prefixes']:,} prefixes: load {dst['load_seconds'] * 1000:.0f} ms; "
        f"longest match {dst['longest_match_hit_us']:.2f} us hit, "
        f"{dst['longest_match_miss_us']:.2f} us miss; "
        f"rule check {dst['rule_check_hit_us']:.2f} us hit, {dst['rule_check_miss_us']:.2f} us miss"
    )
    print(
        f"calling_hours rule check: New York number first seen {hours['new_york_first_call_us']:.1f} us, "
        f"again {hours['new_york_again_us']:.1f} us; Tokyo {hours['tokyo_us']:.1f} us"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
