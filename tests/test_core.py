"""ProxyCore, message by message: verdicts, forwarding edits, retransmissions, responses,
CANCEL and ACK, in-dialog routing, and the requests sipguard answers itself.

Every test feeds wire bytes (built in sipsim.py) with a fake clock and asserts the exact
list of actions; forwarded bytes are compared whole where the edit is the point, or
parsed with proxy.sip.parse_message where one header is. Timers, bounds and the
Hypothesis property are in test_core_timers.py; calls sipguard ends itself (a maximum
duration, BYEs of its own) in test_core_max_duration.py, and its keepalive probes in
test_core_keepalive.py.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
from sipsim import (
    CALL_ID,
    CALLEE_CONTACT,
    CALLEE_TAG,
    CALLER_CONTACT,
    CALLER_TAG,
    CUSTOMER,
    CUSTOMER_VIA,
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
    parse_response,
    request,
    response,
)

from proxy.sip.core import Listener
from proxy.sip.events import (
    Accept,
    Action,
    Address,
    ByeRefused,
    CallAnswered,
    CallEnded,
    Discarded,
    EndReason,
    Reject,
    Send,
)
from proxy.sip.hosts import in_networks, is_routable
from proxy.sip.message import Request
from proxy.sip.replies import build_reply

RFC4475 = Path(__file__).parent / "corpus" / "rfc4475"
OUR_VIA = re.compile(rb"^Via: SIP/2\.0/UDP 127\.0\.0\.1:5060;branch=(z9hG4bK[-\w]+)$")


def our_branch(data: bytes) -> str:
    """The branch of sipguard's Via, which must be the top one."""
    match = OUR_VIA.match(header_lines(data)[1])
    assert match is not None, header_lines(data)[:3]
    return match.group(1).decode()


# -- initial INVITE: the verdict, then the forwarded request -----------------------------------
def test_initial_invite_asks_for_a_verdict_and_sends_nothing() -> None:
    sim = Sim.make()
    decide = sim.offer()
    assert decide.attempt.source == CUSTOMER
    assert decide.attempt.now == 0.0
    assert decide.attempt.request.call_id == CALL_ID
    assert decide.attempt.attempt_id.startswith("z9hG4bK")
    assert sim.core.pending == 1 and sim.core.calls.live == 0


def test_accept_forwards_upstream_with_only_the_proxy_edits() -> None:
    sim = Sim.make()
    original = invite()
    decide = sim.offer(original)
    sim.now = 0.2
    send = only_send(sim.decide(decide.attempt.attempt_id, Accept()))
    assert send.destination == UPSTREAM and send.local == LOCAL_UDP
    branch = our_branch(send.data)
    assert decide.attempt.attempt_id.startswith(branch + ".")  # unique per attempt, see below
    expected = original.replace(
        f"Via: {CUSTOMER_VIA}\r\n".encode(),
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch={branch}\r\n"
        f"Via: {CUSTOMER_VIA}\r\n"
        f"Record-Route: {OUR_RR}\r\n".encode(),
    ).replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 69\r\n")
    assert send.data == expected  # Request-URI, other headers and the body byte-identical
    assert sim.core.calls.live == 1 and sim.core.pending == 1


def test_a_reused_branch_never_makes_two_calls_share_an_attempt_id() -> None:
    """Policies key their slots by attempt id: a dialer that reuses one Via branch for
    every INVITE (each after the previous transaction is forgotten) must get a new id
    each time, or all its calls would share one concurrency slot."""
    sim = Sim.make()
    first = sim.offer(invite(call_id="first@dialer"))
    sim.decide(first.attempt.attempt_id, Accept())
    sim.run_until(sim.now + 100.0)  # Timer B, then the 32 s linger: the transaction is forgotten
    second = sim.offer(invite(call_id="second@dialer"))
    assert second.attempt.attempt_id != first.attempt.attempt_id


def test_accept_adds_max_forwards_70_when_absent() -> None:
    sim = Sim.make()
    send = sim.forward(invite(max_forwards=None))
    forwarded = parse_request(send.data)
    assert forwarded.max_forwards == 70
    assert forwarded.values("max-forwards") == ["70"]


def test_accept_adds_the_verdicts_headers() -> None:
    sim = Sim.make()
    verdict = Accept(add_headers=(("X-Sipguard-Verdict", "ok"), ("X-Customer", "acme")))
    send = sim.forward(invite(), verdict)
    forwarded = parse_request(send.data)
    assert forwarded.values("x-sipguard-verdict") == ["ok"]
    assert forwarded.values("x-customer") == ["acme"]
    assert forwarded.body == invite().split(b"\r\n\r\n", 1)[1]


def test_a_removed_header_goes_before_the_verdict_adds_its_own() -> None:
    """A customer's forged X-Sipguard-Tag is removed, sipguard's own kept."""
    sim = Sim.make()
    verdict = Accept(
        add_headers=(("X-Sipguard-Tag", "caller_id; spoofed"),), remove_headers=("x-sipguard-tag",)
    )
    send = sim.forward(invite(headers=[("X-Sipguard-Tag", "none; all clear")]), verdict)
    assert parse_request(send.data).values("x-sipguard-tag") == ["caller_id; spoofed"]


