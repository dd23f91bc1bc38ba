"""``sipguard demo``: the Acceptable Use Policy at work, with SIPp callers and a real
scanner, on loopback.

Starts sipguard in this process with the bundled demo policy (demo_policy.yaml: two
accounts, acme on 127.0.0.2 and callcenter on 127.0.0.3, four rules and the flood guard),
a SIPp UAS as the PBX behind it (sipp-scenarios/uas_pbx.xml), and plays the scenarios of
demo_plan.py step by step, those of a step at once: bounded SIPp runs from the loopback
address of the account they stand for, and SIPVicious svmap scanning from its own.
A call's outcome is taken from both ends: the final response the caller got (SIPp's
short message trace) and the rule sipguard refused it by (the policy engine's counters,
noted per call); the scan's from svmap's own log (messages sent, answers received) and
sipguard's ban list (messages dropped). A table sets that beside what the policy should
do; the demo exits 1 when a row differs (a missing svmap included). The decision log
goes to a JSON-lines file in a fresh temporary directory, next to SIPp's and svmap's
output. Nothing leaves loopback; the ports are picked at run time; every SIPp and svmap
process is ended on the way out, Ctrl-C included.
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
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from .app import ProxySettings, SipGuard
from .demo_plan import (
    ACME,
    CALLCENTER,
    CALLEE,
    LOOPBACK,
    PLAN,
    SCANNER,
    CallRow,
    DemoRow,
    Scan,
    ScanRow,
    Scenario,
)
from .engine import PolicyEngine
from .flood import FloodGuard
from .policyfile import PolicyFileError, load_policy
from .sip.events import Address, CallAnswered, CallAttempt, CallEnded, Verdict
from .sip.message import Request

POLICY = Path(__file__).resolve().with_name("demo_policy.yaml")
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "sipp-scenarios"
SIPP_TIMEOUT = 20  # seconds: every SIPp caller stops by itself within this (-timeout)
PBX_TIMEOUT = 120  # seconds: the stand-in PBX too, should the demo not stop it first
SVMAP = "sipvicious_svmap"  # SIPVicious's scanner, from the test extras (pip install sipvicious)
SCAN_TIMEOUT = 20  # seconds: svmap ends 3 s after its last message; killed if it is not done by then
NOTE_WIDTH = 100  # the notes under the table are wrapped to this, like the table itself


# -- what happened ---------------------------------------------------------------------------------
class JudgedCalls:
    """The policy engine as the proxy's DecisionHook, noting how it judged each call:
    Call-ID -> the rule that refused it, ``accepted`` or ``emergency`` (from the engine's
    own counters, which move by one per judged INVITE), in the order judged."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine
        self.emergency_calls = engine.emergency_calls
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

    def untrusted_headers(self, request: Request, source_host: str) -> tuple[str, ...]:
        return self.engine.untrusted_headers(request, source_host)

    def is_emergency(self, request: Request, source_host: str) -> bool:
        return self.engine.is_emergency(request, source_host)

    def _counts(self) -> tuple[Counter[tuple[str, int]], Counter[str]]:
        return self.engine.counters.rejections.copy(), self.engine.counters.verdicts.copy()

    def _note(self, attempt: CallAttempt, before: tuple[Counter[tuple[str, int]], Counter[str]]) -> None:
        rejections, verdicts = before
        moved = self.engine.counters.rejections - rejections
        outcome = next((rule for rule, _ in moved), None)
        if outcome is None:
            outcome = "emergency" if (self.engine.counters.verdicts - verdicts)["emergency"] else "accepted"
        self.by_call_id[attempt.request.call_id] = outcome


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


