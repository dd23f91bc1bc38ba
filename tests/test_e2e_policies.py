"""End to end: sipguard's policies, with real SIPp customers and a SIPp stand-in PBX.

Each test writes a small policy file to tmp_path, runs ``sipguard run --config FILE
--log-format json --log-level debug`` and the PBX (sipp-scenarios/uas_pbx.xml; for the
maximum call duration, uas_max_duration.xml, which waits for sipguard's BYE; for the
keepalive, uas_keepalive*.xml, which answer its probes or stop answering them), places
calls with SIPp from the customers' loopback addresses (acme 127.0.0.2, globex
127.0.0.3), and checks both sides of every call: how SIPp saw it end (the final response
to each INVITE in its message trace; the scenarios fail a call that ends any other way)
and how sipguard judged it (its ``call.decision`` line: verdict, rule, counters, and the
rules that also fired, with their modes). The PBX side must show exactly the calls that
were let through, none carrying an identity a customer asserted.

The scenario files and what each shows are listed in sipp-scenarios/README.md.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from policy_e2e import (
    ACME,
    GLOBEX,
    PolicyLab,
    also,
    assert_calls,
    assert_pbx_clean,
    counters,
    decision_of,
    decisions,
    final_responses,
    final_statuses,
    only_call_id,
)
from sipp import LOOPBACK, GuardLog, SippResult, TracedMessage, wait_until

pytestmark = [
    pytest.mark.sipp,
]

ACME_NUMBER = "+14155550100"
ACME_OTHER_NUMBER = "+14155550101"
GLOBEX_NUMBER = "+16505550100"
NOBODYS_NUMBER = "+14155550666"  # owned by no account


def assert_guard_clean(log: GuardLog, ended_by_bye: int) -> None:
    """A clean stop: exit 0, only JSON on stderr, no internal or policy error, no call left,
    and ``ended_by_bye`` calls (those that connected) ended by BYE."""
    assert log.returncode == 0, log.summary()
    assert log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0, log.summary()
    assert log.named("policy.error") == [] and log.named("proxy.drain_timeout") == [], log.summary()
    assert log.stopped["live_calls"] == 0, log.summary()
    assert log.counter("calls_ended_bye") == log.counter("calls_answered") == ended_by_bye, log.summary()


def assert_slot_held_then_freed(
    log: GuardLog, first: SippResult, busy: SippResult, again: SippResult
) -> tuple[str, str]:
    """A call sipguard ended itself held its number's one slot while it was up (``busy``,
    made meanwhile, got 486 from concurrency) and gave it back (``again``, after it, connected
    at 1 of 1). Returns the Call-IDs of the first call and of ``again``."""
    assert_calls(first, [200])
    assert_calls(busy, [486])
    assert_calls(again, [200])
    first_id, again_id = only_call_id(first), only_call_id(again)
    refused = decision_of(log, only_call_id(busy))
    assert (refused["verdict"], refused["rule"]) == ("reject", "concurrency")
    assert index_of(log, "call.decision", only_call_id(busy)) < index_of(log, "call.ended", first_id)
    assert counters(decision_of(log, again_id))[f"concurrency: calls from {ACME_NUMBER}"] == (1, 1)
    return first_id, again_id


def pbx_call_ids(pbx: SippResult) -> set[str]:
    return {m.headers("call-id")[0] for m in pbx.requests("received", "INVITE")}


# acme with one number, one call at a time and one call a minute from it
ONE_CALL_AT_A_TIME = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["{ACME_NUMBER}"]
rules:
  caller_id: {{}}
  concurrency: {{per_number: 1, per_account: null}}
  call_rate:
    per_number: {{per_minute: 1, burst: 1}}
    per_account: null
"""


def index_of(log: GuardLog, event: str, call_id: str) -> int:
    """Where in the log the one ``event`` line about ``call_id`` is."""
    (found,) = [i for i, e in enumerate(log.events) if (e.get("event"), e.get("call_id")) == (event, call_id)]
    return found


# -- 1. caller-ID spoofing ------------------------------------------------------------------------
TWO_ACCOUNTS = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["{ACME_NUMBER}"]
  globex:
    sources: [{GLOBEX}/32]
    numbers: ["{GLOBEX_NUMBER}"]
rules:
  caller_id: {{}}