@pytest.mark.parametrize(
    ("via", "source_port", "stamped"),
    [
        # behind NAT, rport asked for: both filled in (RFC 3581 §4)
        (
            "SIP/2.0/UDP 10.0.0.5:5060;rport;branch=z9hG4bKnat1",
            5062,
            "SIP/2.0/UDP 10.0.0.5:5060;rport=5062;branch=z9hG4bKnat1;received=192.0.2.10",
        ),
        # no rport, but the host is not where it came from (RFC 3261 §18.2.1)
        (
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKnat1",
            5060,
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKnat1;received=192.0.2.10",
        ),
        # rport asked for from the sent-by address: received is added all the same (RFC 3581 §4)
        (
            "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnat1;rport",
            5060,
            "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnat1;rport=5060;received=192.0.2.10",
        ),
        # nothing to add
        (
            "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnat1",
            5060,
            "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnat1",
        ),
        # received and rport values the client wrote itself never stay: they would route
        # the responses (a late 2xx by Via) wherever it chose
        (
            "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnat1;received=203.0.113.9",
            5060,
            "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnat1",
        ),
        (
            "SIP/2.0/UDP 10.0.0.5:5060;rport=9;RECEIVED=203.0.113.9;branch=z9hG4bKnat1",
            5062,
            "SIP/2.0/UDP 10.0.0.5:5060;rport=5062;branch=z9hG4bKnat1;received=192.0.2.10",
        ),
        (
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKnat1;received=203.0.113.9",
            5060,
            "SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKnat1;received=192.0.2.10",
        ),
    ],
    ids=["nat-rport", "nat", "rport", "nothing", "forged-received", "forged-rport", "nat-forged-received"],
)
def test_the_clients_via_is_stamped_below_ours(via: str, source_port: int, stamped: str) -> None:
    sim = Sim.make()
    source = Address("udp", "192.0.2.10", source_port)
    send = sim.forward(invite(vias=(via,)), source=source)
    lines = header_lines(send.data)
    assert OUR_VIA.match(lines[1])
    assert lines[2] == f"Via: {stamped}".encode()
    assert lines[3] == f"Record-Route: {OUR_RR}".encode()
    # the 200 goes back to where the INVITE came from, with the Via as we stamped it
    relayed = sim.answer(send.data)
    assert relayed.destination == source
    assert parse_response(relayed.data).values("via") == [stamped]


