"""State operations and the store interface (see the package docstring)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class TakeSlot:
    """Hold one of ``limit`` slots under ``key`` for the call, until it is released."""

    key: str
    limit: int
    rule: str = ""
    enforced: bool = True
    label: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class HitRate:
    """Count the call against a GCRA bucket: ``per_minute`` sustained, ``burst`` at once.

    ``count_if_blocked``: the attempt counts even when another limit rejects the call
    (a dialer's refused attempts are still attempts). An attempt this bucket itself
    refuses never counts, so a caller who stops is served again after one interval.
    """

    key: str
    per_minute: float
    burst: int
    count_if_blocked: bool = True
    rule: str = ""
    enforced: bool = True
    label: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class UseQuota:
    """A period's running total under ``key`` (calls made, seconds talked today ...):
    allowed while the total is under ``limit``; when the call goes through, ``amount`` is
    added. The total is kept ``ttl`` seconds (the period's end, plus a margin). Unlike
    slots, adding is not idempotent: the engine asks once per attempt."""

    key: str
    limit: int
    amount: int = 1
    ttl: float
    rule: str = ""
    enforced: bool = True
    label: str = ""


Operation = TakeSlot | HitRate | UseQuota


@dataclass(frozen=True, slots=True)
class OpResult:
    allowed: bool
    count: int  # slots held with this call / calls in the bucket with this call
    limit: int
    # seconds until a rate bucket admits a call again: when it refuses the call, or counts
    # an attempt that is refused all the same (count_if_blocked), from the bucket with it
    retry_after: float | None = None


class StateStore(Protocol):
    def check_and_take_now(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult] | None:
        """Answer at once when no I/O is needed; None means: await ``check_and_take``."""
        ...

    async def check_and_take(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult]:
        """Evaluate every operation, then commit atomically: slots only if no enforced
        operation failed and ``blocked`` is False (another rule already refused the call);
        rate hits as their ``count_if_blocked`` says."""
        ...

    def record(self, usage: Sequence[UseQuota], now: float) -> Awaitable[None] | None:
        """Add each ``amount`` to its total, unconditionally (a call's talk time, when it
        ends). A remote store returns the awaitable doing it; a local one has done it."""
        ...

    def hold(self, member: str, slot_keys: Sequence[str], now: float) -> None:
        """Count the member in each key's slots, whatever the limits: a live call admitted
        elsewhere (in the local store while the shared one was away). A remote store puts
        them in at its next lease renewal."""
        ...

    def release(self, member: str, slot_keys: Sequence[str], now: float) -> Awaitable[None] | None:
        """Give back the call's slots (idempotent). A remote store returns the awaitable
        doing it, for the caller to schedule; a local one has done it already (None)."""
        ...