"""


def test_spoofed_caller_refused_owned_caller_connects(policy_lab: PolicyLab) -> None:
    """acme presenting globex's number is refused 403 while acme's own call, from the same
    address, is up; the same number from globex's address connects."""
    guard = policy_lab.start(TWO_ACCOUNTS)

    owned = policy_lab.call("uac_caller.xml", ACME_NUMBER, source=ACME, hold_ms=1500)
    guard.wait_for("call.decision", caller_e164=ACME_NUMBER, verdict="accept")
    spoofed = policy_lab.run("uac_spoofed.xml", GLOBEX_NUMBER, source=ACME)
    owner = policy_lab.run("uac_caller.xml", GLOBEX_NUMBER, source=GLOBEX)
    owned_result = owned.wait()

    log, pbx = policy_lab.finish()
    owned_id = only_call_id(owned_result)
    spoofed_id = only_call_id(spoofed)
    assert_calls(owned_result, [200])
    assert_calls(spoofed, [403])
    assert_calls(owner, [200])
    (refusal,) = final_responses(spoofed, 403)
    assert refusal.first_line == "SIP/2.0 403 Caller ID not permitted"
    refused = decision_of(log, spoofed_id)
    assert (refused["verdict"], refused["rule"], refused["account"], refused["source"]) == (
        "reject", "caller_id", "acme", ACME,
    )  # fmt: skip
    assert refused["detail"] == f"from {GLOBEX_NUMBER} not owned by acme"
    assert decisions(log, verdict="reject") == [refused]
    assert len(decisions(log)) == 3  # one per judged INVITE
    assert decision_of(log, owned_id)["account"] == "acme"
    assert decision_of(log, only_call_id(owner))["account"] == "globex"
    # the refused call never reached the PBX, and the spoofed call overlapped the owned one
    assert pbx_call_ids(pbx) == {owned_id, only_call_id(owner)}
    assert index_of(log, "call.decision", spoofed_id) < index_of(log, "call.ended", owned_id)
    assert_pbx_clean(pbx, 2)
    assert_guard_clean(log, ended_by_bye=2)


def test_customer_asserted_identity_is_stripped(policy_lab: PolicyLab) -> None:
    """RFC 3325: a customer's P-Asserted-Identity and Remote-Party-ID (here for a number it
    owns, so the call is allowed) are removed before the PBX sees the INVITE."""
    policy_lab.start(TWO_ACCOUNTS)

    caller = policy_lab.run("uac_caller_pai.xml", ACME_NUMBER, source=ACME)

    log, pbx = policy_lab.finish()
    assert_calls(caller, [200])
    sent = caller.requests("sent", "INVITE")[0]  # (retransmissions, if any, are copies)
    assert sent.headers("p-asserted-identity") == [f"<sip:{ACME_NUMBER}@{ACME};user=phone>"]
    assert sent.headers("remote-party-id") != []
    received = pbx.requests("received", "INVITE")[0]
    assert received.headers("call-id") == sent.headers("call-id")
    assert received.headers("p-asserted-identity") == received.headers("remote-party-id") == []
    assert received.headers("from") == sent.headers("from")  # the rest is untouched
    assert_pbx_clean(pbx, 1)  # also: uas_pbx.xml's own check passed (no failed call)
    assert_guard_clean(log, ended_by_bye=1)


def test_a_customers_message_loses_the_identity_it_asserts(policy_lab: PolicyLab) -> None:
    """RFC 3325 beyond INVITEs: a MESSAGE (or REFER, SUBSCRIBE...) from a customer reaches
    the PBX without the P-Asserted-Identity and Remote-Party-ID it carried, which the PBX
    would otherwise believe."""
    policy_lab.start(TWO_ACCOUNTS, pbx_scenario="uas_message.xml")

    sender = policy_lab.run("uac_message.xml", ACME_NUMBER, source=ACME)

    _, pbx = policy_lab.finish()
    assert sender.returncode == 0 and (sender.successful, sender.failed) == (1, 0), sender.summary()
    sent = sender.requests("sent", "MESSAGE")[0]
    assert sent.headers("p-asserted-identity") == [f"<sip:{ACME_NUMBER}@{ACME};user=phone>"]
    received = pbx.requests("received", "MESSAGE")[0]
    assert received.headers("call-id") == sent.headers("call-id")
    assert received.headers("p-asserted-identity") == received.headers("remote-party-id") == []
    assert received.headers("from") == sent.headers("from")
    assert pbx.stats["FailedCall(C)"] == pbx.stats["FailedRegexpShouldntMatch(C)"] == "0", pbx.summary()


