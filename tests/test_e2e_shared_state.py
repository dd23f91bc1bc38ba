"""End to end: sipguard instances sharing their counters through one real redis-server.

Each test starts its own redis-server (tests/redis_server.py) on a loopback port, a SIPp
stand-in PBX (sipp-scenarios/uas_pbx.xml) and two ``sipguard run --config FILE``
instances whose policy files differ only in their listening port: both point at the same
PBX and the same Redis (``state: {url: ..., lease: 3}``). Customers are SIPp callers on
loopback addresses, as in tests/test_e2e_policies.py (acme 127.0.0.2, globex 127.0.0.3).

What is shown, for real: one per-number cap across the pair; a live instance's slots
outlive the lease (renewed), a SIGKILLed one's lapse within it (and not before: the
survivor refuses the number until then); Redis stopped under load (fail_mode open lets
calls through, closed answers 503 with Retry-After, every INVITE is answered well within
SIPp's retransmission timer) and restarted empty on its port (the instances reconnect by
themselves, put their live calls' slots back, and share the cap again).
Readiness and progress come from sipguard's JSON log (``policy.loaded``,
``call.decision``, ``call.ended``, ``state.breaker_open``, ``state.recovered``,
``state.leases_restored``), SIPp's traces and Redis itself, polled with deadlines; the
time that passes is the lease's or the breaker's, never a sleep.
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from policy_e2e import (
    ACME,
    GLOBEX,
    Caller,
    PolicyGuard,
    counters,
    decisions,
    final_responses,
    final_statuses,
    only_call_id,
    start_caller,
)
from redis_server import RedisServer, start_redis
from sipp import LOOPBACK, GuardLog, Lab, Sipp, SippResult, free_ports, installed_sipguard, wait_until

pytestmark = [pytest.mark.sipp]

ACME_NUMBER = "+14155550100"
ACME_LOAD_NUMBER = "+14155550101"  # the steady load's, apart from the number whose cap is checked
GLOBEX_NUMBER = "+16505550100"
CAP = 2  # live calls per caller number, across every instance
LEASE = 3.0  # seconds a dead instance's slots stay taken (renewed every LEASE / 3 while alive)
SIPP_T1 = 0.5  # the scenarios' INVITE retransmission timer (retrans="500")
BUSY = f"calls from {ACME_NUMBER}: {CAP + 1} > {CAP}"  # the detail of a refusal at the cap


@dataclass
class SharedLab:
    """A redis-server, a PBX, and sipguard instances sharing both."""

    lab: Lab
    redis: RedisServer
    pbx_port: int = 0
    pbx: Sipp | None = None
    guards: list[PolicyGuard] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    _callers: int = 0

    def start(self, body: str, instances: int = 2) -> list[PolicyGuard]:
        """The PBX, then ``instances`` sipguards: one policy file each, the same but for
        the listening port, sharing this lab's Redis."""
        self.pbx_port, *self.ports = free_ports(1 + instances)
        self.pbx = Sipp(
            self.lab.workdir, "pbx", scenario="uas_pbx.xml", port=self.pbx_port, calls=10_000, timeout=100
        )
        self.lab.sipps.append(self.pbx)
        self.pbx.start().wait_listening()
        for index, port in enumerate(self.ports):
            path = self.lab.workdir / f"policy-{index}.yaml"
            path.write_text(
                f"proxy:\n  listen: [udp:{LOOPBACK}:{port}]\n  upstream: udp:{LOOPBACK}:{self.pbx_port}\n"
                f"state:\n  url: {self.redis.url}\n  lease: {LEASE}\n  timeout: 0.25\n"
                + textwrap.dedent(body).lstrip("\n")
            )
            argv = [installed_sipguard(), "run", "--config", str(path), "--log-format", "json"]
            guard = PolicyGuard([*argv, "--log-level", "debug"], self.lab.workdir / f"sipguard-{index}.log")
            self.lab.guards.append(guard)
            self.guards.append(guard.start())
            guard.wait_for("policy.loaded")
        return self.guards

    def call(
        self,
        instance: int,
        scenario: str,
        caller: str,
        *,
        source: str = ACME,
        calls: int = 1,
        rate: float = 10.0,
        hold_ms: int = 0,
        timeout: float = 20.0,
    ) -> Caller:
        """Start a SIPp UAC placing ``calls`` calls from ``caller`` through one instance."""
        self._callers += 1
        return start_caller(
            self.lab, f"uac-{self._callers}-via-{instance}", scenario, caller,
            proxy_port=self.ports[instance], source=source, calls=calls, rate=rate, hold_ms=hold_ms,
            timeout=timeout,
        )  # fmt: skip

    def run(self, instance: int, scenario: str, caller: str, **options: Any) -> SippResult:
        return self.call(instance, scenario, caller, **options).wait()

    def restart_redis(self) -> None:
        """A new redis-server (empty: no persistence) on the port the instances use."""
        self.redis = start_redis(self.lab.workdir, self.redis.port)

    def stop_redis(self) -> None:
        self.redis.process.terminate()
        self.redis.process.wait(10)

    def slots_taken(self, number: str) -> int:
        """Slots under ``number``'s per-number cap in Redis: the size of the sorted set the
        store keeps for it (``sg:{sg}:`` + the concurrency rule's key)."""
        reply = self.redis.command("ZCARD", f"sg:{{sg}}:conc:num:{number}")
        assert reply.startswith(b":"), reply
        return int(reply[1:].split(b"\r\n", 1)[0])

    def finish(self) -> tuple[list[GuardLog], SippResult]:
        """Stop every live instance (SIGTERM, drain), then the PBX; return their logs."""
        logs = [guard.stop() for guard in self.guards if not guard.exited]
        assert self.pbx is not None
        return logs, self.pbx.stop()


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedLab]:
    lab = Lab(tmp_path)
    shared = SharedLab(lab, start_redis(tmp_path))
    yield shared
    lab.close()
    shared.redis.process.kill()
    shared.redis.process.wait(10)


