"""The state store contract (proxy/state/ops.py), one suite for every backend.

Every test takes the ``store`` fixture, parametrized over BACKENDS (the in-memory store)
and SHARED: a RedisStore on each real Redis setup of tests/redis_server.py (one server, a
master behind Sentinel, a 3-node Cluster), started once per session and emptied before
each test. A store is built inside the test's own event loop, so a client bound to a
loop works. The suite speaks only the protocol (``check_and_take``, ``release``, ``record``); what
a store holds is observed through it, with a probe that is ``blocked`` and so commits
nothing. Time is passed in as ``now``, as everywhere in sipguard.

Tests of one backend's internals (the memory store's sweep) are at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace

import pytest

from proxy.state import HitRate, MemoryStore, Operation, OpResult, StateStore, TakeSlot, UseQuota
from proxy.state import memory as memory_module
from proxy.state.redis_store import RedisStore

LEASE = 600.0
T0 = 1_000_000.0

Factory = Callable[[float], Awaitable[StateStore]]


async def memory_store(lease: float) -> StateStore:
    return MemoryStore(slot_lease=lease)


BACKENDS: dict[str, Factory] = {"memory": memory_store}
# backend -> the session fixture of its servers (a ``url`` for RedisStore and ``flushall()``)
SHARED = {"redis": "redis_server", "redis-sentinel": "redis_sentinel", "redis-cluster": "redis_cluster"}


class Store:
    """A backend under test, driven synchronously from one event loop per test."""

    def __init__(self, backend: StateStore, runner: asyncio.Runner) -> None:
        self.backend = backend
        self._runner = runner

    def take(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult]:
        results = self._runner.run(self.backend.check_and_take(member, operations, now, blocked=blocked))
        assert len(results) == len(operations)
        return results

    def release(self, member: str, keys: Sequence[str], now: float) -> None:
        pending = self.backend.release(member, keys, now)
        if pending is not None:  # a remote store releases asynchronously: wait for it here
            self._runner.run(_awaited(pending))

    def held(self, key: str, now: float) -> int:
        """Slots held under ``key``, asked with a probe that commits nothing."""
        probe = TakeSlot(key=key, limit=1_000_000, enforced=False)
        [result] = self.take("probe", [probe], now, blocked=True)
        return result.count - 1

    def record(self, usage: Sequence[UseQuota], now: float) -> None:
        pending = self.backend.record(usage, now)
        if pending is not None:
            self._runner.run(_awaited(pending))

    def used(self, key: str, now: float) -> int:
        """A quota's total, asked with a probe that adds nothing."""
        [result] = self.take("probe", [quota(key, 1_000_000, amount=0)], now)
        return result.count

    def admits(self, key: str, per_minute: float, burst: int, now: float) -> OpResult:
        """Whether a rate bucket would admit one more call now, asked without counting it."""
        probe = HitRate(key=key, per_minute=per_minute, burst=burst, count_if_blocked=False)
        [result] = self.take("probe", [probe], now, blocked=True)
        return result


async def _awaited(pending: Awaitable[None]) -> None:
    await pending


@pytest.fixture(params=[*BACKENDS, *SHARED])
def store(request: pytest.FixtureRequest) -> Iterator[Store]:
    with asyncio.Runner() as runner:
        if request.param in SHARED:  # real Redis servers, emptied for each test
            server = request.getfixturevalue(SHARED[request.param])
            server.flushall()

            async def redis_store(lease: float) -> StateStore:
                # clock=None: the store uses the ``now`` the test passes, as the memory store does
                return RedisStore(server.url, slot_lease=lease, clock=None, timeout=2.0)

            backend = runner.run(redis_store(LEASE))
            yield Store(backend, runner)
            runner.run(backend.close())  # type: ignore[attr-defined]
        else:
            yield Store(runner.run(BACKENDS[request.param](LEASE)), runner)


