"""sipguard with a policy file between SIPp customers and a SIPp PBX, for the policy
end-to-end tests (tests/test_e2e_policies.py). Builds on tests/sipp.py.

Customers are told apart the way the policy file tells them apart, by source address:
each SIPp caller binds its own loopback address (``-i 127.0.0.2``, ``127.0.0.3``), and
the policy's ``sources:`` name those. Readiness and progress are read from sipguard's
JSON log as it is written (``wait_for``), never from fixed sleeps.
"""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sipp import (
    LOOPBACK,
    GuardLog,
    GuardProcess,
    Lab,
    Sipp,
    SippResult,
    free_ports,
    installed_sipguard,
    wait_until,
)

from proxy.cli import main

ACME = "127.0.0.2"  # the source address of customer account "acme"
GLOBEX = "127.0.0.3"  # ... and of "globex"
CALLEE = "+12125551234"  # whom the customers call (any real number that is not an emergency one)
PBX_CALLS = 100  # the stand-in PBX's -m: more than any test places; it is stopped at the end


def start_caller(
    lab: Lab,
    name: str,
    scenario: str,
    caller: str,
    *,
    proxy_port: int,
    source: str = ACME,
    dialled: str = CALLEE,
    calls: int = 1,
    rate: float = 10.0,
    hold_ms: int = 0,
    timeout: float = 20.0,
) -> Caller:
    """A SIPp UAC from the loopback address ``source`` (an account) presenting ``caller``,
    to the sipguard listening on ``proxy_port``; started in the background."""
    uac = Caller(
        lab.workdir,
        name,
        source=source,
        scenario=scenario,
        port=free_udp_port(source),
        calls=calls,
        remote=f"{LOOPBACK}:{proxy_port}",
        rate=rate,
        timeout=timeout,
        extra=["-key", "caller", caller, "-s", dialled, "-d", str(hold_ms)],
    )
    lab.sipps.append(uac)
    uac.start()
    return uac