def wait_events(
    guard: PolicyGuard, event: str, count: int, *, since: int = 0, timeout: float = 10.0, **fields: Any
) -> list[dict[str, Any]]:
    """At least ``count`` log lines from ``since`` on named ``event`` whose ``fields`` match."""
    found: list[dict[str, Any]] = []

    def logged() -> bool:
        found[:] = [
            entry
            for entry in guard.events[since:]
            if entry.get("event") == event and all(entry.get(k) == v for k, v in fields.items())
        ]
        if guard.exited:
            raise AssertionError(f"sipguard exited waiting for {event}:\n" + "\n".join(guard.garbage))
        return len(found) >= count

    wait_until(logged, timeout, f"{count} x {event} {fields} in sipguard's log")
    return found


def statuses_in_order(result: SippResult) -> list[int]:
    """The final status of each call's INVITE, in the order SIPp placed the calls."""
    outcome = final_statuses(result)
    return [outcome[call_id] for call_id in sorted(outcome, key=lambda cid: int(cid.split("-", 1)[0]))]


def assert_ran(result: SippResult, calls: int) -> list[int]:
    """SIPp finished cleanly, every call ended a way its scenario allows; the statuses."""
    assert result.returncode == 0, result.summary()
    assert (result.successful, result.failed) == (calls, 0), result.summary()
    statuses = statuses_in_order(result)
    assert len(statuses) == calls, result.summary()
    return statuses


def answer_delays(result: SippResult) -> dict[str, float]:
    """Call-ID -> seconds from its first INVITE sent to the INVITE's first final response."""
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    for message in result.messages:
        call_id = message.headers("call-id")[0]
        if message.direction == "sent" and message.method == "INVITE":
            sent.setdefault(call_id, message.at)
        elif (
            message.direction == "received"
            and message.method is None
            and message.headers("cseq")[0].endswith("INVITE")
            and int(message.first_line.split()[1]) >= 200
        ):
            answered.setdefault(call_id, message.at)
    assert set(answered) == set(sent), (sorted(sent), sorted(answered))
    return {call_id: answered[call_id] - sent[call_id] for call_id in sent}


def assert_clean(log: GuardLog) -> None:
    """A clean stop after a clean run: exit 0, only JSON, no internal or policy error,
    no decision that timed out, no call left."""
    assert log.returncode == 0, log.summary()
    assert log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0, log.summary()
    for event in ("policy.error", "policy.timeout", "proxy.drain_timeout"):
        assert log.named(event) == [], log.summary()
    assert log.stopped["live_calls"] == 0, log.summary()


CAP_POLICY = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["+14155550100-+14155550199"]
rules:
  concurrency: {{per_number: {CAP}, per_account: null, fail_mode: closed}}
