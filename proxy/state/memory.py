"""The in-memory state store: one process, no I/O, decisions at once.

Slots are a dict of members (attempt ids) with a lease end per key, never a bare
counter, so a double release or a lost event cannot drift a count; counting a key's
live members is ``len()`` until its earliest lease could have run out (an account's
key holds every live call of the account: counting them one by one on each INVITE made
the check grow with the calls in progress). Rate buckets are GCRA: one "theoretical
arrival time" per key, with the emission interval it was built at: a reload that changes
the rate rescales the backlog, so the calls in the bucket stay the same calls. Quotas are
a total and its expiry per key. Expired leases, full buckets and ended periods are swept
every ``SWEEP_EVERY`` operations so memory stays bounded by live callers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from .ops import HitRate, Operation, OpResult, TakeSlot, UseQuota

SWEEP_EVERY = 10_000
# Instants less than a millisecond apart are one instant to a rate bucket. Arrival times
# are sums of intervals such as 60/7 s, which floats cannot hold exactly (and on a
# wall-clock timeline of 1.7e9 s, one float step is 2.4e-7 s): without this, the last
# call of a burst, or the call made exactly Retry-After later, could be refused.
EPSILON = 1e-3


@dataclass(slots=True)
class _Slots:
    """One key's holders (attempt id -> lease end), with a lower bound on their lease ends."""

    leases: dict[str, float] = field(default_factory=dict)
    earliest_end: float = math.inf

    def take(self, member: str, lease_end: float) -> None:
        self.leases[member] = lease_end
        self.earliest_end = min(self.earliest_end, lease_end)

    def live(self, now: float) -> int:
        """How many leases still run; the lapsed ones are dropped the first time it matters."""
        if self.earliest_end <= now:
            self.leases = {member: end for member, end in self.leases.items() if end > now}
            self.earliest_end = min(self.leases.values(), default=math.inf)
        return len(self.leases)


class MemoryStore:
    def __init__(self, *, slot_lease: float = 4 * 3600.0 + 300.0) -> None:
        self.slot_lease = slot_lease
        self.slots: dict[str, _Slots] = {}
        # key -> (arrival time, last member, the emission interval the arrival time is in)
        self.buckets: dict[str, tuple[float, str, float]] = {}
        self.quotas: dict[str, tuple[int, float]] = {}  # key -> (total, expires at)
        self._operations = 0

    def check_and_take_now(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult]:
        results = [self._evaluate(member, op, now) for op in operations]
        blocked = blocked or any(
            op.enforced and not result.allowed for op, result in zip(operations, results, strict=True)
        )
        for index, (op, result) in enumerate(zip(operations, results, strict=True)):
            if isinstance(op, TakeSlot):
                if not blocked:
                    slots = self.slots.get(op.key)
                    if slots is None:
                        slots = self.slots[op.key] = _Slots()
                    slots.take(member, now + self.slot_lease)
            elif isinstance(op, UseQuota):
                if not blocked and op.amount:
                    self._add(op, now)
            elif (result.allowed or not op.enforced) and (not blocked or op.count_if_blocked):
                self._hit(op, member, now)
                if blocked:  # a refused attempt that counts: the wait is from the bucket with it
                    results[index] = replace(result, retry_after=self._wait(op, now))
        self._operations += 1
        if self._operations % SWEEP_EVERY == 0:
            self.sweep(now)
        return results

    async def check_and_take(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult]:
        return self.check_and_take_now(member, operations, now, blocked=blocked)

    def record(self, usage: Sequence[UseQuota], now: float) -> None:
        for op in usage:
            self._add(op, now)

    def used(self, key: str, now: float) -> int:
        total, expires_at = self.quotas.get(key, (0, now))
        return total if expires_at > now else 0

    def hold(self, member: str, slot_keys: Sequence[str], now: float) -> None:
        """Count the member in each key's slots, whatever the limits (a call another store
        admitted, mirrored here; ``release`` gives them back)."""
        for key in slot_keys:
            slots = self.slots.get(key)
            if slots is None:
                slots = self.slots[key] = _Slots()
            slots.take(member, now + self.slot_lease)

    def release(self, member: str, slot_keys: Sequence[str], now: float) -> None:
        for key in slot_keys:
            slots = self.slots.get(key)
            if slots is not None:
                slots.leases.pop(member, None)
                if not slots.leases:
                    del self.slots[key]

    def held(self, key: str, now: float) -> int:
        slots = self.slots.get(key)
        return slots.live(now) if slots is not None else 0

    def sweep(self, now: float) -> None:
        for key in [key for key, slots in self.slots.items() if not slots.live(now)]:
            del self.slots[key]
        for key in [key for key, (arrival, _, _) in self.buckets.items() if arrival <= now]:
            del self.buckets[key]
        for key in [key for key, (_, expires_at) in self.quotas.items() if expires_at <= now]:
            del self.quotas[key]

    def _evaluate(self, member: str, op: Operation, now: float) -> OpResult:
        if isinstance(op, TakeSlot):
            slots = self.slots.get(op.key)
            live = slots.live(now) if slots is not None else 0
            if slots is not None and member in slots.leases:
                return OpResult(True, live, op.limit)
            return OpResult(live < op.limit, live + 1, op.limit)
        if isinstance(op, UseQuota):
            used = self.used(op.key, now)
            return OpResult(used < op.limit, used + op.amount, op.limit)
        interval = 60.0 / op.per_minute
        arrival, last_member = self._arrival(op.key, now, interval)
        if last_member == member:  # the same attempt again: already counted
            return OpResult(True, _level(arrival, now, interval), op.burst)
        tolerance = (op.burst - 1) * interval
        allowed = arrival - tolerance <= now + EPSILON
        level = _level(arrival + interval, now, interval)
        retry_after = None if allowed else arrival - tolerance - now
        return OpResult(allowed, level, op.burst, retry_after)

    def _wait(self, op: HitRate, now: float) -> float | None:
        """Seconds until the bucket admits a call again; None if it does now."""
        interval = 60.0 / op.per_minute
        wait = self._arrival(op.key, now, interval)[0] - (op.burst - 1) * interval - now
        return wait if wait > EPSILON else None

    def _add(self, op: UseQuota, now: float) -> None:
        self.quotas[op.key] = (self.used(op.key, now) + op.amount, now + op.ttl)

    def _hit(self, op: HitRate, member: str, now: float) -> None:
        interval = 60.0 / op.per_minute
        arrival, last_member = self._arrival(op.key, now, interval)
        if last_member == member:
            return
        self.buckets[op.key] = (arrival + interval, member, interval)

    def _arrival(self, key: str, now: float, interval: float) -> tuple[float, str]:
        """The bucket's arrival time (not before ``now``) at ``interval``, and its last member.
        Built at another interval (a reload changed the rate): the same number of calls at
        the new one, or a raised limit would refuse for the old backlog's time, a lowered
        one forget the calls just made."""
        arrival, last_member, built_at = self.buckets.get(key, (now, "", interval))
        if arrival <= now:
            return now, last_member
        if built_at == interval:
            return arrival, last_member
        return now + (arrival - now) * interval / built_at, last_member


def _level(arrival: float, now: float, interval: float) -> int:
    """How many calls the bucket holds: its backlog in emission intervals, rounded up."""
    return max(0, math.ceil((arrival - now - EPSILON) / interval))
