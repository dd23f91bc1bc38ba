"""The policy engine (proxy/engine.py) with the in-memory store: verdicts by mode,
emergency bypass, identity stripping, slots held and released, reloads, account
resolution, and the one decision line each call logs.

Policies are compiled from Python dicts with proxy.policyfile.compile_policy (the file
format itself is tested in test_policyfile.py); INVITEs are wire bytes built with
sipsim and parsed with proxy.sip.parse_message; ``now`` is passed in.
"""

from __future__ import annotations

import asyncio
import copy
import gc
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest
from sipsim import CALLER_TAG, OUR_RR, Sim, in_dialog_from_customer, invite, only_send, parse_request
from structlog.testing import capture_logs

from policies.usage import UsagePolicy
from proxy.engine import TAG_HEADER, PolicyEngine
from proxy.policyfile import CompiledPolicy, compile_policy
from proxy.sip import Request, parse_message
from proxy.sip.events import (
    Accept,
    Address,
    CallAnswered,
    CallAttempt,
    CallEnded,
    CallInfo,
    EndReason,
    Reject,
    Verdict,
)
from proxy.state import MemoryStore

T0 = 5000.0
CUSTOMER = Address("udp", "192.0.2.10", 5060)  # acme
OFFICE = Address("udp", "192.0.2.200", 5060)  # acme-office: 192.0.2.128/25 inside acme's /24
ELSEWHERE = Address("udp", "198.51.100.7", 5060)  # no network of any account
LONDON = Address("udp", "2001:db8::5", 5060)
CUSTOMER_VIA_IPV6 = Address("tcp", "::ffff:192.0.2.10", 5060)  # acme, as a [::] listener sees it
OWNED = "+14155550142"  # acme's
OWNED_TOO = "+14155550143"
NOT_OWNED = "+14155559999"
CALLEE = "+14155552000"
STRIP = ("p-asserted-identity", "remote-party-id", "x-sipguard-tag")

ACCOUNTS: dict[str, Any] = {
    "acme": {"sources": ["192.0.2.0/24"], "numbers": ["+14155550100-+14155550199"]},
    "acme-office": {"sources": ["192.0.2.128/25"], "numbers": ["+14155550200-+14155550299"]},
    "beta": {"auth_usernames": ["beta-trunk"], "numbers": ["+14155550300-+14155550399"]},
    "gamma": {"from_domains": ["gamma.example"], "numbers": ["+14155550400-+14155550499"]},
    "london": {"sources": ["2001:db8::/32"], "region": "GB", "numbers": ["02079460000-02079460999"]},
}


def policy(rules: dict[str, Any], accounts: dict[str, Any] | None = None, **top: Any) -> CompiledPolicy:
    data = {"accounts": ACCOUNTS if accounts is None else accounts, "rules": rules, **top}
    return compile_policy(data, {}, "test.yaml")


def engine_for(rules: dict[str, Any], accounts: dict[str, Any] | None = None, **top: Any) -> PolicyEngine:
    return PolicyEngine(policy(rules, accounts, **top))


def attempt(
    name: str,
    *,
    caller: str = OWNED,
    callee: str = CALLEE,
    source: Address = CUSTOMER,
    from_: str | None = None,
    uri: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    now: float = T0,
) -> CallAttempt:
    data = invite(
        uri=uri or f"sip:{callee}@pbx.example.com",
        from_=from_ or f"<sip:{caller}@customer.example>",
        call_id=f"{name}@192.0.2.10",
        headers=headers,
    )
    request = parse_message(data)
    assert isinstance(request, Request)
    return CallAttempt(attempt_id=f"attempt-{name}", request=request, source=source, now=now)


def decide(engine: PolicyEngine, call: CallAttempt) -> Verdict:
    verdict = engine.decide_now(call)
    assert verdict is not None  # the memory store answers at once
    return verdict


def call_info(call: CallAttempt) -> CallInfo:
    """The call as the core reports it in CallAnswered and CallEnded."""
    return CallInfo(
        call_id=call.request.call_id,
        from_tag=CALLER_TAG,
        attempt_id=call.attempt_id,
        source=call.source,
        from_customer=True,
        started_at=call.now,
    )


def end(
    engine: PolicyEngine,
    call: CallAttempt,
    now: float | None = None,
    *,
    reason: EndReason = EndReason.BYE,
    status: int | None = None,
    answered_at: float | None = None,
) -> None:
    ended = CallEnded(
        call=call_info(call), reason=reason, now=now or call.now + 60, status=status, answered_at=answered_at
    )
    engine.call_ended(ended)


def store_of(engine: PolicyEngine) -> MemoryStore:
    assert isinstance(engine.store, MemoryStore)
    return engine.store


def held(engine: PolicyEngine, key: str, now: float = T0) -> int:
    return store_of(engine).held(key, now)


def decisions(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "call.decision"]


# Every accepted customer call loses the identity headers it asserted (RFC 3325), whichever
# rules run; a policy with no rules passes calls untouched; emergency calls lose only a
# forged tag, and an asserted identity the account does not own.
STRIPPED = Accept(remove_headers=STRIP)
ACCEPT = STRIPPED
UNTOUCHED = Accept()
EMERGENCY = Accept(remove_headers=("x-sipguard-tag",))


# -- modes --------------------------------------------------------------------------------------
def test_enforce_rejects_with_the_rules_reply() -> None:
    engine = engine_for({"concurrency": {"per_number": 1, "reply": {"code": 480, "reason": "Trunk full"}}})
    assert decide(engine, attempt("a")) == ACCEPT
    assert decide(engine, attempt("b")) == Reject(status=480, reason="Trunk full")
    assert engine.counters.verdicts == {"accepted": 1, "rejected": 1}
    assert engine.counters.rejections == {("concurrency", 480): 1}
    assert engine.counters.findings == {("concurrency", "enforce", "deny"): 1}


def test_call_rate_rejects_with_retry_after_rounded_up() -> None:
    engine = engine_for({"call_rate": {"per_number": {"per_minute": 7, "burst": 2}, "per_account": None}})
    assert decide(engine, attempt("a")) == ACCEPT
    assert decide(engine, attempt("b")) == ACCEPT
    assert decide(engine, attempt("c")) == Reject(
        status=503,
        reason="Call rate exceeded",
        headers=(("Retry-After", "9"),),  # 60/7 s = 8.57 s
    )
    assert isinstance(decide(engine, attempt("d", now=T0 + 8.5)), Reject)
    assert decide(engine, attempt("e", now=T0 + 60 / 7)) == ACCEPT