class PolicyGuard(GuardProcess):
    """A running ``sipguard run --config FILE``, whose log can be waited on while it runs."""

    def mark(self) -> int:
        """Where the log is now: pass it as ``since`` to wait only for what comes next."""
        return len(self.events)

    def wait_for(self, event: str, *, since: int = 0, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first log line from ``since`` on named ``event`` whose ``fields`` match."""
        found: list[dict[str, Any]] = []

        def logged() -> bool:
            for entry in self.events[since:]:
                if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items()):
                    found.append(entry)
                    return True
            if self.exited:
                raise AssertionError(f"sipguard exited waiting for {event}:\n" + "\n".join(self.garbage))
            return False

        wait_until(logged, timeout, f"{event} {fields} in sipguard's log")
        return found[0]


def admin_address(guard: PolicyGuard) -> str:
    """HOST:PORT of the admin listener sipguard started (a policy's ``listen: 127.0.0.1:0``)."""
    started = guard.wait_for("admin.started")
    return f"{started['host']}:{started['port']}"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``sipguard ARGV`` in this process: exit status, stdout, stderr."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def free_udp_port(host: str) -> int:
    """A UDP port free on ``host`` right now. Asked of the caller's own address: a port
    another caller still holds on 127.0.0.2 looks free on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Caller(Sipp):
    """A SIPp UAC placing calls from the loopback address ``source``."""

    def __init__(self, workdir: Path, name: str, *, source: str, **options: Any) -> None:
        super().__init__(workdir, name, host=source, **options)


@dataclass
class PolicyLab:
    """One sipguard with a policy file, a stand-in PBX (uas_pbx.xml unless told, on
    ``pbx_host``) and the callers."""

    lab: Lab
    pbx_host: str = LOOPBACK
    pbx_calls: int = PBX_CALLS
    proxy: int = 0
    pbx_port: int = 0
    path: Path = field(default_factory=Path)
    guard: PolicyGuard | None = None
    pbx: Sipp | None = None
    _callers: int = 0

    def __post_init__(self) -> None:
        self.proxy, self.pbx_port = free_ports(2)
        if self.pbx_host != LOOPBACK:
            self.pbx_port = free_udp_port(self.pbx_host)
        self.path = self.lab.workdir / "policy.yaml"

    def write_policy(self, body: str, proxy_settings: str = "") -> Path:
        """The policy file: a ``proxy:`` section for this lab's ports (plus
        ``proxy_settings``, one ``key: value`` a line), then ``body``."""
        listen, upstream = f"udp:{LOOPBACK}:{self.proxy}", f"udp:{self.pbx_host}:{self.pbx_port}"
        section = f"proxy:\n  listen: [{listen}]\n  upstream: {upstream}\n"
        section += "".join(f"  {line.strip()}\n" for line in proxy_settings.splitlines() if line.strip())
        self.path.write_text(section + textwrap.dedent(body).lstrip("\n"))
        return self.path

    def start(
        self,
        body: str,
        *,
        pbx_scenario: str = "uas_pbx.xml",
        wall_clock: str | None = None,
        proxy_settings: str = "",
    ) -> PolicyGuard:
        """Write the policy, start the PBX and ``sipguard run --config`` (debug log: every
        judged INVITE gets a ``call.decision`` line), and wait until both are ready.
        ``wall_clock`` (ISO 8601) is passed as ``--wall-clock``, for calendar rules."""
        self.write_policy(body, proxy_settings)
        self.pbx = Sipp(
            self.lab.workdir, "pbx", scenario=pbx_scenario, port=self.pbx_port, calls=self.pbx_calls,
            timeout=120, host=self.pbx_host,
        )  # fmt: skip
        self.lab.sipps.append(self.pbx)
        self.pbx.start().wait_listening()
        argv = [installed_sipguard(), "run", "--config", str(self.path)]
        argv += ["--log-format", "json", "--log-level", "debug"]
        argv += ["--wall-clock", wall_clock] if wall_clock else []
        self.guard = PolicyGuard(argv, self.lab.workdir / "sipguard.log")
        self.lab.guards.append(self.guard)
        self.guard.start()
        self.guard.wait_for("policy.loaded")
        return self.guard

    def call(
        self,
        scenario: str,
        caller: str,
        *,
        source: str = ACME,
        dialled: str = CALLEE,
        calls: int = 1,
        rate: float = 10.0,
        hold_ms: int = 0,
        timeout: float = 20.0,
    ) -> Caller:
        """Start a SIPp UAC (it runs in the background): ``calls`` calls from ``caller``."""
        self._callers += 1
        name = f"uac-{self._callers}-{scenario.removesuffix('.xml')}"
        return start_caller(
            self.lab, name, scenario, caller, proxy_port=self.proxy, source=source, dialled=dialled,
            calls=calls, rate=rate, hold_ms=hold_ms, timeout=timeout,
        )  # fmt: skip

    def run(self, scenario: str, caller: str, **options: Any) -> SippResult:
        """Place the calls and wait for SIPp to finish."""
        return self.call(scenario, caller, **options).wait()

    def finish(self) -> tuple[GuardLog, SippResult]:
        """Stop sipguard (SIGTERM, drain), then the PBX; return both logs."""
        assert self.guard is not None and self.pbx is not None
        log = self.guard.stop()
        return log, self.pbx.stop()


# -- reading the outcome ---------------------------------------------------------------------------
def final_statuses(result: SippResult) -> dict[str, int]:
    """Call-ID -> status of the first final response to its INVITE that SIPp received."""
    statuses: dict[str, int] = {}
    for message in result.messages:
        if message.direction != "received" or message.method is not None:
            continue
        if not message.headers("cseq")[0].endswith("INVITE"):
            continue
        status = int(message.first_line.split()[1])
        if status >= 200:
            statuses.setdefault(message.headers("call-id")[0], status)
    return statuses


def final_responses(result: SippResult, status: int) -> list[Any]:
    """The first final response of each INVITE that was answered ``status``."""
    seen: set[str] = set()
    found = []
    for message in result.messages:
        if message.direction == "received" and message.first_line.startswith(f"SIP/2.0 {status} "):
            call_id = message.headers("call-id")[0]
            if call_id not in seen and message.headers("cseq")[0].endswith("INVITE"):
                seen.add(call_id)
                found.append(message)
    return found


def assert_calls(result: SippResult, statuses: list[int]) -> dict[str, int]:
    """SIPp finished cleanly, every call went the way its scenario allows, and the INVITEs'
    final responses were ``statuses``, in call order. Returns Call-ID -> status."""
    assert result.returncode == 0, result.summary()
    assert (result.successful, result.failed) == (len(statuses), 0), result.summary()
    outcome = final_statuses(result)
    assert [outcome[call_id] for call_id in in_call_order(outcome)] == statuses, (outcome, result.summary())
    return outcome


def in_call_order(call_ids: Iterable[str]) -> list[str]:
    """SIPp's Call-IDs (``N-pid@ip``) in the order its calls were placed."""
    return sorted(call_ids, key=lambda call_id: int(call_id.split("-", 1)[0]))


def only_call_id(result: SippResult) -> str:
    (call_id,) = final_statuses(result)
    return call_id


def decisions(log: GuardLog | PolicyGuard, **fields: Any) -> list[dict[str, Any]]:
    """The ``call.decision`` lines whose ``fields`` match."""
    return [
        entry
        for entry in log.events
        if entry.get("event") == "call.decision" and all(entry.get(k) == v for k, v in fields.items())
    ]


def decision_of(log: GuardLog | PolicyGuard, call_id: str) -> dict[str, Any]:
    (found,) = decisions(log, call_id=call_id)
    return found


def counters(decision: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """A decision's counters as ``{"<rule>: <what>": (count, limit)}``."""
    return {f"{c['rule']}: {c['what']}": (c["count"], c["limit"]) for c in decision["counters"]}


def also(decision: dict[str, Any]) -> dict[str, str]:
    """The other rules a decision names (``also``), rule -> mode."""
    return {entry["rule"]: entry["mode"] for entry in decision.get("also", [])}


def assert_pbx_clean(pbx: SippResult, invites: int) -> None:
    """The PBX got exactly ``invites`` INVITEs, none with an identity a customer asserted,
    and failed no call (uas_pbx.xml fails one that carries P-Asserted-Identity/RPID)."""
    received = pbx.requests("received", "INVITE")
    call_ids = [m.headers("call-id")[0] for m in received]
    assert len(set(call_ids)) == invites, call_ids
    for invite in received:
        assert invite.headers("p-asserted-identity") == [], invite.text
        assert invite.headers("remote-party-id") == [], invite.text
    assert pbx.stats, f"the PBX wrote no statistics:\n{pbx.summary()}"
    failed = (pbx.stats["FailedCall(C)"], pbx.stats["FailedRegexpShouldntMatch(C)"])
    assert failed == ("0", "0"), pbx.summary()
