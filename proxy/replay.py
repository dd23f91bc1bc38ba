"""What-if replay: a capture's calls judged offline by a policy file (``sipguard replay``).

Strategy: proxy/capture.py turns the capture into SIP messages in capture order; this
module turns those into what the live proxy would have asked its PolicyEngine, with the
capture's timestamps as the clock (``now`` counts from the first message, and the
engine's wall_offset makes calendar rules see the capture's own date and time):
- Each initial INVITE (no To tag) is one call attempt, counted once by Call-ID, CSeq and
  From tag: retransmissions, and the copy sipguard forwarded to the PBX, are the same
  attempt, and the first copy seen (the customer's) is the one judged. INVITEs from the
  PBX side (the policy's proxy.upstream and trusted_peers) are not judged, as live.
- A real PolicyEngine built from the policy judges each attempt, counting in its own
  in-memory store: a replay never touches the policy's Redis.
- What the capture shows next drives the calls the replay let through, in a CallTable as
  in the core: the first 2xx to the INVITE answers the call, a BYE from the PBX side ends
  it, a customer's BYE ends it when answered 2xx, 481 or 408 (or left unanswered for
  TIMER_B, or still unanswered when the capture ends), a final response of 300 or more
  fails it (487 after a CANCEL: cancelled). As live, a call still
  ringing after proxy.ringing_timeout, or up past proxy.max_call_lifetime or its rules'
  maximum duration, ends then; a call the capture never ends, ends with the capture.
- A call the replay refuses never happened: nothing later in the capture is applied to it.
- A call refused in the capture before it reached the PBX (a final response of 300 or
  more that the PBX side did not send, to an INVITE never seen forwarded) but let
  through by the replay has no real outcome: it is taken as ringing until that refusal,
  then ended unanswered (reason no-answer).
Only ``replay_capture`` opens a file; ``CallReplay`` is fed messages and reads no clock.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from policies.base import Mode

from .capture import LINK_TYPE_NAMES, CaptureError, CaptureReader, DecodeCounts, PacketDecoder, SipPacket
from .engine import PolicyEngine
from .policyfile import CompiledPolicy
from .sip import ParseError, Request, Response
from .sip.calls import Call, CallState, CallTable
from .sip.dialogs import Dialog
from .sip.events import (
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
from .sip.hosts import in_networks, normal_host
from .sip.timers import TIMER_B
from .state import MemoryStore

_POLICY_ERROR = Reject(status=500, reason="Policy Error")  # what the live proxy answers
DUPLICATE_WINDOW = 64.0  # seconds an INVITE's copies are recognised: Timer B (32 s) twice
NO_ACCOUNT = "(no account)"
CAPTURED_OUTCOMES = ("answered", "failed", "refused", "cancelled", "unanswered")


@dataclass(slots=True, kw_only=True)
class JudgedCall:
    """One call attempt as the replay judged it, and how the capture shows it went."""

    at: float  # the INVITE's capture timestamp (epoch seconds)
    call_id: str
    account: str | None
    source: str
    caller: str | None  # as presented (From)
    caller_e164: str | None
    callee: str | None
    verdict: str  # accept | reject | emergency
    rule: str | None = None  # the rule that refused it
    detail: str | None = None
    monitor: tuple[str, ...] = ()  # rules that would have refused it, in monitor mode
    tagged: tuple[str, ...] = ()  # rules whose X-Sipguard-Tag it would have carried
    captured: str = "unanswered"  # answered, failed 486, refused 403, cancelled, unanswered

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "time": wall_time(self.at)}


@dataclass(slots=True)
class RuleCounts:
    judged: int = 0  # calls it was asked about (its account's rules include it)
    refused: int = 0  # calls this rule refused (the first enforcing rule to deny decides)
    monitor: int = 0  # calls it would have refused, in monitor mode
    tagged: int = 0  # calls forwarded with its X-Sipguard-Tag (tag mode, or a warning)
    warnings: int = 0  # calls it warned about (e.g. dialer signatures below critical)


@dataclass(slots=True)
class AccountCounts:
    judged: int = 0
    accepted: int = 0
    refused: int = 0
    monitor: int = 0  # accepted or refused calls that a monitor-mode rule would have refused
    tagged: int = 0


@dataclass(slots=True, kw_only=True)
class ReplayReport:
    """What the policy would have done with the capture's calls."""

    policy: str
    capture: str = ""
    capture_format: str = ""
    link_type: str = ""
    first_at: float | None = None
    last_at: float | None = None
    counts: DecodeCounts = field(default_factory=DecodeCounts)
    judged: int = 0  # INVITEs judged (emergency calls included)
    accepted: int = 0
    refused: int = 0
    emergency: int = 0
    from_pbx_side: int = 0  # INVITEs from the PBX side: not judged
    rules: dict[str, RuleCounts] = field(default_factory=dict)
    replies: dict[str, str] = field(default_factory=dict)  # rule -> "486 Too many simultaneous calls"
    accounts: dict[str, AccountCounts] = field(default_factory=dict)
    # verdict (accept, reject, emergency) -> how the capture shows those calls went
    against_capture: dict[str, Counter[str]] = field(default_factory=dict)
    examples: list[JudgedCall] = field(default_factory=list)  # the first refused calls
    calls: list[JudgedCall] | None = None  # every judged call, when asked for
    warnings: list[str] = field(default_factory=list)

    def seen(self, verdict: str, outcome: str) -> int:
        """How many calls given ``verdict`` the capture shows went ``outcome`` (answered ...)."""
        return self.against_capture.get(verdict, Counter())[outcome]

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "policy": self.policy,
            "capture": {
                "file": self.capture, "format": self.capture_format, "link_type": self.link_type,
                "first": wall_time(self.first_at), "last": wall_time(self.last_at),
                "seconds": round(self.last_at - self.first_at, 3) if self.first_at and self.last_at else 0,
                **self.counts.as_json(),
            },
            "calls_judged": self.judged, "accepted": self.accepted, "refused": self.refused,
            "emergency": self.emergency, "from_pbx_side": self.from_pbx_side,
            "rules": {name: {**asdict(c), "reply": self.replies.get(name)} for name, c in self.rules.items()},
            "accounts": {name: asdict(counts) for name, counts in self.accounts.items()},
            "against_capture": {verdict: dict(c) for verdict, c in self.against_capture.items()},
            "examples": [call.as_json() for call in self.examples],
            "warnings": self.warnings,
        }  # fmt: skip
        if self.calls is not None:
            answer["calls"] = [call.as_json() for call in self.calls]
        return answer