def test_monitor_accepts_but_logs_and_counts_the_would_be_rejection() -> None:
    engine = engine_for({"concurrency": {"mode": "monitor", "per_number": 1, "per_account": None}})
    decide(engine, attempt("a"))
    with capture_logs() as logs:
        assert decide(engine, attempt("b")) == ACCEPT
    [line] = decisions(logs)
    assert line["log_level"] == "info"
    assert (line["verdict"], line["rule"]) == ("accept", None)
    assert line["also"] == [
        {"rule": "concurrency", "mode": "monitor", "detail": f"calls from {OWNED}: 2 > 1"}
    ]
    assert engine.counters.findings == {("concurrency", "monitor", "deny"): 1}
    assert engine.counters.verdicts == {"accepted": 2} and engine.counters.rejections == {}
    assert held(engine, f"conc:num:{OWNED}") == 2  # the monitored call holds its slot


def test_tag_accepts_with_a_header_naming_the_rule() -> None:
    engine = engine_for({"concurrency": {"mode": "tag", "per_number": 1, "per_account": None}})
    decide(engine, attempt("a"))
    assert decide(engine, attempt("b")) == Accept(
        add_headers=((TAG_HEADER, f"concurrency; calls from {OWNED}: 2 > 1"),), remove_headers=STRIP
    )
    assert engine.counters.findings == {("concurrency", "tag", "deny"): 1}


def test_tag_mode_caller_id_still_strips() -> None:
    engine = engine_for({"caller_id": {"mode": "tag"}})
    assert decide(engine, attempt("a", caller=NOT_OWNED)) == Accept(
        add_headers=((TAG_HEADER, f"caller_id; from {NOT_OWNED} not owned by acme"),), remove_headers=STRIP
    )


def test_the_first_enforced_rule_answers_and_the_others_are_logged() -> None:
    engine = engine_for(
        {
            "caller_id": {"mode": "monitor"},
            "concurrency": {"per_number": 1, "per_account": None},
            "call_rate": {"mode": "tag", "per_number": {"per_minute": 6, "burst": 1}, "per_account": None},
        }
    )
    decide(engine, attempt("a", caller=NOT_OWNED))
    with capture_logs() as logs:
        verdict = decide(engine, attempt("b", caller=NOT_OWNED))
    assert verdict == Reject(status=486, reason="Too many simultaneous calls")  # no Retry-After: not its rule
    [line] = decisions(logs)
    assert (line["verdict"], line["rule"]) == ("reject", "concurrency")
    assert line["detail"] == f"calls from {NOT_OWNED}: 2 > 1"
    assert line["also"] == [
        {"rule": "caller_id", "mode": "monitor", "detail": f"from {NOT_OWNED} not owned by acme"},
        {"rule": "call_rate", "mode": "tag", "detail": f"calls from {NOT_OWNED}: 2 > 1"},
    ]


def test_a_remembered_decision_holds_nothing_the_garbage_collector_must_keep_visiting() -> None:
    # thousands of decisions stay in memory for explain and status: under load, their
    # operations and results were most of what every full collection walked
    engine = engine_for(
        {
            "caller_id": {"mode": "monitor"},
            "concurrency": {},
            "call_rate": {"mode": "tag", "per_number": {"per_minute": 6, "burst": 1}},
        }
    )
    decide(engine, attempt("a", caller=NOT_OWNED))
    decide(engine, attempt("b", caller=NOT_OWNED))
    # CPython stops tracking a tuple of atomic values at the first pass that visits it:
    # the counters' inner tuples at one, the tuple holding them at the next
    gc.collect()
    gc.collect()
    for decision in engine.decisions.recent:
        assert decision.counters and decision.also  # (b was tagged and monitored)
        for held_value in (decision.counters, decision.also, decision.warnings):
            assert not gc.is_tracked(held_value), held_value
    assert engine.decisions.recent[-1].fields()["counters"][0] == {
        "rule": "concurrency",
        "what": f"calls from {NOT_OWNED}",
        "count": 2,
        "limit": 2,
    }


# -- slots and rejections ---------------------------------------------------------------------
def test_a_rule_rejecting_after_another_rules_slot_op_leaves_no_slot() -> None:
    engine = engine_for(
        {
            "concurrency": {"per_number": 5, "per_account": 5},
            "call_rate": {"per_number": {"per_minute": 6, "burst": 1}, "per_account": None},
        }
    )
    assert decide(engine, attempt("a")) == ACCEPT
    verdict = decide(engine, attempt("b"))
    assert isinstance(verdict, Reject) and verdict.status == 503
    assert held(engine, f"conc:num:{OWNED}") == 1
    assert held(engine, "conc:acct:acme") == 1
    assert set(engine.held) == {"attempt-a"}


def test_a_denial_after_a_slot_op_leaves_no_slot() -> None:
    engine = engine_for({"concurrency": {}, "caller_id": {}})  # the slot op comes first
    assert decide(engine, attempt("a", caller=NOT_OWNED)) == Reject(
        status=403, reason="Caller ID not permitted"
    )
    assert held(engine, f"conc:num:{NOT_OWNED}") == 0
    assert held(engine, "conc:acct:acme") == 0
    assert engine.held == {}


def test_the_same_attempt_judged_twice_counts_once() -> None:
    engine = engine_for(
        {"concurrency": {"per_number": 1}, "call_rate": {"per_number": {"per_minute": 6, "burst": 1}}}
    )
    call = attempt("a")
    assert decide(engine, call) == ACCEPT
    assert decide(engine, call) == ACCEPT
    assert held(engine, f"conc:num:{OWNED}") == 1
    assert isinstance(decide(engine, attempt("b", now=T0 + 5)), Reject)  # the slot, still one
    end(engine, call)
    assert decide(engine, attempt("c", now=T0 + 10)) == ACCEPT  # and one rate hit, a's


def test_call_ended_releases_exactly_the_slots_held() -> None:
    engine = engine_for({"concurrency": {"per_number": 2, "per_account": 3, "per_destination": 5}})
    a, b = attempt("a"), attempt("b", caller=OWNED_TOO)
    decide(engine, a)
    decide(engine, b)
    keys = [f"conc:num:{OWNED}", f"conc:num:{OWNED_TOO}", "conc:acct:acme", f"conc:dst:{CALLEE}"]
    assert [held(engine, key) for key in keys] == [1, 1, 2, 2]
    end(engine, a)
    assert [held(engine, key) for key in keys] == [0, 1, 1, 1]
    end(engine, a)  # reported twice
    end(engine, attempt("never-judged"))
    assert [held(engine, key) for key in keys] == [0, 1, 1, 1]
    end(engine, b)
    assert [held(engine, key) for key in keys] == [0, 0, 0, 0]
    assert engine.held == {}
    assert store_of(engine).slots == {}