def test_reject_answers_locally_and_forwards_nothing() -> None:
    sim = Sim.make()
    original = invite()
    decide = sim.offer(original)
    actions = sim.decide(decide.attempt.attempt_id, Reject(status=403, reason="Forbidden"))
    assert kinds(actions) == ["Send", "Discarded"]
    send, discarded = actions
    assert isinstance(send, Send) and isinstance(discarded, Discarded)
    assert send.destination == CUSTOMER and send.local == LOCAL_UDP
    assert discarded == Discarded(reason="Forbidden", source=CUSTOMER, status=403, call_id=CALL_ID)
    reply = parse_response(send.data)
    tag = reply.to.tag
    assert tag and re.fullmatch(r"[0-9a-f]{16}", tag)
    assert send.data == (
        b"SIP/2.0 403 Forbidden\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcust1\r\n"
        b"From: <sip:+4930111@customer.example>;tag=caller1\r\n"
        b"To: <sip:+4930123456@pbx.example.com>;tag=" + tag.encode() + b"\r\n"
        b"Call-ID: call-1@192.0.2.10\r\n"
        b"CSeq: 1 INVITE\r\n"
        b"Server: sipguard\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    assert sim.core.calls.live == 0 and sim.core.pending == 0
    # the ACK for our own 403 is absorbed
    ack = request("ACK", to_tag=tag, contact=None)
    assert sim.customer(ack) == []


def test_reject_carries_the_verdicts_headers() -> None:
    sim = Sim.make(server_header=None)
    decide = sim.offer()
    verdict = Reject(status=503, reason="Service Unavailable", headers=(("Retry-After", "60"),))
    send = of_type(sim.decide(decide.attempt.attempt_id, verdict), Send)[0]
    reply = parse_response(send.data)
    assert reply.status_code == 503
    assert reply.values("retry-after") == ["60"]
    assert not reply.has("server")


def test_seven_copies_of_an_invite_are_judged_once_and_answered_alike() -> None:
    sim = Sim.make()
    original = invite()
    decide = sim.offer(original)
    for i in range(6):
        sim.now = 0.5 * (i + 1)
        assert sim.customer(original) == []  # absorbed while deciding
    actions = sim.decide(decide.attempt.attempt_id, Reject(status=403, reason="Forbidden"))
    reply = of_type(actions, Send)[0].data
    for _ in range(7):
        assert sim.customer(original) == [Send(data=reply, destination=CUSTOMER, local=LOCAL_UDP)]
    assert len(of_type(sim.log, Send)) == 8


def test_a_late_verdict_for_an_unknown_attempt_does_nothing() -> None:
    sim = Sim.make()
    assert sim.decide("z9hG4bK-sgnope", Accept()) == []


# -- retransmissions after forwarding ---------------------------------------------------------
def test_udp_retransmissions_are_relayed_once_per_copy() -> None:
    sim = Sim.make()
    original = invite()
    send = sim.forward(original)
    for _ in range(3):
        assert sim.customer(original) == [send]  # same bytes, same hop: no amplification
    assert len(of_type(sim.log, Send)) == 4


def test_after_a_provisional_a_retransmission_gets_it_again() -> None:
    sim = Sim.make()
    original = invite()
    send = sim.forward(original)
    trying = only_send(sim.pbx(response(send.data, 100, to_tag=None)))
    assert trying.destination == CUSTOMER
    assert sim.customer(original) == [trying]
    ringing = only_send(sim.pbx(response(send.data, 180)))
    assert sim.customer(original) == [ringing]
    assert parse_response(ringing.data).status_code == 180


# -- responses ------------------------------------------------------------------------------
def test_responses_are_relayed_with_our_via_popped() -> None:
    sim = Sim.make()
    send = sim.forward()
    pbx_ringing = response(send.data, 180)
    ringing = only_send(sim.pbx(pbx_ringing))
    assert ringing.destination == CUSTOMER and ringing.local == LOCAL_UDP
    our_via_line = header_lines(send.data)[1] + b"\r\n"
    assert ringing.data == pbx_ringing.replace(our_via_line, b"", 1)
    pbx_ok = response(send.data, 200, contact=CALLEE_CONTACT, body=b"v=0\r\n")
    actions = sim.pbx(pbx_ok)
    assert kinds(actions) == ["CallAnswered", "Send"]
    answered, ok = actions
    assert isinstance(ok, Send) and isinstance(answered, CallAnswered)
    assert ok.data == pbx_ok.replace(our_via_line, b"", 1)
    relayed = parse_response(ok.data)
    assert relayed.values("via") == [CUSTOMER_VIA]
    assert relayed.values("record-route") == [OUR_RR]
    assert answered.now == 0.0 and answered.call.call_id == CALL_ID
    assert answered.call.from_tag == CALLER_TAG and answered.call.from_customer
    # a retransmitted 200 is relayed again, but the call is answered once
    assert sim.pbx(pbx_ok) == [ok]


def test_the_pbxs_bye_ends_the_call_as_it_passes_once_even_when_retransmitted() -> None:
    """The PBX hung up: the call is over as far as the PBX is concerned, whatever the
    customer answers."""
    sim = Sim.make()
    send = sim.forward()
    sim.now = 1.0
    sim.answer(send.data)
    sim.now = 61.0
    bye = in_dialog_from_pbx("BYE")
    actions = sim.pbx(bye)
    assert kinds(actions) == ["CallEnded", "Send"]
    ended, forwarded = actions
    assert isinstance(ended, CallEnded) and isinstance(forwarded, Send)
    assert ended.reason is EndReason.BYE and ended.now == 61.0 and ended.answered_at == 1.0
    assert ended.by_caller is False and forwarded.destination == CUSTOMER
    assert sim.core.calls.live == 0
    assert sim.pbx(bye) == [forwarded]  # retransmissions are relayed, never counted again
    assert only_send(sim.customer(response(forwarded.data, 500))).destination == UPSTREAM
    assert len(of_type(sim.log, CallEnded)) == 1


def test_the_customers_bye_ends_the_call_when_the_pbx_accepts_it_once_even_when_retransmitted() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.now = 1.0
    sim.answer(send.data)
    sim.now = 61.0
    bye = in_dialog_from_customer("BYE")
    forwarded = only_send(sim.customer(bye))
    assert forwarded.destination == UPSTREAM and sim.core.calls.live == 1  # the PBX decides
    sim.now = 61.5
    assert sim.customer(bye) == [forwarded]  # relayed again, never counted
    actions = sim.pbx(response(forwarded.data, 200))
    assert kinds(actions) == ["CallEnded", "Send"]
    ended, relayed = actions
    assert isinstance(ended, CallEnded) and isinstance(relayed, Send)
    assert ended.reason is EndReason.BYE and ended.now == 61.5 and ended.answered_at == 1.0
    assert ended.by_caller is True and relayed.destination == CUSTOMER
    assert sim.core.calls.live == 0
    assert sim.customer(bye) == [relayed]  # a late retransmission gets the 200 again
    assert len(of_type(sim.log, CallEnded)) == 1


@pytest.mark.parametrize("status", [481, 408])
def test_a_customers_bye_the_pbx_does_not_know_or_let_time_out_ends_the_call(status: int) -> None:
    """481: the PBX has no such call; 408: the BYE went unanswered. Either way its sender
    holds the dialog over (RFC 3261 §15.1.1), and so does sipguard."""
    sim = Sim.make()
    sim.answer(sim.forward().data)
    actions = sim.hang_up(status=status)
    assert [end.reason for end in of_type(actions, CallEnded)] == [EndReason.BYE]
    assert sim.core.calls.live == 0


@pytest.mark.parametrize("status", [500, 403, 401, 503])
def test_a_customers_bye_the_pbx_refuses_leaves_the_call_up_and_counted(status: int) -> None:
    """A BYE with a stale CSeq (500) or one the PBX will not take (403, a challenge) does
    not end the call on the PBX: it goes on, and so does its slot, until a BYE the PBX
    accepts. Else a crafted BYE would free a slot while the call talks on."""
    sim = Sim.make()
    sim.answer(sim.forward().data)
    refused = sim.hang_up(in_dialog_from_customer("BYE", cseq=1), status=status)
    assert of_type(refused, CallEnded) == [] and sim.core.calls.live == 1
    [said] = of_type(refused, ByeRefused)  # for the log: why the call still counts
    assert (said.status, said.by_caller, said.call.call_id) == (status, True, CALL_ID)
    actions = sim.hang_up(in_dialog_from_customer("BYE", cseq=3, branch="z9hG4bKcust3"))
    assert [end.reason for end in of_type(actions, CallEnded)] == [EndReason.BYE]
    assert sim.core.calls.live == 0


@pytest.mark.parametrize("method", ["INVITE", "UPDATE", "INFO"])
def test_the_callers_later_requests_lose_the_identity_it_asserts(method: str) -> None:
    """RFC 3325: identity the caller asserts mid-call (a re-INVITE or UPDATE with a new
    P-Asserted-Identity, which PBXs show as the connected party) is no more believed than
    the one in its INVITE, whatever its INVITE's verdict kept. The PBX side's requests
    are trusted and pass as they are."""
    sim = Sim.make(untrusted_headers=untrusted_from_customers)
    send = sim.forward(verdict=Accept(remove_headers=("x-sipguard-tag",)))
    sim.answer(send.data)
    asserted = (
        ("Route", OUR_RR),
        ("P-Asserted-Identity", "<tel:+14155559999>"),
        ("Remote-Party-ID", "<sip:+14155559999@c>"),
    )
    forwarded = parse_request(only_send(sim.customer(in_dialog_from_customer(method, headers=asserted))).data)
    assert forwarded.values("p-asserted-identity") == forwarded.values("remote-party-id") == []
    from_pbx = parse_request(only_send(sim.pbx(in_dialog_from_pbx(method, headers=asserted))).data)
    assert from_pbx.values("p-asserted-identity") == ["<tel:+14155559999>"]


ASSERTED = (("P-Asserted-Identity", "<tel:+14155559999>"), ("Remote-Party-ID", "<sip:+14155559999@c>"))


def untrusted_from_customers(request: Request, source_host: str) -> tuple[str, ...]:
    """Stands in for the engine's answer (``CoreConfig.untrusted_headers``)."""
    assert source_host == CUSTOMER.host  # never asked about the PBX's requests
    return ("p-asserted-identity", "remote-party-id")


@pytest.mark.parametrize("method", ["MESSAGE", "REFER", "SUBSCRIBE", "REGISTER"])
def test_a_customers_requests_outside_its_calls_lose_the_identity_it_asserts(method: str) -> None:
    """RFC 3325 holds beyond INVITEs: a MESSAGE or REFER asserting a number the customer
    does not own would be believed by the PBX. The PBX side's requests pass as they are."""
    sim = Sim.make(untrusted_headers=untrusted_from_customers)
    sent = parse_request(only_send(sim.customer(request(method, headers=ASSERTED, contact=None))).data)
    assert sent.values("p-asserted-identity") == sent.values("remote-party-id") == []
    pbx_vias = ("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbxmsg",)
    from_pbx = parse_request(only_send(sim.pbx(request(method, vias=pbx_vias, headers=ASSERTED))).data)
    assert from_pbx.values("p-asserted-identity") == ["<tel:+14155559999>"]


def test_a_customer_called_by_the_pbx_asserts_nothing_mid_call_either() -> None:
    sim = Sim.make(untrusted_headers=untrusted_from_customers)
    towards_customer = invite(
        uri=CALLER_CONTACT, vias=("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbxinv",), contact=CALLEE_CONTACT
    )
    forwarded = only_send(sim.pbx(towards_customer))
    sim.customer(response(forwarded.data, 200, contact=CALLER_CONTACT))
    # the customer is the callee: its re-INVITE has its own tag as From tag
    reinvite = in_dialog_from_customer(
        "INVITE", from_tag=CALLEE_TAG, to_tag=CALLER_TAG, headers=(("Route", OUR_RR), *ASSERTED)
    )
    sent = parse_request(only_send(sim.customer(reinvite)).data)
    assert sent.values("p-asserted-identity") == sent.values("remote-party-id") == []


def test_a_bye_on_an_early_dialog_ends_the_call_with_the_invites_final_response() -> None:
    # RFC 3261 §15: the caller MAY send BYE on an early dialog. Ending the call there would
    # let a 2xx crossing the BYE leave a live call that no policy counts.
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    bye = in_dialog_from_customer("BYE", headers=())
    assert kinds(sim.customer(bye)) == ["Send"]
    assert sim.core.calls.live == 1
    actions = sim.pbx(response(send.data, 487))
    assert kinds(actions) == ["CallEnded", "Send"]
    [end] = of_type(actions, CallEnded)
    assert end.reason is EndReason.REJECTED and end.status == 487
    # and if the 2xx crossed the BYE instead, the call is answered and ends on the next BYE
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    sim.customer(bye)
    sim.answer(send.data)
    actions = sim.hang_up(in_dialog_from_customer("BYE", cseq=3, branch="z9hG4bKcust3"))
    assert kinds(actions) == ["Send", "CallEnded", "Send"]
    assert of_type(actions, CallEnded)[0].reason is EndReason.BYE


def test_a_busy_callee_ends_the_call_as_rejected() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    actions = sim.pbx(response(send.data, 486))
    assert kinds(actions) == ["CallEnded", "Send"]
    ended = actions[0]
    assert isinstance(ended, CallEnded)
    assert ended.reason is EndReason.REJECTED and ended.status == 486 and ended.answered_at is None
    assert sim.core.calls.live == 0


def test_after_the_next_hops_final_response_only_that_one_again_or_a_2xx_is_relayed() -> None:
    """RFC 3261 §16.7 step 10: once a final response went back, a provisional, or a
    different final from the next hop, would contradict what the caller was told."""
    sim = Sim.make()
    send = sim.forward()
    busy = response(send.data, 486)
    assert statuses_sent(sim.pbx(busy)) == [486]
    for late in (response(send.data, 180), response(send.data, 500)):
        assert sim.pbx(late) == [Discarded(reason="response after the final one", source=UPSTREAM)]
    assert statuses_sent(sim.pbx(busy)) == [486]  # its retransmission: the caller must ACK it again
    assert statuses_sent(sim.pbx(response(send.data, 200, contact=CALLEE_CONTACT))) == [200]  # a fork's 2xx


def statuses_sent(actions: list[Action]) -> list[int]:
    return [int(send.data.split(b" ", 2)[1]) for send in of_type(actions, Send)]


def test_the_ack_for_a_non_2xx_follows_the_invites_branch() -> None:
    sim = Sim.make()
    send = sim.forward()
    busy = only_send(sim.pbx(response(send.data, 486))[1:])
    ack = request("ACK", to_tag=CALLEE_TAG, contact=None)
    forwarded = only_send(sim.customer(ack))
    assert forwarded.destination == UPSTREAM
    assert our_branch(forwarded.data) == our_branch(send.data)
    assert parse_request(forwarded.data).values("via")[1] == CUSTOMER_VIA
    assert busy.destination == CUSTOMER


def test_the_ack_for_a_2xx_is_a_new_request_routed_by_route() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.answer(send.data)
    ack = in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None)
    forwarded = only_send(sim.customer(ack))
    assert forwarded.destination == UPSTREAM
    message = parse_request(forwarded.data)
    assert not message.has("route")  # our own Route entry removed
    assert str(message.uri) == CALLEE_CONTACT
    assert our_branch(forwarded.data) not in (our_branch(send.data), "")
    assert message.values("via")[1] == "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKack1"
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []


