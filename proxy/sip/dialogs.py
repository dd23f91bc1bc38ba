"""Dialogs that sipguard may end itself, and the requests it sends on its own to do so.

Strategy: a call accepted with a maximum duration keeps a ``Dialog``: what each party
would put in an in-dialog request (RFC 3261 §12.2.1.1), as header text: its identity
(From with tag; the callee's is the 2xx's To), its remote target (Contact), the route
set from sipguard toward it (cut out of the 2xx's Record-Route), and the highest CSeq it
has sent. When the duration is up the core sends a BYE to each party as if the other had
hung up. Other calls keep no dialog: tracking costs one empty slot per call.

Each BYE is an ``OwnRequest``, a non-INVITE client transaction (§17.1.2) with one
timer at a time, as every object in the core's heap: the next retransmission (Timer E,
UDP only), the give-up (Timer F), or, once answered, when to forget it (Timer K).

Invariants: header values are stored as received and never re-parsed into something
else; a request's CSeq is above every CSeq its sender used in the dialog; nothing here
raises on a malformed Contact or Record-Route: that party is just not reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .errors import ParseError
from .events import Address
from .message import Message, Request, Response
from .timers import T1, T2, T4, TIMER_B

TIMER_F = TIMER_B


class InDialogRequest(NamedTuple):
    """What a request to one party of a dialog carries, as the other party would send it."""

    request_uri: str
    routes: tuple[str, ...]  # loose-routed, nearest hop first
    from_: str
    to: str
    cseq: int


class Dialog:
    """The dialog state of one call, for ending it from the middle."""

    __slots__ = (
        "callee",
        "callee_cseq",
        "callee_target",
        "caller",
        "caller_cseq",
        "caller_target",
        "max_duration",
        "route_to_callee",
        "route_to_caller",
    )

    def __init__(self, invite: Request, max_duration: float) -> None:
        self.max_duration = max_duration  # seconds from the answer
        self.caller = invite.get("from") or ""
        self.caller_target = _contact(invite)
        self.caller_cseq = invite.cseq.seq
        self.callee = ""  # learnt from the 2xx
        self.callee_target: str | None = None
        self.callee_cseq = 0  # none sent yet: its first request may use any number (§12.2.2)
        self.route_to_caller: tuple[str, ...] = ()
        self.route_to_callee: tuple[str, ...] = ()

    def answered(self, ok: Response, is_us: Callable[[object], bool]) -> None:
        """Learn the callee's side from the 2xx that answered the INVITE."""
        self.callee = ok.get("to") or ""
        self.callee_target = _contact(ok)
        try:
            values = ok.list_values("record-route")
            ours = [i for i, route in enumerate(ok.record_routes) if is_us(route.uri)]
        except ParseError:
            return
        if ours:  # else the route sets stay empty: requests go straight to the targets
            # Each proxy puts its Record-Route on top (§16.6): the hops toward the callee
            # are above sipguard's (the nearest one lowest), those toward the caller below.
            self.route_to_callee = tuple(reversed(values[: ours[0]]))
            self.route_to_caller = tuple(values[ours[-1] + 1 :])

    def saw_request(self, from_caller: bool, cseq: int) -> None:
        """A party sent a request in the dialog: ours must come after it (§12.2.1.1)."""
        if from_caller:
            self.caller_cseq = max(self.caller_cseq, cseq)
        else:
            self.callee_cseq = max(self.callee_cseq, cseq)

    def request_to(self, caller: bool) -> InDialogRequest | None:
        """A request to the caller (as if from the callee) or to the callee (as if from
        the caller); None when that party gave no Contact to send it to."""
        if caller:
            if self.caller_target is None:
                return None
            return InDialogRequest(
                self.caller_target, self.route_to_caller, self.callee, self.caller, self.callee_cseq + 1
            )
        if self.callee_target is None:
            return None
        return InDialogRequest(
            self.callee_target, self.route_to_callee, self.caller, self.callee, self.caller_cseq + 1
        )


def _contact(message: Message) -> str | None:
    try:
        contacts = message.contacts
    except ParseError:
        return None
    return str(contacts[0].uri) if contacts else None


class OwnRequest:
    """A request sipguard sent itself: a non-INVITE client transaction (RFC 3261 §17.1.2)."""

    __slots__ = ("answered", "branch", "data", "destination", "give_up_at", "interval", "local", "timer_at")

    def __init__(self, branch: str, data: bytes, destination: Address, local: Address, now: float) -> None:
        self.branch = branch
        self.data = data
        self.destination = destination
        self.local = local
        self.answered = False
        self.interval = T1
        self.give_up_at = now + TIMER_F
        # when its one heap entry fires: a retransmission is due (UDP), or Timer F
        self.timer_at: float | None = self.give_up_at if destination.is_reliable else now + T1

    def on_timer(self, now: float) -> bool:
        """Its timer fired: whether to send it again. ``timer_at`` is then the next one,
        or None when the transaction is over (answered and lingered, or Timer F)."""
        if self.answered or now >= self.give_up_at:
            self.timer_at = None
            return False
        self.interval = min(2 * self.interval, T2)  # Timer E: T1 doubling up to T2
        self.timer_at = min(now + self.interval, self.give_up_at)
        return True

    def on_response(self, status: int, now: float) -> bool:
        """A response arrived: whether ``timer_at`` moved (the core then schedules it)."""
        if self.answered:
            return False
        if status < 200:
            self.interval = T2  # Proceeding: retransmit every T2 (§17.1.2.2)
            return False
        self.answered = True
        # Timer K: a retransmitted final response still finds it and is absorbed
        self.timer_at = now if self.destination.is_reliable else now + T4
        return True