def challenged(engine: PolicyEngine, call: CallAttempt, status: int = 407) -> CallAttempt:
    """The PBX challenges ``call`` (RFC 3261 §22.2); returns the retry the caller sends a
    moment later: same Call-ID and From tag, with credentials, a new attempt for the core."""
    end(engine, call, call.now + 0.05, reason=EndReason.REJECTED, status=status)
    return with_credentials(call, "acme")


def test_a_challenged_call_and_its_retry_count_as_one_call() -> None:
    # Most trunks authenticate each INVITE: the PBX answers 407, the caller sends it again
    # with credentials. The slot is given back at the 407 and taken again; the rates and
    # the call quota count the call once, or every authenticated account would get half
    # the calls per minute (and per day) its limits say.
    engine = engine_for(
        {
            "concurrency": {"per_number": 1},
            "call_rate": {"per_number": {"per_minute": 1, "burst": 1}},
            "usage": {"calls_per_day": {"per_number": 1}},
        }
    )
    first = attempt("a")
    assert decide(engine, first) == ACCEPT
    retry = challenged(engine, first)
    assert held(engine, f"conc:num:{OWNED}") == 0
    assert decide(engine, retry) == ACCEPT
    assert held(engine, f"conc:num:{OWNED}") == 1
    assert decide(engine, attempt("b", now=T0 + 1)) == Reject(
        status=486, reason="Too many simultaneous calls"
    )
    # the retry's exemption is spent: a third INVITE of that Call-ID is a new call
    again = challenged(engine, retry, 401)
    assert held(engine, f"conc:num:{OWNED}") == 0
    assert isinstance(decide(engine, again), Reject)


def with_credentials(call: CallAttempt, username: str, *, uri: str | None = None) -> CallAttempt:
    """``call`` sent again after a challenge with credentials naming ``username`` (and, to
    cheat, to another Request-URI)."""
    data = call.request.raw.replace(
        b"\r\n\r\n", f'\r\nProxy-Authorization: Digest username="{username}", realm="pbx"\r\n\r\n'.encode(), 1
    )
    if uri is not None:
        data = data.replace(str(call.request.uri).encode(), uri.encode(), 1)
    request = parse_message(data)
    assert isinstance(request, Request)
    return CallAttempt(
        attempt_id=f"{call.attempt_id}-retry", request=request, source=call.source, now=call.now + 0.1
    )


def test_a_challenged_calls_retry_counts_what_its_first_invite_did_not() -> None:
    # An account known by its auth username only is no account at the first INVITE (no
    # credentials yet): its per-account rate and quota must count at the retry, or they
    # never count. And a retry sent to another number is counted against that number.
    engine = engine_for(
        {
            "call_rate": {
                "per_number": None,
                "per_account": {"per_minute": 1, "burst": 1},
                "per_destination": {"per_minute": 1, "burst": 1},
            }
        }
    )
    beta = "+14155550342"
    first = attempt("a", source=ELSEWHERE, caller=beta)
    assert decide(engine, first) == ACCEPT
    end(engine, first, first.now + 0.05, reason=EndReason.REJECTED, status=407)
    assert decide(engine, with_credentials(first, "beta-trunk")) == ACCEPT
    second = attempt("b", source=ELSEWHERE, caller=beta, callee="+14155552001", now=T0 + 10)
    assert decide(engine, second) == ACCEPT
    end(engine, second, second.now + 0.05, reason=EndReason.REJECTED, status=407)
    assert decide(engine, with_credentials(second, "beta-trunk")) == Reject(
        status=503, reason="Call rate exceeded", headers=(("Retry-After", "50"),)
    )
    # a retry to the number just called, its first INVITE to another: counted against it
    third = attempt("c", source=CUSTOMER, callee="+14155552002", now=T0 + 20)
    assert decide(engine, third) == ACCEPT
    end(engine, third, third.now + 0.05, reason=EndReason.REJECTED, status=407)
    pumped = with_credentials(third, "acme", uri=f"sip:{CALLEE}@pbx.example.com")
    assert decide(engine, pumped) == Reject(
        status=503, reason="Call rate exceeded", headers=(("Retry-After", "40"),)
    )


def test_the_dialer_history_sees_a_challenged_call_once() -> None:
    # A challenge is no outcome: counted as an unanswered call it would halve an
    # authenticated caller's answer-seizure ratio, and its retry (to the same callee)
    # would break every run of adjacent callees the sequential signature looks for.
    engine = engine_for({"dialer": {}})
    for index in range(3):
        first = attempt(f"c{index}", callee=f"+1415555{2000 + index}", now=T0 + 100 * index)
        assert decide(engine, first) == ACCEPT
        retry = challenged(engine, first)
        assert decide(engine, retry) == ACCEPT
        engine.call_answered(CallAnswered(call=call_info(retry), now=retry.now + 5))
        end(engine, retry, retry.now + 65, answered_at=retry.now + 5)
    subject = engine.history.subject(f"num:{OWNED}", T0 + 300)
    assert subject is not None
    assert (len(subject.attempts), subject.ended, subject.answered, subject.run) == (3, 3, 3, 3)


def test_a_rejected_call_ending_releases_nothing() -> None:
    engine = engine_for({"concurrency": {"per_number": 1}})
    a, b = attempt("a"), attempt("b")
    decide(engine, a)
    assert isinstance(decide(engine, b), Reject)
    end(engine, b)
    assert held(engine, f"conc:num:{OWNED}") == 1


def test_async_decide_agrees_with_decide_now() -> None:
    engine = engine_for({"concurrency": {"per_number": 1}})
    assert asyncio.run(engine.decide(attempt("a"))) == ACCEPT
    assert asyncio.run(engine.decide(attempt("b"))) == Reject(
        status=486, reason="Too many simultaneous calls"
    )
    assert held(engine, f"conc:num:{OWNED}") == 1


def test_no_rules_is_a_plain_proxy() -> None:
    engine = engine_for({})
    assert decide(engine, attempt("a", caller=NOT_OWNED, source=ELSEWHERE)) == UNTOUCHED
    assert asyncio.run(engine.decide(attempt("b", caller=NOT_OWNED, source=ELSEWHERE))) == UNTOUCHED
    assert store_of(engine).slots == {}


# -- emergency calls ---------------------------------------------------------------------------
TIGHT = {
    "caller_id": {"anonymous": "reject"},
    "concurrency": {"per_number": 1, "per_account": 1, "per_destination": 1},
    "call_rate": {
        "per_number": {"per_minute": 1, "burst": 1},
        "per_account": {"per_minute": 1, "burst": 1},
        "per_source": {"per_minute": 1, "burst": 1},
    },
}


