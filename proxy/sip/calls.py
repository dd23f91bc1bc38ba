"""Call tracking: every forwarded initial INVITE is a call, early → confirmed → ended.

Strategy: calls are found by Call-ID plus either dialog tag (a BYE from the callee
carries the caller's tag in To). Each live call has one deadline: the early-dialog
timeout while it rings, then the earlier of its maximum lifetime and, when an RFC 4028
session timer was negotiated, the last refresh plus the session interval. The core
owns the timer heap; this module only says what each deadline is and what ended.

Invariants: a call ends exactly once; every end carries an EndReason; the table never
holds more than ``max_calls`` calls (the core refuses new INVITEs past that).
"""

from __future__ import annotations

import enum

from .events import CallInfo


class CallState(enum.Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"


class Call:
    __slots__ = ("answered_at", "deadline", "info", "session_expires_at", "state", "timer_at", "to_tag")

    def __init__(self, info: CallInfo, deadline: float) -> None:
        self.info = info
        self.state = CallState.EARLY
        self.to_tag: str | None = None
        self.answered_at: float | None = None
        self.session_expires_at: float | None = None
        self.deadline = deadline
        self.timer_at: float | None = None  # when the core's heap entry for it fires

    def matches(self, tags: tuple[str | None, str | None]) -> bool:
        return self.info.from_tag in tags


class CallTable:
    def __init__(self, *, max_lifetime: float, early_timeout: float) -> None:
        self.max_lifetime = max_lifetime
        self.early_timeout = early_timeout
        self._by_call_id: dict[str, list[Call]] = {}
        self.live = 0

    def start(self, info: CallInfo) -> Call:
        call = Call(info, info.started_at + min(self.early_timeout, self.max_lifetime))
        self._by_call_id.setdefault(info.call_id, []).append(call)
        self.live += 1
        return call

    def find(self, call_id: str, tags: tuple[str | None, str | None]) -> Call | None:
        for call in self._by_call_id.get(call_id, ()):
            if call.matches(tags):
                return call
        return None

    def answer(self, call: Call, to_tag: str | None, now: float) -> None:
        call.state = CallState.CONFIRMED
        call.to_tag = to_tag
        call.answered_at = now
        call.deadline = call.info.started_at + self.max_lifetime
        self._apply_session_timer(call)

    def refresh_session(self, call: Call, interval: float | None, now: float) -> None:
        """A 2xx carrying Session-Expires: the session now lasts until now + interval.
        A refresh 2xx without one (``None``) turns the session timer off (RFC 4028 §7.4)."""
        call.session_expires_at = None if interval is None else now + interval
        if call.state is CallState.CONFIRMED:
            call.deadline = call.info.started_at + self.max_lifetime
            self._apply_session_timer(call)

    def end(self, call: Call) -> bool:
        """Remove a call; False if it had already ended."""
        calls = self._by_call_id.get(call.info.call_id)
        if not calls or call not in calls:
            return False
        calls.remove(call)
        if not calls:
            del self._by_call_id[call.info.call_id]
        self.live -= 1
        return True

    def calls(self) -> list[Call]:
        return [call for calls in self._by_call_id.values() for call in calls]

    @staticmethod
    def _apply_session_timer(call: Call) -> None:
        if call.session_expires_at is not None:
            call.deadline = min(call.deadline, call.session_expires_at)