@dataclass(slots=True)
class _Attempt:
    """A judged INVITE whose final response the capture has not shown yet."""

    judged: JudgedCall
    source: Address  # of the copy judged
    call: Call | None  # in the replay's call table, when the replay let it through
    forwarded: bool = False  # a copy was seen from elsewhere: it reached the next hop
    cancelled: bool = False


class CallReplay:
    """Feed it a capture's SIP messages in order, then ``finish``: a ReplayReport."""

    def __init__(
        self,
        policy: CompiledPolicy,
        *,
        upstream: Address | None = None,
        examples: int = 10,
        keep_calls: bool = False,
    ) -> None:
        self.policy = policy
        self.report = report = ReplayReport(policy=policy.path)
        self.engine = PolicyEngine(policy, MemoryStore(slot_lease=policy.local_slot_lease))
        self.engine.on_decision = self._decided
        self.calls = CallTable(
            max_lifetime=policy.proxy.max_call_lifetime, early_timeout=policy.proxy.ringing_timeout
        )
        upstream = upstream or policy.upstream
        self._upstream = (normal_host(upstream.host), upstream.port)
        self._upstream_text = str(upstream)
        self._trusted = tuple(ipaddress.ip_network(text, strict=False) for text in policy.proxy.trusted_peers)
        self._examples = examples
        report.calls = [] if keep_calls else None
        report.rules = {rule.name: RuleCounts() for rule, _ in policy.rules}
        report.replies = {rule.name: f"{c.reply.code} {c.reply.reason}" for rule, c in policy.rules}
        self._origin: float | None = None  # the first message's timestamp: engine time 0
        self._now = 0.0
        self._seen: dict[tuple[str, str, int], float] = {}  # INVITE copies recognised, by first sight
        self._open: dict[tuple[str, str, int], _Attempt] = {}
        self._timers: list[tuple[float, int, Call]] = []
        # customers' BYEs awaiting the PBX's answer, in capture order: (Call-ID, CSeq) ->
        # (the call, sent by its caller, when)
        self._byes: dict[tuple[str, int], tuple[Call, bool, float]] = {}
        self._sequence = itertools.count()
        self._decision: dict[str, Any] | None = None
        self._pbx_messages = 0
        self.unusable = 0  # messages with a header that turned out malformed when read
        self.out_of_order = 0
        self.policy_errors: list[str] = []

    # -- input -----------------------------------------------------------------------------------
    def feed(self, packet: SipPacket) -> None:
        if self._origin is None:
            self._origin = packet.at
            self.engine.wall_offset = packet.at
        now = packet.at - self._origin
        if now < self._now:
            self.out_of_order += 1  # stamped before the previous message: taken as simultaneous
            now = self._now
        self._expire(now)
        self._now = now
        message = packet.message
        try:  # (headers are parsed when first read: only those of messages that matter)
            if isinstance(message, Response):
                if message.status_code >= 200 and message.cseq.method == "INVITE":
                    from_pbx = self._from_pbx_side(packet.source)
                    self._final_response(_attempt_key(message), message, from_pbx, now)
                elif message.status_code >= 200 and message.cseq.method == "BYE":
                    self._bye_answered(message, now)
            elif message.method == "INVITE" and message.to.tag is None:
                self._invite(_attempt_key(message), packet, now)
            elif message.method == "BYE":
                self._bye(message, self._from_pbx_side(packet.source), now)
            elif message.method == "CANCEL" and (attempt := self._open.get(_attempt_key(message))):
                attempt.cancelled = True
        except ParseError:
            self.unusable += 1

    def finish(self, end: float | None) -> ReplayReport:
        """The capture is over at ``end`` (its last packet): calls still up end then."""
        now = self._now
        if end is not None and self._origin is not None:
            now = max(now, end - self._origin)
        self._expire(now)
        for call, by_caller, _ in self._byes.values():  # their answers are not in the capture
            self._end(call, EndReason.BYE, now, by_caller=by_caller)
        self._byes.clear()
        for call in self.calls.calls():
            reason = EndReason.NO_ANSWER if call.state is CallState.EARLY else EndReason.MAX_LIFETIME
            self._end(call, reason, now)
        for attempt in self._open.values():
            self._record_outcome(attempt)
        self._open.clear()
        self._warn()
        return self.report

    # -- calls -----------------------------------------------------------------------------------
    def _invite(self, key: tuple[str, str, int], packet: SipPacket, now: float) -> None:
        if key in self._seen:  # a retransmission, or the copy sent on to the next hop
            attempt = self._open.get(key)
            if attempt is not None and packet.source != attempt.source:
                attempt.forwarded = True
            return
        self._forget_old_invites(now)
        self._seen[key] = now
        if self._from_pbx_side(packet.source):
            self.report.from_pbx_side += 1
            return
        request = packet.message
        assert isinstance(request, Request)
        attempt_id = f"replay.{next(self._sequence)}"
        verdict, judged = self._judge(CallAttempt(attempt_id=attempt_id, request=request,
                                                  source=packet.source, now=now), packet.at)  # fmt: skip
        call = None
        if isinstance(verdict, Accept):
            info = CallInfo(call_id=request.call_id, from_tag=key[1], attempt_id=attempt_id,
                            source=packet.source, from_customer=True, started_at=now)  # fmt: skip
            call = self.calls.start(info)
            if verdict.max_duration is not None:  # the table reads it from the call's dialog
                call.dialog = Dialog(request, verdict.max_duration)
            self._arm(call)
        self._open[key] = _Attempt(judged, packet.source, call)
        self._count(judged)

    def _judge(self, attempt: CallAttempt, at: float) -> tuple[Verdict, JudgedCall]:
        emergencies = self.engine.counters.verdicts["emergency"]
        self._decision = None
        request = attempt.request
        try:
            verdict = self.engine.decide_now(attempt)
        except Exception as error:  # as the live proxy: a policy error refuses the call (500)
            self.policy_errors.append(f"{request.call_id}: {type(error).__name__}: {error}")
            return _POLICY_ERROR, self._bare(request, attempt, at, "reject", "policy-error", str(error))
        assert verdict is not None, "an in-memory store answers at once"
        fields = self._decision
        if fields is None:  # not judged by the rules: an emergency call, or no rules at all
            emergency = self.engine.counters.verdicts["emergency"] > emergencies
            return verdict, self._bare(request, attempt, at, "emergency" if emergency else "accept")
        account = fields["account"]
        modes = {rule.name: config.mode for rule, config in self._rules_of(account)}
        also = fields.get("also", [])
        warned = [entry["rule"] for entry in fields.get("warnings", [])]
        judged = JudgedCall(
            at=at,
            call_id=fields["call_id"],
            account=account,
            source=fields["source"],
            caller=fields["caller"],
            caller_e164=fields["caller_e164"],
            callee=fields["callee"],
            verdict=fields["verdict"],
            rule=fields["rule"],
            detail=fields["detail"],
            monitor=tuple(entry["rule"] for entry in also if entry["mode"] == Mode.MONITOR.value),
            tagged=tuple(
                [entry["rule"] for entry in also if entry["mode"] == Mode.TAG.value]
                + [rule for rule in warned if modes.get(rule) is not Mode.MONITOR]
            ),
        )
        for rule in warned:
            self._rule(rule).warnings += 1
        return verdict, judged

    def _decided(self, fields: dict[str, Any]) -> None:
        self._decision = fields

    def _final_response(
        self, key: tuple[str, str, int], response: Response, from_pbx: bool, now: float
    ) -> None:
        attempt = self._open.pop(key, None)
        if attempt is None:
            return  # not a judged INVITE's, or a copy of a final response already seen
        status = response.status_code
        call = attempt.call
        if status < 300:
            attempt.judged.captured = "answered"
            if call is not None and call.state is CallState.EARLY:
                self.calls.answer(call, response.to.tag, now)
                self.engine.call_answered(CallAnswered(call=call.info, now=now))
                self._arm(call)
        elif from_pbx or attempt.forwarded:
            cancelled = attempt.cancelled and status == 487
            attempt.judged.captured = "cancelled" if cancelled else f"failed {status}"
            if call is not None:
                self._end(call, EndReason.CANCELLED if cancelled else EndReason.REJECTED, now, status=status)
        else:  # refused before the PBX: no real outcome (see the module's docstring)
            attempt.judged.captured = f"refused {status}"
            if call is not None:
                self._end(call, EndReason.NO_ANSWER, now)
        self._record_outcome(attempt)

    def _bye(self, request: Request, from_pbx: bool, now: float) -> None:
        call = self.calls.find(request.call_id, (request.from_.tag, request.to.tag))
        # a BYE while ringing (an early dialog) ends the call when the INVITE's final response passes
        if call is None or call.state is not CallState.CONFIRMED:
            return
        by_caller = request.from_.tag == call.info.from_tag
        if from_pbx:  # the PBX hung up: over as it passes, as live
            self._end(call, EndReason.BYE, now, by_caller=by_caller)
        else:  # the PBX's answer decides, as live (proxy/sip/core.py's CallRole.ENDS)
            self._byes.setdefault((request.call_id, request.cseq.seq), (call, by_caller, now))

    def _bye_answered(self, response: Response, now: float) -> None:
        pending = self._byes.pop((response.call_id, response.cseq.seq), None)
        status = response.status_code
        if pending is not None and (status < 300 or status in (408, 481)):
            call, by_caller, _ = pending
            self._end(call, EndReason.BYE, now, by_caller=by_caller)

    def _end(
        self,
        call: Call,
        reason: EndReason,
        now: float,
        *,
        status: int | None = None,
        by_caller: bool | None = None,
    ) -> None:
        answered_at = call.answered_at
        if self.calls.end(call):
            self.engine.call_ended(CallEnded(call=call.info, reason=reason, now=now, status=status,
                                             answered_at=answered_at, by_caller=by_caller))  # fmt: skip

    def _arm(self, call: Call) -> None:
        heapq.heappush(self._timers, (call.deadline, next(self._sequence), call))

    def _expire(self, now: float) -> None:
        """End the calls whose deadline passed before ``now``, each at its deadline, and
        those whose customer's BYE has gone unanswered for TIMER_B (live: Timer F)."""
        byes = self._byes
        while byes:
            key, (call, by_caller, sent_at) = next(iter(byes.items()))
            if sent_at + TIMER_B > now:
                break
            del byes[key]
            self._end(call, EndReason.BYE, sent_at + TIMER_B, by_caller=by_caller)
        while self._timers and self._timers[0][0] <= now:
            deadline, _, call = heapq.heappop(self._timers)
            if call.state is CallState.ENDED or call.deadline != deadline:
                continue  # ended meanwhile, or its deadline moved (answered)
            if call.state is CallState.EARLY:
                reason = EndReason.NO_ANSWER
            elif deadline == call.duration_limit_at:
                reason = EndReason.MAX_DURATION
            else:
                reason = EndReason.MAX_LIFETIME
            self._end(call, reason, deadline)

    def _forget_old_invites(self, now: float) -> None:
        seen = self._seen
        while seen:
            oldest = next(iter(seen))
            if seen[oldest] > now - DUPLICATE_WINDOW:
                return
            del seen[oldest]

    def _from_pbx_side(self, source: Address) -> bool:
        """Whether the live proxy would take a request from ``source`` as the PBX's."""
        host = normal_host(source.host)
        trusted = bool(self._trusted) and in_networks(host, self._trusted)
        pbx = trusted or (host, source.port) == self._upstream
        self._pbx_messages += pbx
        return pbx

    # -- the report ------------------------------------------------------------------------------
    def _count(self, judged: JudgedCall) -> None:
        report = self.report
        report.judged += 1
        if report.calls is not None:
            report.calls.append(judged)
        if judged.verdict == "emergency":
            report.emergency += 1
            return
        account = report.accounts.setdefault(judged.account or NO_ACCOUNT, AccountCounts())
        account.judged += 1
        for rule, _ in self._rules_of(judged.account):
            self._rule(rule.name).judged += 1
        if judged.verdict == "reject":
            report.refused += 1
            account.refused += 1
            if judged.rule is not None:
                self._rule(judged.rule).refused += 1
            if len(report.examples) < self._examples:
                report.examples.append(judged)
        else:
            report.accepted += 1
            account.accepted += 1
        account.monitor += bool(judged.monitor)
        account.tagged += bool(judged.tagged)
        for rule in judged.monitor:
            self._rule(rule).monitor += 1
        for rule in judged.tagged:
            self._rule(rule).tagged += 1

    def _record_outcome(self, attempt: _Attempt) -> None:
        judged = attempt.judged
        outcome = judged.captured.split(" ", 1)[0]
        self.report.against_capture.setdefault(judged.verdict, Counter())[outcome] += 1

    def _rule(self, name: str) -> RuleCounts:
        return self.report.rules.setdefault(name, RuleCounts())

    def _rules_of(self, account: str | None) -> Any:
        policy = self.policy
        return policy.account_rules.get(account, policy.rules) if account else policy.rules

    def _bare(
        self, request: Request, attempt: CallAttempt, at: float, verdict: str,
        rule: str | None = None, detail: str | None = None,
    ) -> JudgedCall:  # fmt: skip
        """A call the rules did not look at (emergency, no rules, or a policy error)."""
        try:
            caller: str | None = str(request.from_.uri)
        except ParseError:
            caller = None
        return JudgedCall(at=at, call_id=request.call_id, account=None, source=attempt.source.host,
                          caller=caller, caller_e164=None, callee=str(request.uri), verdict=verdict,
                          rule=rule, detail=detail)  # fmt: skip

    def _warn(self) -> None:
        report = self.report
        warnings = report.warnings
        if self.policy.state.url != "memory":
            warnings.append(
                "the policy's state store is a shared Redis: this replay counted in its own memory "
                "and did not touch it"
            )
        if not self.policy.rules:
            warnings.append("the policy has no rules: every call is accepted")
        if report.judged and not self._pbx_messages:
            upstream, trusted = self._upstream_text, self.policy.proxy.trusted_peers
            warnings.append(
                f"no message came from the PBX side (upstream {upstream}"
                f"{', trusted peers ' + ', '.join(trusted) if trusted else ''}): if the PBX placed calls "
                "in this capture they were judged as customers'; give --upstream"
            )
        if self.out_of_order:
            warnings.append(
                f"{self.out_of_order} messages were stamped earlier than one before them "
                "(taken as simultaneous with it)"
            )
        if self.policy_errors:
            warnings.append(f"{len(self.policy_errors)} calls raised a policy error (refused 500, "
                            f"as live): first {self.policy_errors[0]}")  # fmt: skip