# -- CANCEL -----------------------------------------------------------------------------------
def test_cancel_while_ringing_goes_where_the_invite_went() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    sim.now = 3.0
    cancel = request("CANCEL", contact=None)
    forwarded = only_send(sim.customer(cancel))
    assert forwarded.destination == UPSTREAM
    assert our_branch(forwarded.data) == our_branch(send.data)  # RFC 3261 §9.1
    message = parse_request(forwarded.data)
    assert message.method == "CANCEL" and message.cseq.seq == 1
    cancel_ok = only_send(sim.pbx(response(forwarded.data, 200, to_tag=None)))
    assert cancel_ok.destination == CUSTOMER
    assert parse_response(cancel_ok.data).cseq.method == "CANCEL"
    actions = sim.pbx(response(send.data, 487))
    assert kinds(actions) == ["CallEnded", "Send"]
    ended = actions[0]
    assert isinstance(ended, CallEnded)
    assert ended.reason is EndReason.CANCELLED and ended.status == 487 and ended.now == 3.0
    assert sim.core.calls.live == 0


def test_cancel_while_deciding_answers_both_and_an_accept_releases_the_attempt() -> None:
    sim = Sim.make()
    decide = sim.offer()
    actions = sim.customer(request("CANCEL", contact=None))
    assert kinds(actions) == ["Send", "Send", "Discarded"]
    cancel_ok, terminated = (parse_response(send.data) for send in of_type(actions, Send))
    assert (cancel_ok.status_code, cancel_ok.cseq.method) == (200, "CANCEL")
    assert (terminated.status_code, terminated.cseq.method) == (487, "INVITE")
    assert all(send.destination == CUSTOMER for send in of_type(actions, Send))
    # the policies may already hold a slot for it: an Accept releases it, nothing is sent
    actions = sim.decide(decide.attempt.attempt_id, Accept())
    assert kinds(actions) == ["CallEnded"]
    ended = actions[0]
    assert isinstance(ended, CallEnded) and ended.reason is EndReason.CANCELLED
    assert ended.call.attempt_id == decide.attempt.attempt_id
    assert sim.core.calls.live == 0
    # the ACK for our 487 is absorbed
    assert sim.customer(request("ACK", to_tag=terminated.to.tag, contact=None)) == []