@pytest.mark.parametrize(
    ("uri", "source", "from_"),
    [
        ("sip:911@pbx.example.com", CUSTOMER, None),
        ("sip:911@pbx.example.com;user=phone", CUSTOMER, f"<sip:{NOT_OWNED}@customer.example>"),
        ("tel:+1911", CUSTOMER, "<sip:anonymous@anonymous.invalid>"),
        ("sip:112@pbx.example.com", ELSEWHERE, "<sip:nobody@nowhere.example>"),  # no account at all
        ("sip:999@pbx.example.com", LONDON, None),
        ("urn:service:sos", CUSTOMER, f"<sip:{NOT_OWNED}@customer.example>"),  # RFC 5031
    ],
)
def test_emergency_calls_are_accepted_and_never_counted(uri: str, source: Address, from_: str | None) -> None:
    engine = engine_for(TIGHT)
    assert decide(engine, attempt("a")) == STRIPPED
    assert isinstance(decide(engine, attempt("b")), Reject)  # over every limit now
    store = store_of(engine)
    slots, buckets, live = copy.deepcopy(store.slots), dict(store.buckets), dict(engine.held)
    with capture_logs() as logs:
        for index in range(3):
            call = attempt(f"sos{index}", uri=uri, source=source, from_=from_, now=T0 + index)
            assert decide(engine, call) == EMERGENCY
            assert asyncio.run(engine.decide(call)) == EMERGENCY
            end(engine, call)
    assert (store.slots, store.buckets, engine.held) == (slots, buckets, live)
    assert engine.counters.verdicts["emergency"] == 6
    assert decisions(logs) == []
    sos = [entry for entry in logs if entry["event"] == "call.emergency"]
    assert len(sos) == 6
    assert sos[0]["call_id"] == "sos0@192.0.2.10"
    assert sos[0]["callee"] == uri
    assert sos[0]["source"] == source.host
    # what the core and the flood guard ask before refusing a call for their own reasons
    assert engine.is_emergency(attempt("ask", uri=uri, source=source, from_=from_).request, source.host)


@pytest.mark.parametrize(
    ("uri", "source"),
    [
        (f"sip:{CALLEE}@pbx.example.com", CUSTOMER),
        ("sip:999@pbx.example.com", CUSTOMER),  # not in this policy's list
        ("tel:+44999", CUSTOMER),  # nor in its national form
        ("sip:sos@pbx.example.com", CUSTOMER),  # only urn:service:sos is the service URN
    ],
)
def test_is_emergency_says_no_to_numbers_the_policy_does_not_list(uri: str, source: Address) -> None:
    engine = engine_for(TIGHT, emergency_numbers=["911"])
    assert not engine.is_emergency(attempt("ask", uri=uri, source=source).request, source.host)


@pytest.mark.parametrize(
    ("headers", "removed"),
    [
        ((("P-Asserted-Identity", f"<sip:{OWNED}@customer.example>"),), ()),  # its callback number
        ((("P-Asserted-Identity", f"<sip:{NOT_OWNED}@customer.example>"),), ("p-asserted-identity",)),
        (
            (
                ("P-Asserted-Identity", f"<sip:{OWNED}@customer.example>, <tel:{NOT_OWNED}>"),
                ("Remote-Party-ID", f"<sip:{OWNED}@customer.example>;party=calling"),
            ),
            ("p-asserted-identity",),
        ),
        ((("Remote-Party-ID", "<sip:+14155559999@c>;party=calling"),), ("remote-party-id",)),
        ((("P-Asserted-Identity", "<<<not a uri"),), ("p-asserted-identity",)),  # never a 400
        ((("X-Sipguard-Tag", "caller_id; forged"),), ()),
    ],
)
def test_an_emergency_call_keeps_only_an_asserted_identity_its_account_owns(
    headers: tuple[tuple[str, str], ...], removed: tuple[str, ...]
) -> None:
    """The emergency service must not get a spoofed callback number: an asserted number
    the account does not own is removed; an owned one is the callback number, and stays."""
    engine = engine_for(TIGHT)
    verdict = decide(engine, attempt("sos", uri="sip:911@pbx.example.com", headers=headers))
    assert verdict == Accept(remove_headers=("x-sipguard-tag", *removed))
    assert engine.counters.verdicts["emergency"] == 1


@pytest.mark.parametrize("method", ["INVITE", "UPDATE"])
def test_an_emergency_calls_later_requests_assert_no_number_its_account_does_not_own(method: str) -> None:
    """The INVITE of an emergency call keeps an owned (or no) asserted identity; a
    re-INVITE or UPDATE asserting another number, for the PBX to show as the connected
    party or pass to the emergency service, loses it like any customer request."""
    engine = engine_for(TIGHT)
    sim = Sim.make(untrusted_headers=engine.untrusted_headers, is_emergency=engine.is_emergency)
    offered = sim.offer(invite(uri="sip:911@pbx.example.com"))
    verdict = decide(engine, offered.attempt)
    sim.answer(only_send(sim.decide(offered.attempt.attempt_id, verdict)).data)
    spoofed = (
        ("Route", OUR_RR),
        ("P-Asserted-Identity", f"<tel:{NOT_OWNED}>"),
        ("Remote-Party-ID", f"<tel:{NOT_OWNED}>"),
    )
    sent = parse_request(only_send(sim.customer(in_dialog_from_customer(method, headers=spoofed))).data)
    assert sent.values("p-asserted-identity") == sent.values("remote-party-id") == []


def test_the_engine_lists_the_emergency_calls_up_now() -> None:
    """For the flood guard: a ban must not cut an emergency call short."""
    engine = engine_for(TIGHT)
    sos = attempt("sos", uri="sip:911@pbx.example.com")
    decide(engine, sos)
    decide(engine, attempt("a"))  # a normal call is not listed
    assert list(engine.emergency_calls) == ["sos@192.0.2.10"]
    end(engine, sos)
    assert engine.emergency_calls == {}


def test_strip_untrusted_identity_false_keeps_an_emergency_calls_assertions_too() -> None:
    engine = engine_for({"caller_id": {"strip_untrusted_identity": False}})
    headers = (("P-Asserted-Identity", f"<sip:{NOT_OWNED}@customer.example>"),)
    assert decide(engine, attempt("sos", uri="sip:911@pbx.example.com", headers=headers)) == EMERGENCY


def test_untrusted_headers_outside_judged_calls_follow_the_caller_id_setting() -> None:
    """What the core removes from a customer's MESSAGE, REFER...: the same as from its
    INVITEs; nothing when no rule runs (a plain proxy)."""
    request = attempt("m", headers=(("P-Asserted-Identity", f"<tel:{NOT_OWNED}>"),)).request
    assert engine_for({"caller_id": {}}).untrusted_headers(request, CUSTOMER.host) == STRIP
    passing = engine_for({"caller_id": {"strip_untrusted_identity": False}})
    assert passing.untrusted_headers(request, CUSTOMER.host) == ("x-sipguard-tag",)
    assert engine_for({}).untrusted_headers(request, CUSTOMER.host) == ()


