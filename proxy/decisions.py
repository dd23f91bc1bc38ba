"""What the engine decided about each initial INVITE, and the calls up right now: the
memory behind ``sipguard explain`` and ``sipguard status``.

A ``Decision`` is the one description of a verdict: the ``call.decision`` log line and
``explain`` are both read from it (``fields``), so they cannot disagree.

Strategy: recording is on the hot path (every judged INVITE), so a Decision keeps what
the engine built anyway (strings, the rules' findings) and nothing is formatted until a
log line or an operator asks. What it keeps is atomic values in tuples, never the
engine's objects: the cyclic garbage collector stops visiting such a tuple after a pass,
where a decision holding its operations and results was ~13 more objects (measured under
load) that every full collection walked, ten thousand decisions at a time. The
memory is a deque bounded at ``capacity`` decisions (the oldest drop out); calls still up
are also held by attempt id, so answering, ending and the live counts by account and
number are O(1) per call, however long a call lasts. Finding a Call-ID scans the deque:
that is the operator's cost, never a call's.

Times are the engine's monotonic ``now``; each decision also keeps the wall clock of its
INVITE, from which the wall clock of its answer and end follow.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from .sip.events import CallEnded
from .state import Operation, OpResult

DEFAULT_CAPACITY = 10_000
RATE_WINDOW = 60.0  # seconds of decisions "top callers" counts
TOP = 10  # rows of the top-N tables in ``status``


def wall_iso(epoch_seconds: float, timespec: str = "milliseconds") -> str:
    """Epoch seconds as ISO 8601 UTC: 2026-11-23T21:30:00.250+00:00."""
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat(timespec=timespec)


class Decision:
    """One judged INVITE: who called whom, the verdict and why; then how the call went."""

    __slots__ = (
        "account",
        "also",
        "answered_at",
        "attempt_id",
        "by_caller",
        "call_id",
        "callee",
        "caller",
        "caller_e164",
        "code",
        "counters",
        "detail",
        "end_reason",
        "end_status",
        "ended_at",
        "now",
        "rule",
        "source",
        "verdict",
        "wall_time",
        "warnings",
    )

    def __init__(
        self,
        attempt_id: str,
        call_id: str,
        now: float,
        wall_time: float,
        account: str | None,
        source: str,
        caller: str | None,
        caller_e164: str | None,
        callee: str,
        verdict: str,
        rule: str | None,
        detail: str | None,
        code: int | None,
        counters: Sequence[tuple[Operation, OpResult]],
        also: tuple[tuple[str, str, str], ...],
        warnings: Sequence[tuple[str, str]],
    ) -> None:
        self.attempt_id = attempt_id
        self.call_id = call_id
        self.now = now  # monotonic, the INVITE's
        self.wall_time = wall_time  # epoch seconds, the INVITE's
        self.account = account
        self.source = source  # the host the INVITE came from
        self.caller = caller  # the From URI as presented
        self.caller_e164 = caller_e164  # the number the call is made from (From, else PPI/PAI)
        self.callee = callee  # E.164 when the request URI holds a number, else the URI
        self.verdict = verdict  # "accept", "reject" or "emergency"
        self.rule = rule  # the rule that refused it ("parse": malformed; "state": store away)
        self.detail = detail
        self.code = code  # the SIP status sipguard answered; None: forwarded
        # each limit's (rule, what, count, limit): the count against the limit
        self.counters = tuple((op.rule, op.label, result.count, result.limit) for op, result in counters)
        self.also = also  # (rule, mode, detail): the other rules' findings
        self.warnings = tuple(warnings)  # (rule, detail)
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.end_status: int | None = None
        self.by_caller: bool | None = None

    def fields(self) -> dict[str, Any]:
        """What the decision says: the ``call.decision`` log line's fields."""
        fields: dict[str, Any] = {
            "call_id": self.call_id,
            "account": self.account,
            "source": self.source,
            "caller": self.caller,
            "caller_e164": self.caller_e164,
            "callee": self.callee,
            "verdict": self.verdict,
            "rule": self.rule,
            "detail": self.detail,
            "code": self.code,
            "counters": [
                {"rule": rule, "what": what, "count": count, "limit": limit}
                for rule, what, count, limit in self.counters
            ],
        }
        if self.warnings:
            fields["warnings"] = [{"rule": rule, "detail": detail} for rule, detail in self.warnings]
        if self.also:
            fields["also"] = [
                {"rule": rule, "mode": mode, "detail": detail} for rule, mode, detail in self.also
            ]
        return fields

    def explain(self, now: float) -> dict[str, Any]:
        """The decision, when it was taken, and how the call went (as of ``now``)."""
        return {"at": wall_iso(self.wall_time), **self.fields(), "outcome": self._outcome(now)}

    def _outcome(self, now: float) -> dict[str, Any] | None:
        if self.code is not None:
            return None  # refused: there was no call
        answered, ended = self.answered_at, self.ended_at
        outcome: dict[str, Any] = {
            "state": "ended" if ended is not None else "answered" if answered is not None else "ringing",
            "answered_at": self._wall(answered),
            "ended_at": self._wall(ended),
            "reason": self.end_reason,
            "status": self.end_status,
            "by_caller": self.by_caller,
            "seconds": round((ended if ended is not None else now) - self.now, 3),  # INVITE to end (or now)
            "talk_seconds": None,
        }
        if answered is not None:
            outcome["talk_seconds"] = round((ended if ended is not None else now) - answered, 3)
        return outcome

    def _wall(self, moment: float | None) -> str | None:
        return None if moment is None else wall_iso(self.wall_time + (moment - self.now))


