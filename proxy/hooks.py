"""The seam between the proxy and the policy layer.

The core asks for a verdict on each initial INVITE from a customer and reports how
every tracked call went; a ``DecisionHook`` answers and listens. ``decide`` is async
because a policy may need a remote state store; everything else is a notification.
"""

from __future__ import annotations

from typing import Protocol

from .sip.events import Accept, CallAnswered, CallAttempt, CallEnded, Verdict


class DecisionHook(Protocol):
    async def decide(self, attempt: CallAttempt) -> Verdict: ...

    def call_answered(self, event: CallAnswered) -> None: ...

    def call_ended(self, event: CallEnded) -> None: ...


class AcceptAll:
    """No policies: sipguard is a plain proxy."""

    async def decide(self, attempt: CallAttempt) -> Verdict:
        return Accept()

    def call_answered(self, event: CallAnswered) -> None:
        pass

    def call_ended(self, event: CallEnded) -> None:
        pass
