"""ProxyCore over time, with a fake clock: call deadlines, transaction lifetimes, the UDP
retransmissions sipguard owns, policy timeouts; then the table bounds and a Hypothesis
property over any order and duplication of one call's messages.

Nothing sleeps: ``Sim.run_until`` fires each due timer at its own time, as the adapter
calls ``handle_timer`` when ``get_timer`` says.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sipsim import (
    CALL_ID,
    CALLEE_CONTACT,
    CUSTOMER,
    CUSTOMER_TCP,
    LOCAL_TCP,
    LOCAL_UDP,
    OUR_RR,
    UPSTREAM,
    Sim,
    in_dialog_from_customer,
    in_dialog_from_pbx,
    invite,
    kinds,
    of_type,
    only_send,
    parse_request,
    parse_response,
    request,
    response,
)

from proxy.sip.events import (
    Accept,
    Action,
    Address,
    CallAnswered,
    CallEnded,
    CallInfo,
    Decide,
    Discarded,
    EndReason,
    Keepalive,
    Reject,
    Send,
)
from proxy.sip.message import Request


def statuses(actions: list[Action]) -> list[int]:
    return [
        parse_response(send.data).status_code for send in of_type(actions, Send) if send.data[:4] == b"SIP/"
    ]


def ended(actions: list[Action]) -> list[CallEnded]:
    return of_type(actions, CallEnded)


# -- call deadlines -----------------------------------------------------------------------------
def test_a_call_ringing_past_the_early_timeout_ends_no_answer() -> None:
    sim = Sim.make(early_timeout=180.0)
    forwarded = sim.forward()
    sim.now = 1.0
    sim.pbx(response(forwarded.data, 180))
    assert sim.run_until(179.9) == []
    actions = sim.run_until(180.0)
    # the call ends with the INVITE's final response, as after a caller's CANCEL
    assert kinds(actions) == ["Send", "Send", "Discarded"]
    cancel, timeout = of_type(actions, Send)
    # CANCEL towards the PBX, on the INVITE's branch (RFC 3261 §9.1, §16.8)
    assert cancel.destination == UPSTREAM and cancel.local == LOCAL_UDP
    message = parse_request(cancel.data)
    assert message.method == "CANCEL" and message.cseq.seq == 1 and message.call_id == CALL_ID
    assert message.values("via") == parse_request(forwarded.data).values("via")[:1]
    # 408 towards the caller
    assert timeout.destination == CUSTOMER
    assert parse_response(timeout.data).status_code == 408
    assert sim.core.calls.live == 1
    # the PBX's 487 to that CANCEL still reaches the caller: the ACK it sends back is what
    # the PBX needs (sipguard relays the caller's ACK on the INVITE's branch)
    sim.now = 180.1
    late = sim.pbx(response(forwarded.data, 487))
    assert [send.destination for send in of_type(late, Send)] == [CUSTOMER]
    [end] = ended(late)
    assert end.reason is EndReason.NO_ANSWER and end.now == 180.1 and end.answered_at is None
    assert sim.core.calls.live == 0


def test_an_answered_call_ends_at_its_maximum_lifetime() -> None:
    sim = Sim.make(max_call_lifetime=3600.0)
    forwarded = sim.forward()
    sim.now = 5.0
    sim.answer(forwarded.data)
    assert ended(sim.run_until(3599.9)) == []
    actions = sim.run_until(3600.0)
    assert kinds(actions) == ["CallEnded"]
    [end] = ended(actions)
    assert end.reason is EndReason.MAX_LIFETIME and end.answered_at == 5.0
    # a BYE afterwards is still relayed, but the call is not ended twice
    sim.now = 4000.0
    assert kinds(sim.customer(in_dialog_from_customer("BYE"))) == ["Send"]


def test_session_expires_ends_the_call_when_not_refreshed() -> None:
    sim = Sim.make()
    forwarded = sim.forward()
    sim.now = 10.0
    sim.answer(forwarded.data, headers=(("Session-Expires", "90;refresher=uac"),))
    assert ended(sim.run_until(99.9)) == []
    [end] = ended(sim.run_until(100.0))
    assert end.reason is EndReason.SESSION_EXPIRED and end.now == 100.0


@pytest.mark.parametrize("method", ["INVITE", "UPDATE"])
@pytest.mark.parametrize("side", ["customer", "pbx"])
def test_a_refresh_2xx_moves_the_session_deadline(method: str, side: str) -> None:
    sim = Sim.make()
    forwarded = sim.forward()
    sim.now = 10.0
    sim.answer(forwarded.data, headers=(("Session-Expires", "90"),))
    sim.run_until(50.0)
    if side == "customer":
        refresh = only_send(sim.customer(in_dialog_from_customer(method, headers=(("Route", OUR_RR),))))
        sim.now = 51.0
        ok = only_send(sim.pbx(response(refresh.data, 200, headers=(("Session-Expires", "90"),))))
    else:
        refresh = only_send(sim.pbx(in_dialog_from_pbx(method)))
        sim.now = 51.0
        ok = only_send(sim.customer(response(refresh.data, 200, headers=(("Session-Expires", "90"),))))
    assert parse_response(ok.data).cseq.method == method
    assert ended(sim.run_until(140.9)) == []
    [end] = ended(sim.run_until(141.0))
    assert end.reason is EndReason.SESSION_EXPIRED


def test_a_failed_refresh_does_not_move_the_session_deadline() -> None:
    sim = Sim.make()
    forwarded = sim.forward()
    sim.answer(forwarded.data, headers=(("Session-Expires", "90"),))
    sim.now = 40.0
    refresh = only_send(sim.customer(in_dialog_from_customer("UPDATE")))
    assert kinds(sim.pbx(response(refresh.data, 491))) == ["Send"]
    [end] = ended(sim.run_until(90.0))
    assert end.reason is EndReason.SESSION_EXPIRED and end.now == 90.0


def test_a_refresh_2xx_without_session_expires_stops_the_session_timer() -> None:
    # RFC 4028 §7.4: "If the 2xx response did not contain a Session-Expires header
    # field, there is no session expiration."
    sim = Sim.make(max_call_lifetime=3600.0)
    forwarded = sim.forward()
    sim.answer(forwarded.data, headers=(("Session-Expires", "90"),))
    sim.now = 40.0
    refresh = only_send(sim.customer(in_dialog_from_customer("INVITE")))
    only_send(sim.pbx(response(refresh.data, 200)))
    assert ended(sim.run_until(3599.0)) == []
    [end] = ended(sim.run_until(3600.0))
    assert end.reason is EndReason.MAX_LIFETIME


def test_a_re_invite_nobody_answers_does_not_end_the_call() -> None:
    """RFC 3261 §12.2.1.2: what to do about a refresh that timed out is its UAC's call (it
    may send BYE). The proxy answers 408 and keeps the call and its slots."""
    sim = Sim.make(max_call_lifetime=3600.0)
    forwarded = sim.forward()
    sim.answer(forwarded.data)
    sim.now = 40.0
    only_send(sim.customer(in_dialog_from_customer("INVITE")))
    timeouts = sim.run_until(200.0)
    assert [parse_response(send.data).status_code for send in of_type(timeouts, Send)] == [408]
    assert ended(timeouts) == [] and sim.core.calls.live == 1
    [end] = ended(sim.run_until(3600.0))
    assert end.reason is EndReason.MAX_LIFETIME


# -- transaction lifetimes ------------------------------------------------------------------------
def test_a_transaction_is_forgotten_32_seconds_after_its_final_response() -> None:
    sim = Sim.make()
    options = request("OPTIONS", contact=None)
    forwarded = only_send(sim.customer(options))
    sim.now = 1.0
    ok = only_send(sim.pbx(response(forwarded.data, 200)))
    sim.run_until(32.9)
    assert sim.customer(options) == [ok]  # still remembered: the same answer
    sim.run_until(33.0)
    assert sim.core.transactions == 0
    assert sim.customer(options) == [forwarded]  # a new transaction, forwarded afresh


def test_a_rejected_invite_sent_again_after_32_seconds_is_judged_again() -> None:
    sim = Sim.make()
    decide = sim.offer()
    sim.decide(decide.attempt.attempt_id, Reject(status=403, reason="Forbidden"))
    sim.run_until(32.0)
    assert sim.core.transactions == 0 and sim.core.get_timer() is None
    again = sim.offer()
    assert again.attempt.now == 32.0


def test_a_late_2xx_retransmission_follows_the_via_received_and_rport() -> None:
    sim = Sim.make()
    source = Address("udp", "198.51.100.7", 40001)
    forwarded = sim.forward(
        invite(vias=("SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bKnat9",)), source=source
    )
    ok = response(forwarded.data, 200, contact=CALLEE_CONTACT)
    relayed = sim.answer(forwarded.data, contact=CALLEE_CONTACT)
    sim.run_until(40.0)
    assert sim.core.transactions == 0
    assert sim.pbx(ok) == [Send(data=relayed.data, destination=source, local=LOCAL_UDP)]


# -- retransmissions sipguard owns ------------------------------------------------------------------
def test_tcp_in_udp_out_invite_is_retransmitted_until_a_provisional() -> None:
    sim = Sim.make()
    forwarded = sim.forward(
        invite(vias=("SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bKtcp1",)), source=CUSTOMER_TCP
    )
    assert forwarded.destination == UPSTREAM and forwarded.local == LOCAL_UDP
    # each face record-routes itself: the PBX reaches the UDP one, the customer the TCP one
    assert parse_request(forwarded.data).values("record-route") == [
        OUR_RR,
        "<sip:127.0.0.1:5060;transport=tcp;lr>",
    ]
    times = []
    for _ in range(4):
        due = sim.core.get_timer()
        assert due is not None
        assert sim.run_until(due) == [forwarded]
        times.append(sim.now)
    assert times == [0.5, 1.5, 3.5, 7.5]  # Timer A: 0.5, 1, 2, 4 s apart (RFC 3261 §17.1.1.2)
    assert sim.log.count(forwarded) == 5
    sim.now = 8.0
    trying = only_send(sim.pbx(response(forwarded.data, 100, to_tag=None)))
    assert trying.destination == CUSTOMER_TCP and trying.local == LOCAL_TCP
    assert of_type(sim.run_until(100.0), Send) == []
    assert sim.log.count(forwarded) == 5


def test_tcp_in_udp_out_non_invite_is_retransmitted_until_final_and_then_forgotten() -> None:
    sim = Sim.make()
    options = request("OPTIONS", vias=("SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bKtcp2",), contact=None)
    forwarded = only_send(sim.customer(options, source=CUSTOMER_TCP))
    sent_at = []
    while (due := sim.core.get_timer()) is not None and due < 16.0:
        if sim.run_until(due) == [forwarded]:
            sent_at.append(due)
    assert sent_at == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5]  # Timer E, capped at T2 = 4 s
    sim.now = 16.0
    only_send(sim.pbx(response(forwarded.data, 200)))
    assert of_type(sim.run_until(100.0), Send) == []
    assert sim.core.transactions == 0 and sim.core.get_timer() is None


def test_retransmissions_sipguard_owns_stop_when_the_transaction_times_out() -> None:
    sim = Sim.make()
    options = request("OPTIONS", vias=("SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bKtcp3",), contact=None)
    forwarded = only_send(sim.customer(options, source=CUSTOMER_TCP))
    sim.run_until(32.0)  # Timer F: nobody answered
    assert sim.core.transactions == 0
    sends_so_far = len(of_type(sim.log, Send))
    assert of_type(sim.run_until(600.0), Send) == []
    assert len(of_type(sim.log, Send)) == sends_so_far and forwarded in sim.log
    assert sim.core.get_timer() is None


def test_udp_in_udp_out_is_never_retransmitted_by_sipguard() -> None:
    sim = Sim.make()
    forwarded = sim.forward()
    assert forwarded not in sim.run_until(40.0)  # not before a response (Timer B answers 408)...
    sim = Sim.make()
    forwarded = sim.forward()
    sim.pbx(response(forwarded.data, 100, to_tag=None))
    assert sim.run_until(179.0) == []  # ...nor after one


# -- the policy layer's time ------------------------------------------------------------------------
def test_a_decision_that_never_comes_times_out_to_503() -> None:
    sim = Sim.make(decision_timeout=32.0)
    sim.offer()
    assert sim.run_until(31.9) == []
    actions = sim.run_until(32.0)
    assert kinds(actions) == ["Send", "Discarded"]
    reply = parse_response(of_type(actions, Send)[0].data)
    assert reply.status_code == 503 and reply.values("retry-after") == ["5"]
    assert sim.core.calls.live == 0 and sim.core.pending == 0


def test_a_late_accept_gives_back_what_the_policies_took() -> None:
    """The policies may have taken slots before their Accept came too late: the call was
    never forwarded, so it ends at once and they release them (a Reject took nothing)."""
    sim = Sim.make(decision_timeout=32.0)
    late, refused = sim.offer(), sim.offer(second_call())
    sim.run_until(32.0)
    sim.now = 33.0
    actions = sim.decide(late.attempt.attempt_id, Accept())
    assert kinds(actions) == ["CallEnded"]  # and nothing is sent
    ended = actions[0]
    assert isinstance(ended, CallEnded) and ended.reason is EndReason.DECISION_TIMEOUT
    assert ended.call.attempt_id == late.attempt.attempt_id and ended.now == 33.0
    assert sim.decide(refused.attempt.attempt_id, Reject(status=403, reason="Forbidden")) == []
    assert sim.decide(late.attempt.attempt_id, Accept()) == []  # once
    assert sim.core.calls.live == 0


def test_a_verdict_that_never_comes_is_forgotten_with_its_transaction() -> None:
    sim = Sim.make(decision_timeout=32.0, max_calls=1)
    decide = sim.offer()
    sim.run_until(32.0)
    # awaited still, and counted: the policies may hold slots for it until their verdict comes
    assert statuses(sim.customer(second_call(2))) == [503]
    sim.run_until(64.0)  # the 503's transaction ends (Timer J: 32 s), and the wait with it
    assert kinds(sim.customer(second_call(3))) == ["Decide"]
    assert sim.decide(decide.attempt.attempt_id, Accept()) == []


# -- a next hop that cannot be reached -----------------------------------------------------------
def test_requests_to_an_unreachable_next_hop_get_503_at_once() -> None:
    """RFC 3261 §16.9: a transport error counts as a 503 from the next hop. The caller hears
    it now, not after Timer B, and the call's slots come back with the call."""
    sim = Sim.make()
    sim.forward()
    sim.now = 0.2
    actions = sim.core.unreachable(UPSTREAM, sim.now)
    assert kinds(actions) == ["CallEnded", "Send", "Discarded"]
    [end] = ended(actions)
    assert (end.reason, end.status, end.now) == (EndReason.REJECTED, 503, 0.2)
    [reply] = of_type(actions, Send)
    message = parse_response(reply.data)
    assert reply.destination == CUSTOMER and message.call_id == CALL_ID
    assert (message.status_code, message.reason) == (503, "Next Hop Unreachable")
    assert message.values("retry-after") == ["5"]
    assert sim.core.calls.live == 0 and sim.core.pending == 0
    assert statuses(sim.customer(invite())) == [503]  # a retransmission gets the same answer
    assert [kind for kind in kinds(sim.run_until(200.0)) if kind != "Discarded"] == []  # no 408 later


