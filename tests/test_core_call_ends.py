"""How calls end under the less common but legal flows of RFC 3261 (and RFC 6026 for
2xx): a digest challenge and its retry, a BYE the PBX refuses, CANCEL crossing the 200,
forked early dialogs and a second 2xx, refused re-INVITEs. Every forwarded call must end
exactly once, and only when it has really ended: the concurrency rule gives its slot
back on that CallEnded, so an early end lets a customer exceed its cap and a missing one
refuses honest calls until the maximum lifetime.
"""

from __future__ import annotations

from sipsim import (
    CALLEE_CONTACT,
    Sim,
    in_dialog_from_customer,
    in_dialog_from_pbx,
    kinds,
    of_type,
    only_send,
    response,
)

from proxy.sip.events import Address, CallEnded, EndReason

ELSEWHERE = Address("udp", "198.51.100.7", 5060)  # a customer that is no party to the call


def answered_call() -> Sim:
    sim = Sim.make()
    send = sim.forward()
    sim.now = 1.0
    sim.answer(send.data)
    sim.customer(in_dialog_from_customer("ACK", cseq=1, branch="z9hG4bKack1", contact=None))
    sim.now = 60.0
    return sim


# -- a BYE the PBX refuses ------------------------------------------------------------------------
def test_a_bye_with_a_wrong_to_tag_does_not_end_the_call() -> None:
    # RFC 3261 §12.2.2: the PBX answers 481, and the call goes on. Ending it here would give
    # its slot back to a customer still talking: a way round every concurrency cap.
    sim = answered_call()
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", to_tag="not-the-callee")))
    assert kinds(sim.pbx(response(bye.data, 481, to_tag=None))) == ["Send"]
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []


def test_a_bye_the_pbx_refuses_does_not_end_the_call() -> None:
    # The tags are right but the PBX will not have it (here: sent from another source).
    sim = answered_call()
    bye = only_send(sim.customer(in_dialog_from_customer("BYE"), source=ELSEWHERE))
    assert kinds(sim.pbx(response(bye.data, 403, to_tag=None))) == ["Send"]
    assert sim.core.calls.live == 1 and of_type(sim.log, CallEnded) == []
    # the caller's own BYE, accepted, ends it
    sim.now = 90.0
    bye = only_send(sim.customer(in_dialog_from_customer("BYE", cseq=3, branch="z9hG4bKcust3")))
    actions = sim.pbx(response(bye.data, 200, to_tag=None))
    assert kinds(actions) == ["CallEnded", "Send"]
    [end] = of_type(actions, CallEnded)
    assert end.reason is EndReason.BYE and end.by_caller and (end.now, end.answered_at) == (90.0, 1.0)


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
    bye = only_send(
        sim.customer(in_dialog_from_customer("BYE", cseq=3, branch="z9hG4bKcust3", to_tag="fork-a"))
    )
    [end] = of_type(sim.pbx(response(bye.data, 200, to_tag=None)), CallEnded)
    assert (end.reason, end.now, end.answered_at) == (EndReason.BYE, 30.0, 1.0)
