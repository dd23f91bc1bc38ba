"""``sipguard demo``: the Acceptable Use Policy at work, with SIPp callers, on loopback.

Starts sipguard in this process with the bundled demo policy (demo_policy.yaml: two
accounts, acme on 127.0.0.2 and callcenter on 127.0.0.3, and the three rules), a SIPp
UAS as the PBX behind it (sipp-scenarios/uas_pbx.xml), and plays one scenario per row:
bounded SIPp runs from the loopback address of the account they stand for. Each call's
outcome is taken from both ends: the final response the caller got (SIPp's short
message trace) and the rule sipguard refused it by (the policy engine's counters, noted
per call). A table sets that beside what the policy should do; the demo exits 1 when a
row differs. The decision log goes to a JSON-lines file in a fresh temporary directory,
next to SIPp's traces. Nothing leaves loopback; the ports are picked at run time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .app import ProxySettings, SipGuard
from .engine import PolicyEngine
from .policyfile import PolicyFileError, load_policy
from .sip.events import Address, CallAnswered, CallAttempt, CallEnded, Verdict

POLICY = Path(__file__).resolve().with_name("demo_policy.yaml")
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "sipp-scenarios"
LOOPBACK = "127.0.0.1"  # sipguard and the stand-in PBX (a trusted peer in the demo policy)
ACME = "127.0.0.2"  # the demo policy's sources: of account acme ...
CALLCENTER = "127.0.0.3"  # ... and of callcenter
CALLEE = "+12125551234"  # whom the customers call
SIPP_TIMEOUT = 20  # seconds: every SIPp caller stops by itself within this (-timeout)
PBX_TIMEOUT = 120  # seconds: the stand-in PBX too, should the demo not stop it first


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    who: str  # shown in the table: which account, which number
    source: str  # the account's loopback address (its sources: in the demo policy)
    callers: tuple[str, ...]  # caller numbers: one SIPp run each, all at once
    xml: str  # the caller's scenario in sipp-scenarios/
    calls: int  # per caller (-m)
    rate: float  # new calls per second (-r)
    hold_ms: int  # how long a connected call lasts (-d)
    at_once: int | None = None  # at most this many calls in flight per caller (-l)
    dialled: str = CALLEE
    expect_connected: int
    expect_refused: tuple[tuple[int, int, str], ...] = ()  # (calls, status, rule)
    expect_emergency: int = 0  # calls sipguard passes unjudged as call.emergency

    @property
    def sent(self) -> int:
        return self.calls * len(self.callers)


SCENARIOS_PLAYED = (
    Scenario(
        name="legitimate calls",
        who="callcenter, 5 agents",
        source=CALLCENTER,
        callers=tuple(f"+1415555200{agent}" for agent in range(5)),
        xml="uac_caller.xml",
        calls=2,
        rate=2,
        hold_ms=500,
        at_once=1,
        expect_connected=10,
    ),
    Scenario(
        name="spoofed caller ID",
        who="callcenter as +14155559999",  # acme's number
        source=CALLCENTER,
        callers=("+14155559999",),
        xml="uac_spoofed.xml",
        calls=5,
        rate=10,
        hold_ms=0,
        expect_connected=0,
        expect_refused=((5, 403, "caller_id"),),
    ),
    Scenario(
        name="trunking burst",
        who="acme +14155550100",
        source=ACME,
        callers=("+14155550100",),
        xml="uac_trunking.xml",
        calls=6,
        rate=50,
        hold_ms=2000,  # the first two hold their slots while the rest arrive
        expect_connected=2,
        expect_refused=((4, 486, "concurrency"),),
    ),
    Scenario(
        name="dialer burst",
        who="acme +14155550101",
        source=ACME,
        callers=("+14155550101",),
        xml="uac_dialer.xml",
        calls=8,
        rate=100,
        hold_ms=0,
        at_once=1,  # back to back: never two at once, so only the rate can refuse
        expect_connected=3,
        expect_refused=((5, 503, "call_rate"),),
    ),
    Scenario(
        name="emergency over limits",
        who="acme +14155550101 to 911",  # over its call rate since the dialer burst
        source=ACME,
        callers=("+14155550101",),
        xml="uac_caller.xml",
        calls=3,
        rate=50,
        hold_ms=1000,  # three at once: over concurrent_per_number (2) as well
        dialled="911",
        expect_connected=3,
        expect_emergency=3,
    ),
)


# -- what happened ---------------------------------------------------------------------------------
class JudgedCalls:
    """The policy engine as the proxy's DecisionHook, noting how it judged each call:
    Call-ID -> the rule that refused it, ``accepted`` or ``emergency`` (from the engine's
    own counters, which move by one per judged INVITE)."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self.by_call_id: dict[str, str] = {}

    def decide_now(self, attempt: CallAttempt) -> Verdict | None:
        before = self._counts()
        verdict = self.engine.decide_now(attempt)
        if verdict is not None:
            self._note(attempt, before)
        return verdict

    async def decide(self, attempt: CallAttempt) -> Verdict:
        before = self._counts()
        verdict = await self.engine.decide(attempt)
        self._note(attempt, before)
        return verdict

    def call_answered(self, event: CallAnswered) -> None:
        self.engine.call_answered(event)

    def call_ended(self, event: CallEnded) -> None:
        self.engine.call_ended(event)

    def _counts(self) -> tuple[Counter[tuple[str, int]], Counter[str]]:
        return self.engine.counters.rejections.copy(), self.engine.counters.verdicts.copy()

    def _note(self, attempt: CallAttempt, before: tuple[Counter[tuple[str, int]], Counter[str]]) -> None:
        rejections, verdicts = before
        moved = self.engine.counters.rejections - rejections
        outcome = next((rule for rule, _ in moved), None)
        if outcome is None:
            outcome = "emergency" if (self.engine.counters.verdicts - verdicts)["emergency"] else "accepted"
        self.by_call_id[attempt.request.call_id] = outcome