def test_an_unreachable_next_hop_leaves_answered_requests_and_other_hops_alone() -> None:
    sim = Sim.make()
    ringing = sim.forward()
    sim.pbx(response(ringing.data, 180))
    elsewhere = Address("tcp", "192.0.2.99", 5060)
    assert sim.core.unreachable(UPSTREAM, sim.now) == []  # a provisional came: it got through
    waiting = sim.forward(second_call())
    assert sim.core.unreachable(elsewhere, sim.now) == []
    assert statuses(sim.core.unreachable(waiting.destination, sim.now)) == [503]
    assert sim.core.calls.live == 1  # the ringing call goes on
    assert sim.core.unreachable(UPSTREAM, sim.now) == []  # once


def test_an_in_dialog_request_to_an_unreachable_caller_gets_503() -> None:
    sim = Sim.make()
    forwarded = sim.forward()
    sim.answer(forwarded.data)
    [bye] = of_type(sim.pbx(in_dialog_from_pbx("BYE")), Send)
    actions = sim.core.unreachable(bye.destination, sim.now)
    assert statuses(actions) == [503]
    assert of_type(actions, Send)[0].destination == UPSTREAM


def test_a_customers_bye_to_an_unreachable_pbx_gets_503_and_ends_the_call() -> None:
    sim = Sim.make()
    sim.answer(sim.forward().data)
    bye = only_send(sim.customer(in_dialog_from_customer("BYE")))
    assert sim.core.calls.live == 1  # until the PBX answers it
    actions = sim.core.unreachable(bye.destination, sim.now)
    assert statuses(actions) == [503]
    assert [(end.reason, end.by_caller) for end in ended(actions)] == [(EndReason.BYE, True)]
    assert sim.core.calls.live == 0