def slot(key: str = "conc:num:+14155550100", limit: int = 2, *, enforced: bool = True) -> TakeSlot:
    return TakeSlot(key=key, limit=limit, rule="concurrency", enforced=enforced, label=key)


def quota(key: str = "quota:calls:day:2026-11-22:num:+14155550100", limit: int = 3, *,
          amount: int = 1, enforced: bool = True, ttl: float = 3600.0) -> UseQuota:  # fmt: skip
    return UseQuota(key=key, limit=limit, amount=amount, ttl=ttl, rule="usage", enforced=enforced, label=key)


def rate(
    key: str = "rate:num:+14155550100",
    per_minute: float = 6.0,  # one call every 10 s
    burst: int = 3,
    *,
    count_if_blocked: bool = True,
    enforced: bool = True,
) -> HitRate:
    return HitRate(
        key=key,
        per_minute=per_minute,
        burst=burst,
        count_if_blocked=count_if_blocked,
        rule="call_rate",
        enforced=enforced,
        label=key,
    )


# -- concurrency slots ------------------------------------------------------------------------
def test_slots_are_taken_up_to_the_limit_and_the_next_is_refused(store: Store) -> None:
    op = slot(limit=2)
    assert store.take("a", [op], T0) == [OpResult(True, 1, 2)]
    assert store.take("b", [op], T0) == [OpResult(True, 2, 2)]
    assert store.take("c", [op], T0) == [OpResult(False, 3, 2)]
    assert store.held(op.key, T0) == 2


def test_a_refused_take_holds_nothing(store: Store) -> None:
    op = slot(limit=1)
    store.take("a", [op], T0)
    store.take("b", [op], T0)
    store.release("a", [op.key], T0 + 1)
    assert store.held(op.key, T0 + 1) == 0
    assert store.take("c", [op], T0 + 1) == [OpResult(True, 1, 1)]


def test_taking_again_with_the_same_member_is_harmless(store: Store) -> None:
    op = slot(limit=2)
    assert store.take("a", [op], T0)[0].allowed
    assert store.take("a", [op], T0 + 1) == [OpResult(True, 1, 2)]
    assert store.held(op.key, T0 + 1) == 1
    store.take("b", [op], T0 + 2)
    assert store.take("a", [op], T0 + 3) == [OpResult(True, 2, 2)]  # at the limit, but already in
    assert store.held(op.key, T0 + 3) == 2


def test_release_frees_the_members_slots_only(store: Store) -> None:
    one, other = slot("conc:num:+14155550100"), slot("conc:acct:acme", limit=5)
    store.take("a", [one, other], T0)
    store.take("b", [one, other], T0)
    store.release("a", [one.key, other.key], T0 + 1)
    assert (store.held(one.key, T0 + 1), store.held(other.key, T0 + 1)) == (1, 1)


def test_double_release_is_harmless(store: Store) -> None:
    op = slot(limit=2)
    store.take("a", [op], T0)
    store.take("b", [op], T0)
    store.release("a", [op.key], T0 + 1)
    store.release("a", [op.key], T0 + 2)
    assert store.held(op.key, T0 + 2) == 1
    store.release("never-took", [op.key, "conc:acct:nobody"], T0 + 3)
    assert store.held(op.key, T0 + 3) == 1


def test_all_or_nothing(store: Store) -> None:
    number, account = slot("conc:num:+14155550100", limit=5), slot("conc:acct:acme", limit=1)
    store.take("a", [account], T0)
    results = store.take("b", [number, account], T0)
    assert results == [OpResult(True, 1, 5), OpResult(False, 2, 1)]
    assert store.held(number.key, T0) == 0  # the one that fitted was not taken either
    assert store.held(account.key, T0) == 1


def test_blocked_takes_no_slots(store: Store) -> None:
    op = slot(limit=5)
    assert store.take("a", [op], T0, blocked=True) == [OpResult(True, 1, 5)]
    assert store.held(op.key, T0) == 0


