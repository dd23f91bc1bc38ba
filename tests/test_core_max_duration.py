"""ProxyCore ending calls itself: a maximum call duration, enforced with a BYE to each
party (Accept.max_duration), with a fake clock.

The BYEs are checked as the parties would check them (RFC 3261 §12.2): From, To and tags
of the party each one stands in for, a CSeq above anything that party sent, the remote
target as Request-URI, the route set beyond sipguard; then as transactions sipguard owns
(Timers E, F and K, responses absorbed), and against the races of a real hang-up.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from sipsim import (
    CALL_ID,
    CALLEE,
    CALLEE_CONTACT,
    CALLEE_TAG,
    CALLER,
    CALLER_CONTACT,
    CALLER_TAG,
    CUSTOMER,
    CUSTOMER_TCP,
    LOCAL_TCP,
    LOCAL_UDP,
    OUR_RR,
    UPSTREAM,
    Sim,
    header_lines,
    in_dialog_from_customer,
    in_dialog_from_pbx,
    invite,
    kinds,
    of_type,
    only_send,
    parse_request,
    response,
)

from proxy.sip.events import Accept, Action, Address, CallAnswered, CallEnded, EndReason, Send

LIMITED = Accept(max_duration=60.0)
REASON = 'SIP;cause=200;text="Maximum call duration reached"'
BYE_VIA = re.compile(r"SIP/2\.0/(UDP|TCP) 127\.0\.0\.1:5060;branch=(z9hG4bK-sg[0-9a-f]{20})")


def answered_call(sim: Sim, verdict: Accept = LIMITED, *, at: float = 5.0, **answer: Any) -> None:
    """A customer's call accepted with ``verdict`` and answered by the PBX at ``at``."""
    forwarded = sim.forward(verdict=verdict)
    sim.now = at
    sim.answer(forwarded.data, **answer)


def all_byes(actions: list[Action]) -> list[Send]:
    return [send for send in of_type(actions, Send) if send.data.startswith(b"BYE ")]


def byes(actions: list[Action]) -> dict[Address, Send]:
    """sipguard's own BYEs among ``actions``, by destination (a retransmission is a copy)."""
    found: dict[Address, Send] = {}
    for send in all_byes(actions):
        assert found.setdefault(send.destination, send) == send, "two different BYEs to one party"
    return found


def our_via(send: Send) -> tuple[str, str]:
    """The transport and branch of a BYE's one Via, which must be sipguard's."""
    [via] = parse_request(send.data).values("via")
    match = BYE_VIA.fullmatch(via)
    assert match is not None, via
    return match.group(1), match.group(2)


def bye_branch(send: Send) -> str:
    return our_via(send)[1]


def ok_to(send: Send) -> bytes:
    """A party's 200 to one of sipguard's BYEs."""
    return response(send.data, 200, to_tag=None)