def test_a_customers_bye_nobody_answers_ends_the_call_when_it_times_out() -> None:
    """RFC 3261 §15.1.1: a BYE that gets no answer at all (Timer F, 64*T1) ends the dialog
    for its sender, so the call ends then, not at its maximum lifetime."""
    sim = Sim.make()
    sim.answer(sim.forward().data)
    sim.now = 10.0
    only_send(sim.customer(in_dialog_from_customer("BYE")))
    assert ended(sim.run_until(41.9)) == [] and sim.core.pending == 1
    [end] = ended(sim.run_until(42.0))
    assert (end.reason, end.by_caller, end.now) == (EndReason.BYE, True, 42.0)
    assert sim.core.calls.live == 0 and sim.core.pending == 0


# -- bounds -------------------------------------------------------------------------------------------
def second_call(n: int = 2) -> bytes:
    return invite(call_id=f"call-{n}@192.0.2.10", vias=(f"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKc{n}",))


def test_max_calls_reached_answers_503_without_asking() -> None:
    sim = Sim.make(max_calls=1)
    decide = sim.offer()
    actions = sim.customer(second_call())  # the attempt being judged counts
    assert kinds(actions) == ["Send", "Discarded"]
    reply = parse_response(of_type(actions, Send)[0].data)
    assert reply.status_code == 503 and reply.values("retry-after") == ["5"]
    forwarded = only_send(sim.decide(decide.attempt.attempt_id, Accept()))
    sim.answer(forwarded.data)
    assert statuses(sim.customer(second_call(3))) == [503]  # and so does a live call
    sim.hang_up()
    assert kinds(sim.customer(second_call(4))) == ["Decide"]  # a freed slot is reused