def test_monitor_slots_over_the_limit_still_commit(store: Store) -> None:
    op = slot(limit=1, enforced=False)
    assert store.take("a", [op], T0) == [OpResult(True, 1, 1)]
    assert store.take("b", [op], T0) == [OpResult(False, 2, 1)]
    assert store.held(op.key, T0) == 2
    # and an enforced op on the same key sees them
    assert store.take("c", [slot(op.key, limit=3)], T0) == [OpResult(True, 3, 3)]


def test_a_monitor_failure_does_not_block_enforced_slots(store: Store) -> None:
    watched, enforced = slot("conc:acct:acme", limit=1, enforced=False), slot("conc:num:+1", limit=5)
    store.take("a", [watched], T0)
    assert store.take("b", [watched, enforced], T0) == [OpResult(False, 2, 1), OpResult(True, 1, 5)]
    assert (store.held(watched.key, T0), store.held(enforced.key, T0)) == (2, 1)


def test_an_enforced_failure_blocks_monitor_slots_too(store: Store) -> None:
    watched, enforced = slot("conc:acct:acme", limit=5, enforced=False), slot("conc:num:+1", limit=1)
    store.take("a", [enforced], T0)
    store.take("b", [watched, enforced], T0)
    assert store.held(watched.key, T0) == 0


def test_leases_expire(store: Store) -> None:
    op = slot(limit=1)
    store.take("a", [op], T0)
    assert store.held(op.key, T0 + LEASE - 1) == 1
    assert not store.take("b", [op], T0 + LEASE - 1)[0].allowed
    assert store.held(op.key, T0 + LEASE) == 0
    assert store.take("b", [op], T0 + LEASE) == [OpResult(True, 1, 1)]
    assert store.held(op.key, T0 + LEASE) == 1


def test_taking_again_renews_the_lease(store: Store) -> None:
    op = slot(limit=1)
    store.take("a", [op], T0)
    store.take("a", [op], T0 + 100)
    assert store.held(op.key, T0 + LEASE + 50) == 1


def test_leases_of_one_key_lapse_one_by_one(store: Store) -> None:
    # an account's key: calls taken at different times, one released, the others lapsing in turn
    op = slot("conc:acct:acme", limit=10)
    for offset, member in enumerate("abcd"):
        store.take(member, [op], T0 + 10 * offset)
    store.release("b", [op.key], T0 + 40)
    assert store.held(op.key, T0 + LEASE - 1) == 3
    assert store.held(op.key, T0 + LEASE + 5) == 2  # a lapsed
    store.take("e", [op], T0 + LEASE + 5)
    assert store.held(op.key, T0 + LEASE + 25) == 2  # c lapsed too, e came
    assert store.take("c", [op], T0 + LEASE + 25) == [OpResult(True, 3, 10)]  # c's lapsed lease is new again
    assert store.held(op.key, T0 + LEASE + 35) == 2  # d lapsed; c and e remain


# -- rate buckets (GCRA) ---------------------------------------------------------------------
def test_burst_then_refusal_with_retry_after(store: Store) -> None:
    op = rate(per_minute=6.0, burst=3)
    assert [r.allowed for r in (store.take(m, [op], T0)[0] for m in "abc")] == [True, True, True]
    refused = store.take("d", [op], T0)[0]
    assert refused == OpResult(False, 4, 3, 10.0)
    assert store.take("e", [op], T0 + 9.9)[0].allowed is False
    assert store.take("f", [op], T0 + refused.retry_after)[0] == OpResult(True, 3, 3)  # exactly then
    assert store.take("g", [op], T0 + refused.retry_after)[0].allowed is False