# -- the BYEs ----------------------------------------------------------------------------------------
def test_both_parties_get_a_bye_when_the_maximum_duration_is_up() -> None:
    sim = Sim.make()
    answered_call(sim, at=5.0)
    assert sim.run_until(64.9) == []
    actions = sim.run_until(65.0)
    assert kinds(actions) == ["CallEnded", "Send", "Send"]
    [end] = of_type(actions, CallEnded)
    assert (end.reason, end.now, end.answered_at, end.by_caller) == (EndReason.MAX_DURATION, 65.0, 5.0, None)
    assert sim.core.calls.live == 0
    sent = byes(actions)
    assert set(sent) == {UPSTREAM, CUSTOMER}
    to_callee, to_caller = sent[UPSTREAM], sent[CUSTOMER]
    assert to_callee.local == to_caller.local == LOCAL_UDP
    # to the callee, as the caller would send it: byte for byte
    assert (
        to_callee.data
        == (
            f"BYE {CALLEE_CONTACT} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={bye_branch(to_callee)}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: {CALLER};tag={CALLER_TAG}\r\n"
            f"To: {CALLEE};tag={CALLEE_TAG}\r\n"
            f"Call-ID: {CALL_ID}\r\n"
            "CSeq: 2 BYE\r\n"  # the INVITE was 1
            f"Reason: {REASON}\r\n"
            "User-Agent: sipguard\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    # to the caller, as the callee would send it: it has sent nothing yet, so CSeq 1
    message = parse_request(to_caller.data)
    assert str(message.uri) == CALLER_CONTACT
    assert message.values("from") == [f"{CALLEE};tag={CALLEE_TAG}"]
    assert message.values("to") == [f"{CALLER};tag={CALLER_TAG}"]
    assert (message.call_id, message.cseq, message.max_forwards) == (CALL_ID, (1, "BYE"), 70)
    assert message.values("reason") == [REASON] and message.content_length == 0
    assert not message.has("route")  # sipguard's own Record-Route is the whole route set
    assert bye_branch(to_caller) != bye_branch(to_callee)


def test_the_route_set_beyond_sipguard_is_kept_in_each_direction() -> None:
    """caller → p0 → p1 → sipguard → p3 → p4 → callee. Each proxy puts its Record-Route on
    top, so the 2xx lists p4, p3, sipguard, p1, p0: the BYE to the callee routes p3 then
    p4, the one to the caller p1 then p0 (RFC 3261 §12.1, §16.6)."""
    p = [f"<sip:p{n}.example;lr>" for n in range(5)]
    sim = Sim.make()
    forwarded = sim.forward(invite(headers=(("Record-Route", f"{p[1]}, {p[0]}"),)), LIMITED)
    assert parse_request(forwarded.data).values("record-route") == [OUR_RR, f"{p[1]}, {p[0]}"]
    record_route = f"{p[4]}, {p[3]}, {OUR_RR}, {p[1]}, {p[0]}"
    sim.answer(forwarded.data, record_route=False, headers=(("Record-Route", record_route),))
    sent = byes(sim.run_until(60.0))
    to_callee = parse_request(sent[UPSTREAM].data)  # the PBX side: always via the upstream
    assert to_callee.values("route") == [f"{p[3]}, {p[4]}"]
    assert str(to_callee.uri) == CALLEE_CONTACT
    p1 = Address("udp", "p1.example", 5060)
    to_caller = parse_request(sent[p1].data)  # the customer side: to the first Route
    assert to_caller.values("route") == [f"{p[1]}, {p[0]}"]
    assert str(to_caller.uri) == CALLER_CONTACT


def test_over_tcp_the_bye_leaves_from_the_tcp_face_and_is_not_retransmitted() -> None:
    """A caller over TCP, the PBX over UDP: sipguard record-routed both of its faces, and
    neither belongs in a route set. The caller's BYE goes over TCP to its Contact, once;
    the PBX's over UDP, retransmitted until answered."""
    caller_contact = "sip:alice@192.0.2.10:5060;transport=tcp"
    sim = Sim.make()
    tcp_invite = invite(vias=("SIP/2.0/TCP 192.0.2.10:40000;branch=z9hG4bKtcp1",), contact=caller_contact)
    forwarded = sim.forward(tcp_invite, LIMITED, source=CUSTOMER_TCP)
    sim.answer(forwarded.data)
    sent = byes(sim.run_until(60.0))
    caller_tcp = Address("tcp", "192.0.2.10", 5060)
    assert set(sent) == {UPSTREAM, caller_tcp}
    to_caller = sent[caller_tcp]
    assert to_caller.local == LOCAL_TCP and sent[UPSTREAM].local == LOCAL_UDP
    assert our_via(to_caller)[0] == "TCP" and our_via(sent[UPSTREAM])[0] == "UDP"
    message = parse_request(to_caller.data)
    assert str(message.uri) == caller_contact and not message.has("route")
    assert not parse_request(sent[UPSTREAM].data).has("route")
    later = of_type(sim.run_until(70.0), Send)
    assert later and all(send == sent[UPSTREAM] for send in later)  # only the UDP one again


def test_a_re_invite_or_update_raises_the_cseq_of_the_next_bye() -> None:
    sim = Sim.make()
    answered_call(sim)
    sim.now = 10.0
    reinvite = only_send(sim.customer(in_dialog_from_customer("INVITE", cseq=7)))
    only_send(sim.pbx(response(reinvite.data, 200, contact=CALLEE_CONTACT)))
    sim.now = 11.0
    update = only_send(sim.pbx(in_dialog_from_pbx("UPDATE", cseq=40)))
    only_send(sim.customer(response(update.data, 200)))
    sim.now = 12.0  # an older CSeq arriving late lowers nothing
    only_send(sim.customer(in_dialog_from_customer("INFO", cseq=3, branch="z9hG4bKcust3")))
    sent = byes(sim.run_until(65.0))
    assert parse_request(sent[UPSTREAM].data).cseq.seq == 8
    assert parse_request(sent[CUSTOMER].data).cseq.seq == 41


# -- sipguard's own transactions --------------------------------------------------------------------
def test_unanswered_udp_byes_are_retransmitted_per_timer_e_until_timer_f() -> None:
    sim = Sim.make()
    answered_call(sim, at=0.0)
    first = byes(sim.run_until(60.0))
    assert sim.core.pending == 2  # a shutdown drain waits for them too
    sent_at: list[float] = []
    while (due := sim.core.get_timer()) is not None and due < 200.0:
        again = byes(sim.run_until(due))
        if again:
            assert again == first  # the same bytes each time, to both
            sent_at.append(due)
    # RFC 3261 §17.1.2.2: T1 doubling up to T2, for 64*T1
    assert sent_at == [60.5, 61.5, 63.5, 67.5, 71.5, 75.5, 79.5, 83.5, 87.5, 91.5]
    assert sim.core.pending == 0 and sim.core.transactions == 0
    assert sim.core.get_timer() is None
    assert len(of_type(sim.log, CallEnded)) == 1


def test_answers_to_our_byes_are_absorbed_and_stop_retransmission() -> None:
    sim = Sim.make()
    answered_call(sim, at=0.0)
    sent = byes(sim.run_until(60.0))
    to_callee, to_caller = sent[UPSTREAM], sent[CUSTOMER]
    sim.now = 60.1
    assert sim.pbx(response(to_callee.data, 100, to_tag=None)) == []
    assert sim.pbx(ok_to(to_callee)) == []
    assert sim.customer(ok_to(to_caller)) == []
    assert sim.core.pending == 0
    assert sim.pbx(ok_to(to_callee)) == []  # retransmitted within Timer K: absorbed as well
    assert byes(sim.run_until(200.0)) == {}
    assert sim.core.get_timer() is None


def test_a_provisional_answer_slows_retransmission_to_t2() -> None:
    sim = Sim.make()
    answered_call(sim, at=0.0)
    to_callee = byes(sim.run_until(60.0))[UPSTREAM]
    sim.customer(ok_to(byes(sim.log)[CUSTOMER]))
    sim.now = 60.2
    assert sim.pbx(response(to_callee.data, 100, to_tag=None)) == []
    assert len(all_byes(sim.run_until(70.0))) == 3  # 60.5 (already due), then every T2: 64.5, 68.5
    assert sim.core.get_timer() == 72.5


# -- races and what does not end a call -------------------------------------------------------------
@pytest.mark.parametrize("side", ["customer", "pbx"])
def test_a_party_hanging_up_first_ends_the_call_and_no_bye_is_sent(side: str) -> None:
    sim = Sim.make()
    answered_call(sim)
    sim.now = 30.0
    actions = sim.hang_up() if side == "customer" else sim.pbx(in_dialog_from_pbx("BYE"))
    assert [end.reason for end in of_type(actions, CallEnded)] == [EndReason.BYE]
    assert byes(sim.run_until(7200.0)) == {}
    assert of_type(sim.log, CallEnded) == of_type(actions, CallEnded)


def test_requests_crossing_our_byes_are_relayed_and_end_nothing() -> None:
    """The call is over for sipguard, as for any dialog it no longer knows: a BYE or
    re-INVITE from a party is relayed, and the other party (which got our BYE) answers
    481 itself. If our BYE to that party was lost, the relayed one still ends its leg."""
    sim = Sim.make()
    answered_call(sim)
    assert len(byes(sim.run_until(65.0))) == 2
    sim.now = 65.1
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", cseq=2)))
    assert bye.destination == UPSTREAM
    gone = only_send(sim.pbx(response(bye.data, 481)))
    assert gone.destination == CUSTOMER
    reinvite = only_send(sim.pbx(in_dialog_from_pbx("INVITE", cseq=5)))
    assert reinvite.destination == CUSTOMER
    assert kinds(sim.customer(response(reinvite.data, 481))) == ["Send"]
    assert len(of_type(sim.log, CallEnded)) == 1 and sim.core.calls.live == 0


def test_a_retransmitted_2xx_after_the_bye_does_not_bring_the_call_back() -> None:
    sim = Sim.make()
    forwarded = sim.forward(verdict=LIMITED)
    ok = response(forwarded.data, 200, contact=CALLEE_CONTACT)
    relayed = sim.answer(forwarded.data)
    sim.run_until(60.0)
    assert sim.pbx(ok) == [relayed]  # still relayed: a 2xx is end to end
    sim.run_until(200.0)  # the INVITE transaction is forgotten: now routed by Via
    assert kinds(sim.pbx(ok)) == ["Send"]
    assert len(of_type(sim.log, CallAnswered)) == 1
    assert len(of_type(sim.log, CallEnded)) == 1 and sim.core.calls.live == 0
    assert sim.core.get_timer() is None


def test_a_refresh_answered_after_the_bye_does_not_rearm_the_call() -> None:
    sim = Sim.make()
    answered_call(sim, at=0.0, headers=(("Session-Expires", "90"),))
    sim.now = 59.0
    refresh = only_send(sim.customer(in_dialog_from_customer("UPDATE", cseq=3)))
    assert len(byes(sim.run_until(60.0))) == 2
    sim.now = 60.5
    assert kinds(sim.pbx(response(refresh.data, 200, headers=(("Session-Expires", "90"),)))) == ["Send"]
    sim.run_until(10_000.0)
    assert len(of_type(sim.log, CallEnded)) == 1
    assert len(all_byes(sim.log)) == 2 * 11  # each sent and retransmitted 10 times, never anew
    assert sim.core.get_timer() is None


def test_without_a_maximum_duration_nothing_is_sent() -> None:
    sim = Sim.make(max_call_lifetime=3600.0)
    answered_call(sim, Accept())
    [end] = of_type(sim.run_until(3600.0), CallEnded)
    assert end.reason is EndReason.MAX_LIFETIME
    assert byes(sim.log) == {}


def test_a_ringing_call_is_not_ended_by_its_maximum_duration() -> None:
    """The duration counts from the answer; ringing has its own limit (Timer C)."""
    sim = Sim.make(early_timeout=180.0)
    forwarded = sim.forward(verdict=Accept(max_duration=10.0))
    sim.now = 1.0
    sim.pbx(response(forwarded.data, 180))
    assert sim.run_until(119.0) == []
    sim.answer(forwarded.data)
    assert byes(sim.run_until(128.9)) == {}
    [end] = of_type(sim.run_until(129.0), CallEnded)
    assert end.reason is EndReason.MAX_DURATION and end.answered_at == 119.0
    # and a call that rings out ends no-answer with a CANCEL, as any other
    sim = Sim.make(early_timeout=180.0)
    forwarded = sim.forward(verdict=Accept(max_duration=10.0))
    sim.pbx(response(forwarded.data, 180))
    sim.run_until(180.0)
    [end] = of_type(sim.pbx(response(forwarded.data, 487)), CallEnded)
    assert end.reason is EndReason.NO_ANSWER and byes(sim.log) == {}


@pytest.mark.parametrize(
    ("session", "reason"), [(30, EndReason.SESSION_EXPIRED), (90, EndReason.MAX_DURATION)]
)
def test_the_earliest_limit_ends_the_call(session: int, reason: EndReason) -> None:
    sim = Sim.make()
    answered_call(sim, at=0.0, headers=(("Session-Expires", str(session)),))
    [end] = of_type(sim.run_until(100.0), CallEnded)
    assert (end.reason, end.now) == (reason, min(session, 60.0))
    assert bool(byes(sim.log)) is (reason is EndReason.MAX_DURATION)


def test_a_party_without_a_usable_contact_gets_no_bye_but_the_other_does() -> None:
    sim = Sim.make()
    forwarded = sim.forward(verdict=LIMITED)
    ok = response(forwarded.data, 200, headers=(("Contact", "<sip:bob@[::1>"),))
    assert kinds(sim.pbx(ok)) == ["CallAnswered", "Send"]  # the 2xx itself is relayed as ever
    actions = sim.run_until(60.0)
    assert kinds(actions) == ["CallEnded", "Send"]
    assert set(byes(actions)) == {CUSTOMER}
    assert header_lines(byes(actions)[CUSTOMER].data)[0] == f"BYE {CALLER_CONTACT} SIP/2.0".encode()