"""
# fail_mode closed: should Redis fail these tests, calls get 503, never a quiet local count


# -- 1. one cap across the pair -----------------------------------------------------------------
def test_two_instances_share_one_per_number_cap(shared: SharedLab) -> None:
    """Six calls from one number at once, three through each instance, each held: exactly
    CAP connect across the pair, the four others get 486 (counting the two held calls,
    wherever they are). After the BYEs, the number connects again through each instance,
    one call apiece, and a third call is refused by either instance."""
    first, second = shared.start(CAP_POLICY)

    callers = [
        shared.call(i, "uac_trunking.xml", ACME_NUMBER, calls=3, rate=20, hold_ms=1500) for i in (0, 1)
    ]
    race = [caller.wait() for caller in callers]
    raced_statuses = [assert_ran(result, 3) for result in race]
    connected = [cid for result in race for cid, status in final_statuses(result).items() if status == 200]
    for call_id in connected:  # both BYEs passed ...
        for guard in (first, second):
            if decisions(guard, call_id=call_id):
                guard.wait_for("call.ended", call_id=call_id, reason="bye")
    wait_until(lambda: shared.slots_taken(ACME_NUMBER) == 0, 5.0, "the slots' release in Redis")

    mark = [guard.mark() for guard in (first, second)]
    held = [shared.call(i, "uac_trunking.xml", ACME_NUMBER, hold_ms=2500) for i in (0, 1)]
    for guard, since in zip((first, second), mark, strict=True):
        wait_events(guard, "call.decision", 1, since=since, verdict="accept")
    third = [shared.run(i, "uac_trunking.xml", ACME_NUMBER) for i in (0, 1)]
    held_results = [caller.wait() for caller in held]

    logs, pbx = shared.finish()
    assert sorted(raced_statuses[0] + raced_statuses[1]) == [200] * CAP + [486] * 4, raced_statuses
    # the PBX saw the connected calls only
    pbx_calls = {m.headers("call-id")[0] for m in pbx.requests("received", "INVITE")}
    accepted = {
        cid for r in [*race, *held_results] for cid, status in final_statuses(r).items() if status == 200
    }
    assert pbx_calls == accepted and len(accepted) == CAP + 2
    assert [assert_ran(result, 1) for result in held_results] == [[200], [200]]
    assert [assert_ran(result, 1) for result in third] == [[486], [486]]
    for result in [*race, *third]:
        for refusal in final_responses(result, 486):
            assert refusal.first_line == "SIP/2.0 486 Too many simultaneous calls"
    # each instance judged exactly the calls sent to it; every refusal counted the
    # CAP calls held across the pair
    for index, log in enumerate(logs):
        own = [race[index], held_results[index], third[index]]
        assert {d["call_id"] for d in decisions(log)} == {cid for r in own for cid in final_statuses(r)}
        for refused in decisions(log, verdict="reject"):
            assert (refused["rule"], refused["detail"]) == ("concurrency", BUSY), refused
            assert counters(refused) == {f"concurrency: calls from {ACME_NUMBER}": (CAP + 1, CAP)}
        assert log.named("state.unavailable") == [] and log.named("state.breaker_open") == []
        assert_clean(log)
    assert len(decisions(logs[0], verdict="reject")) + len(decisions(logs[1], verdict="reject")) == 4 + 2
    assert sum(log.counter("calls_ended_bye") for log in logs) == CAP + 2


# -- 2. a dead instance's slots lapse within the lease --------------------------------------------
def test_killed_instance_slots_lapse_within_the_lease(shared: SharedLab) -> None:
    """The first instance holds the number's CAP calls, longer than a lease (its renewals
    keep them: the survivor refuses the number past the lease). SIGKILL it: the survivor
    still refuses the number right after (the lease has not run out), then connects it
    within one lease of the kill, polled with a bound; both slots are free by then, and
    the survivor enforces the cap on its own calls."""
    victim, survivor = shared.start(CAP_POLICY)

    mark = victim.mark()
    doomed = shared.call(0, "uac_trunking.xml", ACME_NUMBER, calls=CAP, rate=20, hold_ms=60_000, timeout=90)
    wait_events(victim, "call.decision", CAP, since=mark, verdict="accept")
    # probes through the survivor, 2 a second for longer than a lease: all refused, so
    # the victim renews its leases (unrenewed, they would lapse LEASE after the INVITEs)
    renewed = shared.run(1, "uac_trunking.xml", ACME_NUMBER, calls=9, rate=2)

    victim.kill()  # SIGKILL: no BYE, no release, no more renewals
    killed_at = time.monotonic()
    probes: list[tuple[float, SippResult]] = []
    while True:
        result = shared.run(1, "uac_trunking.xml", ACME_NUMBER)
        probes.append((time.monotonic() - killed_at, result))
        if statuses_in_order(result) == [200]:
            break
        assert probes[-1][0] < LEASE + 1.0, f"slots still taken {probes[-1][0]:.1f} s after the kill"
    freed_after = probes[-1][0]
    wait_until(lambda: shared.slots_taken(ACME_NUMBER) == 0, 5.0, "the probe's slot's release")
    mark = survivor.mark()
    both = shared.call(1, "uac_trunking.xml", ACME_NUMBER, calls=CAP, rate=20, hold_ms=1500)
    wait_events(survivor, "call.decision", CAP, since=mark, verdict="accept")
    over = shared.run(1, "uac_trunking.xml", ACME_NUMBER)
    both_result = both.wait()

    (log,), _ = shared.finish()
    doomed_result = doomed.stop()  # its calls hung on the dead instance
    assert statuses_in_order(doomed_result) == [200] * CAP, doomed_result.summary()
    # the victim's slots outlived a lease while it lived ...
    assert assert_ran(renewed, 9) == [486] * 9
    invites = [m.at for m in renewed.requests("sent", "INVITE")] + [
        m.at for m in doomed_result.requests("sent", "INVITE")
    ]
    assert max(invites) - min(invites) > LEASE + 0.5
    # ... and after the kill: refused until the lease ran out, free within the lease
    assert [assert_ran(result, 1) for _, result in probes[:-1]] == [[486]] * (len(probes) - 1)
    assert len(probes) >= 2, "no call was refused after the kill: the slots lapsed at once"
    assert LEASE / 2 < freed_after < LEASE + 1.0, freed_after
    assert assert_ran(probes[-1][1], 1) == [200]
    assert assert_ran(both_result, CAP) == [200] * CAP
    assert assert_ran(over, 1) == [486]
    refusals = decisions(log, verdict="reject")
    assert len(refusals) == 9 + len(probes) - 1 + 1
    for refused in refusals:
        assert (refused["rule"], refused["detail"]) == ("concurrency", BUSY), refused
    assert log.named("state.unavailable") == []
    assert_clean(log)
    assert log.counter("calls_ended_bye") == 1 + CAP


# -- 3. Redis away under load, then back ----------------------------------------------------------
OUTAGE_POLICY = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["+14155550100-+14155550199"]
    rules: {{concurrency: {{fail_mode: open}}}}
  globex:
    sources: [{GLOBEX}/32]
    numbers: ["+16505550100-+16505550199"]
    rules: {{concurrency: {{fail_mode: closed}}}}
rules:
  concurrency: {{per_number: {CAP}, per_account: null}}
"""


