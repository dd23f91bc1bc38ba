"""Dialogs that sipguard may end itself, and the requests it sends on its own to do so.

Strategy: a call accepted with a maximum duration or a keepalive keeps a ``Dialog``: what
each party would put in an in-dialog request (RFC 3261 §12.2.1.1), as header text: its
identity (From with tag; the callee's is the 2xx's To), its remote target (Contact, as
the last target refresh left it), the route set from sipguard toward it (cut out of the
2xx's Record-Route), and the highest CSeq it has sent. When the duration is up the core
sends a BYE to each party as if the other had hung up. Other calls keep no dialog:
tracking costs one empty slot per call.

Each BYE is an ``OwnRequest``, a non-INVITE client transaction (§17.1.2) with one
timer at a time, as every object in the core's heap: the next retransmission (Timer E,
UDP only), the give-up (Timer F), or, once answered, when to forget it (Timer K).

A keepalive (Kamailio's dialog keepalives, with its ka_failed_limit lesson: one lost
probe must not end a call) is a ``Prober`` per answered call, one heap entry that fires
every interval and sends each party an OPTIONS ``Probe`` (an OwnRequest that gives up
after the keepalive's timeout). Its answers count per party; misses in a row past the
limit end the call with BYEs, as the maximum duration does.

Invariants: header values are stored as received and never re-parsed into something
else; a BYE's CSeq is above every CSeq its sender used in the dialog, a probe's below
(see ``Probe.cseq_for``); nothing here raises on a malformed Contact or Record-Route:
that party is just not reachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .errors import ParseError
from .events import Address, CallInfo, Keepalive
from .headers import parse_name_addr, split_values
from .message import Request, Response
from .timers import T1, T2, T4, TIMER_B

TIMER_F = TIMER_B


class InDialogRequest(NamedTuple):
    """What a request to one party of a dialog carries, as the other party would send it."""

    request_uri: str
    routes: tuple[str, ...]  # loose-routed, nearest hop first
    from_: str
    to: str
    cseq: int  # the sender's last CSeq + 1


class Dialog:
    """The dialog state of one call, for ending it from the middle.

    Contact and Record-Route are kept as the header text that arrived and parsed only
    when sipguard sends a BYE: most calls end on their own, and parsing them on every
    limited call's INVITE and 2xx cost about a tenth of the core's time per call.
    """

    __slots__ = (
        "_callee_contacts",
        "_caller_contacts",
        "_record_routes",
        "callee",
        "callee_cseq",
        "caller",
        "caller_cseq",
        "max_duration",
        "prober",
    )

    def __init__(self, invite: Request, max_duration: float | None) -> None:
        self.max_duration = max_duration  # seconds from the answer
        self.prober: Prober | None = None  # for a call with a keepalive
        self.caller = invite.get("from") or ""
        self._caller_contacts = invite.values("contact")
        self.caller_cseq = invite.cseq.seq
        self.callee = ""  # learnt from the 2xx
        self._callee_contacts: list[str] = []
        self.callee_cseq = 0  # none sent yet: its first request may use any number (§12.2.2)
        self._record_routes: list[str] = []

    def answered(self, ok: Response) -> None:
        """Learn the callee's side from the 2xx that answered the INVITE."""
        self.callee = ok.get("to") or ""
        self._callee_contacts = ok.values("contact")
        self._record_routes = ok.values("record-route")

    def saw_request(self, from_caller: bool, request: Request) -> None:
        """A party sent a request in the dialog: ours must come after it (§12.2.1.1); a
        target refresh (re-INVITE, UPDATE) may move that party."""
        cseq = request.cseq.seq
        if from_caller:
            self.caller_cseq = max(self.caller_cseq, cseq)
        else:
            self.callee_cseq = max(self.callee_cseq, cseq)
        if request.method in ("INVITE", "UPDATE"):
            self.target_refreshed(from_caller, request)

    def target_refreshed(self, caller: bool, message: Request | Response) -> None:
        """A target refresh from one party, or its 2xx to one: its Contact, if it carries
        one, is where requests to that party go from now on (§12.2.1.2, §12.2.2). Without
        this a party that moved (a new address mid-call) would miss every probe."""
        contacts = message.values("contact")
        if not contacts:
            return
        if caller:
            self._caller_contacts = contacts
        else:
            self._callee_contacts = contacts

    def request_to(self, caller: bool, is_us: Callable[[object], bool]) -> InDialogRequest | None:
        """A request to the caller (as if from the callee) or to the callee (as if from
        the caller); None when that party gave no Contact to send it to. ``is_us`` picks
        sipguard's own Record-Route entries (asked for here, not kept: a dialog that held
        the core's method would tie every limited call to the core in a reference cycle)."""
        if caller:
            target = _first_uri(self._caller_contacts)
            if target is None:
                return None
            route = self._route_set(is_us, toward_caller=True)
            return InDialogRequest(target, route, self.callee, self.caller, self.callee_cseq + 1)
        target = _first_uri(self._callee_contacts)
        if target is None:
            return None
        route = self._route_set(is_us, toward_caller=False)
        return InDialogRequest(target, route, self.caller, self.callee, self.caller_cseq + 1)

    def _route_set(self, is_us: Callable[[object], bool], *, toward_caller: bool) -> tuple[str, ...]:
        """The Record-Route entries between sipguard and that party, nearest hop first;
        empty (requests go straight to the target) when the 2xx did not route through us."""
        try:
            values = [value for line in self._record_routes for value in split_values(line)]
            routes = [parse_name_addr(value) for value in values]
        except ParseError:
            return ()
        ours = [i for i, route in enumerate(routes) if is_us(route.uri)]
        if not ours:
            return ()
        # Each proxy puts its Record-Route on top (§16.6): the hops toward the callee are
        # above sipguard's (the nearest one lowest), those toward the caller below.
        if toward_caller:
            return tuple(values[ours[-1] + 1 :])
        return tuple(reversed(values[: ours[0]]))