# -- 2. trunking: simultaneous calls per number -----------------------------------------------------
def test_per_number_cap_third_call_busy_until_a_bye(policy_lab: PolicyLab) -> None:
    """acme may hold 2 calls per number (its ``limits:`` shorthand over a rule default of
    5). With two calls from one number up, a third from it gets 486 while another number's
    calls connect; once one of the two hangs up, the first number connects again while its
    other call is still up."""
    guard = policy_lab.start(f"""
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["+14155550100-+14155550199"]
            limits: {{concurrent_per_number: 2}}
        rules:
          concurrency: {{per_number: 5, per_account: null}}
        """)

    mark = guard.mark()
    long_call = policy_lab.call("uac_trunking.xml", ACME_NUMBER, hold_ms=6000)
    guard.wait_for("call.decision", since=mark, caller_e164=ACME_NUMBER, verdict="accept")
    mark = guard.mark()
    short_call = policy_lab.call("uac_trunking.xml", ACME_NUMBER, hold_ms=2500)
    guard.wait_for("call.decision", since=mark, caller_e164=ACME_NUMBER, verdict="accept")
    third = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    other_number = policy_lab.run("uac_trunking.xml", ACME_OTHER_NUMBER, calls=2, rate=20, hold_ms=500)
    short = short_call.wait()
    guard.wait_for("call.ended", call_id=only_call_id(short), reason="bye")
    again = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    long = long_call.wait()

    log, pbx = policy_lab.finish()
    assert_calls(long, [200])
    assert_calls(short, [200])
    assert_calls(third, [486])
    assert_calls(other_number, [200, 200])
    assert_calls(again, [200])
    # exactly the third call was refused, by the per-number cap, counting the two held calls
    third_id = only_call_id(third)
    busy = decision_of(log, third_id)
    assert (busy["verdict"], busy["rule"], busy["detail"]) == (
        "reject", "concurrency", f"calls from {ACME_NUMBER}: 3 > 2",
    )  # fmt: skip
    assert counters(busy) == {f"concurrency: calls from {ACME_NUMBER}": (3, 2)}
    assert decisions(log, verdict="reject") == [busy]
    assert len(decisions(log)) == 6  # one per judged INVITE
    (answer,) = final_responses(third, 486)
    assert answer.first_line == "SIP/2.0 486 Too many simultaneous calls"
    # the other number counted its own calls only
    other_counts = [counters(decision_of(log, cid)) for cid in final_statuses(other_number)]
    short_ended = index_of(log, "call.ended", only_call_id(short))
    assert all(index_of(log, "call.decision", cid) < short_ended for cid in final_statuses(other_number))
    other_key = f"concurrency: calls from {ACME_OTHER_NUMBER}"
    assert sorted(c[other_key] for c in other_counts) == [(1, 2), (2, 2)]
    # after the BYE, the new call took the freed slot next to the long call, still up
    again_id = only_call_id(again)
    assert counters(decision_of(log, again_id)) == {f"concurrency: calls from {ACME_NUMBER}": (2, 2)}
    assert index_of(log, "call.decision", again_id) < index_of(log, "call.ended", only_call_id(long))
    assert third_id not in pbx_call_ids(pbx)
    assert_pbx_clean(pbx, 5)
    assert_guard_clean(log, ended_by_bye=5)


# -- 3. dialer bursts: call rate ------------------------------------------------------------------
def test_dialer_burst_gets_503_retry_after_then_service_resumes(policy_lab: PolicyLab) -> None:
    """60 calls a minute per number with a burst of 3: a dialer's 6 back-to-back calls get
    3 through and 3 refused 503 with Retry-After: 1 (a full bucket frees a place within a
    second). Another number is not affected; the dialer's number is served again once the
    window has passed (polled with bounded retries, which do not count against it)."""
    policy_lab.start(f"""
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["+14155550100-+14155550199"]
        rules:
          call_rate:
            per_number: {{per_minute: 60, burst: 3}}
            per_account: null
        """)

    burst = policy_lab.run("uac_dialer.xml", ACME_NUMBER, calls=6, rate=100, hold_ms=100)
    burst_over = time.monotonic()
    other_number = policy_lab.run("uac_dialer.xml", ACME_OTHER_NUMBER)
    refused = final_responses(burst, 503)
    assert refused and refused[0].headers("retry-after"), burst.summary()
    retry_after = int(refused[0].headers("retry-after")[0])
    probes: list[SippResult] = []

    def served_again() -> bool:  # one more call from the dialer: refused until the window ends
        probes.append(policy_lab.run("uac_dialer.xml", ACME_NUMBER))
        return list(final_statuses(probes[-1]).values()) == [200]

    wait_until(served_again, retry_after + 2, f"a call served again within Retry-After ({retry_after} s) + 2")
    assert time.monotonic() - burst_over < retry_after + 2

    log, pbx = policy_lab.finish()
    statuses = assert_calls(burst, [200, 200, 200, 503, 503, 503])
    assert_calls(other_number, [200])
    for probe in probes[:-1]:  # refused while the window lasted: 503 with Retry-After too
        assert_calls(probe, [503])
    refusals = final_responses(burst, 503) + [final_responses(p, 503)[0] for p in probes[:-1]]
    for refusal in refusals:
        assert refusal.first_line == "SIP/2.0 503 Call rate exceeded"
        assert refusal.headers("retry-after") == ["1"], refusal.text
    key = f"call_rate: calls from {ACME_NUMBER}"
    for call_id, status in statuses.items():
        decision = decision_of(log, call_id)
        if status == 503:
            assert (decision["verdict"], decision["rule"]) == ("reject", "call_rate")
            count, limit = counters(decision)[key]
            assert (count > limit, limit) == (True, 3)
        else:
            assert decision["verdict"] == "accept"
    assert len(decisions(log, verdict="reject")) == 3 + len(probes) - 1
    assert len(decisions(log)) == 6 + 1 + len(probes)  # one per judged INVITE
    # served again: the bucket had room for one call again, no more
    assert decision_of(log, only_call_id(probes[-1]))["verdict"] == "accept"
    assert counters(decision_of(log, only_call_id(probes[-1])))[key][0] <= 3
    assert_pbx_clean(pbx, 3 + 1 + 1)
    assert_guard_clean(log, ended_by_bye=5)