def _attempt_key(message: Request | Response) -> tuple[str, str, int]:
    """An INVITE transaction's messages by Call-ID, From tag and CSeq number (a CANCEL's too)."""
    return (message.call_id, message.from_.tag or "", message.cseq.seq)


def wall_time(at: float | None) -> str | None:
    """ISO 8601 in UTC, to the millisecond: 2026-01-12T09:00:00.123Z."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def replay_capture(
    policy: CompiledPolicy,
    path: str,
    *,
    upstream: Address | None = None,
    examples: int = 10,
    keep_calls: bool = False,
) -> ReplayReport:
    """Read the capture at ``path`` and judge its calls by ``policy``; CaptureError when
    the file cannot be read as a capture at all."""
    replay = CallReplay(policy, upstream=upstream, examples=examples, keep_calls=keep_calls)
    report = replay.report
    report.capture = path
    first = last = None
    try:
        with open(path, "rb") as file:
            reader = CaptureReader(file, path)
            decoder = PacketDecoder(reader.link_type)
            report.capture_format, report.link_type = reader.format, LINK_TYPE_NAMES[reader.link_type]
            for at, frame in reader:
                first = at if first is None else first
                last = at if last is None else max(last, at)
                for packet in decoder.decode(at, frame):
                    replay.feed(packet)
            for packet in decoder.finish(last or 0.0):
                replay.feed(packet)
    except OSError as error:  # (not found, a directory, no permission)
        raise CaptureError(f"cannot read {path}: {error.strerror or error}") from None
    report.first_at, report.last_at = first, last
    report.counts = decoder.counts
    report.counts.malformed += replay.unusable
    replay.finish(last)
    if reader.truncated:
        report.warnings.insert(0, f"the capture is cut short: {reader.truncated}; "
                                  f"what came before it was replayed")  # fmt: skip
    if decoder.counts.snapped:
        report.warnings.append(
            f"{decoder.counts.snapped} packets were cut short by the capture's snap length "
            "and skipped (capture with tcpdump -s 0)"
        )
    if decoder.counts.packets and not decoder.counts.messages:
        report.warnings.append(f"no SIP message in {decoder.counts.packets} packets")
    return report