def _first_uri(contacts: list[str]) -> str | None:
    """The URI of the first Contact value, or None when there is none or it is malformed."""
    try:
        values = [value for line in contacts for value in split_values(line)]
        return str(parse_name_addr(values[0]).uri) if values and values[0] != "*" else None
    except ParseError:
        return None


class OwnRequest:
    """A request sipguard sent itself: a non-INVITE client transaction (RFC 3261 §17.1.2)."""

    __slots__ = ("answered", "branch", "data", "destination", "give_up_at", "interval", "local", "timer_at")

    def __init__(
        self, branch: str, data: bytes, destination: Address, local: Address, now: float,
        give_up_after: float = TIMER_F,
    ) -> None:  # fmt: skip
        self.branch = branch
        self.data = data
        self.destination = destination
        self.local = local
        self.answered = False
        self.interval = T1
        self.give_up_at = now + give_up_after
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


class Prober:
    """The keepalive of one answered call: when the next round of probes is due, and how
    many probes in a row each party has missed."""

    __slots__ = ("call", "misses", "rounds", "settings", "timer_at")

    def __init__(self, call: CallInfo, settings: Keepalive) -> None:
        # the call's info, not the call: the call holds its dialog, which holds this, and
        # a reference cycle would leave every such call to the full garbage collection
        self.call = call
        self.settings = settings
        self.misses = [0, 0]  # the callee's, the caller's (indexed by ``to_caller``)
        self.rounds = 0  # rounds sent so far: each probe's branch names its round
        self.timer_at: float | None = None  # its one heap entry: the next round, once answered

    def start(self, now: float) -> None:
        """The call was answered: the first round is due one interval later."""
        self.timer_at = now + self.settings.interval

    def stop(self) -> None:
        """The call ended: no more rounds (answers still in flight find no call)."""
        self.timer_at = None

    def next_round(self, now: float) -> int:
        """A round is being sent now: its number; ``timer_at`` is then the next one."""
        self.rounds += 1
        self.timer_at = now + self.settings.interval
        return self.rounds

    def failed(self, to_caller: bool, status: int | None) -> bool:
        """A probe of one party ended with ``status`` (None: no final response in time).
        Whether that party has now missed ``failed_limit`` in a row: the call must end."""
        if status is not None and status not in (408, 481):
            self.misses[to_caller] = 0  # any other answer, even an error, comes from a live party
            return False
        # 408: nobody answered, here or at a proxy on the way; 481: the party forgot the call
        self.misses[to_caller] += 1
        return self.misses[to_caller] >= self.settings.failed_limit


class Probe(OwnRequest):
    """One OPTIONS sent to one party of a call with a keepalive. It gives up after the
    keepalive's timeout, not Timer F: the next probe is due before Timer F would end."""

    __slots__ = ("prober", "to_caller")

    def __init__(
        self, branch: str, data: bytes, destination: Address, local: Address, now: float,
        prober: Prober, to_caller: bool,
    ) -> None:  # fmt: skip
        super().__init__(branch, data, destination, local, now, prober.settings.timeout)
        self.prober = prober
        self.to_caller = to_caller

    @staticmethod
    def cseq_for(request: InDialogRequest) -> int:
        """The CSeq of a probe: below every CSeq the party it stands in for has used.

        A UAS rejects a request whose CSeq is lower than the last it saw from that party
        with a 500 (RFC 3261 §12.2.2) and keeps its own count; a probe with the next CSeq
        would instead make the party's own next request look old (many UAs refuse an
        equal one too). And it checks the dialog first: a UA that lost the call answers
        481 whatever the CSeq. So a probe one below the party's last CSeq gets a 500 (or a
        200 from a UA that does not check) from a live dialog and a 481 from a dead one,
        and sipguard never has to renumber the parties' requests (as OpenSIPS does for its
        pings). This is what Kamailio's dialog keepalive does (dlg_send_ka). When the
        party has sent nothing yet, 0, the lowest CSeq there is (§8.1.1.5): the receiver
        takes it as its first, below anything the party will send itself.
        """
        return max(request.cseq - 2, 0)  # request.cseq is the party's last + 1