def test_max_transactions_reached_answers_503_statelessly() -> None:
    sim = Sim.make(max_transactions=1)
    sim.offer()
    actions = sim.customer(second_call())
    assert kinds(actions) == ["Send", "Discarded"]
    assert statuses(actions) == [503]
    assert sim.core.transactions == 1


def emergency_call(n: int) -> bytes:
    return invite(
        uri="sip:911@198.51.100.1",
        call_id=f"sos-{n}@192.0.2.10",
        vias=(f"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKsos{n}",),
    )


def dials_911(request: Request, source_host: str) -> bool:
    return str(request.uri).startswith("sip:911@") and source_host == CUSTOMER.host


@pytest.mark.parametrize("refusing", ["max_calls", "stopping"])
def test_emergency_calls_pass_where_new_calls_are_refused(refusing: str) -> None:
    """Past max_calls and while shutting down, an emergency call is still asked about and
    forwarded (the policy layer's is_emergency says which calls are), while any other new
    call gets 503."""
    sim = Sim.make(max_calls=1, is_emergency=dials_911)
    if refusing == "max_calls":
        sim.answer(sim.forward().data)
    else:
        sim.core.stop_accepting()
    assert statuses(sim.customer(second_call())) == [503]
    [decide] = of_type(sim.customer(emergency_call(1)), Decide)
    forwarded = only_send(sim.decide(decide.attempt.attempt_id, Accept()))
    assert forwarded.destination == UPSTREAM
    assert str(parse_request(forwarded.data).uri) == "sip:911@198.51.100.1"
    assert statuses(sim.customer(second_call(3))) == [503]  # and the refusal goes on for the rest