def test_cancel_while_deciding_then_reject_yields_nothing() -> None:
    sim = Sim.make()
    decide = sim.offer()
    sim.customer(request("CANCEL", contact=None))
    assert sim.decide(decide.attempt.attempt_id, Reject(status=403, reason="Forbidden")) == []


def test_cancel_without_an_invite_gets_481() -> None:
    sim = Sim.make()
    actions = sim.customer(request("CANCEL", contact=None))
    assert kinds(actions) == ["Send", "Discarded"]
    reply = parse_response(of_type(actions, Send)[0].data)
    assert reply.status_code == 481 and reply.cseq.method == "CANCEL"


# -- in-dialog routing ------------------------------------------------------------------------
def test_requests_from_the_pbx_follow_the_request_uri_to_the_customer() -> None:
    sim = Sim.make()
    sim.answer(sim.forward().data)
    reinvite = in_dialog_from_pbx("INVITE", body=b"v=0\r\n")
    forwarded = only_send(sim.pbx(reinvite))
    assert forwarded.destination == CUSTOMER and forwarded.local == LOCAL_UDP
    message = parse_request(forwarded.data)
    assert str(message.uri) == CALLER_CONTACT
    assert not message.has("route")
    assert not message.has("record-route")  # only initial INVITEs are record-routed
    assert message.values("via")[1] == "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbx2"
    assert message.values("contact") == [f"<{CALLEE_CONTACT}>"]


def test_requests_from_the_pbx_loose_route_to_the_next_route_entry() -> None:
    sim = Sim.make()
    routes = f"{OUR_RR}, <sip:sbc.customer.example:5080;lr>"
    bye = in_dialog_from_pbx("BYE", headers=(("Route", routes),))
    forwarded = only_send(sim.pbx(bye))
    assert forwarded.destination == Address("udp", "sbc.customer.example", 5080)
    message = parse_request(forwarded.data)
    assert message.values("route") == ["<sip:sbc.customer.example:5080;lr>"]
    assert str(message.uri) == CALLER_CONTACT


def test_requests_from_a_strict_router_are_rewritten_per_rfc3261_16_4() -> None:
    sim = Sim.make()
    bye = in_dialog_from_pbx("BYE", headers=(("Route", f"<{CALLER_CONTACT}>"),))
    bye = bye.replace(f"BYE {CALLER_CONTACT} ".encode(), b"BYE sip:127.0.0.1:5060 ", 1)
    forwarded = only_send(sim.pbx(bye))
    message = parse_request(forwarded.data)
    assert str(message.uri) == CALLER_CONTACT
    assert not message.has("route")
    assert forwarded.destination == CUSTOMER


def test_requests_from_the_customer_always_go_upstream() -> None:
    sim = Sim.make()
    routes = f"{OUR_RR}, <sip:elsewhere.example;lr>"
    bye = in_dialog_from_customer("BYE", headers=(("Route", routes),))
    bye = bye.replace(f"BYE {CALLEE_CONTACT} ".encode(), b"BYE sip:bob@203.0.113.99 ", 1)
    forwarded = only_send(sim.customer(bye))
    assert forwarded.destination == UPSTREAM
    message = parse_request(forwarded.data)
    assert message.values("route") == ["<sip:elsewhere.example;lr>"]
    assert str(message.uri) == "sip:bob@203.0.113.99"


