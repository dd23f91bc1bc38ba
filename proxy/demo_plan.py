"""What ``sipguard demo`` plays and what the demo policy (demo_policy.yaml) should do with
it: the scenarios, step by step, each with its expected outcome, and the table rows that
set what happened beside that (proxy/demo.py plays them and prints the table).

A scenario is SIPp callers of one account, from that account's loopback address, or a
scan by SIPVicious svmap from an address of its own. The scenarios of a step run at the
same time: the scanner while customers call, an agent while a dialer on the same account
is caught. Changing a number here means changing the policy's limits to match.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .flood import Ban

LOOPBACK = "127.0.0.1"  # sipguard and the stand-in PBX (a trusted peer in the demo policy)
ACME = "127.0.0.2"  # the demo policy's sources: of account acme ...
CALLCENTER = "127.0.0.3"  # ... and of callcenter
SCANNER = "127.0.0.9"  # svmap's: no account's, and not exempt from the flood guard
CALLEE = "+12125551234"  # whom the customers call


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    name: str
    account: str  # shown in the table
    who: str  # shown under it: which numbers, how they call
    source: str  # the account's loopback address (its sources: in the demo policy)
    callers: tuple[str, ...]  # caller numbers: one SIPp run each, all at once
    xml: str  # the caller's scenario in sipp-scenarios/
    calls: int  # per caller (-m)
    rate: float  # new calls per second (-r)
    hold_ms: int  # how long a connected call lasts (-d)
    at_once: int | None = None  # at most this many calls in flight per caller (-l)
    dialled: str = CALLEE  # -s (uac_sequential.xml appends the call's number to it)
    expect_connected: int
    expect_refused: tuple[tuple[int, int, str], ...] = ()  # (calls, status, rule)
    expect_emergency: int = 0  # calls sipguard passes unjudged as call.emergency
    beside: str | None = None  # the scenario (played at the same time) whose number gets boxed

    @property
    def sent(self) -> int:
        return self.calls * len(self.callers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scan:
    """SIPVicious svmap probing sipguard's port once per method, as a scanner looking for PBXs does."""

    name: str
    who: str  # shown under the table
    source: str  # svmap binds here (-b)
    methods: tuple[str, ...]  # one message each (-m)
    expect_ban: str  # the flood guard's reason: svmap's User-Agent is friendly-scanner


LEGITIMATE = Scenario(
    name="legitimate calls",
    account="callcenter",
    who="callcenter's agents +14155552000-04, 2 calls each, during the scan",
    source=CALLCENTER,
    callers=tuple(f"+1415555200{agent}" for agent in range(5)),
    xml="uac_caller.xml",
    calls=2,
    rate=2,
    hold_ms=500,
    at_once=1,
    expect_connected=10,
)
SCANNER_SCAN = Scan(
    name="scanner (svmap)",
    who=f"SIPVicious svmap from {SCANNER}: an OPTIONS, an INVITE and a REGISTER to sipguard's port",
    source=SCANNER,
    methods=("OPTIONS", "INVITE", "REGISTER"),
    expect_ban="user-agent",
)
SPOOFED = Scenario(
    name="spoofed caller ID",
    account="callcenter",
    who="callcenter presenting acme's +14155559999",
    source=CALLCENTER,
    callers=("+14155559999",),
    xml="uac_spoofed.xml",
    calls=5,
    rate=10,
    hold_ms=0,
    expect_connected=0,
    expect_refused=((5, 403, "caller_id"),),
)
TRUNKING = Scenario(
    name="trunking burst",
    account="acme",
    who="acme's +14155550100, 6 calls at once; 2 at a time allowed per number",
    source=ACME,
    callers=("+14155550100",),
    xml="uac_trunking.xml",
    calls=6,
    rate=50,
    hold_ms=2000,  # the first two hold their slots while the rest arrive
    expect_connected=2,
    expect_refused=((4, 486, "concurrency"),),
)
DIALER_BURST = Scenario(
    name="dialer burst",
    account="acme",
    who="acme's +14155550101, 8 calls back to back; 10 a minute allowed, burst 3",
    source=ACME,
    callers=("+14155550101",),
    xml="uac_dialer.xml",
    calls=8,
    rate=100,
    hold_ms=0,
    at_once=1,  # back to back: never two at once, so only the rate can refuse
    expect_connected=3,
    expect_refused=((5, 503, "call_rate"),),
)
SEQUENTIAL_DIALER = Scenario(
    name="sequential dialer",
    account="callcenter",
    who="callcenter's +14155552050 dialling +12125550101, …0102, … one after another",
    source=CALLCENTER,
    callers=("+14155552050",),
    xml="uac_sequential.xml",
    calls=8,
    rate=4,  # the 5th about 1.25 s in, with the agent's calls before it and after
    hold_ms=100,
    at_once=1,  # one after another: the callees in order
    dialled="+1212555010",
    expect_connected=4,  # runs of 3 and 4 tagged; the 5th refused and the number boxed: the rest too
    expect_refused=((4, 403, "dialer"),),
)
AGENT = Scenario(
    name="agent beside it",
    account="callcenter",
    who="callcenter's +14155552005, an agent on the dialer's account, calling meanwhile",
    source=CALLCENTER,
    callers=("+14155552005",),
    xml="uac_caller.xml",
    calls=3,  # within call_rate's burst of 3: no warning in the log either
    rate=2,
    hold_ms=300,
    at_once=1,
    expect_connected=3,
    beside=SEQUENTIAL_DIALER.name,
)
EMERGENCY = Scenario(
    name="911 over limits",
    account="acme",
    who="acme's +14155550101, over its call rate since the dialer burst, 3 calls to 911 at once",
    source=ACME,
    callers=("+14155550101",),
    xml="uac_caller.xml",
    calls=3,
    rate=50,
    hold_ms=1000,  # three at once: over concurrent_per_number (2) as well
    dialled="911",
    expect_connected=3,
    expect_emergency=3,
)
# The steps, in order; the scenarios of a step are played at the same time.
PLAN: tuple[tuple[Scenario | Scan, ...], ...] = (
    (LEGITIMATE, SCANNER_SCAN),  # the scanner is banned while the agents' calls connect
    (SPOOFED,),
    (TRUNKING,),
    (DIALER_BURST,),
    (SEQUENTIAL_DIALER, AGENT),
    (EMERGENCY,),  # after the dialer burst: its number is over its call rate
)