def test_stop_accepting_refuses_new_calls_but_lets_dialogs_finish() -> None:
    sim = Sim.make()
    forwarded = sim.forward()
    sim.answer(forwarded.data)
    sim.core.stop_accepting()
    actions = sim.customer(second_call())
    assert kinds(actions) == ["Send", "Discarded"]
    reply = parse_response(of_type(actions, Send)[0].data)
    assert reply.status_code == 503 and reply.values("retry-after") == ["5"]
    actions = sim.pbx(in_dialog_from_pbx("BYE"))
    assert kinds(actions) == ["CallEnded", "Send"]
    assert of_type(actions, Send)[0].destination == CUSTOMER
    assert sim.core.calls.live == 0


# -- property: any order and duplication of one call's messages ------------------------------------
def _script() -> dict[str, bytes]:
    """Every message of one call, built once from a scratch core (branches are deterministic)."""
    sim = Sim.make()
    inv = invite()
    forwarded = sim.forward(inv).data
    bye_up = of_type(sim.customer(in_dialog_from_customer("BYE")), Send)[0].data
    bye_down = of_type(sim.pbx(in_dialog_from_pbx("BYE")), Send)[0].data
    return {
        "invite": inv,
        "cancel": request("CANCEL", contact=None),
        "100": response(forwarded, 100, to_tag=None),
        "180": response(forwarded, 180),
        "200": response(forwarded, 200, contact=CALLEE_CONTACT),
        "486": response(forwarded, 486),
        "487": response(forwarded, 487),
        "ack": in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None),
        "ack-non2xx": request("ACK", to_tag="callee1", contact=None),
        "bye-customer": in_dialog_from_customer("BYE"),
        "bye-customer-200": response(bye_up, 200),
        "bye-pbx": in_dialog_from_pbx("BYE"),
        "bye-pbx-200": response(bye_down, 200),
    }


