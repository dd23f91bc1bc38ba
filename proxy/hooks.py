"""The seam between the proxy and the policy layer.

The core asks for a verdict on each initial INVITE from a customer and reports how
every tracked call went; a ``DecisionHook`` answers and listens. ``decide_now`` answers
at once when no I/O is needed (in-memory state) and returns None otherwise; then
``decide`` is awaited, because a remote state store may be involved. An event-loop
task per INVITE costs more than the whole SIP path, so the fast path matters.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from .sip.events import Accept, CallAnswered, CallAttempt, CallEnded, Verdict
from .sip.message import Request


class DecisionHook(Protocol):
    @property
    def emergency_calls(self) -> Collection[str]:
        """The Call-IDs of the emergency calls up now: their messages pass a flood ban too."""
        ...

    def decide_now(self, attempt: CallAttempt) -> Verdict | None: ...

    async def decide(self, attempt: CallAttempt) -> Verdict: ...

    def call_answered(self, event: CallAnswered) -> None: ...

    def call_ended(self, event: CallEnded) -> None: ...

    def untrusted_headers(self, request: Request, source_host: str) -> tuple[str, ...]:
        """The headers to remove from a customer's request outside the calls judged here:
        the identity it asserts (RFC 3325), as from its INVITEs."""
        ...

    def is_emergency(self, request: Request, source_host: str) -> bool:
        """Does this initial INVITE call an emergency number? Asked, without judging, where
        the proxy would refuse a call for its own reasons (a ban, shutting down, max_calls),
        because emergency calls are never blocked."""
        ...


class AcceptAll:
    """No policies: sipguard is a plain proxy."""

    _ACCEPT = Accept()
    emergency_calls: Collection[str] = frozenset()

    def decide_now(self, attempt: CallAttempt) -> Verdict | None:
        return self._ACCEPT

    async def decide(self, attempt: CallAttempt) -> Verdict:
        return self._ACCEPT

    def call_answered(self, event: CallAnswered) -> None:
        pass

    def call_ended(self, event: CallEnded) -> None:
        pass

    def untrusted_headers(self, request: Request, source_host: str) -> tuple[str, ...]:
        return ()

    def is_emergency(self, request: Request, source_host: str) -> bool:
        return False  # no policy, no emergency numbers
