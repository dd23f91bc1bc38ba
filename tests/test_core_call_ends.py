"""How calls end under the less common but legal flows of RFC 3261 (and RFC 6026 for
2xx): a digest challenge and its retry, a BYE with another dialog's tag, CANCEL crossing the 200,
forked early dialogs and a second 2xx, refused re-INVITEs. Every forwarded call must end
exactly once, and only when it has really ended: the concurrency rule gives its slot
back on that CallEnded, so an early end lets a customer exceed its cap and a missing one
refuses honest calls until the maximum lifetime.
"""

from __future__ import annotations

import pytest
from sipsim import (
    CALLEE_CONTACT,
    CALLEE_TAG,
    CALLER_CONTACT,
    CALLER_TAG,
    SDP,
    UPSTREAM,
    Sim,
    in_dialog_from_customer,
    in_dialog_from_pbx,
    invite,
    kinds,
    of_type,
    only_send,
    request,
    response,
)

from proxy.sip.events import Accept, CallAnswered, CallEnded, EndReason


def answered_call() -> Sim:
    sim = Sim.make()
    send = sim.forward()
    sim.now = 1.0
    sim.answer(send.data)
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None))
    sim.now = 60.0
    return sim


# -- a BYE with another dialog's tag ----------------------------------------------------------------
def test_a_bye_with_a_wrong_to_tag_does_not_end_the_call() -> None:
    # RFC 3261 §12.2.2: the PBX answers 481, and the call goes on. Ending it here would give
    # its slot back to a customer still talking: a way round every concurrency cap. Only a
    # BYE with both of the call's tags can end it, as in Kamailio's dialog module.
    sim = answered_call()
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", to_tag="not-the-callee")))
    assert kinds(sim.pbx(response(bye.data, 481, to_tag=None))) == ["Send"]
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []


def test_a_customers_bye_with_the_tags_swapped_does_not_end_the_call() -> None:
    """From tag the callee's, To tag the caller's: a BYE in the other party's name, which
    no dialog at the PBX matches (RFC 3261 §12.2.2: the To tag is the UAS's own), so it
    answers 481. That 481 used to end the call and free its slot while it talked on."""
    sim = answered_call()
    swapped = in_dialog_from_customer("BYE", from_tag=CALLEE_TAG, to_tag=CALLER_TAG)
    bye = only_send(sim.customer(swapped))
    assert kinds(sim.pbx(response(bye.data, 481, to_tag=None))) == ["Send"]
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []
    [end] = of_type(sim.hang_up(in_dialog_from_customer("BYE", cseq=3, branch="z9hG4bKcust3")), CallEnded)
    assert (end.reason, end.by_caller) == (EndReason.BYE, True)


def test_a_called_customers_bye_with_the_tags_swapped_does_not_end_the_call() -> None:
    sim = Sim.make()
    towards_customer = invite(
        uri=CALLER_CONTACT, vias=("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbxinv",), contact=CALLEE_CONTACT
    )
    forwarded = only_send(sim.pbx(towards_customer))  # From tag caller1, the PBX's party
    answered = sim.customer(response(forwarded.data, 200, contact=CALLER_CONTACT))  # To tag callee1
    assert kinds(answered) == ["CallAnswered", "Send"]
    # the customer is the callee: a BYE in the caller's name (From caller1, To callee1)
    bye = only_send(sim.customer(in_dialog_from_customer("BYE")))
    assert kinds(sim.pbx(response(bye.data, 481, to_tag=None))) == ["Send"]
    assert sim.core.calls.live == 1
    # in its own name, it ends the call once the PBX accepts it
    own = in_dialog_from_customer(
        "BYE", cseq=3, branch="z9hG4bKcust3", from_tag=CALLEE_TAG, to_tag=CALLER_TAG
    )
    [end] = of_type(sim.hang_up(own), CallEnded)
    assert (end.reason, end.by_caller) == (EndReason.BYE, False)


# -- forked early dialogs and a second 2xx (RFC 3261 §13.2.2.4, RFC 6026) -----------------------------
def test_a_second_2xx_from_another_fork_makes_no_call_and_its_bye_ends_nothing() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180, to_tag="fork-a"))
    sim.pbx(response(send.data, 180, to_tag="fork-b"))
    sim.now = 1.0
    sim.answer(send.data, to_tag="fork-a")
    # the other fork answers too: relayed for the caller to ACK and BYE, no second call
    assert kinds(sim.pbx(response(send.data, 200, to_tag="fork-b", contact=CALLEE_CONTACT))) == ["Send"]
    assert sim.core.calls.live == 1
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack-b", contact=None, to_tag="fork-b"))
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", to_tag="fork-b")))
    assert kinds(sim.pbx(response(bye.data, 200, to_tag=None))) == ["Send"]
    # nor does the PBX's own BYE on that dialog: the call on fork-a goes on
    assert kinds(sim.pbx(in_dialog_from_pbx("BYE", from_tag="fork-b"))) == ["Send"]
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []
    # which its own BYE ends
    sim.now = 30.0
    own_bye = in_dialog_from_customer("BYE", cseq=3, branch="z9hG4bKcust3", to_tag="fork-a")
    [end] = of_type(sim.hang_up(own_bye), CallEnded)
    assert (end.reason, end.now, end.answered_at) == (EndReason.BYE, 30.0, 1.0)


