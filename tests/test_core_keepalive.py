"""ProxyCore probing both parties of an answered call with in-dialog OPTIONS, and ending
the call when one has vanished (Accept.keepalive), with a fake clock.

The probes are checked as the parties would see them (RFC 3261 §12.2): From, To and tags
of the party each stands in for, the remote target as Request-URI, the route set beyond
sipguard, and a CSeq below anything that party sent (so the receiver answers without
counting it, and the parties' own requests stay in order). Then the counting: any final
answer but 408 and 481 keeps a party alive, misses must come ``failed_limit`` in a row,
and a call that ends for any reason stops probing.
"""

from __future__ import annotations

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
    in_dialog_from_customer,
    in_dialog_from_pbx,
    invite,
    kinds,
    of_type,
    only_send,
    parse_request,
    response,
)
from test_core_max_duration import all_byes, answered_call, byes, ok_to, our_via

from proxy.sip.events import Accept, Action, Address, CallEnded, EndReason, Keepalive, Send

KEEPALIVE = Keepalive(interval=30.0, failed_limit=3, timeout=10.0)
PROBED = Accept(keepalive=KEEPALIVE)
KEEPALIVE_REASON = 'SIP;cause=408;text="Keepalive failed"'
# answered at 5 (answered_call's default): a round of probes every 30 s from then
ROUNDS = [35.0 + 30.0 * n for n in range(20)]


def probes(actions: list[Action]) -> dict[Address, Send]:
    """sipguard's own OPTIONS among ``actions``, by destination (a retransmission is a copy)."""
    found: dict[Address, Send] = {}
    for send in of_type(actions, Send):
        if send.data.startswith(b"OPTIONS "):
            assert found.setdefault(send.destination, send) == send, "two different probes to one party"
    return found


def answer(sim: Sim, probe: Send, status: int = 200) -> list[Action]:
    """The probed party's final answer, sent back along the probe's one Via (sipguard's)."""
    data = response(probe.data, status, to_tag=None)
    return sim.pbx(data) if probe.destination == UPSTREAM else sim.customer(data)


def round_at(sim: Sim, when: float, *, callee: int | None = 200, caller: int | None = 200) -> list[Action]:
    """Run to a round of probes (there must be one to each party) and answer each with its
    status, or not at all (None); what the answers made the core do."""
    sim.run_until(when - 0.01)  # (the last round's retransmissions)
    sent = probes(sim.run_until(when))
    assert set(sent) == {UPSTREAM, CUSTOMER}, sent
    actions: list[Action] = []
    for destination, status in ((UPSTREAM, callee), (CUSTOMER, caller)):
        if status is not None:
            actions += answer(sim, sent[destination], status)
    return actions


def own_byes(actions: list[Action]) -> list[Send]:
    """The BYEs sipguard wrote itself (its Via alone), not those it relayed."""
    return [send for send in all_byes(actions) if len(parse_request(send.data).values("via")) == 1]


def ended(sim: Sim) -> list[CallEnded]:
    return of_type(sim.log, CallEnded)