@dataclass(slots=True)
class Row:
    scenario: Scenario
    sent: int = 0
    connected: int = 0
    refused: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, rule) -> calls
    unanswered: int = 0
    emergency: int = 0
    sipp_failed: list[str] = field(default_factory=list)  # SIPp runs whose scenario failed a call
    retry_after: list[int] = field(default_factory=list)  # each 503's, as the caller logged it

    @property
    def expected(self) -> tuple[int, Counter[tuple[int, str]], int]:
        refused = Counter({(status, rule): n for n, status, rule in self.scenario.expect_refused})
        return self.scenario.expect_connected, refused, self.scenario.expect_emergency

    @property
    def ok(self) -> bool:
        seen = (self.connected, self.refused, self.emergency)
        return seen == self.expected and self.sent == self.scenario.sent and not self.sipp_failed


def _refusals(refused: Counter[tuple[int, str]], unanswered: int = 0) -> str:
    parts = [f"{n} × {status} {rule}" for (status, rule), n in sorted(refused.items())]
    parts += [f"{unanswered} × no answer"] if unanswered else []
    return ", ".join(parts) or "0"


def _final_statuses(path: Path) -> dict[str, int | None]:
    """Call-ID -> the first final response to its INVITE, from SIPp's -trace_shortmsg
    (tab-separated: date, time, epoch, S/R, Call-ID, CSeq, first line); None: no answer."""
    statuses: dict[str, int | None] = {}
    if not path.exists():
        return statuses
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 7 or not fields[5].endswith("INVITE"):
            continue
        direction, call_id, first = fields[3], fields[4], fields[6]
        if direction == "S" and first.startswith("INVITE "):
            statuses.setdefault(call_id, None)
        elif direction == "R" and first.startswith("SIP/2.0 ") and statuses.get(call_id) is None:
            status = int(first.split()[1])
            if status >= 200:
                statuses[call_id] = status
    return statuses


def _invites_received(path: Path) -> set[str]:
    """The Call-IDs of the INVITEs a SIPp UAS received (its -trace_shortmsg)."""
    found = set()
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split("\t")
            if len(fields) >= 7 and fields[3] == "R" and fields[6].startswith("INVITE "):
                found.add(fields[4])
    return found