# -- running SIPp and svmap ------------------------------------------------------------------------
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
    """The SIPp and svmap processes of one demo, their files in ``workdir``; ``close`` ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[asyncio.subprocess.Process] = []

    async def start(self, argv: list[str], output: Path) -> asyncio.subprocess.Process:
        """Start ``argv``, its stdout and stderr into ``output``; ``close`` ends it."""
        with output.open("wb") as file:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=file, stderr=asyncio.subprocess.STDOUT
            )
        self.processes.append(process)
        return process

    async def sipp(self, name: str, argv: list[str], *, logs: bool = False) -> asyncio.subprocess.Process:
        """Start SIPp with its short message trace (and its <log> actions) in ``workdir``."""
        traces = ["-trace_shortmsg", "-shortmessage_file", str(self.workdir / f"{name}.shortmsg")]
        if logs:
            traces += ["-trace_logs", "-log_file", str(self.workdir / f"{name}.logs")]
        return await self.start(["sipp", *argv, "-nostdin", *traces], self.workdir / f"{name}.screen")

    async def close(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 5)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def play_calls(
    lab: Lab, scenario: Scenario, index: int, proxy: Address, judged: JudgedCalls
) -> CallRow:
    """Every caller of the scenario at once, each a bounded SIPp run; then read the outcome."""
    ports = free_udp_ports(scenario.source, len(scenario.callers))
    logs = "<log " in (SCENARIO_DIR / scenario.xml).read_text(errors="replace")  # uac_dialer.xml: Retry-After
    stem = f"{index}-{scenario.name.replace(' ', '-')}"  # 2-trunking-burst-0.shortmsg ...
    names = [f"{stem}-{n}" for n in range(len(scenario.callers))]
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
    row = CallRow(scenario)
    for name, code in zip(names, codes, strict=True):
        if code != 0:
            row.sipp_failed.append(f"{name} (exit {code}, see {lab.workdir / name}.screen)")
        statuses = _final_statuses(lab.workdir / f"{name}.shortmsg")
        row.statuses.update(statuses)
        for call_id, status in statuses.items():
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


def find_svmap() -> str | None:
    """svmap beside this Python (a venv's bin/, where `pip install sipvicious` puts it), or on PATH."""
    beside = Path(sys.executable).parent / SVMAP
    return str(beside) if beside.exists() else shutil.which(SVMAP)


async def play_scan(lab: Lab, scan: Scan, proxy: Address, flood: FloodGuard, svmap: str | None) -> ScanRow:
    """svmap, bounded: one target (sipguard's port), one message per method; then what it
    logged (-vv: each message sent, each answer received) and sipguard's ban of its address."""
    if svmap is None:
        return ScanRow(scan, problem="svmap not installed")
    (port,) = free_udp_ports(scan.source, 1)
    output = lab.workdir / "svmap.out"
    process = await lab.start(
        [
            svmap, "-vv", "-b", scan.source, "-P", str(port), "-p", str(proxy.port),
            "-m", ",".join(scan.methods), proxy.host,
        ],
        output,
    )  # fmt: skip
    row = ScanRow(scan, output=output)
    try:
        code = await asyncio.wait_for(process.wait(), SCAN_TIMEOUT)
    except TimeoutError:
        row.problem = f"svmap ran {SCAN_TIMEOUT} s"  # Lab.close ends it
        return row
    log = output.read_text(errors="replace").splitlines()
    row.sent = sum(f"sending packet to {proxy.host_port}" in line for line in log)
    row.answered = sum("got data from" in line for line in log)
    # svmap exits 30 when it got fewer answers than it sent: here, the point
    if code not in (0, 30) or any(line.startswith(("ERROR:", "CRITICAL:")) for line in log):
        row.problem = f"svmap failed (exit {code})"
    row.ban = next((ban for ban in flood.bans if ban.host == scan.source), None)
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


def _events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


# -- the demo -------------------------------------------------------------------------------------
# Two spaces between columns; at most 100 characters wide (a row that differs may be longer).
COLUMNS = "{:<17}  {:<10}  {:>4}  {:>8}  {:<19}  {:<23}  {}"
HEADER = ("scenario", "from", "sent", "answered", "refused / dropped", "expected", "result")


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
    svmap = find_svmap()
    started = time.monotonic()
    with decision_log(log_path, log_level, log_format):
        (pbx_port,) = free_udp_ports(LOOPBACK, 1)
        pbx = Address("udp", LOOPBACK, pbx_port)
        judged = JudgedCalls(PolicyEngine(policy))
        settings = ProxySettings.from_policy(policy, listen=[Address("udp", LOOPBACK, 0)], upstream=pbx)
        guard = SipGuard(settings, judged)
        lab = Lab(workdir)
        rows: list[DemoRow] = []
        try:
            proxy = (await guard.start())[0]
            uas = await lab.sipp("pbx", [
                "-sf", str(SCENARIO_DIR / "uas_pbx.xml"), "-i", LOOPBACK, "-p", str(pbx.port),
                "-m", "1000", "-timeout", str(PBX_TIMEOUT),
            ])  # fmt: skip
            await _wait_until_bound(pbx.port, uas)
            print(f"sipguard {proxy}, policy {POLICY}")
            print(f"in front of a stand-in PBX (SIPp, uas_pbx.xml) at {pbx}")
            print(f"customers (SIPp): acme from {ACME}, callcenter from {CALLCENTER}, calling {CALLEE}")
            print(f"a scanner (SIPVicious svmap) from {SCANNER}\n")
            header = COLUMNS.format(*HEADER)
            print(header)
            print("-" * len(header), flush=True)

            async def play(item: Scenario | Scan, index: int) -> DemoRow:
                if isinstance(item, Scan):
                    return await play_scan(lab, item, proxy, guard.flood, svmap)
                return await play_calls(lab, item, index, proxy, judged)

            for index, step in enumerate(PLAN):
                for row in await asyncio.gather(*(play(item, index) for item in step)):
                    rows.append(row)
                    print(table_row(row), flush=True)
        finally:
            await lab.close()  # the PBX too: its trace is complete once SIPp has exited
            await guard.close()
    pbx_calls = len(_invites_received(workdir / "pbx.shortmsg"))
    return _report(rows, guard, judged, pbx_calls, log_path, time.monotonic() - started)


def table_row(row: DemoRow) -> str:
    return COLUMNS.format(*row.cells(), "ok" if row.ok else "DIFFERS")


def _note(text: str) -> str:
    return textwrap.fill(text, NOTE_WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def _penalty_notes(
    row: CallRow, rows: list[DemoRow], judged: JudgedCalls, events: list[dict[str, Any]]
) -> list[str]:
    """The penalty box at work: for a dialer it boxed, why and what the box refused after;
    for the scenario played beside it, how many of its calls connected after the box."""
    notes = []
    boxed = [e for e in events if e.get("event") == "penalty.boxed" and e.get("call_id") in row.statuses]
    by_the_box = sum(n for (_, rule), n in row.refused.items() if rule == "dialer") - len(boxed)
    notes += [
        f"{e['reason']}: refused, boxed {e['seconds']:g} s; then {by_the_box} refused by the box"
        for e in boxed
    ]
    if row.scenario.beside:
        order = {call_id: position for position, call_id in enumerate(judged.by_call_id)}
        dialer = next(r for r in rows if isinstance(r, CallRow) and r.name == row.scenario.beside)
        refused = [order[c] for c in dialer.statuses if judged.by_call_id.get(c) == "dialer"]
        box = min(refused, default=len(order))
        after = sum(status == 200 and order.get(c, -1) > box for c, status in row.statuses.items())
        notes.append(f"{row.connected} connected, {after} of them after the dialer's number was boxed")
    return notes


def _report(
    rows: list[DemoRow], guard: SipGuard, judged: JudgedCalls, pbx_calls: int, log_path: Path, elapsed: float
) -> int:
    print()
    events = _events(log_path)
    for row in rows:
        notes = row.notes()
        if isinstance(row, CallRow):
            notes += _penalty_notes(row, rows, judged, events)
        print(_note(f"{row.name}: {'; '.join(notes)}"))
    connected = sum(row.connected for row in rows if isinstance(row, CallRow))
    pbx_ok = pbx_calls == connected
    if pbx_ok:
        print(f"the PBX saw {pbx_calls} calls: the {connected} that connected; no refused call reached it")
    else:
        print(f"the PBX saw {pbx_calls} calls, but {connected} connected: DIFFERS")
    banned = [ban.host for ban in guard.flood.bans]
    bans_ok = set(banned) <= {SCANNER}  # whether the scanner is, its row says
    verdict = (
        "no customer, and not the PBX" if bans_ok else f"DIFFERS: the scanner ({SCANNER}) alone should be"
    )
    print(f"banned: {', '.join(banned) or 'nobody'}; {verdict}")
    assert guard.core is not None
    counters = guard.counters
    print(
        f"sipguard saw {counters['messages_in']} messages, dropped {counters['flood_dropped']}; calls "
        f"answered {counters['calls_answered']}, ended {counters['calls_ended']}, "
        f"still tracked {guard.core.calls.live}"
    )
    named = Counter(event.get("event", "") for event in events)
    print(f"\ndecision log (JSON lines, SIPp's and svmap's output beside it): {log_path}")
    print(
        f"  {named['call.decision']} call.decision, {named['call.emergency']} call.emergency, "
        f"{named['penalty.boxed']} penalty.boxed, {named['flood.banned']} flood.banned"
    )
    differs = [row.name for row in rows if not row.ok]
    differs += [] if pbx_ok else ["the PBX"]
    differs += [] if bans_ok else ["the bans"]
    print(f"\n{'DIFFERS: ' + ', '.join(differs) if differs else 'every row as expected'} ({elapsed:.1f} s)")
    return 1 if differs else 0