def test_a_bye_the_pbx_refuses_keeps_the_slot_until_one_it_accepts(policy_lab: PolicyLab) -> None:
    """The PBX answers the caller's first BYE 500 (as to a stale CSeq): the call is still up
    there, so it keeps its slot, and a second call from the number gets 486. The second BYE,
    answered 200, ends the call; the number connects again. (A BYE freeing the slot as it
    passed would let a BYE crafted to be refused lift every concurrency cap.)"""
    guard = policy_lab.start(
        f"""
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["{ACME_NUMBER}"]
        rules:
          caller_id: {{}}
          concurrency: {{per_number: 1, per_account: null}}
        """,
        pbx_scenario="uas_bye_refused.xml",
    )
    mark = guard.mark()
    holder = policy_lab.call("uac_bye_refused.xml", ACME_NUMBER, hold_ms=200)
    refused_bye = guard.wait_for("call.bye_refused", since=mark)
    busy = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    holder_result = holder.wait()
    again = policy_lab.run("uac_bye_refused.xml", ACME_NUMBER)

    log, pbx = policy_lab.finish()
    assert_calls(holder_result, [200])
    assert_calls(busy, [486])
    assert_calls(again, [200])
    holder_id = only_call_id(holder_result)
    assert (refused_bye["call_id"], refused_bye["status"], refused_bye["by"]) == (holder_id, 500, "caller")
    assert counters(decision_of(log, only_call_id(busy))) == {
        f"concurrency: calls from {ACME_NUMBER}": (2, 1)
    }
    # refused while the holder's call was up on the PBX, between its two BYEs
    assert index_of(log, "call.bye_refused", holder_id) < index_of(log, "call.decision", only_call_id(busy))
    assert index_of(log, "call.decision", only_call_id(busy)) < index_of(log, "call.ended", holder_id)
    assert log.counter("byes_refused") == 2
    assert_pbx_clean(pbx, 2)
    assert_guard_clean(log, ended_by_bye=2)


# -- 4. emergency calls -----------------------------------------------------------------------------
def test_emergency_call_connects_past_the_proxys_own_call_limit(policy_lab: PolicyLab) -> None:
    """proxy.max_calls: 1 and one call up: a normal call gets 503 Call Limit Reached, the
    call to 911 connects (the core asks the policy whether a call it would refuse is an
    emergency call)."""
    guard = policy_lab.start(ONE_CALL_AT_A_TIME, proxy_settings="max_calls: 1")
    mark = guard.mark()
    holder = policy_lab.call("uac_caller.xml", ACME_NUMBER, hold_ms=4000)
    guard.wait_for("call.decision", since=mark, caller_e164=ACME_NUMBER, verdict="accept")
    refused = policy_lab.run("uac_refused.xml", ACME_NUMBER)  # refused before any rule is asked
    emergency = policy_lab.run("uac_caller.xml", ACME_NUMBER, dialled="911")
    holder_result = holder.wait()

    log, pbx = policy_lab.finish()
    assert_calls(holder_result, [200])
    assert_calls(refused, [503])
    (limit_reached,) = final_responses(refused, 503)
    assert limit_reached.first_line == "SIP/2.0 503 Call Limit Reached", limit_reached.text
    assert_calls(emergency, [200])
    assert [entry["call_id"] for entry in log.named("call.emergency")] == [only_call_id(emergency)]
    assert pbx_call_ids(pbx) == {only_call_id(holder_result), only_call_id(emergency)}
    assert_guard_clean(log, ended_by_bye=2)