# -- running SIPp ----------------------------------------------------------------------------------
def free_udp_ports(host: str, count: int) -> list[int]:
    """Distinct UDP ports free on ``host`` right now (held together, so never the same twice)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(count)]
        for probe in probes:
            probe.bind((host, 0))
        return [int(probe.getsockname()[1]) for probe in probes]


async def _wait_until_bound(port: int, process: asyncio.subprocess.Process) -> None:
    """SIPp prints nothing when ready: wait until its port is taken (or it died)."""
    for _ in range(200):
        if process.returncode is not None:
            raise RuntimeError("SIPp UAS exited at start")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("SIPp UAS did not start")


class Lab:
    """The SIPp processes of one demo, their files in ``workdir``; ``close`` ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[asyncio.subprocess.Process] = []

    async def sipp(self, name: str, argv: list[str], *, logs: bool = False) -> asyncio.subprocess.Process:
        """Start SIPp with its short message trace (and its <log> actions) in ``workdir``."""
        traces = ["-trace_shortmsg", "-shortmessage_file", str(self.workdir / f"{name}.shortmsg")]
        if logs:
            traces += ["-trace_logs", "-log_file", str(self.workdir / f"{name}.logs")]
        with (self.workdir / f"{name}.screen").open("wb") as screen:
            process = await asyncio.create_subprocess_exec(
                "sipp", *argv, "-nostdin", *traces,
                stdin=asyncio.subprocess.DEVNULL, stdout=screen, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        self.processes.append(process)
        return process

    async def close(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 5)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _play(lab: Lab, scenario: Scenario, index: int, proxy: Address, judged: JudgedCalls) -> Row:
    """Every caller of the scenario at once, each a bounded SIPp run; then read the outcome."""
    ports = free_udp_ports(scenario.source, len(scenario.callers))
    logs = "<log " in (SCENARIO_DIR / scenario.xml).read_text(errors="replace")  # uac_dialer.xml: Retry-After
    names = [f"{index}-{scenario.xml.removesuffix('.xml')}-{n}" for n in range(len(scenario.callers))]
    runs = []
    for name, caller, port in zip(names, scenario.callers, ports, strict=True):
        argv = [
            "-sf", str(SCENARIO_DIR / scenario.xml), "-i", scenario.source, "-p", str(port),
            "-key", "caller", caller, "-s", scenario.dialled, "-d", str(scenario.hold_ms),
            "-m", str(scenario.calls), "-r", str(scenario.rate),
            "-timeout", str(SIPP_TIMEOUT), "-timeout_error",
        ]  # fmt: skip
        if scenario.at_once is not None:
            argv += ["-l", str(scenario.at_once)]
        runs.append(await lab.sipp(name, [*argv, proxy.host_port], logs=logs))
    codes = await asyncio.gather(*(run.wait() for run in runs))
    row = Row(scenario)
    for name, code in zip(names, codes, strict=True):
        if code != 0:
            row.sipp_failed.append(f"{name} (exit {code}, see {lab.workdir / name}.screen)")
        for call_id, status in _final_statuses(lab.workdir / f"{name}.shortmsg").items():
            row.sent += 1
            outcome = judged.by_call_id.get(call_id, "unjudged")
            row.emergency += outcome == "emergency"
            if status is None:
                row.unanswered += 1
            elif status == 200:
                row.connected += 1
            else:
                row.refused[status, outcome] += 1
        logged = lab.workdir / f"{name}.logs"
        if logged.exists():  # uac_dialer.xml logs each 503's Retry-After
            found = re.findall(r" 503 Retry-After: (\d+)", logged.read_text(errors="replace"))
            row.retry_after += [int(seconds) for seconds in found]
    return row


# -- the log --------------------------------------------------------------------------------------
@contextlib.contextmanager
def decision_log(path: Path, level: str, fmt: str) -> Iterator[None]:
    """sipguard's log as JSON lines into ``path``; with ``console``, also readable on stderr."""
    renderer = structlog.processors.JSONRenderer()
    console = structlog.dev.ConsoleRenderer() if fmt == "console" else None
    with path.open("w", encoding="utf-8", buffering=1) as file:

        def write(logger: Any, method: str, event: Any) -> Any:
            line = renderer(logger, method, dict(event))
            assert isinstance(line, str)  # json.dumps
            file.write(line + "\n")
            if console is not None:
                print(console(logger, method, dict(event)), file=sys.stderr)
            raise structlog.DropEvent

        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                write,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.getLevelNamesMapping()[level.upper()]
            ),
            logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
            cache_logger_on_first_use=True,
        )
        yield


def _events(path: Path) -> Counter[str]:
    events: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events[json.loads(line).get("event", "")] += 1
    return events


# -- the demo -------------------------------------------------------------------------------------
COLUMNS = "{:<22}  {:<26}  {:>5}  {:>9}  {:<22}  {:<30}  {}"
HEADER = ("scenario", "from", "calls", "connected", "refused", "expected (connected + refused)", "result")