# -- the table ------------------------------------------------------------------------------------
# A row's cells: scenario, from, sent, answered (calls connected; messages answered), refused /
# dropped, expected (answered + refused / dropped). The result column says whether it is ``ok``.
@dataclass(slots=True)
class CallRow:
    """What a scenario's calls got, from the callers' traces and the engine's verdicts."""

    scenario: Scenario
    sent: int = 0
    connected: int = 0
    refused: Counter[tuple[int, str]] = field(default_factory=Counter)  # (status, rule) -> calls
    unanswered: int = 0
    emergency: int = 0
    sipp_failed: list[str] = field(default_factory=list)  # SIPp runs whose scenario failed a call
    retry_after: list[int] = field(default_factory=list)  # each 503's, as the caller logged it
    statuses: dict[str, int | None] = field(default_factory=dict)  # Call-ID -> final status

    @property
    def name(self) -> str:
        return self.scenario.name

    @property
    def expected(self) -> tuple[int, Counter[tuple[int, str]], int]:
        refused = Counter({(status, rule): n for n, status, rule in self.scenario.expect_refused})
        return self.scenario.expect_connected, refused, self.scenario.expect_emergency

    @property
    def ok(self) -> bool:
        seen = (self.connected, self.refused, self.emergency)
        return seen == self.expected and self.sent == self.scenario.sent and not self.sipp_failed

    def cells(self) -> tuple[str, str, str, str, str, str]:
        connected, refused, _ = self.expected
        return (
            self.name,
            self.scenario.account,
            str(self.sent),
            str(self.connected),
            _refusals(self.refused, self.unanswered),
            f"{connected} + {_refusals(refused)}",
        )

    def notes(self) -> list[str]:
        notes = [self.scenario.who]
        refused_503 = sum(n for (status, _), n in self.refused.items() if status == 503)
        if refused_503:
            seconds = ", ".join(str(s) for s in sorted(set(self.retry_after))) or "none"
            notes.append(f"{len(self.retry_after)} of {refused_503} × 503 carried Retry-After ({seconds} s)")
        if self.scenario.expect_emergency:
            notes.append(f"{self.emergency} × call.emergency: passed unjudged and uncounted")
        notes += [
            f"a SIPp run failed a call its scenario expected to go otherwise: {f}" for f in self.sipp_failed
        ]
        return notes


def _refusals(refused: Counter[tuple[int, str]], unanswered: int = 0) -> str:
    parts = [f"{n} × {status} {rule}" for (status, rule), n in sorted(refused.items())]
    parts += [f"{unanswered} × no answer"] if unanswered else []
    return ", ".join(parts) or "0"


BAN_CELLS = {"user-agent": "UA ban", "rate": "rate ban"}  # the flood guard's reasons, in the table


@dataclass(slots=True)
class ScanRow:
    """What the scanner got: from svmap's log, and sipguard's ban of its address."""

    scan: Scan
    problem: str | None = None  # why the scan did not run as it should: shown in the table
    sent: int = 0  # messages, as svmap logged them
    answered: int = 0  # answers svmap received
    ban: Ban | None = None  # sipguard's ban of the scanner's address
    output: Path | None = None  # svmap's log

    @property
    def name(self) -> str:
        return self.scan.name

    @property
    def ok(self) -> bool:
        ban = self.ban
        return (
            self.problem is None
            and (self.sent, self.answered) == (len(self.scan.methods), 0)
            and ban is not None
            and (ban.reason, ban.dropped) == (self.scan.expect_ban, self.sent)
        )

    def cells(self) -> tuple[str, str, str, str, str, str]:
        ban = self.ban
        if self.problem is not None:
            got = self.problem
        elif ban is None:
            got = "0 dropped, no ban"
        else:
            got = f"{ban.dropped} dropped, {BAN_CELLS.get(ban.reason, ban.reason)}"
        expected = f"0 + {len(self.scan.methods)} dropped, {BAN_CELLS[self.scan.expect_ban]}"
        return (self.name, self.scan.source, str(self.sent), str(self.answered), got, expected)

    def notes(self) -> list[str]:
        if self.output is None:  # it never ran
            return ["SIPVicious svmap is not installed, so no scan ran: pip install sipvicious"]
        notes = [self.scan.who]
        ban = self.ban
        if ban is not None:
            notes.append(
                f"banned {ban.until - ban.since:.0f} s for its {ban.reason} ({ban.detail}): "
                f"{ban.dropped} messages dropped, {self.answered} answered"
            )
        if not self.ok:
            notes.append(f"svmap's log: {self.output}")
        return notes


DemoRow = CallRow | ScanRow