SCRIPT = _script()
FROM_CUSTOMER = {"invite", "cancel", "ack", "ack-non2xx", "bye-customer", "bye-pbx-200"}
VERDICTS = {
    "accept": Accept(),
    "accept-limited": Accept(max_duration=60.0),
    "accept-probed": Accept(keepalive=Keepalive(interval=30.0, failed_limit=2, timeout=10.0)),
    "reject": Reject(status=403, reason="Forbidden"),
}
STEPS = st.one_of(
    st.sampled_from(sorted(SCRIPT)),
    # accept-limited: a 60 s maximum duration, so sipguard sends BYEs of its own;
    # accept-probed: a keepalive, so it sends OPTIONS (and BYEs when they go unanswered);
    # answer-our-byes / answer-our-probes: both parties answer them 200
    st.sampled_from([*VERDICTS, "answer-our-byes", "answer-our-probes"]),
    # around the timers that matter: T1, a slow verdict, Timer B, Timer C, a long call
    st.sampled_from([0.5, 5.0, 31.9, 32.0, 60.0, 175.0, 180.0, 3600.0]).map(
        lambda seconds: ("wait", seconds)
    ),
    st.floats(min_value=0.0, max_value=200.0).map(lambda seconds: ("wait", seconds)),
)


def check(actions: list[Action], ended_calls: list[CallInfo]) -> None:
    """Per-step invariants; records every call that ended."""
    for action in actions:
        if isinstance(action, CallEnded):
            assert action.call not in ended_calls, "a call ended twice"
            ended_calls.append(action.call)
        if isinstance(action, CallAnswered):
            assert action.call not in ended_calls, "a call answered after it ended"
        if isinstance(action, Send):
            assert action.destination in (UPSTREAM, CUSTOMER)
        if isinstance(action, Discarded):
            assert action.status in (None, 403, 408, 481, 487, 503)