def test_a_rules_call_ended_hook_that_raises_does_not_keep_the_calls_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A rule's outcome hook (a third-party rule's, say) raising as a call ends: the error
    is logged with the rule, and the call's slots are given back all the same. Before,
    the exception left the engine before the release: the number stayed at its cap."""

    def broken(self: UsagePolicy, outcome: Any, config: Any) -> tuple[()]:
        raise RuntimeError("a bug in a rule")

    monkeypatch.setattr(UsagePolicy, "call_ended", broken)
    engine = engine_for({"concurrency": {"per_number": 1, "per_account": None}, "usage": {}})
    first = attempt("a")
    assert decide(engine, first) == STRIPPED
    assert isinstance(decide(engine, attempt("b")), Reject)  # at the cap while a is up
    with capture_logs() as logs:
        end(engine, first)
    [error] = [entry for entry in logs if entry["event"] == "policy.error"]
    assert (error["rule"], error["call_id"]) == ("usage", "a@192.0.2.10")
    assert engine.counters.hook_errors == {"usage": 1}
    assert decide(engine, attempt("c")) == STRIPPED  # the slot came back


def test_an_emergency_number_as_caller_id_is_refused() -> None:
    engine = engine_for({"caller_id": {}})
    verdict = decide(engine, attempt("a", from_="<sip:911@customer.example>"))
    assert verdict == Reject(status=403, reason="Caller ID not permitted")


def test_an_owned_number_is_believed_to_exist_and_an_unowned_one_is_checked() -> None:
    # +1 213 000-5555 lies in the owned range, but phonenumbers' metadata calls it unreal
    # (no NANP exchange starts with 0): the operator's assignment wins over the library's.
    accounts = {"acme": {"sources": ["192.0.2.0/24"], "numbers": ["+12125550000-+12135559999"]}}
    engine = engine_for({"caller_id": {}}, accounts)
    with capture_logs() as logs:
        assert decide(engine, attempt("owned", caller="+12130005555")) == STRIPPED
        assert decide(engine, attempt("unowned", caller="+12140005555")) == Reject(
            status=403, reason="Caller ID not permitted"
        )
    accepted, refused = decisions(logs)
    assert (accepted["verdict"], accepted["caller_e164"]) == ("accept", "+12130005555")
    assert refused["detail"] == "from sip:+12140005555@customer.example: number cannot exist"


# -- identity headers ---------------------------------------------------------------------------
def test_untrusted_identity_headers_are_stripped() -> None:
    engine = engine_for({"caller_id": {}})
    headers = [
        ("P-Asserted-Identity", f"<sip:{OWNED_TOO}@customer.example>"),
        ("Remote-Party-ID", f"<sip:{OWNED}@c>"),
    ]
    assert decide(engine, attempt("a", headers=headers)) == STRIPPED
    assert decide(engine, attempt("b")) == STRIPPED


def test_identity_is_stripped_even_without_caller_id() -> None:
    """RFC 3325: the trust domain ends at sipguard whichever rules run."""
    engine = engine_for({"concurrency": {}})
    assert decide(engine, attempt("a")) == STRIPPED


def test_stripping_can_be_turned_off() -> None:
    engine = engine_for({"caller_id": {"strip_untrusted_identity": False}})
    assert decide(engine, attempt("a")) == Accept(remove_headers=("x-sipguard-tag",))


def test_a_customers_own_tag_header_never_reaches_the_pbx() -> None:
    """X-Sipguard-Tag is sipguard's verdict for the PBX: one a customer wrote is a forgery,
    removed (the core removes before it adds) whatever sipguard adds itself."""
    engine = engine_for({"caller_id": {"mode": "tag", "strip_untrusted_identity": False}})
    forged = [(TAG_HEADER, "none; all clear")]
    assert decide(engine, attempt("a", headers=forged)) == Accept(remove_headers=("x-sipguard-tag",))
    assert decide(engine, attempt("b", caller=NOT_OWNED, headers=forged)) == Accept(
        add_headers=((TAG_HEADER, f"caller_id; from {NOT_OWNED} not owned by acme"),),
        remove_headers=("x-sipguard-tag",),
    )


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("P-Asserted-Identity", f"<sip:{NOT_OWNED}@customer.example>"),
        ("P-Asserted-Identity", f"<sip:{OWNED_TOO}@c>, <tel:{NOT_OWNED}>"),
        ("P-Preferred-Identity", f"<tel:{NOT_OWNED}>"),
        ("Remote-Party-ID", f'"Bob" <sip:{NOT_OWNED}@customer.example>;party=calling'),
    ],
)
def test_identity_headers_are_checked_before_they_are_stripped(header: str, value: str) -> None:
    engine = engine_for({"caller_id": {}})
    with capture_logs() as logs:
        verdict = decide(engine, attempt("a", headers=[(header, value)]))
    assert verdict == Reject(status=403, reason="Caller ID not permitted")
    [line] = decisions(logs)
    assert line["detail"] == f"{header.lower()} {NOT_OWNED} not owned by acme"


@pytest.mark.parametrize(
    ("setting", "headers", "accepted"),
    [
        ("with-owned-identity", [], False),
        ("with-owned-identity", [("P-Preferred-Identity", f"<sip:{OWNED}@customer.example>")], True),
        ("with-owned-identity", [("P-Asserted-Identity", f"<tel:{OWNED}>")], True),
        ("with-owned-identity", [("P-Preferred-Identity", f"<sip:{NOT_OWNED}@customer.example>")], False),
        ("allow", [], True),
        ("reject", [("P-Preferred-Identity", f"<sip:{OWNED}@customer.example>")], False),
    ],
)
def test_anonymous_from(setting: str, headers: list[tuple[str, str]], accepted: bool) -> None:
    engine = engine_for({"caller_id": {"anonymous": setting}})
    call = attempt("a", from_='"Anonymous" <sip:anonymous@anonymous.invalid>', headers=headers)
    assert (decide(engine, call) == STRIPPED) is accepted


def test_an_anonymous_display_name_does_not_hide_the_number() -> None:
    engine = engine_for({"caller_id": {"anonymous": "allow"}})
    call = attempt("a", from_=f'"Anonymous" <sip:{NOT_OWNED}@customer.example>')
    assert isinstance(decide(engine, call), Reject)


def test_junk_after_a_number_does_not_make_it_anonymous() -> None:
    # otherwise an owned P-Preferred-Identity would carry a From a PBX reads as +1...9999
    engine = engine_for({"caller_id": {}})
    vouched = [("P-Preferred-Identity", f"<sip:{OWNED}@customer.example>")]
    for from_ in (f'"Anonymous" <sip:{NOT_OWNED}%00@c>', f"<sip:{NOT_OWNED}%00@anonymous.invalid>"):
        assert isinstance(decide(engine, attempt("a", from_=from_, headers=vouched)), Reject), from_


@pytest.mark.parametrize(
    ("from_", "caller_e164", "owned"),
    [
        ("<tel:555-0142;phone-context=+1-415>", OWNED, True),  # an IMS network's local form
        ("<sip:5550142;phone-context=+1415@customer.example;user=phone>", OWNED, True),
        # acme's national digits in Germany's context: +49 415 55550142, not acme's number
        ("<tel:4155550142;phone-context=+49>", "+494155550142", False),
        ("<sip:4155550142;phone-context=+49@customer.example;user=phone>", "+494155550142", False),
    ],
)
def test_a_local_number_is_judged_in_its_phone_context(from_: str, caller_e164: str, owned: bool) -> None:
    engine = engine_for({"caller_id": {}})
    with capture_logs() as logs:
        verdict = decide(engine, attempt("a", from_=from_))
    assert (verdict == STRIPPED) is owned
    [line] = decisions(logs)
    assert line["caller_e164"] == caller_e164


@pytest.mark.parametrize(
    ("from_", "caller_e164", "owned"),
    [
        ("<tel:2079460142;phone-context=+44>", "+12079460142", False),  # Maine, to a PBX in the US
        ("<sip:2079460142;phone-context=+44@customer.example;user=phone>", "+12079460142", False),
        ("<tel:+442079460142>", "+442079460142", True),
        ("<tel:555-0142;phone-context=+1-415>", OWNED, True),  # 5550142 alone is no number
    ],
)
def test_a_local_numbers_digits_alone_must_be_owned_too(from_: str, caller_e164: str, owned: bool) -> None:
    """A PBX may ignore the phone-context (Asterisk reads a tel: URI's number alone) and
    read the digits as a national number of its own region: an account owning London
    numbers must not present +1 207 946 0142 as tel:2079460142;phone-context=+44."""
    numbers = ["+14155550100-+14155550199", "+442079460000-+442079460999"]
    accounts = {"acme": {"sources": ["192.0.2.0/24"], "numbers": numbers}}
    engine = engine_for({"caller_id": {}}, accounts)
    with capture_logs() as logs:
        verdict = decide(engine, attempt("a", from_=from_))
    assert (verdict == STRIPPED) is owned
    [line] = decisions(logs)
    assert line["caller_e164"] == caller_e164


@pytest.mark.parametrize("spacer", ["%20", "%09", "%0A", "%C2%A0"])
@pytest.mark.parametrize("header", ["From", "P-Asserted-Identity"])
def test_a_caller_number_with_whitespace_in_it_is_no_number(spacer: str, header: str) -> None:
    """Whitespace is no visual separator (RFC 3966), and a URI holds it only %-escaped: a
    PBX or carrier reading +4930123456%207 may stop at the space, at +4930123456, a
    number of its own in Germany's open numbering plan, which the account does not own."""
    accounts = {"acme": {"sources": ["192.0.2.0/24"], "numbers": ["+49301234567", "+14155550142"]}}
    engine = engine_for({"caller_id": {}}, accounts)
    presented = f"<sip:+4930123456{spacer}7@customer.example;user=phone>"
    headers = [(header, presented)] if header != "From" else []
    with capture_logs() as logs:
        verdict = decide(engine, attempt("a", from_=presented if header == "From" else None, headers=headers))
    assert verdict == Reject(status=403, reason="Caller ID not permitted")
    [line] = decisions(logs)
    assert line["detail"].endswith(": no telephone number")


def test_a_malformed_identity_header_is_a_bad_request() -> None:
    engine = engine_for({"caller_id": {}})
    with capture_logs() as logs:
        verdict = decide(engine, attempt("a", headers=[("P-Asserted-Identity", "<sip:+14155550142@c")]))
    assert isinstance(verdict, Reject) and verdict.status == 400
    [line] = decisions(logs)
    assert (line["verdict"], line["rule"]) == ("reject", "parse")


# -- reload ---------------------------------------------------------------------------------------
def test_replace_keeps_live_calls_slots_and_releases_them_at_call_end() -> None:
    first = policy({"concurrency": {"per_number": None, "per_account": 2}})
    engine = PolicyEngine(first)
    a, b = attempt("a"), attempt("b", caller=OWNED_TOO)
    assert decide(engine, a) == decide(engine, b) == ACCEPT
    engine.replace(policy({"call_rate": {}}))  # a different policy: no concurrency at all
    assert decide(engine, attempt("c")) == ACCEPT
    assert held(engine, "conc:acct:acme") == 2
    end(engine, a)  # slots taken under the old policy are still given back
    assert held(engine, "conc:acct:acme") == 1
    engine.replace(first)
    assert decide(engine, attempt("d")) == ACCEPT
    assert isinstance(decide(engine, attempt("e")), Reject)  # b and d: counters survived
    end(engine, b)
    assert decide(engine, attempt("f")) == ACCEPT
    assert engine.counters.verdicts["accepted"] == 5


def test_rate_buckets_survive_a_reload() -> None:
    rules = {"call_rate": {"per_number": {"per_minute": 6, "burst": 1}, "per_account": None}}
    engine = engine_for(rules)
    assert decide(engine, attempt("a")) == ACCEPT
    engine.replace(policy(rules))
    assert decide(engine, attempt("b", now=T0 + 1)) == Reject(
        status=503, reason="Call rate exceeded", headers=(("Retry-After", "9"),)
    )


def test_retry_after_waits_for_every_bucket_of_the_rule() -> None:
    # The account's bucket refuses the call and the number's counts it all the same
    # (count_rejected): Retry-After is when both admit the next call, not the account's alone.
    one_in_ten_seconds = {"per_minute": 6, "burst": 1}
    engine = engine_for({"call_rate": {"per_number": one_in_ten_seconds, "per_account": one_in_ten_seconds}})
    assert decide(engine, attempt("a")) == ACCEPT
    refused = decide(engine, attempt("b", caller=OWNED_TOO, now=T0 + 1))
    assert refused == Reject(status=503, reason="Call rate exceeded", headers=(("Retry-After", "10"),))
    assert decide(engine, attempt("c", caller=OWNED_TOO, now=T0 + 11)) == ACCEPT


@pytest.mark.parametrize("callee", ["+88234567890", "+19995551234"])
def test_per_destination_limits_count_numbers_phonenumbers_calls_invalid(callee: str) -> None:
    # +882 (international networks) and unassigned area codes are what pumping schemes
    # terminate on; phonenumbers' metadata calls them invalid, the PBX routes them.
    engine = engine_for(
        {
            "concurrency": {"per_number": None, "per_account": None, "per_destination": 1},
            "call_rate": {
                "per_number": None,
                "per_account": None,
                "per_destination": {"per_minute": 1, "burst": 1},
            },
        }
    )
    assert decide(engine, attempt("a", callee=callee)) == ACCEPT
    assert held(engine, f"conc:dst:{callee}") == 1
    assert decide(engine, attempt("b", caller=OWNED_TOO, callee=callee, now=T0 + 1)) == Reject(
        status=486, reason="Too many simultaneous calls"
    )
    end(engine, attempt("a", callee=callee), now=T0 + 2)
    national = "011" + callee[1:]  # the same number, dialled internationally from the US
    refused = decide(engine, attempt("c", caller=OWNED_TOO, callee=national, now=T0 + 3))
    assert refused == Reject(status=503, reason="Call rate exceeded", headers=(("Retry-After", "57"),))


def test_a_reload_changes_account_resolution() -> None:
    engine = engine_for({"caller_id": {}})
    assert decide(engine, attempt("a", source=OFFICE, caller="+14155550242")) == STRIPPED
    moved = {**ACCOUNTS, "acme-office": {**ACCOUNTS["acme-office"], "sources": ["203.0.113.0/24"]}}
    engine.replace(policy({"caller_id": {}}, moved))
    assert isinstance(decide(engine, attempt("b", source=OFFICE, caller="+14155550242")), Reject)


# -- accounts -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "headers", "from_host", "account"),
    [
        (CUSTOMER, [], "customer.example", "acme"),
        (OFFICE, [], "customer.example", "acme-office"),  # the most specific network wins
        (CUSTOMER_VIA_IPV6, [], "customer.example", "acme"),
        (LONDON, [], "customer.example", "london"),
        (ELSEWHERE, [("Proxy-Authorization", 'Digest username="beta-trunk", realm="x"')], "c", "beta"),
        (ELSEWHERE, [("Authorization", 'Digest realm="x", username = "beta-trunk"')], "c", "beta"),
        (ELSEWHERE, [], "gamma.example", "gamma"),
        (ELSEWHERE, [], "GAMMA.Example", "gamma"),
        (ELSEWHERE, [], "customer.example", None),
        # a source network beats an auth username, which beats a From domain
        (CUSTOMER, [("Proxy-Authorization", 'Digest username="beta-trunk"')], "gamma.example", "acme"),
        (ELSEWHERE, [("Proxy-Authorization", 'Digest username="beta-trunk"')], "gamma.example", "beta"),
        (ELSEWHERE, [("Proxy-Authorization", 'Digest username="stranger"')], "gamma.example", "gamma"),
    ],
)
def test_account_resolution(
    source: Address, headers: list[tuple[str, str]], from_host: str, account: str | None
) -> None:
    engine = engine_for({"caller_id": {"mode": "monitor"}})
    with capture_logs() as logs:
        decide(engine, attempt("a", source=source, headers=headers, from_=f"<sip:{NOT_OWNED}@{from_host}>"))
    [line] = decisions(logs)
    assert line["account"] == account
    if account is None:
        assert line["also"][0]["detail"] == f"source {source.host} belongs to no account"