def test_counts_are_calls_in_the_bucket(store: Store) -> None:
    op = rate(per_minute=6.0, burst=3)
    assert [store.take(m, [op], T0)[0].count for m in "abc"] == [1, 2, 3]
    assert store.take("d", [op], T0 + 10)[0].count == 3  # one drained, one added
    assert store.take("e", [op], T0 + 40)[0].count == 1  # empty again


def test_retry_after_is_when_the_next_call_is_admitted(store: Store) -> None:
    op = rate(per_minute=6.0, burst=2)
    store.take("a", [op], T0)
    store.take("b", [op], T0 + 1)
    refused = store.take("c", [op], T0 + 4)[0]
    assert refused.retry_after == pytest.approx(6.0)
    assert store.take("d", [op], T0 + 4 + refused.retry_after)[0].allowed


def test_a_refused_attempt_that_counts_says_when_its_bucket_admits_again(store: Store) -> None:
    # The number's bucket admits the attempt and counts it, though the account's refuses
    # the call: its Retry-After must be from the bucket with that attempt in it.
    number, account = rate("rate:num:+1", burst=1), rate("rate:acct:acme", burst=1)
    store.take("a", [account], T0)
    admitted, refused = store.take("b", [number, account], T0 + 1)
    assert (admitted.allowed, refused.allowed) == (True, False)
    assert (admitted.retry_after, refused.retry_after) == (pytest.approx(10.0), pytest.approx(9.0))
    assert not store.admits(number.key, 6.0, 1, T0 + 10.5).allowed
    assert store.admits(number.key, 6.0, 1, T0 + 11).allowed
    # the same when another rule refused it already; a bucket with room left says nothing
    [full] = store.take("c", [rate("rate:num:+2", burst=1)], T0, blocked=True)
    [roomy] = store.take("c", [rate("rate:num:+3", burst=2)], T0, blocked=True)
    assert (full.retry_after, roomy.retry_after) == (pytest.approx(10.0), None)


def test_sustained_rate_is_admitted(store: Store) -> None:
    op = rate(per_minute=6.0, burst=1)
    for index in range(10):
        assert store.take(f"m{index}", [op], T0 + 10 * index)[0].allowed
    assert not store.take("late", [op], T0 + 95)[0].allowed


@pytest.mark.parametrize("per_minute", [7.0, 13.0, 33.3, 200.0, 0.7])
@pytest.mark.parametrize("burst", [3, 20])
@pytest.mark.parametrize("start", [0.0, 1000.3, 12345.678, 1.7e9 + 0.1])
def test_burst_and_retry_after_hold_for_intervals_that_floats_cannot_hold(
    store: Store, per_minute: float, burst: int, start: float
) -> None:
    op = rate(per_minute=per_minute, burst=burst)
    results = [store.take(f"m{index}", [op], start)[0] for index in range(burst + 1)]
    assert [r.allowed for r in results] == [True] * burst + [False]
    assert [r.count for r in results] == [*range(1, burst + 1), burst + 1]
    retry_after = results[-1].retry_after
    assert retry_after == pytest.approx(60.0 / per_minute, abs=1e-3)
    assert store.take("next", [op], start + retry_after)[0] == OpResult(True, burst, burst)


def test_a_refused_attempt_does_not_advance_the_bucket(store: Store) -> None:
    op = rate(per_minute=6.0, burst=1)
    store.take("a", [op], T0)
    for index in range(5):  # a dialer hammering: every attempt refused, none counted
        assert store.take(f"x{index}", [op], T0 + index)[0].allowed is False
    assert store.take("b", [op], T0 + 10)[0].allowed


def test_the_same_attempt_is_counted_once(store: Store) -> None:
    op = rate(per_minute=6.0, burst=2)
    assert store.take("a", [op], T0)[0] == OpResult(True, 1, 2)
    assert store.take("a", [op], T0)[0] == OpResult(True, 1, 2)
    assert store.take("a", [op], T0 + 1)[0].allowed
    assert store.take("b", [op], T0 + 1)[0].allowed
    assert not store.take("c", [op], T0 + 1)[0].allowed


