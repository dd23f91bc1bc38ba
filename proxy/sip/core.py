"""The sans-I/O proxy core: bytes, a source address and ``now`` in; actions out.

Strategy (RFC 3261 §16, a transaction-stateful relay that never forks):
- Each request is matched to a server transaction by its top Via (branch, sent-by,
  method; ACK and CANCEL find their INVITE). A retransmission is never judged or
  counted again: it gets the last response sipguard relayed or wrote, or, while the
  request is still pending downstream over UDP, it is relayed once more, so sipguard
  never sends more copies than it receives. Only when a request came over a reliable
  transport and leaves over UDP does sipguard own retransmission (Timers A/E).
- Our branch is derived from the incoming transaction (keyed hash), so a CANCEL or a
  non-2xx ACK gets the branch of the INVITE it belongs to, and the loop check can
  recompute it (§16.3 step 4).
- An initial INVITE from the customer side becomes a ``Decide`` action; the adapter
  asks the policy layer (asynchronously) and answers with ``decided``. Retransmissions
  and a CANCEL that arrive meanwhile are handled without waiting.
- Requests from the customer side go to the upstream PBX, Request-URI unchanged.
  Requests from the upstream side follow Route / Request-URI. Responses follow the
  transaction back, or the Via (received, rport) once the transaction has gone.
- A call ends when the PBX says so: at the PBX's BYE as it passes, at a customer's BYE
  once the PBX accepts it (2xx, 481) or leaves it unanswered (``CallRole.ENDS``), at the
  INVITE's failed final response, or at a timer (ringing, lifetime, session expiry).
  A call that rings too long ends at the final response to the INVITE that Timer C
  cancels, as after a caller's CANCEL: a 2xx crossing the CANCEL answers it.
- Timers live in one heap: ``get_timer`` says when to call ``handle_timer(now)``.
- A call accepted with a maximum duration keeps its dialog (dialogs.py); when the time
  is up sipguard sends BYE to both parties itself, absorbs their answers, and reports the
  call ended at once. A request crossing those BYEs is relayed as in any unknown dialog.
- A call accepted with a keepalive keeps its dialog too, and once answered sipguard probes
  both parties with OPTIONS every interval; a party that misses too many in a row ends
  the call the same way. Answers to probes are absorbed; an ended call sends no more.

Invariants: the core reads no clock and does no I/O; tables are bounded
(``max_transactions``, ``max_calls``); every call that was forwarded ends exactly once
with a CallEnded action. For metrics it counts each message received and each one it
sends, by request or response and method, in plain dicts whose keys are fixed (methods
it does not know count as "other"), and each unparseable message. Its objects form no
reference cycles, so reference counting frees each call's state as soon as it is
forgotten, and the garbage collector's full passes find nothing of the core's to free
(tests/test_core_garbage.py).
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from . import abnf
from .calls import Call, CallState, CallTable
from .dialogs import Dialog, InDialogRequest, OwnRequest, Probe, Prober
from .editor import MessageEditor
from .errors import ParseError
from .events import (
    Accept,
    Action,
    Address,
    ByeRefused,
    CallAnswered,
    CallAttempt,
    CallEnded,
    CallInfo,
    Decide,
    Discarded,
    EndReason,
    Send,
    Verdict,
)
from .headers import MAX_UINT32, Via, bounded_int, parse_name_addr, split_outside_quotes, split_values
from .hosts import Network, in_networks, ipv4_mapped, is_ip, is_routable, normal_host
from .message import Request, Response, parse_message
from .replies import build_cancel, build_reply, build_request
from .timers import T1, T2, TIMER_B
from .uri import SipUri, Uri, parse_uri

BRANCH_PREFIX = "z9hG4bK"
OUR_BRANCH_PREFIX = BRANCH_PREFIX + "-sg"
MAX_DURATION_REASON = ("Reason", 'SIP;cause=200;text="Maximum call duration reached"')  # RFC 3326
KEEPALIVE_REASON = ("Reason", 'SIP;cause=408;text="Keepalive failed"')  # a party stopped answering probes
# Methods counted by name; any other (a method is any token) counts as "other", so that
# nobody can grow the counters, or the metrics, by inventing methods.
KNOWN_METHODS = (
    "INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "UPDATE", "INFO",
    "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH",
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    """A socket sipguard listens on, and the host it writes into Via and Record-Route."""

    address: Address
    advertise: str | None = None  # needed when bound to 0.0.0.0 / ::
    # A dual-stack socket (UDP bound to ``::``): IPv4 peers reach it, as ::ffff:a.b.c.d, and
    # it can send to them; the transport says so once bound.
    takes_ipv4: bool = False

    @property
    def host_port(self) -> str:
        host = self.advertise or self.address.host
        return f"[{host}]:{self.address.port}" if ":" in host else f"{host}:{self.address.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class CoreConfig:
    listeners: tuple[Listener, ...]
    upstream: Address
    # Sources on the PBX side besides the upstream address itself (a PBX that sends from
    # other ports or hosts, e.g. new TCP connections): their requests are not judged.
    trusted_networks: tuple[Network, ...] = ()
    branch_secret: bytes = b""
    server_header: str | None = "sipguard"
    max_calls: int = 100_000
    max_transactions: int = 200_000
    # 4 h: longer than nearly every business call, short enough that a call whose BYE
    # was lost frees its slots the same working day (Kamailio's 12 h holds them overnight).
    max_call_lifetime: float = 4 * 3600.0
    early_timeout: float = 180.0  # RFC 3261 Timer C: > 3 minutes of ringing
    decision_timeout: float = TIMER_B
    aliases: frozenset[str] = field(default=frozenset())  # other names for us in Route / R-URI
    # Is this customer's INVITE (and its source host) an emergency call? Such calls are let
    # through while new calls are otherwise refused (shutting down, max_calls reached):
    # emergency numbers are never blocked. max_transactions still bounds memory.
    is_emergency: Callable[[Request, str], bool] | None = None
    # The headers to remove from a customer's request other than a judged INVITE (whose
    # verdict says): REGISTER, MESSAGE, REFER..., and every request inside a call, in either
    # direction. Identity a customer asserts is not believed beyond sipguard (RFC 3325).
    # None: remove nothing.
    untrusted_headers: Callable[[Request, str], tuple[str, ...]] | None = None


class TxState(enum.Enum):
    DECIDING = "deciding"  # waiting for the policy verdict
    FORWARDED = "forwarded"  # sent on, no final response yet
    COMPLETED = "completed"  # final response relayed or written; kept to absorb retransmissions


class CallRole(enum.Enum):
    """What a transaction that carries a call (``Transaction.call``) does to it."""

    STARTS = "starts"  # the initial INVITE: its final response answers or ends the call
    REFRESHES = "refreshes"  # a re-INVITE or UPDATE: its 2xx refreshes the session
    # A customer's BYE: the call ends when the PBX accepts it (2xx, or 481: it has no such
    # call) or when the BYE goes unanswered (408, no answer, next hop unreachable), since
    # its sender then holds the dialog over (§15.1.1). A BYE the PBX refuses otherwise (a
    # stale CSeq's 500, a 403) leaves the call up and counted, as the PBX sees it.
    ENDS = "ends"
    # A caller's BYE on an early dialog (§15): the INVITE's final response ends the call,
    # unless a 2xx crossing the BYE answered it on that dialog; then the BYE's 2xx does.
    ENDS_IF_ANSWERED = "ends-if-answered"


class Transaction:
    __slots__ = (
        "attempt",
        "by_caller",
        "call",
        "cancelled",
        "destination",
        "expires_at",
        "final_status",
        "forwarded",
        "has_response",
        "key",
        "last_response",
        "local",
        "method",
        "out_branch",
        "out_local",
        "request",
        "retransmit_at",
        "retransmit_interval",
        "role",
        "source",
        "state",
        "timer_at",
    )

    def __init__(self, key: tuple[str, str, str], request: Request, source: Address, local: Address) -> None:
        self.key = key
        self.method = request.method
        # released when the transaction completes: it lingers 32 s for retransmissions
        # and needs only its last response then (a parsed request is ~70 objects)
        self.request: Request | None = request
        self.source = source
        self.local = local
        self.state = TxState.FORWARDED
        self.out_branch = ""
        self.forwarded: bytes | None = None
        self.destination: Address | None = None
        self.out_local: Address | None = None
        self.last_response: bytes | None = None
        self.has_response = False
        self.final_status = 0  # the next hop's final response once relayed (0: none, or sipguard's own)
        self.expires_at = 0.0
        self.call: Call | None = None
        self.attempt: CallInfo | None = None
        self.cancelled = False
        self.role = CallRole.STARTS
        self.by_caller = False  # a BYE (CallRole.ENDS): sent by the caller, not the callee
        self.retransmit_at: float | None = None
        self.retransmit_interval = T1
        self.timer_at: float | None = None  # when its one heap entry fires (see _set_expiry)


TimerTarget = Transaction | Call | OwnRequest | Prober


class ProxyCore:
    def __init__(self, config: CoreConfig) -> None:
        self.config = config
        self.calls = CallTable(max_lifetime=config.max_call_lifetime, early_timeout=config.early_timeout)
        self._server_tx: dict[tuple[str, str, str], Transaction] = {}
        self._client_tx: dict[tuple[str, str], Transaction] = {}
        # by attempt id: INVITEs whose verdict is awaited, answered already or not (CANCEL, timeout)
        self._deciding: dict[str, Transaction] = {}
        self._timers: list[tuple[float, int, str, TimerTarget]] = []
        self._own_requests: dict[str, OwnRequest] = {}  # by branch: the BYEs and probes sipguard sent
        self._timer_seq = itertools.count()
        self._attempt_seq = itertools.count(1)
        upstream = config.upstream
        self._upstream_host_ports = {_normal_host_port(upstream.host, upstream.port)}
        mapped = ipv4_mapped(normal_host(upstream.host))
        if mapped is not None:  # an IPv4 PBX, as a listener bound to [::] sees it
            self._upstream_host_ports.add((mapped, upstream.port))
        self._trusted: dict[str, bool] = {}  # source host -> inside a trusted network (bounded cache)
        self._our_host_ports = {
            _normal_host_port(lst.address.host, lst.address.port) for lst in config.listeners
        }
        self._our_host_ports |= {
            _normal_host_port(lst.advertise, lst.address.port) for lst in config.listeners if lst.advertise
        }
        for host, port in list(self._our_host_ports):
            mapped = ipv4_mapped(host)
            if mapped is not None:  # our IPv4 address as a listener bound to [::] spells it
                self._our_host_ports.add((mapped, port))
        self.accepting = True
        # messages by method: a plain dict increment per message (a Counter's costs 3 times more)
        self.requests_in, self.responses_in = _by_method(), _by_method()  # a response's CSeq method
        self.requests_out, self.responses_out = _by_method(), _by_method()
        self.parse_errors: Counter[bool] = Counter()  # by whether a 400 (or 413, 416...) went back

    # -- public API --------------------------------------------------------------------------
    @property
    def transactions(self) -> int:
        return len(self._server_tx)

    @property
    def pending(self) -> int:
        """Transactions still waiting for a verdict or a final response, sipguard's own BYEs
        too (not its probes: nothing waits for their answers)."""
        relayed = sum(1 for tx in self._server_tx.values() if tx.state is not TxState.COMPLETED)
        return relayed + sum(
            1 for own in self._own_requests.values() if not own.answered and not isinstance(own, Probe)
        )

    def message_counts(self) -> dict[tuple[str, str, str], int]:
        """(in | out, request | response, method) -> messages, for the metrics."""
        tables = {
            ("in", "request"): self.requests_in,
            ("in", "response"): self.responses_in,
            ("out", "request"): self.requests_out,
            ("out", "response"): self.responses_out,
        }
        return {(*key, method): n for key, counts in tables.items() for method, n in counts.items()}

    def stop_accepting(self) -> None:
        """Shutting down: new calls get 503 (emergency calls excepted), transactions in
        flight go on."""
        self.accepting = False

    def receive(self, data: bytes, source: Address, local: Address, now: float) -> list[Action]:
        actions: list[Action] = []
        if not data.lstrip(b"\r\n") and not source.is_reliable:  # (lstrip: no copy of a message)
            # a NAT keep-alive: CRLFs alone (phones, Asterisk's keep_alive_interval) or an
            # empty datagram. Nothing to answer, and no error: it is not a message.
            return actions
        try:
            message = parse_message(data, stream=source.is_reliable)
        except ParseError as error:
            self._answer_unparseable(error, source, local, actions)
            return actions
        try:
            if isinstance(message, Response):
                _count(self.responses_in, message.cseq.method)
                self._on_response(message, source, now, actions)
            else:
                _count(self.requests_in, message.method)
                self._on_request(message, source, local, now, actions)
        except ParseError as error:  # a lazily parsed header turned out malformed
            if isinstance(message, Request) and message.method != "ACK":
                error.partial = message
                self._answer_unparseable(error, source, local, actions)
            else:
                self.parse_errors[False] += 1
                actions.append(Discarded(reason=error.reason, source=source, call_id=_call_id(message)))
        return actions

    def decided(self, attempt_id: str, verdict: Verdict, now: float) -> list[Action]:
        """The policy layer's answer to a Decide action."""
        actions: list[Action] = []
        tx = self._deciding.pop(attempt_id, None)
        if tx is None or tx.attempt is None:
            return actions  # unknown, or its transaction is long gone
        if tx.state is not TxState.DECIDING:  # answered meanwhile: a CANCEL, or the decision timeout
            if isinstance(verdict, Accept):  # the policies took state for a call that is gone
                reason = EndReason.CANCELLED if tx.cancelled else EndReason.DECISION_TIMEOUT
                actions.append(CallEnded(call=tx.attempt, reason=reason, now=now))
            return actions
        if not isinstance(verdict, Accept):
            self._reply(tx, verdict.status, verdict.reason, now, actions, headers=verdict.headers)
            return actions
        tx.call = self.calls.start(tx.attempt)
        if verdict.max_duration is not None or verdict.keepalive is not None:
            assert tx.request is not None
            tx.call.dialog = Dialog(tx.request, verdict.max_duration)
            if verdict.keepalive is not None:
                tx.call.dialog.prober = Prober(tx.call.info, verdict.keepalive)
        self._arm_call(tx.call)
        self._forward(
            tx, now, actions, add_headers=verdict.add_headers, remove_headers=verdict.remove_headers
        )
        return actions

    def unreachable(self, destination: Address, now: float) -> list[Action]:
        """The transport could not reach ``destination`` (a TCP connect failed, its name did
        not resolve): each request forwarded there and not answered yet fails at once, as if
        it had got a 503 (RFC 3261 §16.9), instead of leaving its caller waiting for Timer
        B or C and its call holding policy slots meanwhile."""
        actions: list[Action] = []
        stranded = [
            tx
            for tx in self._client_tx.values()
            if tx.destination == destination and tx.state is TxState.FORWARDED and not tx.has_response
        ]
        for tx in stranded:
            tx.retransmit_at = None
            if tx.call is not None and tx.role is CallRole.STARTS:
                self._end_call(tx.call, EndReason.REJECTED, now, actions, status=503)
            elif tx.call is not None and tx.role is CallRole.ENDS:
                self._end_call(tx.call, EndReason.BYE, now, actions, by_caller=tx.by_caller)
            self._reply(tx, 503, "Next Hop Unreachable", now, actions, headers=(("Retry-After", "5"),))
        return actions

    def get_timer(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def handle_timer(self, now: float) -> list[Action]:
        actions: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, kind, target = heapq.heappop(timers)
            if kind == "retransmit":
                assert isinstance(target, Transaction)
                self._retransmit(target, when, now, actions)
                continue
            if target.timer_at != when:
                continue  # superseded by an earlier entry, or the object is gone
            target.timer_at = None
            if isinstance(target, Transaction):
                if target.expires_at > now:  # extended since: fire again then
                    self._set_expiry(target, target.expires_at)
                elif self._server_tx.get(target.key) is target:
                    self._expire_transaction(target, now, actions)
            elif isinstance(target, OwnRequest):
                self._own_request_timer(target, now, actions)
            elif isinstance(target, Prober):
                self._probe(target, now, actions)
            elif target.deadline > now:
                self._arm_call(target)
            else:
                self._end_call_by_timer(target, now, actions)
        return actions

    # -- requests -----------------------------------------------------------------------------
    def _on_request(
        self, request: Request, source: Address, local: Address, now: float, actions: list[Action]
    ) -> None:
        top_via = request.top_via
        # Parse now what forwarding reads later: a malformed one is a 400 here, not a
        # transaction left behind (answered 408 later) or an error out of ``decided``.
        _ = (request.from_, request.to, request.max_forwards, request.routes)
        for option in request.list_values("proxy-require"):  # echoed in a 420's Unsupported
            if not abnf.TOKEN_RE.fullmatch(option):  # §20.29: option-tag = token
                raise ParseError(400, "Malformed Proxy-Require")
        method = request.method
        key = self._server_key(request, top_via)
        if method == "ACK":
            self._on_ack(request, key, source, local, now, actions)
            return
        tx = self._server_tx.get(key)
        if tx is not None:
            self._on_retransmission(tx, source, actions)
            return
        if len(self._server_tx) >= self.config.max_transactions:
            self._reply_stateless(request, source, local, 503, "Service Unavailable", actions)
            return
        tx = Transaction(key, request, source, local)
        self._remember(tx, now + TIMER_B)
        if method == "CANCEL":
            self._on_cancel(tx, now, actions)
            return
        if request.max_forwards == 0:
            self._reply(tx, 483, "Too Many Hops", now, actions)
            return
        if request.has("proxy-require"):
            unsupported = ", ".join(request.list_values("proxy-require"))
            self._reply(tx, 420, "Bad Extension", now, actions, headers=(("Unsupported", unsupported),))
            return
        if self._is_loop(request):
            self._reply(tx, 482, "Loop Detected", now, actions)
            return
        from_customer = not self._is_upstream(source)
        to_tag = request.to.tag
        if to_tag is None and method == "OPTIONS" and self._addressed_to_us(request):
            self._reply(tx, 200, "OK", now, actions)  # keep-alive probes of sipguard itself
            return
        if method == "INVITE" and to_tag is None:
            self._on_initial_invite(tx, from_customer, now, actions)
            return
        call = self.calls.find(request.call_id, (request.from_.tag, to_tag)) if to_tag is not None else None
        if call is not None and from_customer:
            as_caller = request.from_.tag == call.info.from_tag  # what its tags say it is
            if as_caller != call.info.from_customer:
                # the customer's request in the other party's name (the tags swapped): no
                # dialog at the PBX has it (§12.2.2: the To tag is the UAS's own), and the
                # 481 that a BYE gets must not end the call. Not a request in the call.
                call = None
        remove_headers: tuple[str, ...] = ()
        if from_customer and self.config.untrusted_headers is not None:
            # mid-call too: not its INVITE's list, which may have kept the identity it asserted
            # then (an emergency call's owned callback number) and would keep any other now
            remove_headers = self.config.untrusted_headers(request, source.host)
        if call is not None:
            from_caller = request.from_.tag == call.info.from_tag
            if call.dialog is not None:
                call.dialog.saw_request(from_caller, request)
            if method == "BYE":
                # A BYE on an early dialog (§15) ends the call when the INVITE's final
                # response passes: ended now, a 2xx crossing it would go uncounted.
                if call.state is CallState.CONFIRMED and from_customer:  # the PBX's answer decides
                    tx.call, tx.role, tx.by_caller = call, CallRole.ENDS, from_caller
                elif from_customer:
                    tx.call, tx.role, tx.by_caller = call, CallRole.ENDS_IF_ANSWERED, from_caller
                elif call.state is CallState.CONFIRMED:  # the PBX hung up: over, as far as it knows
                    self._end_call(call, EndReason.BYE, now, actions, by_caller=from_caller)
            elif method in ("INVITE", "UPDATE"):
                tx.call, tx.role = call, CallRole.REFRESHES
        self._forward(tx, now, actions, remove_headers=remove_headers)

    def _on_initial_invite(
        self, tx: Transaction, from_customer: bool, now: float, actions: list[Action]
    ) -> None:
        request = tx.request
        assert request is not None
        refusal = None
        if not self.accepting:
            refusal = "Service Unavailable"
        elif self.calls.live + len(self._deciding) >= self.config.max_calls:
            refusal = "Call Limit Reached"
        if refusal is not None and not (from_customer and self._emergency(request, tx.source)):
            self._reply(tx, 503, refusal, now, actions, headers=(("Retry-After", "5"),))
            return
        # Unique per call attempt, not just per branch: a client that reuses a Via branch
        # for a new INVITE (after the old transaction is forgotten) must not make two calls
        # share one attempt id, since policies key their slots by it.
        attempt_id = f"{tx.out_branch}.{next(self._attempt_seq)}"
        tx.attempt = CallInfo(
            call_id=request.call_id,
            from_tag=request.from_.tag or "",
            attempt_id=attempt_id,
            source=tx.source,
            from_customer=from_customer,
            started_at=now,
        )
        if not from_customer:  # calls towards customers are tracked, not judged
            tx.call = self.calls.start(tx.attempt)
            self._arm_call(tx.call)
            self._forward(tx, now, actions)
            return
        tx.state = TxState.DECIDING
        self._deciding[attempt_id] = tx
        self._set_expiry(tx, now + self.config.decision_timeout)
        actions.append(
            Decide(attempt=CallAttempt(attempt_id=attempt_id, request=request, source=tx.source, now=now))
        )

    def _emergency(self, request: Request, source: Address) -> bool:
        is_emergency = self.config.is_emergency
        return is_emergency is not None and is_emergency(request, source.host)

    def _on_retransmission(self, tx: Transaction, source: Address, actions: list[Action]) -> None:
        if tx.last_response is not None:
            self._send(actions, self.responses_out, tx.method, tx.last_response, tx.source, tx.local)
        elif (
            tx.state is TxState.FORWARDED
            and tx.forwarded is not None
            and tx.destination is not None
            and not tx.destination.is_reliable
            and tx.retransmit_at is None
        ):
            self._send(actions, self.requests_out, tx.method, tx.forwarded, tx.destination, tx.out_local)
        # otherwise still deciding, or the next hop is reliable: absorb it

    def _on_ack(
        self,
        request: Request,
        key: tuple[str, str, str],
        source: Address,
        local: Address,
        now: float,
        actions: list[Action],
    ) -> None:
        invite_tx = self._server_tx.get((key[0], key[1], "INVITE"))
        if invite_tx is None or invite_tx.state is not TxState.COMPLETED:
            # an ACK for a 2xx: end to end, a new transaction that follows the dialog's route
            tx = Transaction(key, request, source, local)
            tx.out_branch = self._branch(key)
            self._forward(tx, now, actions, remember=False)
        elif invite_tx.destination is not None:
            # the ACK for a downstream non-2xx belongs to the INVITE's hop-by-hop transaction
            tx = Transaction(key, request, source, local)
            tx.out_branch = invite_tx.out_branch
            self._forward(tx, now, actions, remember=False, destination=invite_tx.destination)
        # else: it acknowledges sipguard's own reply: absorbed

    def _on_cancel(self, tx: Transaction, now: float, actions: list[Action]) -> None:
        invite_tx = self._server_tx.get((tx.key[0], tx.key[1], "INVITE"))
        if invite_tx is None:
            self._reply(tx, 481, "Call/Transaction Does Not Exist", now, actions)
            return
        if invite_tx.state is TxState.DECIDING:
            invite_tx.cancelled = True
            self._reply(tx, 200, "OK", now, actions)
            self._reply(invite_tx, 487, "Request Terminated", now, actions)
        elif invite_tx.state is TxState.FORWARDED and invite_tx.destination is not None:
            invite_tx.cancelled = True
            tx.out_branch = invite_tx.out_branch  # §9.1: a CANCEL carries its INVITE's branch
            self._forward(tx, now, actions, destination=invite_tx.destination)
        else:
            self._reply(tx, 200, "OK", now, actions)  # too late to cancel: no effect

    # -- forwarding ----------------------------------------------------------------------------
    def _forward(
        self,
        tx: Transaction,
        now: float,
        actions: list[Action],
        *,
        add_headers: tuple[tuple[str, str], ...] = (),
        remove_headers: tuple[str, ...] = (),
        remember: bool = True,
        destination: Address | None = None,
    ) -> None:
        request = tx.request
        assert request is not None
        editor = MessageEditor(request)
        from_customer = not self._is_upstream(tx.source)
        if destination is None:
            destination = self._next_hop(request, editor, from_customer)
            if destination is None:
                self._refuse_to_forward(tx, 404, "Not Found", now, actions)
                return
        elif request.has("route"):
            self._strip_own_routes(request, editor)
        out_listener = self._listener_for(destination)
        if out_listener is None:
            self._refuse_to_forward(tx, 503, "No Route To Destination", now, actions)
            return
        editor.push_via(_our_via(out_listener, tx.out_branch))
        # after our push_via: insertions at one offset keep their order, so ours stays on top
        self._stamp_source(request, tx.source, editor)
        hops = request.max_forwards
        editor.set_max_forwards(70 if hops is None else hops - 1)
        if request.method == "INVITE" and tx.attempt is not None:
            in_listener = self._listener_at(tx.local) or out_listener
            editor.insert_record_route(_record_route(out_listener))
            if in_listener != out_listener:  # two faces: each side must reach its own
                editor.insert_record_route(_record_route(in_listener))
        for name in remove_headers:
            editor.remove_header(name)
        for name, value in add_headers:
            editor.add_header(name.lower(), value)
        if destination.is_reliable and request.content_length is None:
            editor.set_content_length(len(request.body))
        data = editor.render()
        self._send(actions, self.requests_out, request.method, data, destination, out_listener.address)
        if not remember:
            return
        tx.state = TxState.FORWARDED
        tx.forwarded = data
        tx.destination = destination
        tx.out_local = out_listener.address
        self._client_tx[(tx.out_branch, request.method)] = tx
        self._set_expiry(tx, self._give_up_at(tx, now, TIMER_B))  # Timer B / F
        if tx.source.is_reliable and not destination.is_reliable:
            # nobody upstream will retransmit for us: own the UDP leg (Timers A and E)
            tx.retransmit_at = now + T1
            self._schedule(tx.retransmit_at, "retransmit", tx)

    def _refuse_to_forward(
        self, tx: Transaction, status: int, reason: str, now: float, actions: list[Action]
    ) -> None:
        """sipguard cannot send the request on: it answers it itself, and the call the
        request was to start (counted already) never began."""
        if tx.call is not None and tx.role is CallRole.STARTS:
            self._end_call(tx.call, EndReason.REJECTED, now, actions, status=status)
        self._reply(tx, status, reason, now, actions)

    def _next_hop(self, request: Request, editor: MessageEditor, from_customer: bool) -> Address | None:
        """Where a request goes, and the Route / Request-URI edits that takes (§16.4, §16.6)."""
        route_target = self._strip_own_routes(request, editor) if request.has("route") else None
        if from_customer:
            return self.config.upstream
        return _uri_destination(route_target or request.uri)

    def _strip_own_routes(self, request: Request, editor: MessageEditor) -> SipUri | None:
        """Drop our own Route entries; return the URI of the next one, if any (loose routing)."""
        values = request.list_values("route")
        routes = request.routes
        own = 0
        while own < len(routes) and self._is_us(routes[own].uri):
            own += 1
        remaining_values = values[own:]
        strict_target = None
        if isinstance(request.uri, SipUri) and self._is_us(request.uri) and remaining_values and not own:
            # the previous hop was a strict router (§16.4): the real target is the last Route
            last = routes[-1].uri
            editor.set_request_uri(str(last))
            remaining_values = remaining_values[:-1]
            routes = routes[:-1]
            strict_target = last
        if len(remaining_values) != len(values):
            if remaining_values:
                editor.replace_header("route", ", ".join(remaining_values))
            else:
                editor.remove_header("route")
        next_uri = routes[own].uri if own < len(routes) else strict_target
        return next_uri if isinstance(next_uri, SipUri) else None

    def _stamp_source(self, request: Request, source: Address, editor: MessageEditor) -> None:
        """RFC 3261 §18.2.1 received, RFC 3581 rport: so responses can find the sender."""
        via = request.top_via
        # RFC 3581 §4: with rport, received is added "even if it is identical to the sent-by"
        add_received = via.wants_rport or normal_host(via.host) != normal_host(source.host)
        # received and an rport value are a server's to write: a client's own would route
        # responses (and a late 2xx, by Via) wherever it chose, so it never stays
        if not add_received and via.received is None:
            return
        top = split_values(request.value_of(request.fields_named("via")[0]))[0]
        stamped: list[str] = []
        for piece in split_outside_quotes(top, ";"):
            name = piece.partition("=")[0].strip().lower()
            if name == "received" and stamped:
                continue
            stamped.append(f"rport={source.port}" if name == "rport" and stamped else piece)
        top = ";".join(stamped)
        if add_received:
            top += f";received={source.host}"
        editor.push_via(top)
        editor.pop_via()

    # -- responses ----------------------------------------------------------------------------
    def _on_response(self, response: Response, source: Address, now: float, actions: list[Action]) -> None:
        vias = response.vias  # all of them: a response whose next Via is malformed is dropped
        branch = vias[0].branch or ""
        own = self._own_requests.get(branch)
        if own is not None:  # the answer to a request sipguard sent itself: nobody to relay it to
            if own.on_response(response.status_code, now):  # its first final response
                self._schedule_own(own)
                if isinstance(own, Probe):
                    self._probe_ended(own, response.status_code, now, actions)
            return
        if not branch.startswith(OUR_BRANCH_PREFIX) or len(vias) < 2:
            actions.append(Discarded(reason="response not for us", source=source, call_id=response.call_id))
            return
        tx = self._client_tx.get((branch, response.cseq.method))
        if tx is None and branch != self._branch(self._response_key(response, vias[1])):
            # No transaction, and not a branch sipguard gave the request (a keyed hash of
            # the Via below ours): a forged response, which routing by that Via would
            # reflect to any address its sender chose (§16.11: the top Via must be ours).
            actions.append(Discarded(reason="response not for us", source=source, call_id=response.call_id))
            return
        editor = MessageEditor(response)
        editor.pop_via()
        data = editor.render()
        if tx is None:  # the transaction is gone (a late 2xx retransmission): route by Via
            destination = _via_destination(vias[1])
            listener = self._listener_for(destination)
            local = listener.address if listener else None
        else:
            destination, local = tx.source, tx.local
            if not self._track_response(tx, response, data, now, actions):
                actions.append(Discarded(reason="response after the final one", source=source))
                return
        if not is_routable(destination.host):
            actions.append(Discarded(reason="Via points at a broadcast address", source=source))
            return
        if tx is None and _normal_host_port(destination.host, destination.port) in self._our_host_ports:
            # a forged Via list naming sipguard again and again: each pass would pop one
            # Via and send the rest back to us, one message becoming hundreds
            actions.append(Discarded(reason="Via points back at sipguard", source=source))
            return
        self._send(actions, self.responses_out, response.cseq.method, data, destination, local)

    def _track_response(
        self, tx: Transaction, response: Response, data: bytes, now: float, actions: list[Action]
    ) -> bool:
        """Take a response to a forwarded request into its transaction; False: not to be
        relayed. Once a final response went back, a provisional would contradict it, and
        so would a different final from the next hop after the one it sent first (RFC
        3261 §16.7 step 10): neither is relayed. What still goes on: the same final again
        (the next hop retransmits it until the ACK comes), another fork's 2xx, and the next
        hop's final after one sipguard wrote itself (Timer C's 408: relayed, the caller's
        ACK of it is what reaches the next hop as the ACK of its own)."""
        status = response.status_code
        if tx.state is TxState.COMPLETED and (
            status < 200 or (status >= 300 and tx.final_status not in (0, status))
        ):
            return False
        first_response = not tx.has_response
        tx.has_response = True
        if tx.retransmit_at is not None and (status >= 200 or tx.method == "INVITE"):
            tx.retransmit_at = None  # Timer A stops on any response, Timer E on a final one
        if status < 200:
            tx.last_response = data
            if first_response and tx.method == "INVITE":  # Timer B gives way to Timer C
                self._set_expiry(tx, self._give_up_at(tx, now, self.config.early_timeout))
            return True
        if tx.state is TxState.COMPLETED and tx.call is None:  # the final again, another fork's 2xx
            return True  # relayed only
        # (a completed transaction with a call: Timer C's 408 went back, this is the next hop's final)
        tx.last_response = data
        call = tx.call  # (before _complete lets go of it)
        self._complete(tx, now, status)
        if call is None:
            return True
        if tx.role is CallRole.ENDS:
            if status < 300 or status in (408, 481):
                self._end_call(call, EndReason.BYE, now, actions, by_caller=tx.by_caller)
            elif call.state is CallState.CONFIRMED:
                actions.append(ByeRefused(call=call.info, status=status, now=now, by_caller=tx.by_caller))
            return True
        if tx.role is CallRole.ENDS_IF_ANSWERED:
            dialog_tags = (response.from_.tag, response.to.tag)
            if status < 300 and call.state is CallState.CONFIRMED and call.matches(dialog_tags):
                self._end_call(call, EndReason.BYE, now, actions, by_caller=tx.by_caller)
            return True
        if tx.role is CallRole.REFRESHES:
            if status < 300 and call.state is CallState.CONFIRMED:  # not a call ended meanwhile
                self._refresh_session(call, response, now)
                if call.dialog is not None:  # the party answering may have moved too
                    call.dialog.target_refreshed(response.from_.tag != call.info.from_tag, response)
            return True
        if status >= 300:
            reason = EndReason.REJECTED
            if status == 487 and tx.cancelled:
                reason = EndReason.CANCELLED
            elif status == 487 and call.ringing_timed_out:  # the CANCEL was Timer C's
                reason = EndReason.NO_ANSWER
            self._end_call(call, reason, now, actions, status=status)
        elif call.state is CallState.EARLY:
            if call.dialog is not None:
                call.dialog.answered(response)
                if call.dialog.prober is not None:
                    call.dialog.prober.start(now)
                    self._schedule_prober(call.dialog.prober)
            self.calls.answer(call, response.to.tag, now)
            self._refresh_session(call, response, now)
            self._arm_call(call)
            actions.append(CallAnswered(call=call.info, now=now))
        return True

    def _give_up_at(self, tx: Transaction, now: float, timeout: float) -> float:
        """When a forwarded request times out: never after the early deadline of the call
        it starts, so that Timer C cancels the INVITE when the call's ringing time is up."""
        if tx.call is not None and tx.role is CallRole.STARTS:
            return min(now + timeout, tx.call.deadline)
        return now + timeout

    def _refresh_session(self, call: Call, response: Response, now: float) -> None:
        value = response.get("session-expires")
        if value is None:
            if call.session_expires_at is not None:  # RFC 4028 §7.4: no Session-Expires, no expiry
                self.calls.refresh_session(call, None, now)
                self._arm_call(call)
            return
        # ASCII digits, bounded: str.isdigit() also takes "²", which int() refuses, and int()
        # of thousands of digits raises too; either would lose the 2xx being relayed.
        seconds = bounded_int(value.split(";", 1)[0].strip(" \t"), MAX_UINT32)
        if seconds:
            self.calls.refresh_session(call, float(seconds), now)
            self._arm_call(call)

    # -- replies, calls, timers ------------------------------------------------------------------
    def _reply(
        self,
        tx: Transaction,
        status: int,
        reason: str,
        now: float,
        actions: list[Action],
        *,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        request = tx.request
        assert request is not None, "a completed transaction does not reply again"
        data = build_reply(
            request,
            status,
            reason,
            to_tag=tx.out_branch[-16:],
            server=self.config.server_header,
            headers=headers,
        )
        if data is None:
            return
        tx.last_response = data
        if status >= 200:
            self._complete(tx, now, 0)  # 0: sipguard's own, not the next hop's
        self._send(actions, self.responses_out, tx.method, data, tx.source, tx.local)
        if status >= 300:
            actions.append(Discarded(reason=reason, source=tx.source, status=status, call_id=request.call_id))

    def _send(
        self,
        actions: list[Action],
        counts: dict[str, int],
        method: str,
        data: bytes,
        destination: Address,
        local: Address | None,
    ) -> None:
        """Every message the core emits goes out through here, counted in ``counts``
        (``requests_out`` or ``responses_out``) by ``method``."""
        _count(counts, method)
        actions.append(Send(data=data, destination=destination, local=local))

    def _complete(self, tx: Transaction, now: float, relayed_status: int) -> None:
        """A final response went back (the next hop's ``relayed_status``, or 0 for one of
        sipguard's own): keep only what answers retransmissions (Timer J/H). Each call
        leaves two such transactions for 32 s; what they hold, the garbage collector walks
        on every full pass (``attempt`` stays: a verdict may still come)."""
        tx.state = TxState.COMPLETED
        tx.final_status = relayed_status
        tx.request = None
        tx.forwarded = None
        tx.call = None
        self._set_expiry(tx, now + TIMER_B)

    def _reply_stateless(
        self,
        request: Request,
        source: Address,
        local: Address,
        status: int,
        reason: str,
        actions: list[Action],
    ) -> bool:
        """Whether a reply could be written (not when the request lacks what one needs)."""
        data = build_reply(request, status, reason, to_tag="sg-stateless", server=self.config.server_header)
        if data is not None:
            self._send(actions, self.responses_out, request.method, data, source, local)
        actions.append(Discarded(reason=reason, source=source, status=status, call_id=_call_id(request)))
        return data is not None

    def _answer_unparseable(
        self, error: ParseError, source: Address, local: Address, actions: list[Action]
    ) -> None:
        request = error.partial
        if not isinstance(request, Request) or request.method == "ACK":
            self.parse_errors[False] += 1
            actions.append(Discarded(reason=error.reason, source=source))
            return
        answered = self._reply_stateless(request, source, local, error.status, error.reason, actions)
        self.parse_errors[answered] += 1

    def _end_call(
        self,
        call: Call,
        reason: EndReason,
        now: float,
        actions: list[Action],
        *,
        status: int | None = None,
        by_caller: bool | None = None,
    ) -> None:
        if self.calls.end(call):
            call.timer_at = None  # its heap entry is now stale: compaction may drop it
            if call.dialog is not None and call.dialog.prober is not None:
                call.dialog.prober.stop()  # its heap entry is stale too
            actions.append(
                CallEnded(
                    call=call.info,
                    reason=reason,
                    now=now,
                    status=status,
                    answered_at=call.answered_at,
                    by_caller=by_caller,
                )
            )

    def _end_call_by_timer(self, call: Call, now: float, actions: list[Action]) -> None:
        if call.state is CallState.EARLY and not call.ringing_timed_out:
            # Its INVITE's Timer C is due at this instant too (_give_up_at) and cancels it. A
            # 2xx may cross that CANCEL: the call counts until the INVITE's final response,
            # or at most as long as a CANCEL transaction lives.
            self.calls.ringing_timeout(call, now + TIMER_B)
            self._arm_call(call)
            return
        if call.state is CallState.EARLY:  # no final response to the cancelled INVITE either
            reason = EndReason.NO_ANSWER
        elif call.deadline == call.duration_limit_at:  # a tie with another limit: still say BYE
            reason = EndReason.MAX_DURATION
        elif call.session_expires_at is not None and call.deadline == call.session_expires_at:
            reason = EndReason.SESSION_EXPIRED
        else:
            reason = EndReason.MAX_LIFETIME
        self._end_call(call, reason, now, actions)
        if reason is EndReason.MAX_DURATION and call.dialog is not None:
            self._hang_up(call, call.dialog, MAX_DURATION_REASON, now, actions)

    # -- requests sipguard sends itself -------------------------------------------------------------
    def _hang_up(
        self, call: Call, dialog: Dialog, reason: tuple[str, str], now: float, actions: list[Action]
    ) -> None:
        """BYE to the callee as if from the caller, and to the caller as if from the callee."""
        for to_caller in (False, True):
            self._send_in_dialog(call, dialog, to_caller, now, actions, reason=reason)

    def _probe(self, prober: Prober, now: float, actions: list[Action]) -> None:
        """A keepalive round: an OPTIONS to each party, as the other would send it."""
        call = self.calls.live_call(prober.call)
        assert call is not None and call.dialog is not None  # (stopped when the call ended)
        prober.next_round(now)
        for to_caller in (False, True):
            self._send_in_dialog(call, call.dialog, to_caller, now, actions, prober=prober)
        self._schedule_prober(prober)

    def _probe_ended(self, probe: Probe, status: int | None, now: float, actions: list[Action]) -> None:
        """A probe got its final response (``status``) or gave up (None)."""
        call = self.calls.live_call(probe.prober.call)
        if call is None:
            return  # the call ended meanwhile: nothing to keep alive
        if probe.prober.failed(probe.to_caller, status):
            assert call.dialog is not None
            last = 408 if status is None else status  # no answer in time: as a proxy would say
            self._end_call(call, EndReason.KEEPALIVE_FAILED, now, actions, status=last)
            self._hang_up(call, call.dialog, KEEPALIVE_REASON, now, actions)

    def _send_in_dialog(
        self,
        call: Call,
        dialog: Dialog,
        to_caller: bool,
        now: float,
        actions: list[Action],
        *,
        reason: tuple[str, str] | None = None,
        prober: Prober | None = None,
    ) -> None:
        """sipguard's own request to one party: a BYE giving ``reason``, or with ``prober``
        a keepalive OPTIONS. A party with no usable Contact gets neither."""
        request = dialog.request_to(to_caller, self._is_us)
        if request is None:
            return
        # the PBX side is always reached through the upstream, whatever the route says
        toward_upstream = to_caller != call.info.from_customer
        destination = self._in_dialog_destination(request, toward_upstream)
        listener = self._listener_for(destination) if destination is not None else None
        method = "BYE" if prober is None else "OPTIONS"
        if destination is None or listener is None:
            if prober is None:  # (said once, for the BYE; not for every probe)
                actions.append(
                    Discarded(
                        reason="no route for our BYE", source=call.info.source, call_id=call.info.call_id
                    )
                )
            return
        side = "caller" if to_caller else "callee"
        if prober is None:
            branch = self._branch((call.info.attempt_id, side, method))
            cseq = request.cseq
        else:  # a new transaction each round
            branch = self._branch((call.info.attempt_id, side, f"{method} {prober.rounds}"))
            cseq = Probe.cseq_for(request)
        headers = [reason] if reason is not None else []
        if self.config.server_header:
            headers.append(("User-Agent", self.config.server_header))
        data = build_request(
            method,
            request.request_uri,
            via=_our_via(listener, branch),
            from_=request.from_,
            to=request.to,
            call_id=call.info.call_id,
            cseq=cseq,
            routes=request.routes,
            headers=headers,
        )
        own = (
            OwnRequest(branch, data, destination, listener.address, now)
            if prober is None
            else Probe(branch, data, destination, listener.address, now, prober, to_caller)
        )
        self._own_requests[branch] = own
        self._send(actions, self.requests_out, method, data, destination, listener.address)
        self._schedule_own(own)

    def _in_dialog_destination(self, request: InDialogRequest, toward_upstream: bool) -> Address | None:
        """The next hop of a request sipguard sends in a dialog, as ``_next_hop`` would
        choose for one that a party sent through it."""
        if toward_upstream:
            return self.config.upstream
        if request.routes:
            return _uri_destination(parse_name_addr(request.routes[0]).uri)
        return _uri_destination(parse_uri(request.request_uri))

    def _own_request_timer(self, own: OwnRequest, now: float, actions: list[Action]) -> None:
        if own.on_timer(now):
            method = "OPTIONS" if isinstance(own, Probe) else "BYE"  # the two requests sipguard sends
            self._send(actions, self.requests_out, method, own.data, own.destination, own.local)
        if own.timer_at is None:
            del self._own_requests[own.branch]
            if isinstance(own, Probe) and not own.answered:  # no final response in time
                self._probe_ended(own, None, now, actions)
        else:
            self._schedule_own(own)

    def _schedule_own(self, own: OwnRequest) -> None:
        assert own.timer_at is not None
        self._schedule(own.timer_at, "own", own)

    def _schedule_prober(self, prober: Prober) -> None:
        assert prober.timer_at is not None
        self._schedule(prober.timer_at, "probe", prober)

    def _expire_transaction(self, tx: Transaction, now: float, actions: list[Action]) -> None:
        if tx.state is TxState.DECIDING:
            # the attempt stays in _deciding: a late Accept must still give back what it took
            self._reply(tx, 503, "Policy Decision Timeout", now, actions, headers=(("Retry-After", "5"),))
            return
        if tx.state is TxState.FORWARDED and tx.method == "INVITE":
            # Timer C: nobody answered. Give up upstream, cancel downstream (§16.8). A
            # re-INVITE nobody answered does not end the call: its UAC decides (§12.2.1.2).
            call = tx.call if tx.role is CallRole.STARTS else None
            cancelling = tx.forwarded is not None and tx.destination is not None and tx.has_response
            if cancelling:
                assert tx.forwarded is not None and tx.destination is not None
                cancel = build_cancel(parse_message(tx.forwarded))
                self._send(actions, self.requests_out, "CANCEL", cancel, tx.destination, tx.out_local)
            elif call is not None:  # Timer B: not even a provisional, nothing to cancel
                self._end_call(call, EndReason.NO_ANSWER, now, actions)
            self._reply(tx, 408, "Request Timeout", now, actions)
            if cancelling and call is not None:
                # the next hop's final response still ends or answers the call (a 2xx that
                # crosses the CANCEL is relayed, §16.7): keep it, as _complete let go of it
                tx.call = call
            return
        if tx.state is TxState.FORWARDED and tx.call is not None and tx.role is CallRole.ENDS:
            self._end_call(tx.call, EndReason.BYE, now, actions, by_caller=tx.by_caller)  # Timer F
        tx.retransmit_at = None  # Timer F: Timer E stops too
        tx.timer_at = None
        del self._server_tx[tx.key]
        if tx.attempt is not None:  # a verdict not come by now is no longer waited for
            self._deciding.pop(tx.attempt.attempt_id, None)
        if self._client_tx.get((tx.out_branch, tx.method)) is tx:
            del self._client_tx[(tx.out_branch, tx.method)]

    def _retransmit(self, tx: Transaction, when: float, now: float, actions: list[Action]) -> None:
        if tx.retransmit_at != when or tx.state is not TxState.FORWARDED or tx.forwarded is None:
            return
        assert tx.destination is not None
        self._send(actions, self.requests_out, tx.method, tx.forwarded, tx.destination, tx.out_local)
        tx.retransmit_interval = min(tx.retransmit_interval * 2, 1e9 if tx.method == "INVITE" else T2)
        tx.retransmit_at = now + tx.retransmit_interval
        self._schedule(tx.retransmit_at, "retransmit", tx)

    def _remember(self, tx: Transaction, expires_at: float) -> None:
        tx.out_branch = self._branch(tx.key)
        self._server_tx[tx.key] = tx
        self._set_expiry(tx, expires_at)

    def _set_expiry(self, tx: Transaction, expires_at: float) -> None:
        """One heap entry per transaction: a later expiry needs no new entry (the early one
        re-arms itself when it fires), only an earlier one does."""
        tx.expires_at = expires_at
        if tx.timer_at is None or expires_at < tx.timer_at:
            tx.timer_at = expires_at
            self._schedule(expires_at, "tx", tx)

    def _arm_call(self, call: Call) -> None:
        """One heap entry per call, as for transactions."""
        if call.timer_at is None or call.deadline < call.timer_at:
            call.timer_at = call.deadline
            self._schedule(call.deadline, "call", call)

    def _schedule(self, when: float, kind: str, target: TimerTarget) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), kind, target))
        if len(self._timers) > 2 * (len(self._server_tx) + self.calls.live + len(self._own_requests)) + 1024:
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop entries that will never fire, so ended calls and forgotten transactions are
        freed now rather than when their old deadline (up to hours away) comes round."""
        live = [entry for entry in self._timers if _fires(entry)]
        heapq.heapify(live)
        self._timers = live

    # -- identities ------------------------------------------------------------------------------
    def _server_key(self, request: Request, via: Via) -> tuple[str, str, str]:
        """RFC 3261 §17.2.3 matching; RFC 2543 peers (no magic cookie) by dialog fields."""
        method = "INVITE" if request.method == "ACK" else request.method
        return _transaction_key(via, method, request.call_id, request.cseq.seq, request.from_.tag)

    def _response_key(self, response: Response, via: Via) -> tuple[str, str, str]:
        """The key of the server transaction a response answers, from the Via below ours:
        what ``_branch`` made our branch from."""
        return _transaction_key(
            via, response.cseq.method, response.call_id, response.cseq.seq, response.from_.tag
        )

    def _branch(self, key: tuple[str, str, str]) -> str:
        # CANCEL shares its INVITE's branch (§9.1); everything else gets its own.
        method = "INVITE" if key[2] == "CANCEL" else key[2]
        digest = hashlib.blake2b(
            f"{key[0]}\x00{key[1]}\x00{method}".encode("utf-8", "surrogateescape"),
            key=self.config.branch_secret[:64],
            digest_size=10,
        ).hexdigest()
        return f"{OUR_BRANCH_PREFIX}{digest}"

    def _is_loop(self, request: Request) -> bool:
        """Our own Via already in the request with the branch we would give it: a loop (§16.3)."""
        if len(request.fields_named("via")) < 2 and "," not in (request.get("via") or ""):
            return False
        ours = self._branch(self._server_key(request, request.top_via))
        return any(via.branch == ours for via in request.vias[1:])

    def _is_upstream(self, source: Address) -> bool:
        host = normal_host(source.host)
        if (host, source.port) in self._upstream_host_ports:
            return True
        if not self.config.trusted_networks:
            return False
        trusted = self._trusted.get(host)
        if trusted is None:
            if len(self._trusted) > 100_000:
                self._trusted.clear()
            trusted = self._trusted[host] = in_networks(host, self.config.trusted_networks)
        return trusted

    def _is_us(self, uri: object) -> bool:
        if not isinstance(uri, SipUri):
            return False
        if uri.host.lower() in self.config.aliases:
            return True
        port = uri.port or (5061 if uri.scheme == "sips" else 5060)
        return _normal_host_port(uri.host, port) in self._our_host_ports

    def _addressed_to_us(self, request: Request) -> bool:
        uri = request.uri
        return isinstance(uri, SipUri) and uri.user is None and self._is_us(uri) and not request.has("route")

    def _listener_for(self, destination: Address) -> Listener | None:
        """The listener to send from: same transport and address family as the destination
        (for an IPv4 one, a dual-stack IPv6 listener will do when no IPv4 listener is
        there: ``listen: [udp:[::]:5060]`` in front of an IPv4 PBX)."""
        wants_ipv6 = ":" in destination.host
        fallback = None
        dual_stack = None
        for listener in self.config.listeners:
            if listener.address.transport != destination.transport:
                continue
            if (":" in listener.address.host) == wants_ipv6:
                return listener
            fallback = fallback or listener
            if listener.takes_ipv4 and not wants_ipv6:
                dual_stack = dual_stack or listener
        if dual_stack is not None:
            return dual_stack
        return fallback if not is_ip(destination.host) else None

    def _listener_at(self, address: Address) -> Listener | None:
        for listener in self.config.listeners:
            if listener.address == address:
                return listener
        return None


def _by_method() -> dict[str, int]:
    return dict.fromkeys((*KNOWN_METHODS, "other"), 0)


def _count(counts: dict[str, int], method: str) -> None:
    try:
        counts[method] += 1
    except KeyError:  # a method sipguard does not know: one key for them all, so none is added
        counts["other"] += 1


def _fires(entry: tuple[float, int, str, TimerTarget]) -> bool:
    """Whether a timer heap entry is still the one its object waits for."""
    when, _, kind, target = entry
    if kind == "retransmit":
        return isinstance(target, Transaction) and target.retransmit_at == when
    return target.timer_at == when


def _our_via(listener: Listener, branch: str) -> str:
    return f"SIP/2.0/{listener.address.transport.upper()} {listener.host_port};branch={branch}"


def _uri_destination(uri: Uri | None) -> Address | None:
    """Where a request for ``uri`` goes: its host and port, over its transport parameter."""
    if not isinstance(uri, SipUri):
        return None
    transport = (uri.params.get("transport") or "udp").lower()
    if transport not in ("udp", "tcp"):
        return None
    host = uri.params.get("maddr") or uri.host
    return Address(transport, host, uri.port or 5060)


def _record_route(listener: Listener) -> str:
    transport = "" if listener.address.transport == "udp" else f";transport={listener.address.transport}"
    return f"<sip:{listener.host_port}{transport};lr>"


def _transaction_key(
    via: Via, method: str, call_id: str, cseq: int, from_tag: str | None
) -> tuple[str, str, str]:
    """A server transaction's key (RFC 3261 §17.2.3): the Via's branch and sent-by and the
    method; for RFC 2543 peers (no magic cookie) the dialog fields stand in for the branch."""
    branch = via.branch or ""
    if not branch.startswith(BRANCH_PREFIX) or branch == BRANCH_PREFIX:
        branch = f"2543:{call_id}:{cseq}:{from_tag}"
    return (branch, via.sent_by.lower(), method)


def _via_destination(via: Via) -> Address:
    """RFC 3261 §18.2.2 and RFC 3581 §4: where a response goes when no transaction remembers."""
    transport = "udp" if via.transport == "UDP" else "tcp"
    host = via.received or via.maddr or via.host
    return Address(transport, host, via.rport or via.port or 5060)


def _normal_host_port(host: str, port: int) -> tuple[str, int]:
    return (normal_host(host), port)


def _call_id(message: Request | Response) -> str | None:
    try:
        return message.call_id
    except ParseError:
        return None