def test_a_peer_reaching_an_ipv4_and_an_ipv6_listener_is_one_source() -> None:
    """A socket bound to [::] sees the IPv4 peer 192.0.2.10 as ::ffff:192.0.2.10: one
    address, so one account (its per-account slots) and one per-source rate, whichever
    listener each call reached."""
    engine = engine_for(
        {
            "concurrency": {"per_number": None, "per_account": 1},
            "call_rate": {"per_source": {"per_minute": 1, "burst": 1}},
        }
    )
    with capture_logs() as logs:
        assert decide(engine, attempt("a", source=CUSTOMER_VIA_IPV6)) == STRIPPED
    assert held(engine, "conc:acct:acme") == 1
    [line] = decisions(logs)
    assert line["source"] == "192.0.2.10"
    second = decide(engine, attempt("b", source=CUSTOMER, caller=OWNED_TOO, now=T0 + 1))
    assert isinstance(second, Reject) and second.status == 486
    end(engine, attempt("a", source=CUSTOMER_VIA_IPV6), now=T0 + 2)
    third = decide(engine, attempt("c", source=CUSTOMER, caller=OWNED_TOO, now=T0 + 3))
    assert third == Reject(status=503, reason="Call rate exceeded", headers=(("Retry-After", "57"),))


def test_a_challenged_calls_retry_over_an_ipv6_listener_is_the_same_call() -> None:
    # Credentials can grow an INVITE past the MTU, and the caller sends the retry over TCP
    # (RFC 3261 §18.1.1), maybe to a [::] listener: the same peer, the same call.
    engine = engine_for({"call_rate": {"per_number": {"per_minute": 1, "burst": 1}}})
    first = attempt("a")
    assert decide(engine, first) == ACCEPT
    retry = challenged(engine, first)
    assert decide(engine, replace(retry, source=CUSTOMER_VIA_IPV6)) == ACCEPT