def test_emergency_call_connects_over_every_limit_and_is_not_counted(policy_lab: PolicyLab) -> None:
    """A caller at its concurrency cap and over its call rate is refused a normal call, but
    its call to 911 connects; the emergency call takes no slot and no rate: a normal call
    placed while it is up sees the very same counters as the one before it."""
    guard = policy_lab.start(ONE_CALL_AT_A_TIME)

    mark = guard.mark()
    holder = policy_lab.call("uac_caller.xml", ACME_NUMBER, hold_ms=6000)
    guard.wait_for("call.decision", since=mark, caller_e164=ACME_NUMBER, verdict="accept")
    before = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    mark = guard.mark()
    emergency = policy_lab.call("uac_caller.xml", ACME_NUMBER, dialled="911", hold_ms=3000)
    flagged = guard.wait_for("call.emergency", since=mark)
    after = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    emergency_result = emergency.wait()
    holder_result = holder.wait()

    log, pbx = policy_lab.finish()
    assert_calls(holder_result, [200])
    assert_calls(before, [486])
    assert_calls(emergency_result, [200])
    assert_calls(after, [486])
    emergency_id = only_call_id(emergency_result)
    assert (flagged["call_id"], flagged["account"], flagged["source"]) == (emergency_id, "acme", ACME)
    assert decisions(log, call_id=emergency_id) == []  # not judged, so nothing counted
    assert len(decisions(log)) == 3 and len(log.named("call.emergency")) == 1
    # over every limit: refused by the first, the other named too
    refused_before = decision_of(log, only_call_id(before))
    assert (refused_before["verdict"], refused_before["rule"]) == ("reject", "concurrency")
    assert also(refused_before) == {"call_rate": "enforce"}
    assert counters(refused_before) == {
        f"concurrency: calls from {ACME_NUMBER}": (2, 1),
        f"call_rate: calls from {ACME_NUMBER}": (2, 1),
    }
    # while the emergency call was up, the next normal call saw the same counters
    refused_after = decision_of(log, only_call_id(after))
    assert index_of(log, "call.decision", only_call_id(after)) < index_of(log, "call.ended", emergency_id)
    assert counters(refused_after) == counters(refused_before)
    assert also(refused_after) == also(refused_before)
    (emergency_invite,) = [
        m for m in pbx.requests("received", "INVITE") if m.headers("call-id") == [emergency_id]
    ]
    assert emergency_invite.first_line.startswith("INVITE sip:911@"), emergency_invite.text
    assert pbx_call_ids(pbx) == {only_call_id(holder_result), emergency_id}
    assert_pbx_clean(pbx, 2)
    assert_guard_clean(log, ended_by_bye=2)


# -- 5. monitor mode --------------------------------------------------------------------------------
def test_monitor_mode_forwards_everything_and_logs_would_be_rejections(policy_lab: PolicyLab) -> None:
    """``mode_override: monitor``: three simultaneous calls from a number acme does not
    own, over a cap of 1 and a rate of 1, all connect; each call.decision is an accept
    that names every rule that would have refused it, in mode monitor."""
    policy_lab.start("mode_override: monitor\n" + ONE_CALL_AT_A_TIME)

    calls = policy_lab.run("uac_caller.xml", NOBODYS_NUMBER, calls=3, rate=20, hold_ms=1000)

    log, pbx = policy_lab.finish()
    statuses = assert_calls(calls, [200, 200, 200])
    in_order = sorted(statuses, key=lambda call_id: int(call_id.split("-", 1)[0]))
    found = [decision_of(log, call_id) for call_id in in_order]
    assert [(d["verdict"], d["rule"]) for d in found] == [("accept", None)] * 3
    assert [also(d) for d in found] == [
        {"caller_id": "monitor"},
        {"caller_id": "monitor", "concurrency": "monitor", "call_rate": "monitor"},
        {"caller_id": "monitor", "concurrency": "monitor", "call_rate": "monitor"},
    ]
    details = {entry["rule"]: entry["detail"] for entry in found[2]["also"]}
    assert details["caller_id"] == f"from {NOBODYS_NUMBER} not owned by acme"
    assert details["concurrency"] == f"calls from {NOBODYS_NUMBER}: 3 > 1"
    assert re.fullmatch(rf"calls from {re.escape(NOBODYS_NUMBER)}: \d+ > 1", details["call_rate"])
    assert decisions(log, verdict="reject") == [] and len(decisions(log)) == 3
    assert pbx_call_ids(pbx) == set(statuses)
    assert_pbx_clean(pbx, 3)
    assert_guard_clean(log, ended_by_bye=3)