def test_count_if_blocked_counts_attempts_another_limit_refused(store: Store) -> None:
    counted, free = rate("rate:num:+1", burst=1), rate("rate:acct:acme", burst=1, count_if_blocked=False)
    full = slot(limit=1)
    store.take("a", [full], T0)
    results = store.take("b", [counted, free, full], T0)
    assert [r.allowed for r in results] == [True, True, False]
    assert store.admits(counted.key, 6.0, 1, T0).allowed is False  # counted although refused
    assert store.admits(free.key, 6.0, 1, T0).allowed is True  # not counted


def test_count_if_blocked_with_blocked(store: Store) -> None:
    counted, free = rate("rate:num:+1", burst=1), rate("rate:acct:acme", burst=1, count_if_blocked=False)
    store.take("a", [counted, free], T0, blocked=True)
    assert store.admits(counted.key, 6.0, 1, T0).allowed is False
    assert store.admits(free.key, 6.0, 1, T0).allowed is True


def test_a_rate_refusal_blocks_slots_and_other_buckets_count_as_told(store: Store) -> None:
    tight, loose = rate("rate:num:+1", burst=1), rate("rate:acct:acme", burst=5, count_if_blocked=False)
    op = slot(limit=5)
    store.take("a", [tight], T0)
    results = store.take("b", [op, tight, loose], T0)
    assert [r.allowed for r in results] == [True, False, True]
    assert store.held(op.key, T0) == 0
    assert store.admits(loose.key, 6.0, 5, T0).count == 1  # untouched: the probe is the first


def test_monitor_rates_over_the_limit_still_count(store: Store) -> None:
    op = rate(per_minute=6.0, burst=1, enforced=False)
    assert store.take("a", [op], T0)[0].allowed
    assert store.take("b", [op], T0)[0] == OpResult(False, 2, 1, 10.0)
    assert store.take("c", [op], T0)[0] == OpResult(False, 3, 1, 20.0)  # b was counted
    enforced = rate(op.key, per_minute=6.0, burst=1)
    assert store.take("d", [enforced], T0 + 29)[0].allowed is False
    assert store.take("e", [enforced], T0 + 30)[0].allowed is True


def test_a_raised_rate_admits_the_calls_it_allows_at_once(store: Store) -> None:
    """A reload raises 6 to 600 calls a minute: the 3 calls of the burst are still in the
    bucket, now 0.1 s each. They used to stay there as 30 s of the old rate, and the raised
    limit refused the caller for 30 s (neither the old nor the new limit would have)."""
    old, new = rate(per_minute=6.0, burst=4), rate(per_minute=600.0, burst=4)
    assert [store.take(m, [old], T0)[0].allowed for m in "abc"] == [True] * 3
    assert store.take("d", [new], T0)[0] == OpResult(True, 4, 4)  # the 3 calls, and this one
    assert store.take("e", [new], T0)[0] == OpResult(False, 5, 4, pytest.approx(0.1))
    assert store.take("f", [new], T0 + 0.1)[0].allowed


def test_a_lowered_rate_keeps_counting_the_calls_made_under_the_old_one(store: Store) -> None:
    """A reload lowers 600 to 6 calls a minute after a dialer's burst of 3: the bucket
    holds 3 calls at the new rate, not 0.3 s of the old one, which gave a new burst."""
    old, new = rate(per_minute=600.0, burst=3), rate(per_minute=6.0, burst=3)
    assert [store.take(m, [old], T0)[0].allowed for m in "abc"] == [True] * 3
    assert store.take("d", [new], T0)[0] == OpResult(False, 4, 3, pytest.approx(10.0))
    assert store.take("e", [new], T0 + 10)[0].allowed


