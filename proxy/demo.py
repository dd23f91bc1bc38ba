"""``sipguard demo``: the proxy in front of a stand-in PBX, driven by SIPp, on loopback.

Starts sipguard in this process, a SIPp UAS as the PBX and SIPp UACs as customers,
plays each scenario with a bounded number of calls, and prints what happened next to
what was expected. Exits non-zero when a row differs. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import sys
from dataclasses import dataclass

from .app import ProxySettings, SipGuard
from .sip.events import Address

SIPP_TIMEOUT = 30  # seconds: every SIPp run stops by itself


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    calls: int
    rate: int
    expect_connected: int
    sipp_args: tuple[str, ...] = ()


SCENARIOS = (Scenario(name="legitimate calls", calls=50, rate=25, expect_connected=50),)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    scenario: Scenario
    connected: int
    failed: int


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _wait_until_bound(port: int, process: asyncio.subprocess.Process) -> None:
    """SIPp prints nothing when ready: wait until its port is taken (or it died)."""
    for _ in range(200):
        if process.returncode is not None:
            raise RuntimeError("SIPp UAS exited at start")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("SIPp UAS did not start")


async def _play(scenario: Scenario, proxy: Address) -> Outcome:
    process = await asyncio.create_subprocess_exec(
        "sipp", "-sn", "uac", f"{proxy.host}:{proxy.port}", "-i", "127.0.0.1", "-p", str(free_udp_port()),
        "-m", str(scenario.calls), "-r", str(scenario.rate), "-d", "200", "-nostdin",
        "-timeout", str(SIPP_TIMEOUT), "-timeout_error", *scenario.sipp_args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    text = output.decode("utf-8", "replace")
    return Outcome(
        scenario=scenario,
        connected=_sipp_total(text, "Successful call"),
        failed=_sipp_total(text, "Failed call"),
    )


def _sipp_total(screen: str, label: str) -> int:
    """The cumulative column of a SIPp statistics row (its last screen wins)."""
    rows = re.findall(rf"{label}\s*\|\s*\d+\s*\|\s*(\d+)", screen)
    return int(rows[-1]) if rows else 0


async def run_demo() -> int:
    if shutil.which("sipp") is None:
        print(
            "sipguard demo needs SIPp: run `bash .ci/setup` (installs Debian's sip-tester)", file=sys.stderr
        )
        return 2
    pbx = Address("udp", "127.0.0.1", free_udp_port())
    guard = SipGuard(ProxySettings(listen=[Address("udp", "127.0.0.1", 0)], upstream=pbx))
    proxy = (await guard.start())[0]
    uas = await asyncio.create_subprocess_exec(
        "sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(pbx.port), "-nostdin",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await _wait_until_bound(pbx.port, uas)
        outcomes = [await _play(scenario, proxy) for scenario in SCENARIOS]
    finally:
        uas.terminate()
        await uas.wait()
        await guard.close()
    assert guard.core is not None
    return _report(outcomes, guard, proxy, pbx)


def _report(outcomes: list[Outcome], guard: SipGuard, proxy: Address, pbx: Address) -> int:
    print(f"\nsipguard {proxy}  →  stand-in PBX (SIPp UAS) {pbx}\n")
    header = f"{'scenario':<20} {'calls':>6} {'connected':>10} {'failed':>7} {'expected':>9}  result"
    print(header)
    print("-" * len(header))
    mismatches = 0
    for outcome in outcomes:
        ok = outcome.connected == outcome.scenario.expect_connected
        mismatches += not ok
        print(
            f"{outcome.scenario.name:<20} {outcome.scenario.calls:>6} {outcome.connected:>10} "
            f"{outcome.failed:>7} {outcome.scenario.expect_connected:>9}  {'ok' if ok else 'DIFFERS'}"
        )
    assert guard.core is not None
    counters = guard.counters
    print(
        f"\nsipguard saw {counters['messages_in']} messages; calls answered {counters['calls_answered']}, "
        f"ended {counters['calls_ended']}, still tracked {guard.core.calls.live}."
    )
    print("The decision log is on stderr (JSON lines; --log-format console for a terminal).")
    return 1 if mismatches else 0