def test_an_extension_method_is_forwarded_like_any_request() -> None:
    sim = Sim.make()
    forwarded = only_send(sim.customer(request("FROBNICATE", contact=None)))
    assert forwarded.destination == UPSTREAM
    assert parse_request(forwarded.data).method == "FROBNICATE"


def test_an_invite_from_the_pbx_is_tracked_not_judged() -> None:
    sim = Sim.make()
    towards_customer = invite(
        uri=CALLER_CONTACT, vias=("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbxinv",), contact=CALLEE_CONTACT
    )
    forwarded = only_send(sim.pbx(towards_customer))
    assert forwarded.destination == CUSTOMER
    assert parse_request(forwarded.data).values("record-route") == [OUR_RR]
    assert sim.core.calls.live == 1
    actions = sim.customer(response(forwarded.data, 200, contact=CALLER_CONTACT))
    assert kinds(actions) == ["CallAnswered", "Send"]
    answered = actions[0]
    assert isinstance(answered, CallAnswered) and not answered.call.from_customer
    assert of_type(actions, Send)[0].destination == UPSTREAM


def test_the_pbx_seen_by_a_dual_stack_listener_is_still_the_pbx() -> None:
    """A listener bound to [::] sees the IPv4 PBX as ::ffff:127.0.0.1: its INVITE was
    judged as a customer's (and forwarded back to the PBX) instead of routed to the
    customer by its Request-URI."""
    sim = Sim.make()
    towards_customer = invite(
        uri=CALLER_CONTACT, vias=("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbxinv",), contact=CALLEE_CONTACT
    )
    mapped = Address("udp", "::ffff:127.0.0.1", UPSTREAM.port)
    forwarded = only_send(sim.pbx(towards_customer, source=mapped))
    assert forwarded.destination == CUSTOMER
    assert sim.core.calls.live == 1


@pytest.mark.parametrize(
    ("uri", "status"), [("sip:alice@192.0.2.10;transport=tls", 404), ("sip:alice@[2001:db8::10]", 503)]
)
def test_an_invite_from_the_pbx_that_cannot_be_sent_on_ends_its_call_with_the_refusal(
    uri: str, status: int
) -> None:
    """No route (a transport sipguard does not speak), or no listener for the address
    family: sipguard refuses the INVITE itself. Its call was counted for the early
    timeout all the same, and then reported as ringing out unanswered."""
    sim = Sim.make()
    towards_customer = invite(
        uri=uri, vias=("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbxinv",), contact=CALLEE_CONTACT
    )
    actions = sim.pbx(towards_customer)
    [end] = of_type(actions, CallEnded)
    assert (end.reason, end.status, end.now) == (EndReason.REJECTED, status, 0.0)
    assert reply_to(actions)[0] == status
    assert sim.core.calls.live == 0


@pytest.mark.parametrize("takes_ipv4", [True, False])
def test_a_dual_stack_listener_reaches_an_ipv4_pbx(takes_ipv4: bool) -> None:
    """``listen: [udp:[::]:5060]`` in front of an IPv4 PBX: the socket reaches IPv4 peers
    (the transport says so), so the INVITE goes out through it, where every call got
    503 No Route To Destination. An IPv6-only socket still cannot."""
    wildcard = Address("udp", "::", 5060)
    sim = Sim.make(listeners=(Listener(address=wildcard, advertise="127.0.0.1", takes_ipv4=takes_ipv4),))
    actions = sim.decide(sim.offer().attempt.attempt_id, Accept())
    if not takes_ipv4:
        assert reply_to(actions)[0] == 503
        return
    [forwarded] = of_type(actions, Send)
    assert (forwarded.destination, forwarded.local) == (UPSTREAM, wildcard)
    assert parse_request(forwarded.data).top_via.host == "127.0.0.1"  # the advertised address


def test_an_accepted_call_that_cannot_be_sent_on_gives_its_slots_back_at_once() -> None:
    sim = Sim.make(upstream=Address("udp", "::1", 5070))  # an IPv6 PBX, only IPv4 listeners
    actions = sim.decide(sim.offer().attempt.attempt_id, Accept())
    [end] = of_type(actions, CallEnded)
    assert (end.reason, end.status) == (EndReason.REJECTED, 503)
    assert reply_to(actions)[0] == 503
    assert sim.core.calls.live == 0


# -- requests sipguard answers itself -------------------------------------------------------------
def reply_to(actions: list[object]) -> tuple[int, Send]:
    """The status of the one reply among ``actions`` (read off its status line), and the Send."""
    [send] = [action for action in actions if isinstance(action, Send)]
    return int(send.data.split(b" ", 2)[1]), send


def test_max_forwards_zero_gets_483() -> None:
    sim = Sim.make()
    actions = sim.customer(invite(max_forwards=0))
    assert kinds(actions) == ["Send", "Discarded"]
    assert reply_to(actions)[0] == 483
    assert sim.core.calls.live == 0


def test_proxy_require_gets_420_with_unsupported() -> None:
    sim = Sim.make()
    actions = sim.customer(invite(headers=(("Proxy-Require", "foo, bar"),)))
    status, send = reply_to(actions)
    assert status == 420
    assert parse_response(send.data).values("unsupported") == ["foo, bar"]


@pytest.mark.parametrize("value", [b"f\xffo", b"foo, b\xc3\xa4r", b"foo bar", b"<sip:x>"])
def test_a_proxy_require_that_is_not_option_tags_gets_400(value: bytes) -> None:
    """A Proxy-Require with undecodable bytes made writing the 420's Unsupported raise
    UnicodeEncodeError out of the core: the request went unanswered. Option tags are
    tokens (RFC 3261 §20.29); anything else is a 400."""
    sim = Sim.make()
    data = invite(headers=(("Proxy-Require", "PLACEHOLDER"),)).replace(b"PLACEHOLDER", value)
    actions = sim.customer(data)
    assert kinds(actions) == ["Send", "Discarded"]
    status, send = reply_to(actions)
    assert status == 400 and send.destination == CUSTOMER
    assert sim.core.calls.live == 0 and sim.core.transactions == 0