def answer_ours(sim: Sim, method: str) -> list[Action]:
    """Each party answers 200 to every ``method`` request sipguard sent it on its own (one
    Via: its own)."""
    actions: list[Action] = []
    for send in of_type(sim.log, Send):
        if send.data.startswith(f"{method} ".encode()) and len(parse_request(send.data).values("via")) == 1:
            ok = response(send.data, 200, to_tag=None)
            actions += sim.pbx(ok) if send.destination == UPSTREAM else sim.customer(ok)
    return actions


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEPS, max_size=40))
# interleavings found by hand, kept as regressions: a slow verdict then a 200 racing Timer C;
# CANCEL before the verdict; a BYE overtaking the 200; everything twice
@example(steps=["invite", ("wait", 5.0), "accept", "180", ("wait", 175.0), "200", "ack", "bye-customer"])
# Timer C's CANCEL crossed by the 200, then by the 487; a CANCEL that is never answered
@example(steps=["invite", "accept", "180", ("wait", 180.0), "200", "ack", "bye-customer", "bye-customer-200"])
@example(steps=["invite", "accept", "180", ("wait", 180.0), "487", "200", "ack-non2xx"])
@example(steps=["invite", "accept", "180", ("wait", 180.0), ("wait", 31.9), "200", ("wait", 0.5)])
@example(steps=["invite", "cancel", "accept", "200", "ack", "bye-pbx", "bye-pbx-200"])
@example(
    steps=["invite", "accept", "100", "bye-customer", "200", "200", "ack", "bye-pbx", "bye-customer-200"]
)
@example(steps=["invite", "invite", "accept", "180", "180", "invite", "486", "486", "ack-non2xx", "invite"])
# the maximum duration: our BYEs answered; a party's BYE crossing them; a late 2xx after them
@example(steps=["invite", "accept-limited", "200", "ack", ("wait", 60.0), "answer-our-byes", "bye-pbx"])
@example(steps=["invite", "accept-limited", "200", ("wait", 60.0), "bye-customer", "200", "answer-our-byes"])
# the keepalive: probes answered, then not; a BYE crossing a probe; probes ended with the call
@example(steps=["invite", "accept-probed", "200", ("wait", 31.9), "answer-our-probes", ("wait", 200.0)])
@example(steps=["invite", "accept-probed", "200", ("wait", 60.0), "bye-pbx", "answer-our-probes"])
def test_any_interleaving_ends_each_call_at_most_once(steps: list[object]) -> None:
    """Any order and duplication of one call's messages, verdicts and waits: each call ends
    at most once, is never answered after it ended, and every table drains in the end."""
    sim = Sim.make()
    attempts: list[str] = []
    accepted = 0
    ended_calls: list[CallInfo] = []
    for step in steps:
        if isinstance(step, tuple):
            actions = sim.run_until(sim.now + step[1])
        elif step == "answer-our-byes":
            actions = answer_ours(sim, "BYE")
        elif step == "answer-our-probes":
            actions = answer_ours(sim, "OPTIONS")
        elif step in VERDICTS:
            if not attempts:
                continue
            verdict = VERDICTS[str(step)]
            actions = sim.decide(attempts[-1], verdict)
            accepted += bool(actions) and step != "reject"
        elif step in FROM_CUSTOMER:
            actions = sim.customer(SCRIPT[str(step)])
        else:
            actions = sim.pbx(SCRIPT[str(step)])
        attempts += [action.attempt.attempt_id for action in of_type(actions, Decide)]
        check(actions, ended_calls)
        assert 0 <= sim.core.calls.live <= 1
    for attempt in attempts:  # the policy layer always answers in the end
        actions = sim.decide(attempt, Accept())
        accepted += bool(actions)
        check(actions, ended_calls)
    check(sim.run_until(sim.now + 5 * 3600.0), ended_calls)
    assert sim.core.calls.live == 0
    assert len(ended_calls) == accepted
    assert sim.core.transactions == 0 and sim.core.pending == 0
    assert sim.core.get_timer() is None


# -- Timer B and Timer C line up with the call's own deadline ----------------------------------------
def test_an_invite_nobody_answers_at_all_times_out_after_timer_b() -> None:
    sim = Sim.make()
    sim.forward()
    assert sim.run_until(31.9) == []
    actions = sim.run_until(32.0)  # RFC 3261 §17.1.1.2 Timer B = 64*T1: no CANCEL without a provisional
    assert kinds(actions) == ["CallEnded", "Send", "Discarded"]
    assert ended(actions)[0].reason is EndReason.NO_ANSWER
    assert statuses(actions) == [408]
    assert sim.core.calls.live == 0
    assert of_type(sim.run_until(600.0), Send) == []


def test_timer_a_stops_when_timer_b_fires() -> None:
    sim = Sim.make()
    forwarded = sim.forward(
        invite(vias=("SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bKtcp4",)), source=CUSTOMER_TCP
    )
    actions = sim.run_until(600.0)
    assert [send for send in of_type(actions, Send) if send == forwarded] == [forwarded] * 6
    assert statuses(actions) == [408]
    assert sim.core.get_timer() is None


def test_a_slow_verdict_does_not_let_the_invite_outlive_its_call() -> None:
    sim = Sim.make(early_timeout=180.0)
    decide = sim.offer()
    sim.now = 5.0  # the policies took 5 s
    forwarded = only_send(sim.decide(decide.attempt.attempt_id, Accept()))
    sim.now = 6.0
    sim.pbx(response(forwarded.data, 180))
    actions = sim.run_until(180.0)  # the call's early deadline: give up on the INVITE too
    assert kinds(actions) == ["Send", "Send", "Discarded"]
    assert statuses(actions) == [408]
    sim.now = 182.0
    # the PBX's 487 to the CANCEL ends the call (a 2xx crossing it would answer it instead)
    [end] = ended(sim.pbx(response(forwarded.data, 487)))
    assert (end.reason, end.now) == (EndReason.NO_ANSWER, 182.0)
    assert sim.core.calls.live == 0


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "90\u0660", "-5", "0"])
def test_a_session_expires_that_is_no_number_leaves_the_2xx_relayed_and_the_call_answered(
    value: str,
) -> None:
    """A Session-Expires that is not ASCII digits (``²`` passes str.isdigit, not int()), or
    too long for int(), raised out of the core: the 2xx was never relayed and the call
    never answered. Now it is ignored, as an absent one would be."""
    sim = Sim.make(max_call_lifetime=3600.0)
    forwarded = sim.forward()
    actions = sim.pbx(
        response(forwarded.data, 200, contact=CALLEE_CONTACT, headers=(("Session-Expires", value),))
    )
    assert kinds(actions) == ["CallAnswered", "Send"]
    assert ended(sim.run_until(3599.0)) == []
    [end] = ended(sim.run_until(3600.0))
    assert end.reason is EndReason.MAX_LIFETIME