STRANGER = 'Digest username="stranger", realm="pbx", nonce="n", uri="sip:pbx", response="0"'
ELSEWHERE_REALM = 'Digest username="beta-trunk", realm="elsewhere"'


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", 'Digest xusername="beta-trunk", username="stranger", realm="pbx"')],
        [("Authorization", 'Digest username="beta-trunk", username="stranger", realm="pbx"')],
        [("Authorization", 'Digest\tusername="stranger", username="beta-trunk", realm="pbx"')],
        [("Proxy-Authorization", ELSEWHERE_REALM), ("Authorization", STRANGER)],
        [("Authorization", ELSEWHERE_REALM), ("Authorization", STRANGER)],
        [("Authorization", 'Digest username="beta-trunk", username*=UTF-8\'\'stranger, realm="pbx"')],
    ],
)
def test_no_account_is_claimed_beside_the_credentials_the_pbx_checks(headers: list[tuple[str, str]]) -> None:
    """sipguard does not verify credentials, the PBX does: those of its own realm, which
    may be any of several sent. A username only sipguard reads (in ``xusername``, in the
    credentials of another realm) must not make the call beta's, to present beta's numbers
    from an account whose password the PBX does check."""
    engine = engine_for({"caller_id": {}})
    with capture_logs() as logs:
        verdict = decide(engine, attempt("a", source=ELSEWHERE, caller="+14155550342", headers=headers))
    assert verdict == Reject(status=403, reason="Caller ID not permitted")
    [line] = decisions(logs)
    assert line["account"] is None