# -- a caller's BYE on an early dialog (RFC 3261 §15) that the 200 crosses ---------------------------
def test_a_bye_on_the_early_dialog_crossed_by_its_200_ends_the_call_when_the_pbx_accepts_it() -> None:
    """The PBX answered before the caller's early BYE reached it: the BYE then ends the
    confirmed call at the PBX (200). The call used to stay counted until the caller sent
    another BYE, or for the maximum lifetime (4 h) if it did not."""
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", headers=())))
    sim.now = 1.0
    sim.answer(send.data)
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None))
    assert sim.core.calls.live == 1
    sim.now = 1.1
    actions = sim.pbx(response(bye.data, 200))
    assert kinds(actions) == ["CallEnded", "Send"]
    [end] = of_type(actions, CallEnded)
    assert (end.reason, end.by_caller, end.answered_at, end.now) == (EndReason.BYE, True, 1.0, 1.1)
    assert sim.core.calls.live == 0


def test_a_bye_on_one_forks_early_dialog_does_not_end_the_call_another_fork_answered() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180, to_tag="fork-a"))
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", headers=(), to_tag="fork-a")))
    sim.now = 1.0
    sim.answer(send.data, to_tag="fork-b")
    assert kinds(sim.pbx(response(bye.data, 200))) == ["Send"]
    assert sim.core.calls.live == 1
    # nor does the BYE's 200 while the call still rings: the INVITE's final response does
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", headers=())))
    assert kinds(sim.pbx(response(bye.data, 200))) == ["Send"] and sim.core.calls.live == 1
    [end] = of_type(sim.pbx(response(send.data, 487)), CallEnded)
    assert (end.reason, end.status) == (EndReason.REJECTED, 487)


# -- a digest challenge, then the same call again with credentials ----------------------------------
def test_a_challenged_invite_ends_its_attempt_and_the_retry_is_judged_as_a_new_one() -> None:
    sim = Sim.make()
    first = sim.forward()
    challenge = sim.pbx(response(first.data, 407, headers=(("Proxy-Authenticate", 'Digest realm="pbx"'),)))
    assert kinds(challenge) == ["CallEnded", "Send"]
    [end] = of_type(challenge, CallEnded)
    assert (end.reason, end.status) == (EndReason.REJECTED, 407)
    ack = only_send(sim.customer(request("ACK", to_tag=CALLEE_TAG, contact=None)))
    assert ack.destination == UPSTREAM
    # RFC 3261 §22.2: same Call-ID and From tag, CSeq + 1, a new branch, credentials
    retry = invite(
        cseq=2,
        vias=("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcust-auth",),
        headers=(("Proxy-Authorization", 'Digest username="acme", realm="pbx"'),),
    )
    decide = sim.offer(retry)  # judged (so its slot is taken again), not relayed as a retransmission
    assert decide.attempt.attempt_id != end.call.attempt_id
    sim.answer(only_send(sim.decide(decide.attempt.attempt_id, Accept())).data)
    assert sim.core.calls.live == 1 and len(of_type(sim.log, CallEnded)) == 1


# -- CANCEL ----------------------------------------------------------------------------------------
def test_a_cancel_crossing_the_200_leaves_an_answered_call_that_ends_at_its_bye() -> None:
    sim = Sim.make()
    send = sim.forward()
    sim.pbx(response(send.data, 180))
    cancel = only_send(sim.customer(request("CANCEL", contact=None)))
    sim.now = 1.0
    sim.answer(send.data)  # the PBX answered before the CANCEL reached it
    assert kinds(sim.pbx(response(cancel.data, 200, to_tag=None))) == ["Send"]
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None))
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []
    sim.now = 2.0
    [end] = of_type(sim.hang_up(), CallEnded)
    assert (end.reason, end.answered_at, end.now) == (EndReason.BYE, 1.0, 2.0)


def test_a_cancel_before_any_provisional_ends_the_call_with_the_487() -> None:
    # (RFC 3261 §9.1 has a UAC wait for a provisional before it cancels; sipguard relays the
    # CANCEL at once, and the call ends with the 487 as after any CANCEL)
    sim = Sim.make()
    send = sim.forward()
    cancel = only_send(sim.customer(request("CANCEL", contact=None)))
    assert cancel.destination == UPSTREAM and sim.core.calls.live == 1
    sim.pbx(response(cancel.data, 200, to_tag=None))
    [end] = of_type(sim.pbx(response(send.data, 487)), CallEnded)
    assert (end.reason, end.status) == (EndReason.CANCELLED, 487)
    assert sim.core.calls.live == 0


# -- re-INVITEs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [488, 491, 500])
def test_a_refused_re_invite_does_not_end_the_call(status: int) -> None:
    sim = answered_call()
    reinvite = only_send(sim.customer(in_dialog_from_customer("INVITE", body=SDP)))
    assert kinds(sim.pbx(response(reinvite.data, status, to_tag=None))) == ["Send"]
    reinvite = only_send(sim.pbx(in_dialog_from_pbx("INVITE", body=SDP)))
    assert kinds(sim.customer(response(reinvite.data, status, to_tag=None))) == ["Send"]
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []


def test_200_retransmissions_after_the_ack_answer_the_call_once() -> None:
    sim = Sim.make()
    send = sim.forward()
    ok = response(send.data, 200, contact=CALLEE_CONTACT)
    sim.pbx(ok)
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None))
    assert kinds(sim.pbx(ok)) == ["Send"]  # RFC 6026: relayed, for the caller to ACK again
    sim.run_until(40.0)  # the INVITE transaction is forgotten: a late copy follows the Via
    assert kinds(sim.pbx(ok)) == ["Send"]
    assert len(of_type(sim.log, CallAnswered)) == 1 and sim.core.calls.live == 1
