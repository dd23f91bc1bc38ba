"""Call tracking: every forwarded initial INVITE is a call, early → confirmed → ended.

Strategy: calls are found by Call-ID plus the caller's tag, in From or in To (a BYE
from the callee carries it in To), and once answered the callee's tag too. Each live
call has one deadline: the early-dialog timeout while it rings (then, once sipguard has
cancelled its INVITE, ``ringing_timed_out``, a backstop: the call lasts until the
INVITE's final response, since a 2xx may cross the CANCEL), then the earliest of
its maximum lifetime, when an RFC 4028 session timer was negotiated the last refresh
plus the session interval, and when the policies gave it a maximum duration the answer
plus that (the call then carries a ``Dialog``, to be ended with BYEs; so does a call
with a keepalive, whose probes have their own timer, dialogs.py ``Prober``). The core
owns the timer heap; this module only says what each deadline is and what ended.

Invariants: a call ends exactly once, and stays ENDED (a late 2xx or refresh cannot
bring it back); every end carries an EndReason; the table never holds more than
``max_calls`` calls (the core refuses new INVITEs past that).
"""

from __future__ import annotations

import enum

from .dialogs import Dialog
from .events import CallInfo


class CallState(enum.Enum):
    EARLY = "early"
    CONFIRMED = "confirmed"
    ENDED = "ended"


class Call:
    __slots__ = (
        "answered_at",
        "deadline",
        "dialog",
        "info",
        "ringing_timed_out",
        "session_expires_at",
        "state",
        "timer_at",
        "to_tag",
    )

    def __init__(self, info: CallInfo, deadline: float) -> None:
        self.info = info
        self.state = CallState.EARLY
        self.to_tag: str | None = None
        self.answered_at: float | None = None
        self.session_expires_at: float | None = None
        self.deadline = deadline
        self.timer_at: float | None = None  # when the core's heap entry for it fires
        self.dialog: Dialog | None = None  # only for a call with a maximum duration or a keepalive
        self.ringing_timed_out = False  # rang past the early timeout: its INVITE is being cancelled

    @property
    def duration_limit_at(self) -> float | None:
        """When an answered call with a maximum duration reaches it."""
        if self.dialog is None or self.dialog.max_duration is None or self.answered_at is None:
            return None
        return self.answered_at + self.dialog.max_duration

    def matches(self, tags: tuple[str | None, str | None]) -> bool:
        """A request's (From, To) tags, from either party. While the call rings any callee
        tag will do (each fork has its early dialog); once answered, only the answered
        dialog's: another fork's 2xx makes a dialog the caller must BYE (§13.2.2.4), and
        that BYE must not end the call."""
        if self.to_tag is None:
            return self.info.from_tag in tags
        return self.info.from_tag in tags and self.to_tag in tags


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

    def live_call(self, info: CallInfo) -> Call | None:
        """The call that ``info`` started, while it lasts."""
        for call in self._by_call_id.get(info.call_id, ()):
            if call.info is info:
                return call
        return None

    def answer(self, call: Call, to_tag: str | None, now: float) -> None:
        call.state = CallState.CONFIRMED
        call.to_tag = to_tag
        call.answered_at = now
        self._set_answered_deadline(call)

    def ringing_timeout(self, call: Call, backstop: float) -> None:
        """An early call rang past its early deadline and sipguard cancels its INVITE. It
        still counts until the INVITE's final response (a 487, or a 2xx that crossed the
        CANCEL and answers it), or until ``backstop`` if none comes."""
        call.ringing_timed_out = True
        call.deadline = backstop

    def refresh_session(self, call: Call, interval: float | None, now: float) -> None:
        """A 2xx carrying Session-Expires: the session now lasts until now + interval.
        A refresh 2xx without one (``None``) turns the session timer off (RFC 4028 §7.4)."""
        call.session_expires_at = None if interval is None else now + interval
        if call.state is CallState.CONFIRMED:
            self._set_answered_deadline(call)

    def end(self, call: Call) -> bool:
        """Remove a call; False if it had already ended."""
        if call.state is CallState.ENDED:
            return False
        call.state = CallState.ENDED
        calls = self._by_call_id[call.info.call_id]
        calls.remove(call)
        if not calls:
            del self._by_call_id[call.info.call_id]
        self.live -= 1
        return True

    def calls(self) -> list[Call]:
        return [call for calls in self._by_call_id.values() for call in calls]

    def _set_answered_deadline(self, call: Call) -> None:
        deadline = call.info.started_at + self.max_lifetime
        if call.session_expires_at is not None:
            deadline = min(deadline, call.session_expires_at)
        limit = call.duration_limit_at
        if limit is not None:
            deadline = min(deadline, limit)
        call.deadline = deadline