def test_each_account_owns_its_numbers_in_its_region() -> None:
    engine = engine_for({"caller_id": {}})
    assert decide(engine, attempt("a", source=OFFICE, caller="+14155550242")) == STRIPPED
    assert isinstance(decide(engine, attempt("b", source=OFFICE, caller=OWNED)), Reject)  # acme's
    london = attempt("c", source=LONDON, from_="<sip:02079460958@customer.example>", callee="02079460000")
    with capture_logs() as logs:
        assert decide(engine, london) == STRIPPED
    [line] = decisions(logs)
    assert (line["caller"], line["caller_e164"], line["callee"]) == (
        "sip:02079460958@customer.example",
        "+442079460958",
        "+442079460000",
    )


def test_account_limits_and_rule_overrides() -> None:
    accounts = {
        **ACCOUNTS,
        "acme": {
            **ACCOUNTS["acme"],
            "limits": {"concurrent_per_number": 3},
            "rules": {"concurrency": {"reply": {"code": 403, "reason": "Over contract"}}},
        },
    }
    engine = engine_for({"concurrency": {"per_number": 1}}, accounts)
    assert [decide(engine, attempt(name)) for name in "abc"] == [ACCEPT] * 3
    assert decide(engine, attempt("d")) == Reject(status=403, reason="Over contract")
    office = [decide(engine, attempt(f"o{i}", source=OFFICE, caller="+14155550242")) for i in range(2)]
    assert office == [ACCEPT, Reject(status=486, reason="Too many simultaneous calls")]


def test_mode_override_monitors_every_rule() -> None:
    engine = engine_for({"caller_id": {}, "concurrency": {"per_number": 1}}, mode_override="monitor")
    assert decide(engine, attempt("a", caller=NOT_OWNED)) == STRIPPED
    with capture_logs() as logs:
        assert decide(engine, attempt("b", caller=NOT_OWNED)) == STRIPPED
    [line] = decisions(logs)
    assert [(other["rule"], other["mode"]) for other in line["also"]] == [
        ("caller_id", "monitor"),
        ("concurrency", "monitor"),
    ]
    assert engine.counters.findings == {
        ("caller_id", "monitor", "deny"): 2,
        ("concurrency", "monitor", "deny"): 1,
    }


# -- the decision line --------------------------------------------------------------------------
def test_the_decision_line_explains_a_rejection() -> None:
    engine = engine_for(
        {
            "caller_id": {},
            "concurrency": {"per_number": 1, "per_account": 5},
            "call_rate": {"per_number": {"per_minute": 6, "burst": 3}, "per_account": None},
        }
    )
    presented = "sip:4155550142@customer.example;user=phone"
    decide(engine, attempt("a", from_=f"<{presented}>"))
    with capture_logs() as logs:
        verdict = decide(engine, attempt("b", from_=f"<{presented}>", uri="sip:4155552000@pbx.example.com"))
    assert verdict == Reject(status=486, reason="Too many simultaneous calls")
    [line] = decisions(logs)
    assert line == {
        "event": "call.decision",
        "log_level": "info",
        "call_id": "b@192.0.2.10",
        "account": "acme",
        "source": "192.0.2.10",
        "caller": presented,
        "caller_e164": OWNED,
        "callee": CALLEE,
        "verdict": "reject",
        "rule": "concurrency",
        "detail": f"calls from {OWNED}: 2 > 1",
        "code": 486,
        "counters": [
            {"rule": "concurrency", "what": f"calls from {OWNED}", "count": 2, "limit": 1},
            {"rule": "concurrency", "what": "calls of acme", "count": 2, "limit": 5},
            {"rule": "call_rate", "what": f"calls from {OWNED}", "count": 2, "limit": 3},
        ],
    }


def test_the_decision_line_of_a_denied_call() -> None:
    engine = engine_for({"caller_id": {}, "concurrency": {}})
    with capture_logs() as logs:
        decide(engine, attempt("a", source=ELSEWHERE, caller=NOT_OWNED, uri="sip:alice@pbx.example.com"))
    [line] = decisions(logs)
    assert {key: line[key] for key in ("account", "source", "caller", "caller_e164", "callee")} == {
        "account": None,
        "source": "198.51.100.7",
        "caller": f"sip:{NOT_OWNED}@customer.example",
        "caller_e164": NOT_OWNED,
        "callee": "sip:alice@pbx.example.com",  # not a number: as presented
    }
    assert (line["verdict"], line["rule"]) == ("reject", "caller_id")
    assert line["detail"] == "source 198.51.100.7 belongs to no account"
    assert line["counters"] == [
        {"rule": "concurrency", "what": f"calls from {NOT_OWNED}", "count": 1, "limit": 2}
    ]
    assert "also" not in line


def test_one_decision_line_per_call() -> None:
    engine = engine_for({"caller_id": {}, "concurrency": {"per_number": 1}, "call_rate": {}})
    with capture_logs() as logs:
        verdicts = [decide(engine, attempt(name)) for name in "abc"]
    lines = decisions(logs)
    assert [line["call_id"] for line in lines] == ["a@192.0.2.10", "b@192.0.2.10", "c@192.0.2.10"]
    assert [line["verdict"] for line in lines] == ["accept", "reject", "reject"]
    assert [isinstance(verdict, Accept) for verdict in verdicts] == [True, False, False]
    assert lines[0]["log_level"] == "debug"  # a clean accept is not news


# -- the usage rule's maximum call duration ----------------------------------------------------------
def test_max_call_duration_reaches_the_core_in_enforce_mode_only() -> None:
    enforcing = engine_for({"usage": {"max_call_duration": 90}})
    assert decide(enforcing, attempt("long")) == Accept(remove_headers=STRIP, max_duration=90.0)
    monitoring = engine_for({"usage": {"max_call_duration": 90, "mode": "monitor"}})
    assert decide(monitoring, attempt("long")) == Accept(remove_headers=STRIP)


def test_the_shortest_max_call_duration_wins_an_accounts_own_included() -> None:
    accounts = copy.deepcopy(ACCOUNTS)
    accounts["acme"]["limits"] = {"max_call_duration": 30}
    engine = engine_for({"usage": {"max_call_duration": 600}}, accounts)
    assert decide(engine, attempt("acme")) == Accept(remove_headers=STRIP, max_duration=30.0)
    beta = attempt("beta", source=ELSEWHERE, headers=[("Authorization", 'Digest username="beta-trunk"')])
    assert decide(engine, beta) == Accept(remove_headers=STRIP, max_duration=600.0)