def test_buckets_empty_out(store: Store) -> None:
    op = rate(per_minute=6.0, burst=3)
    for member in "abc":
        store.take(member, [op], T0)
    assert store.admits(op.key, 6.0, 3, T0 + 30).count == 1
    assert [store.take(m, [op], T0 + 3600)[0].allowed for m in "defg"] == [True, True, True, False]


def test_check_and_take_now_agrees_with_check_and_take(store: Store) -> None:
    op = slot(limit=1)
    answer = store.backend.check_and_take_now("a", [op], T0)
    if answer is None:  # a backend that needs I/O answers only through check_and_take
        answer = store.take("a", [op], T0)
    assert answer == [OpResult(True, 1, 1)]
    assert store.take("b", [op], T0) == [OpResult(False, 2, 1)]


# -- the memory store's own housekeeping ---------------------------------------------------
# -- quotas ---------------------------------------------------------------------------------------
def test_a_quota_admits_until_its_total_reaches_the_limit(store: Store) -> None:
    results = [store.take(f"call-{index}", [quota()], T0 + index)[0] for index in range(4)]
    assert [(r.allowed, r.count, r.limit) for r in results] == [
        (True, 1, 3), (True, 2, 3), (True, 3, 3), (False, 4, 3)
    ]  # fmt: skip
    assert store.used(quota().key, T0 + 10) == 3  # the refused call added nothing


def test_a_blocked_call_adds_nothing_to_a_quota(store: Store) -> None:
    store.take("call-1", [quota(), slot(limit=0)], T0)
    store.take("call-2", [quota()], T0, blocked=True)
    assert store.used(quota().key, T0) == 0


def test_a_monitored_quota_over_its_limit_still_counts(store: Store) -> None:
    for index in range(3):
        [result] = store.take(f"call-{index}", [quota(limit=1, enforced=False)], T0)
    assert (result.allowed, store.used(quota().key, T0)) == (False, 3)


def test_talk_time_is_recorded_and_checked_against_its_quota(store: Store) -> None:
    seconds = quota("quota:secs:day:2026-11-22:acct:acme", limit=600, amount=0)
    assert store.take("call-1", [seconds], T0)[0].allowed
    store.record([replace(seconds, amount=400)], T0 + 400)
    store.record([replace(seconds, amount=250)], T0 + 700)
    [result] = store.take("call-2", [seconds], T0 + 800)
    assert (result.allowed, result.count, result.limit) == (False, 650, 600)


def test_memory_quotas_end_with_their_period() -> None:
    memory = MemoryStore()
    memory.check_and_take_now("call-1", [quota(ttl=60)], T0)
    assert memory.used(quota().key, T0 + 59) == 1
    assert memory.used(quota().key, T0 + 60) == 0
    memory.sweep(T0 + 60)
    assert memory.quotas == {}


def test_memory_sweep_drops_expired_slots_and_empty_buckets() -> None:
    store = MemoryStore(slot_lease=LEASE)
    store.check_and_take_now("a", [slot("k1"), rate("r1")], T0)
    store.check_and_take_now("b", [slot("k2")], T0 + LEASE / 2)
    store.sweep(T0 + LEASE)
    assert set(store.slots) == {"k2"}
    assert store.buckets == {}
    store.sweep(T0 + 2 * LEASE)
    assert store.slots == {}


def test_memory_stays_bounded_by_live_callers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_module, "SWEEP_EVERY", 100)
    store = MemoryStore(slot_lease=60.0)
    for index in range(5000):  # 5000 callers, each calling once, a second apart, never hanging up
        now = T0 + index
        store.check_and_take_now(f"call-{index}", [slot(f"num:{index}"), rate(f"rate:{index}")], now)
        assert len(store.slots) <= 60 + 100
        assert len(store.buckets) <= 10 + 100


def test_memory_release_forgets_empty_keys() -> None:
    store = MemoryStore(slot_lease=LEASE)
    store.check_and_take_now("a", [slot("k1")], T0)
    store.release("a", ["k1"], T0)
    assert store.slots == {}