# -- 6. reload ----------------------------------------------------------------------------------------
def test_sighup_with_broken_file_keeps_old_policy_then_applies_fixed_one(policy_lab: PolicyLab) -> None:
    """A typo in the file and SIGHUP: the reload fails with file:line and the old policy
    stays in force (a spoofed call is still refused 403). The file fixed to a different
    policy and SIGHUP again: the new one applies (the number that was spoofed is now
    acme's and connects; the one that was acme's is now refused)."""
    old_policy = f"""
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["{ACME_NUMBER}"]
        rules:
          caller_id: {{}}
        """
    guard = policy_lab.start(old_policy)
    first = policy_lab.run("uac_spoofed.xml", NOBODYS_NUMBER)

    path = policy_lab.path
    broken = path.read_text().replace("    numbers:", "    numbrs:")
    path.write_text(broken)
    line = next(i for i, text in enumerate(broken.splitlines(), 1) if "numbrs:" in text)
    mark = guard.mark()
    guard.send_signal(signal.SIGHUP)
    failed = guard.wait_for("policy.reload_failed", since=mark)
    still_refused = policy_lab.run("uac_spoofed.xml", NOBODYS_NUMBER)
    still_owned = policy_lab.run("uac_caller.xml", ACME_NUMBER)

    policy_lab.write_policy(old_policy.replace(ACME_NUMBER, NOBODYS_NUMBER))
    mark = guard.mark()
    guard.send_signal(signal.SIGHUP)
    guard.wait_for("policy.reloaded", since=mark)
    now_owned = policy_lab.run("uac_caller.xml", NOBODYS_NUMBER)
    now_refused = policy_lab.run("uac_spoofed.xml", ACME_NUMBER)

    log, pbx = policy_lab.finish()
    assert failed["errors"] == [
        f"{path}:{line}: accounts.acme.numbrs: unknown key 'numbrs' (did you mean 'numbers'?)"
    ]
    assert failed["kept"] == str(path)
    assert len(log.named("policy.reloaded")) == 1
    for result in (first, still_refused, now_refused):
        assert_calls(result, [403])
    assert_calls(still_owned, [200])
    assert_calls(now_owned, [200])
    refused_numbers = [(first, NOBODYS_NUMBER), (still_refused, NOBODYS_NUMBER), (now_refused, ACME_NUMBER)]
    for result, number in refused_numbers:
        refused = decision_of(log, only_call_id(result))
        assert (refused["rule"], refused["detail"]) == ("caller_id", f"from {number} not owned by acme")
    assert len(decisions(log)) == 5  # one per judged INVITE
    assert pbx_call_ids(pbx) == {only_call_id(still_owned), only_call_id(now_owned)}
    assert_pbx_clean(pbx, 2)
    assert_guard_clean(log, ended_by_bye=2)


# -- 7. maximum call duration -------------------------------------------------------------------------
def test_max_call_duration_byes_both_sides_and_frees_the_slot(policy_lab: PolicyLab) -> None:
    """``usage: {max_call_duration: 2}``: neither party ever hangs up (both SIPp scenarios
    wait for a BYE). Two seconds after the answer sipguard sends a BYE to each, as the
    other party would, answers nobody's, and logs the call ended ``max-duration``. While
    the call is up, a second call from the number is busy (``per_number: 1``); once it
    has ended, a third one connects: the slot was given back."""
    guard = policy_lab.start(
        f"""
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["{ACME_NUMBER}"]
        rules:
          usage: {{max_call_duration: 2}}
          concurrency: {{per_number: 1}}
        """,
        pbx_scenario="uas_max_duration.xml",
    )

    mark = guard.mark()
    first = policy_lab.call("uac_max_duration.xml", ACME_NUMBER)
    guard.wait_for("call.decision", since=mark, caller_e164=ACME_NUMBER, verdict="accept")
    busy = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    guard.wait_for("call.ended", since=mark, reason="max-duration")
    again = policy_lab.run("uac_max_duration.xml", ACME_NUMBER)
    first_result = first.wait()

    log, pbx = policy_lab.finish()
    assert_calls(first_result, [200])  # (the scenario also checked the BYE's Reason)
    first_id, again_id = assert_slot_held_then_freed(log, first_result, busy, again)
    # sipguard ended both calls itself, each about 2 s after its answer
    for call_id in (first_id, again_id):
        ended = log.events[index_of(log, "call.ended", call_id)]
        assert (ended["reason"], ended["level"]) == ("max-duration", "info"), ended
        assert 2.0 <= ended["duration"] < 4.0, ended
    # each party got one BYE from sipguard, in its own dialog's terms, and sent none
    assert pbx.requests("sent", "BYE") == []
    assert {m.headers("call-id")[0] for m in pbx.requests("received", "BYE")} == {first_id, again_id}
    for caller in (first_result, again):
        assert caller.requests("sent", "BYE") == []
        # to the caller, as if from the callee: the callee had sent no request, so CSeq 1
        to_caller = first_of(caller, "received", "BYE")
        invite, ok = first_of(caller, "sent", "INVITE"), first_of(caller, "received", "SIP/2.0 200")
        target = invite.headers("contact")[0]
        assert in_dialog(to_caller) == (target, ok.headers("to"), invite.headers("from"), "1")
        # to the callee, as if from the caller: above the INVITE's CSeq 1
        to_callee = first_of(pbx, "received", "BYE", caller)
        invite, ok = first_of(pbx, "received", "INVITE", caller), first_of(pbx, "sent", "SIP/2.0 200", caller)
        target = ok.headers("contact")[0].strip("<>")
        assert in_dialog(to_callee) == (target, invite.headers("from"), ok.headers("to"), "2")
        for bye in (to_caller, to_callee):
            assert_from_sipguard(bye, policy_lab.proxy)
    assert_pbx_clean(pbx, 2)  # and uas_max_duration.xml checked the Reason (no failed call)
    assert pbx.successful == 2
    # a clean stop; the 200s to sipguard's BYEs were absorbed, not dropped or relayed
    assert log.returncode == 0 and log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0 and log.named("policy.error") == [], log.summary()
    assert log.named("proxy.drain_timeout") == [] and log.named("message.dropped") == [], log.summary()
    assert log.stopped["live_calls"] == 0, log.summary()
    assert log.counter("calls_answered") == log.counter("calls_ended_max-duration") == 2, log.summary()