# -- the probes ---------------------------------------------------------------------------------------
def test_each_party_is_probed_every_interval_once_answered_as_the_other_would_ask() -> None:
    sim = Sim.make()
    answered_call(sim, PROBED, at=5.0)
    assert sim.run_until(34.9) == []
    actions = sim.run_until(35.0)
    assert kinds(actions) == ["Send", "Send"]
    sent = probes(actions)
    to_callee, to_caller = sent[UPSTREAM], sent[CUSTOMER]
    assert to_callee.local == to_caller.local == LOCAL_UDP
    # to the callee, as the caller would send it, one CSeq below its INVITE's: byte for byte
    assert (
        to_callee.data
        == (
            f"OPTIONS {CALLEE_CONTACT} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={our_via(to_callee)[1]}\r\n"
            "Max-Forwards: 70\r\n"
            f"From: {CALLER};tag={CALLER_TAG}\r\n"
            f"To: {CALLEE};tag={CALLEE_TAG}\r\n"
            f"Call-ID: {CALL_ID}\r\n"
            "CSeq: 0 OPTIONS\r\n"
            "User-Agent: sipguard\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
    )
    # to the caller, as the callee would send it: tags the other way round; the callee has
    # sent nothing, so 0, below whatever it will send itself
    message = parse_request(to_caller.data)
    assert str(message.uri) == CALLER_CONTACT
    assert message.values("from") == [f"{CALLEE};tag={CALLEE_TAG}"]
    assert message.values("to") == [f"{CALLER};tag={CALLER_TAG}"]
    assert (message.call_id, message.cseq, message.max_forwards) == (CALL_ID, (0, "OPTIONS"), 70)
    assert not message.has("route") and not message.has("reason")
    assert our_via(to_caller)[1] != our_via(to_callee)[1]
    # answers are absorbed; the next round is 30 s on, each probe a new transaction
    assert answer(sim, to_callee) == [] and answer(sim, to_caller) == []
    assert sim.run_until(64.9) == []
    again = probes(sim.run_until(65.0))
    assert set(again) == {UPSTREAM, CUSTOMER}
    branches = {our_via(send)[1] for send in (*sent.values(), *again.values())}
    assert len(branches) == 4


def test_probes_follow_the_route_set_beyond_sipguard_in_each_direction() -> None:
    """caller → p0 → p1 → sipguard → p3 → p4 → callee, as for the BYE (§12.1, §16.6)."""
    p = [f"<sip:p{n}.example;lr>" for n in range(5)]
    sim = Sim.make()
    forwarded = sim.forward(invite(headers=(("Record-Route", f"{p[1]}, {p[0]}"),)), PROBED)
    record_route = f"{p[4]}, {p[3]}, {OUR_RR}, {p[1]}, {p[0]}"
    sim.answer(forwarded.data, record_route=False, headers=(("Record-Route", record_route),))
    sent = probes(sim.run_until(30.0))
    to_callee = parse_request(sent[UPSTREAM].data)  # the PBX side: always via the upstream
    assert to_callee.values("route") == [f"{p[3]}, {p[4]}"]
    assert str(to_callee.uri) == CALLEE_CONTACT
    to_caller = parse_request(sent[Address("udp", "p1.example", 5060)].data)  # to the first Route
    assert to_caller.values("route") == [f"{p[1]}, {p[0]}"]
    assert str(to_caller.uri) == CALLER_CONTACT


def test_probe_cseqs_stay_below_each_partys_own_and_leave_the_bye_above() -> None:
    """After a re-INVITE (7) from the caller and an UPDATE (40) from the callee, probes say 6
    and 39: a live UA rejects them as out of order (§12.2.2) and keeps its count, so the
    parties' next requests, and sipguard's own BYE (8 and 41), are still in order."""
    sim = Sim.make()
    answered_call(sim, Accept(max_duration=100.0, keepalive=KEEPALIVE), at=5.0)
    sim.now = 10.0
    reinvite = only_send(sim.customer(in_dialog_from_customer("INVITE", cseq=7)))
    only_send(sim.pbx(response(reinvite.data, 200, contact=CALLEE_CONTACT)))
    sim.now = 11.0
    update = only_send(sim.pbx(in_dialog_from_pbx("UPDATE", cseq=40)))
    only_send(sim.customer(response(update.data, 200)))
    sent = probes(sim.run_until(35.0))
    assert parse_request(sent[UPSTREAM].data).cseq == (6, "OPTIONS")
    assert parse_request(sent[CUSTOMER].data).cseq == (39, "OPTIONS")
    answer(sim, sent[UPSTREAM], 500)  # "CSeq out of order": the dialog is alive
    answer(sim, sent[CUSTOMER], 500)
    bye = byes(sim.run_until(105.0))
    assert parse_request(bye[UPSTREAM].data).cseq.seq == 8
    assert parse_request(bye[CUSTOMER].data).cseq.seq == 41
    assert [end.reason for end in ended(sim)] == [EndReason.MAX_DURATION]


def test_a_party_that_moved_mid_call_is_probed_at_its_new_contact() -> None:
    """A re-INVITE or UPDATE is a target refresh (§12.2): the Contact of the request, and of
    its 2xx, is where requests to that party go from then on; probes to a party's old
    address would all be missed, and its call ended for nothing."""
    sim = Sim.make()
    answered_call(sim, PROBED)
    sim.now = 10.0
    moved_caller, moved_callee = "sip:alice@192.0.2.99:5080", "sip:bob@127.0.0.1:5099"
    reinvite = only_send(sim.customer(in_dialog_from_customer("INVITE", cseq=2, contact=moved_caller)))
    only_send(sim.pbx(response(reinvite.data, 200, contact=moved_callee)))
    sent = probes(sim.run_until(35.0))
    caller_now = Address("udp", "192.0.2.99", 5080)
    assert set(sent) == {UPSTREAM, caller_now}
    assert str(parse_request(sent[caller_now].data).uri) == moved_caller
    assert str(parse_request(sent[UPSTREAM].data).uri) == moved_callee
    assert [answer(sim, probe) for probe in sent.values()] == [[], []]
    sim.now = 40.0  # and the callee moves again, by an UPDATE of its own
    moved_again = "sip:bob@127.0.0.1:5100"
    update = only_send(sim.pbx(in_dialog_from_pbx("UPDATE", cseq=5, contact=moved_again)))
    only_send(sim.customer(response(update.data, 200, contact=None)))  # a 2xx without Contact moves nobody
    sent = probes(sim.run_until(65.0))
    assert str(parse_request(sent[UPSTREAM].data).uri) == moved_again
    assert str(parse_request(sent[caller_now].data).uri) == moved_caller


def test_a_ringing_call_is_not_probed_and_the_first_round_counts_from_the_answer() -> None:
    sim = Sim.make()
    forwarded = sim.forward(verdict=PROBED)
    sim.now = 1.0
    sim.pbx(response(forwarded.data, 180))
    assert sim.run_until(100.0) == []
    sim.answer(forwarded.data)
    assert probes(sim.run_until(129.9)) == {}
    assert set(probes(sim.run_until(130.0))) == {UPSTREAM, CUSTOMER}


def test_calls_without_a_keepalive_are_never_probed_and_keep_no_prober() -> None:
    for verdict in (Accept(), Accept(max_duration=3000.0)):
        sim = Sim.make()
        answered_call(sim, verdict)
        [call] = sim.core.calls.calls()
        assert call.dialog is None or call.dialog.prober is None
        sim.run_until(4000.0)
        assert probes(sim.log) == {}


# -- counting answers and misses ----------------------------------------------------------------------
def test_answered_probes_keep_the_call_up_whatever_the_answer() -> None:
    """Any final response but 408 and 481 comes from a party that still has the call: a 500
    for the low CSeq, a 405 from a UA that does not do OPTIONS, a 200."""
    sim = Sim.make()
    answered_call(sim, PROBED)
    for when, status in zip(ROUNDS, [200, 500, 405, 200, 404, 500, 603, 200], strict=False):
        assert round_at(sim, when, callee=status, caller=status) == []  # absorbed, never relayed
    assert ended(sim) == [] and sim.core.calls.live == 1
    assert own_byes(sim.log) == []


def test_one_lost_probe_does_not_end_the_call_nor_do_misses_that_are_not_in_a_row() -> None:
    sim = Sim.make()
    answered_call(sim, PROBED)
    # the callee misses two, answers, misses two, answers ...; the caller misses every other
    pattern = [None, None, 200, None, None, 200, None, None, 200]
    for index, (when, status) in enumerate(zip(ROUNDS, pattern, strict=False)):
        round_at(sim, when, callee=status, caller=None if index % 2 else 200)
    sim.run_until(ROUNDS[len(pattern)] - 1)  # the last misses have timed out
    assert ended(sim) == [] and sim.core.calls.live == 1


def test_failed_limit_probes_missed_in_a_row_end_the_call_with_a_bye_to_both_sides() -> None:
    """The callee stops answering: its probe of 35 s is sent again per Timer E until the
    keepalive's timeout (not Timer F), a miss at 45 s, then at 75 s, then at 105 s the third:
    the call ends, each party gets a BYE naming why, and the caller's probes stop too."""
    sim = Sim.make()
    answered_call(sim, PROBED, at=5.0)
    first = probes(sim.run_until(35.0))[UPSTREAM]
    answer(sim, probes(sim.log)[CUSTOMER])
    copies: list[tuple[bytes, float]] = []
    while (due := sim.core.get_timer()) is not None and due < 45.0:
        copies += [(send.data, due) for send in of_type(sim.run_until(due), Send)]
    assert copies == [(first.data, when) for when in (35.5, 36.5, 38.5, 42.5)]  # T1 doubling
    assert sim.run_until(45.0) == []  # gave up: a miss, silently
    round_at(sim, 65.0, callee=None)
    round_at(sim, 95.0, callee=None)
    assert ended(sim) == []
    actions = sim.run_until(105.0)
    [end] = of_type(actions, CallEnded)
    assert (end.reason, end.now, end.status, end.answered_at) == (EndReason.KEEPALIVE_FAILED, 105.0, 408, 5.0)
    assert sim.core.calls.live == 0
    sent = byes(actions)
    assert set(sent) == {UPSTREAM, CUSTOMER}
    for bye in sent.values():
        assert parse_request(bye.data).values("reason") == [KEEPALIVE_REASON]
    assert parse_request(sent[UPSTREAM].data).cseq.seq == 2  # above the INVITE, not the probes
    assert parse_request(sent[CUSTOMER].data).cseq.seq == 1
    # the vanished callee never answers its BYE either; the caller does: then all is forgotten
    assert sim.customer(ok_to(sent[CUSTOMER])) == []
    sim.run_until(10_000.0)
    assert probes(sim.log[sim.log.index(end) :]) == {}
    assert len(ended(sim)) == 1
    assert sim.core.pending == 0 and sim.core.get_timer() is None


@pytest.mark.parametrize(("status", "ends"), [(481, True), (408, True), (500, False), (486, False)])
def test_a_481_or_408_answer_is_a_miss_like_silence(status: int, ends: bool) -> None:
    """481: the party forgot the call (it restarted); 408: a proxy on the way got no answer."""
    sim = Sim.make()
    answered_call(sim, PROBED)
    for when in ROUNDS[:2]:
        assert round_at(sim, when, caller=status) == []
    actions = round_at(sim, ROUNDS[2], caller=status)
    assert [(end.reason, end.now, end.status) for end in of_type(actions, CallEnded)] == (
        [(EndReason.KEEPALIVE_FAILED, ROUNDS[2], status)] if ends else []
    )
    assert len(own_byes(actions)) == (2 if ends else 0)


def test_responses_to_probes_are_absorbed_a_late_one_is_dropped_and_none_relayed() -> None:
    sim = Sim.make()
    answered_call(sim, PROBED)
    start = len(sim.log)
    sent = probes(sim.run_until(35.0))
    to_callee, to_caller = sent[UPSTREAM], sent[CUSTOMER]
    assert sim.pbx(response(to_callee.data, 100, to_tag=None)) == []  # provisional: still waiting
    assert answer(sim, to_callee) == []
    assert answer(sim, to_callee) == []  # a retransmitted 200 (Timer K): absorbed as well
    sim.run_until(50.0)  # the caller's probe gave up (45 s) and its transaction is gone
    late = answer(sim, to_caller)
    assert kinds(late) == ["Discarded"]  # sipguard's own Via and nothing below it: no one to relay to
    sends = of_type(sim.log[start:], Send)
    assert sends == [to_callee, to_caller] + [to_caller] * 4  # only probes (and copies), never a reply


def test_over_tcp_a_probe_is_sent_once_and_waits_its_timeout() -> None:
    caller_contact = "sip:alice@192.0.2.10:5060;transport=tcp"
    sim = Sim.make()
    tcp_invite = invite(vias=("SIP/2.0/TCP 192.0.2.10:40000;branch=z9hG4bKtcp1",), contact=caller_contact)
    forwarded = sim.forward(tcp_invite, PROBED, source=CUSTOMER_TCP)
    sim.now = 5.0
    sim.answer(forwarded.data)
    caller_tcp = Address("tcp", "192.0.2.10", 5060)
    sent = probes(sim.run_until(35.0))
    assert sent[caller_tcp].local == LOCAL_TCP and our_via(sent[caller_tcp])[0] == "TCP"
    answer(sim, sent[UPSTREAM])
    assert of_type(sim.run_until(64.9), Send) == []  # no retransmission over TCP
    for when in ROUNDS[1:3]:
        fresh = probes(sim.run_until(when))
        answer(sim, fresh[UPSTREAM])
    [end] = of_type(sim.run_until(ROUNDS[2] + 10.0), CallEnded)
    assert (end.reason, end.now) == (EndReason.KEEPALIVE_FAILED, ROUNDS[2] + 10.0)


# -- calls that end otherwise stop probing --------------------------------------------------------------
@pytest.mark.parametrize("side", ["customer", "pbx"])
def test_a_call_hung_up_stops_its_probes_and_one_in_flight_counts_for_nothing(side: str) -> None:
    sim = Sim.make()
    answered_call(sim, Accept(keepalive=Keepalive(interval=30.0, failed_limit=1, timeout=10.0)))
    in_flight = probes(sim.run_until(35.0))
    sim.now = 36.0
    actions = sim.hang_up() if side == "customer" else sim.pbx(in_dialog_from_pbx("BYE"))
    assert [end.reason for end in of_type(actions, CallEnded)] == [EndReason.BYE]
    assert answer(sim, in_flight[UPSTREAM], 481) == []  # would have ended it (failed_limit 1)
    sim.run_until(10_000.0)  # and the caller's never answered: it times out, uncounted
    assert set(probes(sim.log)) == {UPSTREAM, CUSTOMER} and len(ended(sim)) == 1
    assert own_byes(sim.log) == [] and sim.core.get_timer() is None


def test_the_maximum_duration_ends_a_probed_call_and_its_probes() -> None:
    sim = Sim.make()
    answered_call(sim, Accept(max_duration=50.0, keepalive=KEEPALIVE), at=5.0)
    round_at(sim, 35.0)
    actions = sim.run_until(55.0)
    assert [end.reason for end in of_type(actions, CallEnded)] == [EndReason.MAX_DURATION]
    assert len(byes(actions)) == 2
    sim.run_until(10_000.0)  # the BYEs go unanswered: sent again until Timer F, and no probe after them
    sends = of_type(sim.log, Send)
    assert sum(send.data.startswith(b"OPTIONS ") for send in sends) == 2
    assert len(own_byes(sim.log)) == 2 * 11
    assert sim.core.get_timer() is None


def test_a_party_without_a_usable_contact_is_not_probed_but_the_other_is() -> None:
    sim = Sim.make()
    forwarded = sim.forward(verdict=PROBED)
    ok = response(forwarded.data, 200, headers=(("Contact", "<sip:bob@[::1>"),))
    assert kinds(sim.pbx(ok)) == ["CallAnswered", "Send"]
    for when in ROUNDS[:5]:
        sent = probes(sim.run_until(when))
        assert set(sent) == {CUSTOMER}
        answer(sim, sent[CUSTOMER])
    assert ended(sim) == []