def test_redis_stopped_under_load_then_restarted(shared: SharedLab) -> None:
    """A steady 10 calls a second through each instance (acme, fail_mode open, through
    the first; globex, fail_mode closed, through the second), and one long acme call
    through the first. Redis is stopped once both instances have been served through it,
    and restarted (empty) on its port once both breakers opened and each fail mode
    showed: acme's calls keep connecting (counted on the instance alone), globex's are
    refused 503 with Retry-After; every INVITE of both runs is answered well within
    SIPp's retransmission timer. Both instances reconnect by themselves, globex connects
    again, the first instance puts its long call's slot back into the new Redis, and the
    cap is enforced across the pair again, counting that call."""
    first, second = shared.start(OUTAGE_POLICY)
    calls = 100  # 10 s: the outage, plus the breaker's 5 s before it probes Redis again

    mark = first.mark()
    spanning = shared.call(0, "uac_trunking.xml", ACME_NUMBER, hold_ms=12_000, timeout=40)
    (spanning_decision,) = wait_events(first, "call.decision", 1, since=mark, verdict="accept")
    marks = [guard.mark() for guard in (first, second)]
    loads = [
        shared.call(0, "uac_dialer.xml", ACME_LOAD_NUMBER, source=ACME, calls=calls, rate=10, timeout=40),
        shared.call(1, "uac_dialer.xml", GLOBEX_NUMBER, source=GLOBEX, calls=calls, rate=10, timeout=40),
    ]
    for guard, since in zip((first, second), marks, strict=True):
        wait_events(guard, "call.decision", 5, since=since, verdict="accept")
    shared.stop_redis()
    opened = [wait_events(guard, "state.breaker_open", 1) for guard in (first, second)]
    wait_events(first, "state.unavailable", 3, counted="locally")
    wait_events(second, "state.unavailable", 3, refused_by=["concurrency"])
    shared.restart_redis()
    recovered = [wait_events(guard, "state.recovered", 1, timeout=15) for guard in (first, second)]
    # the new Redis is empty: the first instance's lease renewal puts the long call back
    (restored,) = wait_events(first, "state.leases_restored", 1, timeout=5)

    # sharing again: the long call through the first instance, one more through the
    # second; a third is refused by either
    mark = second.mark()
    held = shared.call(1, "uac_trunking.xml", ACME_NUMBER, hold_ms=1500)
    # (acme's: globex's load may still be passing through the second instance)
    wait_events(second, "call.decision", 1, since=mark, verdict="accept", account="acme")
    third = [shared.run(i, "uac_trunking.xml", ACME_NUMBER) for i in (0, 1)]
    held_result = held.wait()
    acme_load, globex_load = (load.wait() for load in loads)
    spanning_result = spanning.wait()

    logs, _ = shared.finish()
    # fail open: every acme call connected, before, during and after the outage
    assert assert_ran(acme_load, calls) == [200] * calls
    # fail closed: globex connected, then 503 while Redis was away, then connected again
    globex = assert_ran(globex_load, calls)
    refused_from, refused_to = globex.index(503), len(globex) - globex[::-1].index(503)
    assert globex == [200] * refused_from + [503] * (refused_to - refused_from) + [200] * (calls - refused_to)
    assert refused_from > 0 and refused_to < calls, globex
    for refusal in final_responses(globex_load, 503):
        assert refusal.first_line == "SIP/2.0 503 Service Unavailable"
        assert refusal.headers("retry-after") == ["5"], refusal.text
    refused_ids = {m.headers("call-id")[0] for m in final_responses(globex_load, 503)}
    unavailable = logs[1].named("state.unavailable")
    assert {e["call_id"] for e in unavailable if e.get("refused_by") == ["concurrency"]} == refused_ids
    # the local count let acme through on the first instance while Redis was away
    counted_locally = [e for e in logs[0].named("state.unavailable") if e.get("counted") == "locally"]
    assert len(counted_locally) >= 3
    for entry in counted_locally:
        (decision,) = decisions(logs[0], call_id=entry["call_id"])
        assert decision["verdict"] == "accept"
    # no stall: every INVITE was answered well before SIPp would have retransmitted it
    for load in (acme_load, globex_load):
        delays = answer_delays(load)
        assert len(delays) == calls
        slowest = max(delays.items(), key=lambda item: item[1])
        assert slowest[1] < SIPP_T1 / 2, slowest
        sent = Counter(m.headers("call-id")[0] for m in load.requests("sent", "INVITE"))
        assert set(sent.values()) == {1}, "an INVITE was retransmitted"
    # each instance's breaker opened, then it reconnected to the restarted Redis
    for open_lines, back in zip(opened, recovered, strict=True):
        assert open_lines[0]["failures"] >= 3 and back[0]["after_failures"] >= 3
    assert restored["slots"] == 1
    # sharing resumed, counting the call that lived through the outage
    assert assert_ran(spanning_result, 1) == [200]
    assert only_call_id(spanning_result) == spanning_decision["call_id"]
    assert assert_ran(held_result, 1) == [200]
    (held_decision,) = decisions(logs[1], call_id=only_call_id(held_result))
    assert counters(held_decision) == {f"concurrency: calls from {ACME_NUMBER}": (2, CAP)}
    assert [assert_ran(result, 1) for result in third] == [[486], [486]]
    for log, result in zip(logs, third, strict=True):
        (refused,) = decisions(log, call_id=only_call_id(result))
        assert (refused["rule"], refused["detail"]) == ("concurrency", BUSY), refused
    for log in logs:
        assert_clean(log)