def in_dialog(request: TracedMessage) -> tuple[str, list[str], list[str], str]:
    """An in-dialog request's Request-URI, From, To and CSeq number."""
    method, uri, version = request.first_line.split()
    (cseq,) = request.headers("cseq")
    assert (version, cseq.split()[1]) == ("SIP/2.0", method), request.text
    return uri, request.headers("from"), request.headers("to"), cseq.split()[0]


def call_id(caller: SippResult) -> str:
    return caller.requests("sent", "INVITE")[0].headers("call-id")[0]


def first_of(result: SippResult, direction: str, start: str, call: SippResult | None = None) -> TracedMessage:
    """The first message ``result`` sent or received whose first line starts with ``start``
    (a method, or "SIP/2.0 200"): of the call ``call`` placed, if given."""
    wanted = None if call is None else [call_id(call)]
    return next(
        m
        for m in result.messages
        if m.direction == direction
        and m.first_line.startswith(start)
        and (wanted is None or m.headers("call-id") == wanted)
    )


MAX_DURATION_REASON = 'SIP;cause=200;text="Maximum call duration reached"'
KEEPALIVE_REASON = 'SIP;cause=408;text="Keepalive failed"'


def assert_from_sipguard(
    request: TracedMessage, proxy_port: int, reason: str | None = MAX_DURATION_REASON
) -> None:
    """A request sipguard wrote: one Via, its own, no Route (its Record-Route was the route
    set), and for a BYE the RFC 3326 Reason naming why (a probe has none)."""
    (via,) = request.headers("via")
    assert via.startswith(f"SIP/2.0/UDP {LOOPBACK}:{proxy_port};branch=z9hG4bK-sg"), request.text
    assert request.headers("route") == [] and request.headers("max-forwards") == ["70"], request.text
    assert request.headers("reason") == ([] if reason is None else [reason]), request.text


# -- 8. keepalive -------------------------------------------------------------------------------------
PROBED = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["{ACME_NUMBER}"]
rules:
  usage: {{keepalive: {{interval: 1, failed_limit: 2, timeout: 0.5}}}}
  concurrency: {{per_number: 1}}
"""


def of_call(result: SippResult, direction: str, start: str, call_id: str) -> list[TracedMessage]:
    """The messages of one call ``result`` sent or received whose first line starts with ``start``."""
    return [
        m
        for m in result.messages
        if m.direction == direction and m.first_line.startswith(start) and m.headers("call-id") == [call_id]
    ]


def answers_to_probes(result: SippResult, direction: str) -> list[TracedMessage]:
    """Responses to OPTIONS that ``result`` sent or received."""
    return [
        m
        for m in result.messages
        if m.direction == direction and m.method is None and m.headers("cseq")[0].endswith(" OPTIONS")
    ]


def assert_probes(caller: SippResult, pbx: SippResult, proxy_port: int, count: int) -> None:
    """The call ``caller`` placed was probed ``count`` times each way, each probe written as the
    other party would ask, with a CSeq below that party's own (0: the callee sent nothing, the
    caller only its INVITE's 1); the caller answered all of them."""
    call = call_id(caller)
    to_caller = of_call(caller, "received", "OPTIONS", call)
    to_callee = of_call(pbx, "received", "OPTIONS", call)
    assert (len(to_caller), len(to_callee)) == (count, count)
    assert len(of_call(caller, "sent", "SIP/2.0 200", call)) == count + 1  # and the BYE's
    invite, ok = first_of(caller, "sent", "INVITE"), first_of(caller, "received", "SIP/2.0 200")
    target = invite.headers("contact")[0]
    for probe in to_caller:
        assert in_dialog(probe) == (target, ok.headers("to"), invite.headers("from"), "0")
        assert_from_sipguard(probe, proxy_port, reason=None)
    invite, ok = first_of(pbx, "received", "INVITE", caller), first_of(pbx, "sent", "SIP/2.0 200", caller)
    target = ok.headers("contact")[0].strip("<>")
    for probe in to_callee:
        assert in_dialog(probe) == (target, invite.headers("from"), ok.headers("to"), "0")
        assert_from_sipguard(probe, proxy_port, reason=None)
    assert len({probe.top_via for probe in to_caller + to_callee}) == 2 * count  # a transaction each