class DecisionMemory:
    """The last ``capacity`` decisions, and every forwarded call until it ends."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.recent: deque[Decision] = deque(maxlen=capacity)
        self.totals: Counter[str] = Counter()  # decisions since start, by verdict
        self.live: dict[str, Decision] = {}  # by attempt id: forwarded and not ended
        self.live_by_account: Counter[str | None] = Counter()
        self.live_by_number: Counter[str] = Counter()  # callers with an E.164 number

    def record(self, decision: Decision) -> None:
        self.recent.append(decision)
        self.totals[decision.verdict] += 1

    def forwarded(self, decision: Decision) -> None:
        """The call went on to the PBX: live until ``ended``."""
        if decision.attempt_id in self.live:
            return  # judged twice (decide_now, then decide): counted once
        self.live[decision.attempt_id] = decision
        self.live_by_account[decision.account] += 1
        if decision.caller_e164 is not None:
            self.live_by_number[decision.caller_e164] += 1

    def answered(self, attempt_id: str, now: float) -> None:
        decision = self.live.get(attempt_id)
        if decision is not None:
            decision.answered_at = now

    def ended(self, event: CallEnded) -> None:
        decision = self.live.pop(event.call.attempt_id, None)
        if decision is None:
            return
        decision.ended_at = event.now
        decision.end_reason = event.reason.value
        decision.end_status = event.status
        decision.by_caller = event.by_caller
        if event.answered_at is not None:
            decision.answered_at = event.answered_at
        _uncount(self.live_by_account, decision.account)
        if decision.caller_e164 is not None:
            _uncount(self.live_by_number, decision.caller_e164)

    # -- for operators (the admin listener) ----------------------------------------------------
    def attempts(self, call_id: str) -> list[Decision]:
        """Every remembered decision on ``call_id``, oldest first (a Call-ID can be retried
        with a new INVITE); a call still up is found even when it left the memory."""
        found = [decision for decision in self.recent if decision.call_id == call_id]
        remembered = {id(decision) for decision in found}
        found += [
            decision
            for decision in self.live.values()
            if decision.call_id == call_id and id(decision) not in remembered
        ]
        return sorted(found, key=lambda decision: decision.now)

    def since(self, moment: float) -> Iterator[Decision]:
        """The remembered decisions taken at ``moment`` or later, newest first."""
        for decision in reversed(self.recent):
            if decision.now < moment:
                return
            yield decision

    def top_callers(self, now: float, window: float = RATE_WINDOW, top: int = TOP) -> dict[str, Any]:
        """The callers with the most INVITEs over the last ``window`` seconds. When the
        memory holds less than that (a capacity below ``window``'s traffic), the seconds it
        covers are said, and the rates are over those."""
        calls: Counter[tuple[str | None, str]] = Counter()
        refused: Counter[tuple[str | None, str]] = Counter()
        oldest = now
        for decision in self.since(now - window):
            caller = (decision.account, decision.caller_e164 or decision.caller or "(no caller)")
            calls[caller] += 1
            refused[caller] += decision.code is not None
            oldest = decision.now
        full = len(self.recent) == self.capacity and oldest > now - window
        covered = max(now - oldest, 1.0) if full else window
        return {
            "window_seconds": round(covered, 1),
            "callers": [
                {
                    "number": number,
                    "account": account,
                    "calls": count,
                    "per_minute": round(count * 60.0 / covered, 1),
                    "refused": refused[account, number],
                }
                for (account, number), count in calls.most_common(top)
            ],
        }

    def live_summary(self, top: int = TOP) -> dict[str, Any]:
        return {
            "total": len(self.live),
            "by_account": [
                {"account": account, "calls": count} for account, count in self.live_by_account.most_common()
            ],
            "top_numbers": [
                {"number": number, "calls": count} for number, count in self.live_by_number.most_common(top)
            ],
        }


def _uncount(counter: Counter[Any], key: str | None) -> None:
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        del counter[key]