# -- Timer C: the call counts until the cancelled INVITE's final response -------------------------
def ringing_call(sim: Sim) -> Send:
    """A call forwarded at 0, ringing from 1 s on: its INVITE as sent to the PBX."""
    forwarded = sim.forward()
    sim.now = 1.0
    sim.pbx(response(forwarded.data, 180))
    return forwarded


def test_a_2xx_crossing_timer_c_cancel_is_an_answered_call_that_counts_until_its_bye() -> None:
    """Timer C cancelled the INVITE and answered 408, but the PBX's 2xx crossed the CANCEL:
    relayed (§16.7), the caller ACKs it and the call is up at the PBX. It used to have
    ended already (slots given back at 180 s) and stayed untracked: a way round the cap."""
    sim = Sim.make(early_timeout=180.0)
    forwarded = ringing_call(sim)
    actions = sim.run_until(180.0)
    assert statuses(actions) == [408] and ended(actions) == []
    assert sim.core.calls.live == 1
    sim.now = 180.2
    late_ok = sim.pbx(response(forwarded.data, 200, contact=CALLEE_CONTACT))
    assert kinds(late_ok) == ["CallAnswered", "Send"]
    assert of_type(late_ok, Send)[0].destination == CUSTOMER
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None))
    assert ended(sim.run_until(1000.0)) == [] and sim.core.calls.live == 1
    [end] = ended(sim.hang_up())
    assert (end.reason, end.answered_at, end.now) == (EndReason.BYE, 180.2, 1000.0)


def test_timer_c_ends_the_call_at_the_487_to_its_cancel() -> None:
    sim = Sim.make(early_timeout=180.0)
    forwarded = ringing_call(sim)
    cancel = of_type(sim.run_until(180.0), Send)[0]
    assert parse_request(cancel.data).method == "CANCEL"
    sim.now = 180.1
    sim.pbx(response(cancel.data, 200, to_tag=None))  # the answer to sipguard's own CANCEL: absorbed
    assert sim.core.calls.live == 1
    actions = sim.pbx(response(forwarded.data, 487))
    [end] = ended(actions)
    assert (end.reason, end.status, end.now) == (EndReason.NO_ANSWER, 487, 180.1)
    assert [send.destination for send in of_type(actions, Send)] == [CUSTOMER]
    assert sim.core.calls.live == 0
    # a 2xx after the 487 is relayed (the PBX's contradiction), but ends or answers nothing
    late_ok = sim.pbx(response(forwarded.data, 200, contact=CALLEE_CONTACT))
    assert kinds(late_ok) == ["Send"] and sim.core.calls.live == 0


def test_timer_c_ends_the_call_32_seconds_later_when_no_final_response_comes() -> None:
    sim = Sim.make(early_timeout=180.0)
    ringing_call(sim)
    sim.run_until(180.0)
    assert ended(sim.run_until(211.9)) == [] and sim.core.calls.live == 1
    [end] = ended(sim.run_until(212.0))
    assert (end.reason, end.now) == (EndReason.NO_ANSWER, 212.0)
    assert sim.core.calls.live == 0 and sim.core.transactions == 0


def test_a_caller_who_cancelled_before_timer_c_ends_cancelled() -> None:
    sim = Sim.make(early_timeout=180.0)
    forwarded = ringing_call(sim)
    sim.now = 179.9
    sim.customer(request("CANCEL", contact=None))
    sim.run_until(180.0)  # the PBX is slow: Timer C cancels again and answers 408
    sim.now = 180.5
    [end] = ended(sim.pbx(response(forwarded.data, 487)))
    assert (end.reason, end.status) == (EndReason.CANCELLED, 487)