def test_keepalive_ends_a_call_whose_callee_vanished_and_frees_the_slot(policy_lab: PolicyLab) -> None:
    """``usage: {keepalive: {interval: 1, failed_limit: 2, timeout: 0.5}}``: once answered,
    sipguard sends each party an in-dialog OPTIONS every second. The callee answers the first,
    then nothing more: the probes of 2 s and 3 s go unanswered for 0.5 s each, so 3.5 s after
    the answer (2.5 s, interval × failed_limit + timeout, after the callee was last heard)
    sipguard sends BYE to both sides naming why and logs the call ended ``keepalive-failed``.
    The caller answered every probe: its own call is not what failed. While the call is up a
    second call from the number is busy (``per_number: 1``); after it a third connects."""
    guard = policy_lab.start(PROBED, pbx_scenario="uas_keepalive_vanishing.xml")

    mark = guard.mark()
    first = policy_lab.call("uac_keepalive.xml", ACME_NUMBER)
    guard.wait_for("call.decision", since=mark, caller_e164=ACME_NUMBER, verdict="accept")
    busy = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    guard.wait_for("call.ended", since=mark, reason="keepalive-failed")
    again = policy_lab.run("uac_keepalive.xml", ACME_NUMBER)
    first_result = first.wait()

    log, pbx = policy_lab.finish()
    first_id, again_id = assert_slot_held_then_freed(log, first_result, busy, again)
    for call in (first_id, again_id):
        ended = log.events[index_of(log, "call.ended", call)]
        assert (ended["reason"], ended["status"], ended["level"]) == ("keepalive-failed", 408, "info"), ended
        assert 3.5 <= ended["duration"] < 5.0, ended
    for caller in (first_result, again):
        assert_probes(caller, pbx, policy_lab.proxy, 3)
        call = call_id(caller)
        assert len(of_call(pbx, "sent", "SIP/2.0 200", call)) == 1 + 1 + 1  # INVITE, first probe, BYE
        # each party got one BYE from sipguard, as the other would send it, and sent none
        assert of_call(caller, "sent", "BYE", call) == of_call(pbx, "sent", "BYE", call) == []
        to_caller, to_callee = first_of(caller, "received", "BYE"), first_of(pbx, "received", "BYE", caller)
        assert in_dialog(to_caller)[3] == "1" and in_dialog(to_callee)[3] == "2"  # above, not below
        for bye in (to_caller, to_callee):
            assert_from_sipguard(bye, policy_lab.proxy, reason=KEEPALIVE_REASON)
    # the answers to the probes were absorbed: neither party saw the other's
    assert answers_to_probes(first_result, "received") == answers_to_probes(again, "received") == []
    assert answers_to_probes(pbx, "received") == []
    assert_pbx_clean(pbx, 2)
    assert pbx.successful == 2
    assert log.returncode == 0 and log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0 and log.named("policy.error") == [], log.summary()
    assert log.named("proxy.drain_timeout") == [] and log.named("message.dropped") == [], log.summary()
    assert log.stopped["live_calls"] == 0, log.summary()
    assert log.counter("calls_answered") == log.counter("calls_ended_keepalive-failed") == 2, log.summary()


def test_keepalive_probes_answered_keep_the_call_until_its_own_bye(policy_lab: PolicyLab) -> None:
    """Both parties answer every probe: the call outlives interval × failed_limit + timeout
    (2.5 s) and ends when the callee hangs up after its third probe, by its own BYE."""
    policy_lab.start(PROBED, pbx_scenario="uas_keepalive.xml")
    result = policy_lab.run("uac_keepalive.xml", ACME_NUMBER)

    log, pbx = policy_lab.finish()
    assert_calls(result, [200])
    ended = log.events[index_of(log, "call.ended", only_call_id(result))]
    assert ended["reason"] == "bye" and ended["duration"] >= 3.0, ended
    assert_probes(result, pbx, policy_lab.proxy, 3)
    assert len(of_call(pbx, "sent", "SIP/2.0 200", call_id(result))) == 1 + 3  # INVITE and probes
    bye = first_of(result, "received", "BYE")
    assert len(bye.headers("via")) == 2 and bye.headers("reason") == [], bye.text  # the callee's, relayed
    assert answers_to_probes(result, "received") == answers_to_probes(pbx, "received") == []
    assert_pbx_clean(pbx, 1)
    assert_guard_clean(log, ended_by_bye=1)
    assert log.named("message.dropped") == [], log.summary()