async def run_demo(log_level: str = "debug", log_format: str = "auto") -> int:
    if shutil.which("sipp") is None:
        print("sipguard demo needs SIPp: `bash .ci/setup` installs Debian's sip-tester", file=sys.stderr)
        return 2
    if not SCENARIO_DIR.is_dir():
        print(f"sipguard demo runs from a source checkout: {SCENARIO_DIR} is missing", file=sys.stderr)
        return 2
    try:
        policy = load_policy(POLICY)
    except PolicyFileError as error:
        print(error, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="sipguard-demo-"))
    log_path = workdir / "sipguard.log"
    started = time.monotonic()
    with decision_log(log_path, log_level, log_format):
        (pbx_port,) = free_udp_ports(LOOPBACK, 1)
        pbx = Address("udp", LOOPBACK, pbx_port)
        judged = JudgedCalls(PolicyEngine(policy))
        settings = ProxySettings.from_policy(policy, listen=[Address("udp", LOOPBACK, 0)], upstream=pbx)
        guard = SipGuard(settings, judged)
        lab = Lab(workdir)
        rows: list[Row] = []
        try:
            proxy = (await guard.start())[0]
            uas = await lab.sipp("pbx", [
                "-sf", str(SCENARIO_DIR / "uas_pbx.xml"), "-i", LOOPBACK, "-p", str(pbx.port),
                "-m", "1000", "-timeout", str(PBX_TIMEOUT),
            ])  # fmt: skip
            await _wait_until_bound(pbx.port, uas)
            print(f"sipguard {proxy}, policy {POLICY}")
            print(f"in front of a stand-in PBX (SIPp, uas_pbx.xml) at {pbx}")
            print(f"callers (SIPp): acme from {ACME}, callcenter from {CALLCENTER}; they call {CALLEE}\n")
            header = COLUMNS.format(*HEADER)
            print(header)
            print("-" * len(header), flush=True)
            for index, scenario in enumerate(SCENARIOS_PLAYED):
                row = await _play(lab, scenario, index, proxy, judged)
                rows.append(row)
                print(_table_row(row), flush=True)
        finally:
            await lab.close()  # the PBX too: its trace is complete once SIPp has exited
            await guard.close()
    pbx_calls = len(_invites_received(workdir / "pbx.shortmsg"))
    return _report(rows, guard, pbx_calls, log_path, time.monotonic() - started)


def _table_row(row: Row) -> str:
    scenario = row.scenario
    connected, refused, _ = row.expected
    return COLUMNS.format(
        scenario.name,
        scenario.who,
        row.sent,
        row.connected,
        _refusals(row.refused, row.unanswered),
        f"{connected} + {_refusals(refused)}",
        "ok" if row.ok else "DIFFERS",
    )


def _report(rows: list[Row], guard: SipGuard, pbx_calls: int, log_path: Path, elapsed: float) -> int:
    print()
    for row in rows:
        name = row.scenario.name
        refused_503 = sum(n for (status, _), n in row.refused.items() if status == 503)
        if refused_503:
            seconds = ", ".join(str(s) for s in sorted(set(row.retry_after))) or "none"
            print(f"{name}: {len(row.retry_after)} of {refused_503} × 503 carried Retry-After ({seconds} s)")
        if row.scenario.expect_emergency:
            print(
                f"{name}: {row.emergency} × call.emergency, passed unjudged and uncounted: placed at once "
                "(over concurrent_per_number, 2), from the number call_rate refused above"
            )
        for failed in row.sipp_failed:
            print(f"{name}: a SIPp run failed a call its scenario expected to go otherwise: {failed}")
    connected = sum(row.connected for row in rows)
    pbx_ok = pbx_calls == connected
    if pbx_ok:
        print(f"the PBX saw {pbx_calls} calls: the {connected} that connected; no refused call reached it")
    else:
        print(f"the PBX saw {pbx_calls} calls, but {connected} connected: DIFFERS")
    assert guard.core is not None
    counters = guard.counters
    print(
        f"sipguard saw {counters['messages_in']} messages; calls answered {counters['calls_answered']}, "
        f"ended {counters['calls_ended']}, still tracked {guard.core.calls.live}"
    )
    events = _events(log_path)
    print(f"\ndecision log (JSON lines, SIPp's traces beside it): {log_path}")
    print(f"  {events['call.decision']} call.decision, {events['call.emergency']} call.emergency")
    differs = [row.scenario.name for row in rows if not row.ok] + ([] if pbx_ok else ["the PBX"])
    print(f"\n{'DIFFERS: ' + ', '.join(differs) if differs else 'every row as expected'} ({elapsed:.1f} s)")
    return 1 if differs else 0