def test_a_reply_echoes_undecodable_header_text_as_it_came() -> None:
    request = parse_request(invite())
    data = build_reply(request, 420, "Bad Extension", to_tag="t", headers=(("Unsupported", "f\udcffo"),))
    assert data is not None and b"\r\nUnsupported: f\xffo\r\n" in data


def test_a_request_carrying_our_own_via_and_branch_is_a_loop() -> None:
    first = Sim.make()
    original = invite()
    sent = first.forward(original).data
    # the same request back with its top Via unchanged and ours below it
    lines = header_lines(sent)
    looped = sent.replace(lines[1] + b"\r\n" + lines[2] + b"\r\n", lines[2] + b"\r\n" + lines[1] + b"\r\n", 1)
    assert looped != sent
    actions = Sim.make().customer(looped)
    assert kinds(actions) == ["Send", "Discarded"]
    assert reply_to(actions)[0] == 482


def test_options_to_sipguard_itself_gets_200() -> None:
    sim = Sim.make()
    options = request("OPTIONS", "sip:127.0.0.1:5060", contact=None)
    status, send = reply_to(sim.customer(options))
    assert status == 200 and send.destination == CUSTOMER
    assert len(sim.log) == 1
    # an OPTIONS for a user behind the PBX is forwarded instead
    forwarded = only_send(sim.customer(request("OPTIONS", contact=None, vias=(CUSTOMER_VIA + "x",))))
    assert forwarded.destination == UPSTREAM


def test_a_request_with_two_from_headers_gets_400_from_the_partial_message() -> None:
    sim = Sim.make()
    data = invite().replace(b"To:", b"From: <sip:mallory@evil.example>;tag=2\r\nTo:", 1)
    actions = sim.customer(data)
    assert kinds(actions) == ["Send", "Discarded"]
    status, send = reply_to(actions)
    assert status == 400 and send.destination == CUSTOMER
    assert send.data.startswith(b"SIP/2.0 400 ")
    assert send.data.count(b"\r\nFrom: ") == 2
    assert b"\r\nVia: " + CUSTOMER_VIA.encode() in send.data
    discarded = actions[1]
    assert isinstance(discarded, Discarded) and discarded.status == 400


@pytest.mark.parametrize(
    "malformed",
    [
        pytest.param(("Max-Forwards: 70", "Max-Forwards: lots"), id="max-forwards"),
        pytest.param(("To: <sip:+4930123456@pbx.example.com>", "To: <sip:+4930123456@pbx"), id="to"),
        pytest.param(("Contact:", "Route: <sip:127.0.0.1:5060;lr\r\nContact:"), id="route"),
    ],
)
def test_a_lazily_parsed_header_that_is_malformed_gets_400_and_nothing_later(
    malformed: tuple[str, str],
) -> None:
    sim = Sim.make()
    data = invite().replace(malformed[0].encode(), malformed[1].encode(), 1)
    actions = sim.customer(data)
    assert kinds(actions) == ["Send", "Discarded"]
    assert reply_to(actions)[0] == 400
    assert sim.core.pending == 0
    assert of_type(sim.run_until(3600.0), Send) == []  # no ghost transaction answers later


def test_malformed_responses_are_dropped() -> None:
    sim = Sim.make()
    send = sim.forward()
    ok = response(send.data, 200)
    two_call_ids = ok.replace(b"Call-ID:", b"Call-ID: other\r\nCall-ID:", 1)
    assert kinds(sim.pbx(two_call_ids)) == ["Discarded"]
    bad_via = ok.replace(b"Via: SIP/2.0/UDP 192.0.2.10", b"Via: SIP/2.0/UDP [192.0.2.10", 1)
    actions = sim.pbx(bad_via)
    assert kinds(actions) == ["Discarded"]
    assert actions[0] == Discarded(reason=actions[0].reason, source=UPSTREAM, call_id=CALL_ID)
    assert sim.core.calls.live == 1


def test_responses_whose_top_via_is_not_ours_are_dropped() -> None:
    sim = Sim.make()
    send = sim.forward()
    forged = response(send.data, 200).replace(b"branch=z9hG4bK-sg", b"branch=z9hG4bK-xx", 1)
    assert kinds(sim.pbx(forged)) == ["Discarded"]
    bcast = (RFC4475 / "bcast.dat").read_bytes()
    assert kinds(sim.pbx(bcast)) == ["Discarded"]
    assert of_type(sim.log, Send) == [send]


@pytest.mark.parametrize(
    ("host", "routable"),
    [
        ("255.255.255.255", False),
        ("::ffff:255.255.255.255", False),  # the same, IPv4-mapped
        ("224.0.0.1", False),
        ("::ffff:224.0.0.1", False),  # Python 3.11's is_multicast says no: mapped first
        ("ff02::1", False),
        ("0.0.0.0", False),
        ("::ffff:0.0.0.0", False),
        ("::", False),
        ("192.0.2.10", True),
        ("::ffff:192.0.2.10", True),
        ("2001:db8::10", True),
        ("pbx.example.com", True),  # a name: the transport resolves it
    ],
)
def test_broadcast_multicast_and_unspecified_addresses_are_never_sent_to(host: str, routable: bool) -> None:
    assert is_routable(host) is routable


@pytest.mark.parametrize(
    ("host", "inside"),
    [
        ("10.0.0.10", True),
        ("::ffff:10.0.0.10", True),  # a socket bound to [::] sees an IPv4 peer so
        ("::ffff:a00:a", True),
        ("::ffff:10.0.1.10", False),
        ("2001:db8::10", True),
        ("::ffff:2001:db8", False),
        ("pbx.example.com", False),
    ],
)
def test_trusted_networks_hold_ipv4_peers_seen_as_ipv4_mapped_addresses(host: str, inside: bool) -> None:
    networks = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("2001:db8::/64"))
    assert in_networks(host, networks) is inside


def test_a_response_whose_next_via_is_broadcast_is_never_sent() -> None:
    sim = Sim.make()
    bcast = (RFC4475 / "bcast.dat").read_bytes()
    ours = b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-sg0123456789abcdef0123\r\n"
    data = bcast.replace(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.198;branch=z9hG4bK1324923\r\n", ours, 1)
    assert data != bcast
    # no transaction knows it, so it would be routed by the next Via: 255.255.255.255
    assert kinds(sim.pbx(data)) == ["Discarded"]
    assert of_type(sim.log, Send) == []


def test_a_response_no_transaction_knows_is_relayed_only_under_a_branch_sipguard_gave() -> None:
    """A response that matches no transaction is routed by the Via below ours (a late 2xx
    retransmission). Only if the branch on top is the one sipguard derived from that Via
    (a keyed hash): anyone could otherwise send one with a made-up z9hG4bK-sg branch and a
    Via naming a victim, and sipguard would reflect it there (RFC 3261 §16.11)."""
    sim = Sim.make()
    forged = (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-sg{7:020x}\r\n"
        "Via: SIP/2.0/UDP 203.0.113.66:5060;branch=z9hG4bKvictim\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        "Call-ID: reflect@example.com\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    actions = sim.pbx(forged)
    assert actions == [
        Discarded(reason="response not for us", source=UPSTREAM, call_id="reflect@example.com")
    ]
    # while the real late 2xx of a forwarded INVITE still goes back by its Via
    forwarded = sim.forward()
    ok = response(forwarded.data, 200, contact=CALLEE_CONTACT)
    relayed = sim.answer(forwarded.data)
    sim.run_until(40.0)
    assert sim.core.transactions == 0 and sim.pbx(ok) == [relayed]


def test_a_late_response_routed_back_to_sipguard_itself_is_dropped() -> None:
    """Defence in depth: a late 2xx goes where the request came from (received, rport).
    If that was sipguard's own address (a spoofed UDP source), it is dropped rather than
    sent to sipguard."""
    sim = Sim.make()
    ourselves = Address("udp", "127.0.0.1", 5060)
    forwarded = sim.forward(
        invite(vias=("SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKspoofed",)), source=ourselves
    )
    ok = response(forwarded.data, 200, contact=CALLEE_CONTACT)
    sim.answer(forwarded.data)
    sim.run_until(40.0)
    assert sim.pbx(ok) == [Discarded(reason="Via points back at sipguard", source=UPSTREAM)]


def test_a_late_response_routed_back_to_a_dual_stack_sipguard_is_dropped() -> None:
    """The same behind ``listen: [udp:[::]:5060]`` advertising 127.0.0.1: a spoofed source
    of sipguard's own IPv4 address reaches that socket as ::ffff:127.0.0.1; the late 2xx
    went to that spelling, which did not compare equal to 127.0.0.1, and sipguard sent it
    to itself."""
    wildcard = Address("udp", "::", 5060)
    sim = Sim.make(listeners=(Listener(address=wildcard, advertise="127.0.0.1", takes_ipv4=True),))
    ourselves = Address("udp", "::ffff:127.0.0.1", 5060)
    spoofed = invite(vias=("SIP/2.0/UDP 127.0.0.1:5060;rport;branch=z9hG4bKspoofed",))
    forwarded = sim.forward(spoofed, source=ourselves, local=wildcard)
    ok = response(forwarded.data, 200, contact=CALLEE_CONTACT)
    sim.answer(forwarded.data)
    sim.run_until(40.0)
    assert sim.pbx(ok) == [Discarded(reason="Via points back at sipguard", source=UPSTREAM)]


@pytest.mark.parametrize("param", ["received=a..b", "received=pbx.example.com", "maddr=a%00b"])
def test_a_response_is_never_routed_to_a_via_address_that_is_no_address(param: str) -> None:
    """received must be an IP address and maddr a host (RFC 3261 §20.42): any text was
    taken, so a forged response went to whatever name its next Via gave, and a name
    like ``a..b`` made the transport's DNS lookup fail with UnicodeError, not OSError."""
    sim = Sim.make()
    forged = (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-sg{0:020x}\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKx;{param}\r\n"
        "From: <sip:a@example.com>;tag=1\r\nTo: <sip:b@example.com>;tag=2\r\n"
        "Call-ID: reflect@example.com\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    assert kinds(sim.customer(forged)) == ["Discarded"]


@pytest.mark.parametrize("keepalive", [b"\r\n\r\n", b"\r\n", b"", b"\r\n" * 40])
def test_udp_crlf_keepalives_are_ignored_not_counted_as_parse_errors(keepalive: bytes) -> None:
    """Phones and PBXs (Asterisk's keep_alive_interval) keep NAT bindings open with CRLFs
    over UDP. Each one was a Discarded (a message.dropped log line) and a parse error in
    the metrics: thousands of phones made a steady false error rate and log stream."""
    sim = Sim.make()
    assert sim.customer(keepalive) == []
    assert sim.pbx(keepalive) == []
    assert sim.core.parse_errors == {}
    # a datagram with anything else is still a parse error
    assert kinds(sim.customer(b"\r\n\r\nx")) == ["Discarded"]
    assert sim.core.parse_errors == {False: 1}


def test_unparseable_bytes_are_dropped() -> None:
    sim = Sim.make()
    actions = sim.customer(b"\x00\x01garbage\r\n\r\n")
    assert kinds(actions) == ["Discarded"]
    assert sim.customer(b"INVITE sip:x@y SIP/2.0\r\n") == [
        Discarded(reason="No empty line after the headers", source=CUSTOMER)
    ]
