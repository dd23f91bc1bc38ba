"""The engine with a shared (Redis) store: its fail modes when Redis is away, and two
engines sharing one real redis-server as two sipguard instances would; then what is
particular to a Redis Cluster (where the scripts run) and to Sentinel (no master).

Redis being away is caused for real: a RedisStore pointed at a loopback port where
nothing listens (connection refused), and a real redis-server stopped mid-test.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisCluster, RedisSentinel, RedisServer, start_redis
from structlog.testing import capture_logs
from test_engine import OWNED, T0, attempt, end, policy

from proxy.engine import PolicyEngine
from proxy.sip.events import Accept, CallAttempt, Reject, Verdict
from proxy.state import TakeSlot, redis_store
from proxy.state.redis_store import RedisStore, StoreUnavailableError

TIGHT = {"concurrency": {"per_number": 1, "per_account": None}}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens once the probe closes


def engine_on(url: str, rules: dict[str, Any]) -> PolicyEngine:
    return PolicyEngine(policy(rules), RedisStore(url, timeout=0.5, clock=None, breaker_failures=100))


def decide(engine: PolicyEngine, call: CallAttempt) -> Verdict:
    assert engine.decide_now(call) is None  # a shared store always takes a round trip
    return asyncio.run(engine.decide(call))


def test_fail_closed_refuses_with_503_when_redis_is_away() -> None:
    rules = {"concurrency": {**TIGHT["concurrency"], "fail_mode": "closed"}}
    engine = engine_on(f"redis://127.0.0.1:{closed_port()}/0", rules)
    verdict = decide(engine, attempt("a"))
    assert isinstance(verdict, Reject) and verdict.status == 503
    assert ("Retry-After", "5") in verdict.headers
    assert engine.counters.verdicts == {"error": 1} and engine.held == {}


def test_fail_open_counts_on_this_instance_alone() -> None:
    engine = engine_on(f"redis://127.0.0.1:{closed_port()}/0", TIGHT)  # fail_mode: open by default

    async def scenario() -> list[Verdict]:
        first = attempt("a")
        verdicts = [await engine.decide(first)]
        verdicts.append(await engine.decide(attempt("b")))  # the local count still enforces per_number: 1
        end(engine, first)  # released in the local store, where it was taken
        await asyncio.gather(*engine._background)  # (and in Redis: still away, nothing to do)
        verdicts.append(await engine.decide(attempt("c")))
        return verdicts

    first, refused, after = asyncio.run(scenario())
    assert isinstance(first, Accept) and isinstance(after, Accept)
    assert isinstance(refused, Reject) and refused.status == 486
    assert engine.counters.store_unavailable == 3


def test_fail_open_counts_this_instances_calls_that_redis_admitted(tmp_path: Path) -> None:
    """While Redis is away, the local count starts from this instance's live calls, those
    Redis admitted included: per_number: 1 with one call up refuses a second one, so the
    limits hold per instance as documented (before, the local store knew only calls made
    during the outage, and the number got a second live call here)."""
    server = start_redis(tmp_path)

    async def scenario() -> list[Verdict]:
        engine = engine_on(server.url, TIGHT)
        first = attempt("a")
        verdicts = [await engine.decide(first)]  # admitted by Redis
        server.stop()
        verdicts.append(await engine.decide(attempt("b")))  # counted locally: "a" is still up
        end(engine, first)
        await asyncio.gather(*engine._background)
        verdicts.append(await engine.decide(attempt("c")))  # "a" ended: the slot is free here too
        assert engine.counters.store_unavailable == 2
        await engine.store.close()  # type: ignore[attr-defined]
        return verdicts

    first, second, third = asyncio.run(scenario())
    assert isinstance(first, Accept) and isinstance(third, Accept)
    assert isinstance(second, Reject) and second.status == 486


def test_calls_counted_locally_during_an_outage_reach_redis_once_it_is_back(tmp_path: Path) -> None:
    """A call admitted on the local count while Redis was away: the first renewal Redis
    answers puts its slot there, so another instance counts it too (before, it stayed local
    until it ended, and with per_number: 1 the other instance let a second call through);
    its end takes the slot out of Redis again."""
    server = start_redis(tmp_path)

    async def scenario() -> list[Verdict]:
        engine, other = engine_on(server.url, TIGHT), engine_on(server.url, TIGHT)
        server.stop()
        during = attempt("a")
        verdicts = [await engine.decide(during)]  # counted locally
        back = start_redis(tmp_path, port=server.port)  # restarted empty, where the stores point
        await engine.store.renew_now(T0)  # type: ignore[attr-defined]
        verdicts.append(await other.decide(attempt("b")))  # the same number, on the other instance
        end(engine, during)
        await asyncio.gather(*engine._background)
        verdicts.append(await other.decide(attempt("c")))
        assert engine.counters.store_unavailable == 1 and other.counters.store_unavailable == 0
        for store in (engine.store, other.store):
            await store.close()  # type: ignore[attr-defined]
        back.stop()
        return verdicts

    during, second, after = asyncio.run(scenario())
    assert isinstance(during, Accept)
    assert isinstance(second, Reject) and second.status == 486
    assert isinstance(after, Accept)


@pytest.mark.parametrize(
    ("rules", "refused_with"),
    [
        ({"call_rate": {"per_number": {"per_minute": 6, "burst": 2}, "per_account": None}}, 503),
        ({"usage": {"calls_per_day": {"per_number": 2}}}, 403),
    ],
    ids=["call_rate", "usage"],
)
def test_an_outage_gives_no_fresh_burst_or_quota(
    tmp_path: Path, rules: dict[str, Any], refused_with: int
) -> None:
    """A number's rate bucket and daily quota, filled through Redis, still count once Redis
    is away: the local store mirrors what this instance's calls used. Before, the local
    count started from nothing at each outage: a dialer got a fresh burst, a customer over
    its daily quota a fresh quota, for as long as Redis was away."""
    server = start_redis(tmp_path)

    async def scenario() -> list[Verdict]:
        engine = engine_on(server.url, rules)
        verdicts = [await engine.decide(attempt(name)) for name in ("a", "b")]  # through Redis
        server.stop()
        verdicts.append(await engine.decide(attempt("c")))  # counted locally
        assert engine.counters.store_unavailable == 1
        await engine.store.close()  # type: ignore[attr-defined]
        return verdicts

    first, second, during = asyncio.run(scenario())
    assert isinstance(first, Accept) and isinstance(second, Accept)
    assert isinstance(during, Reject) and during.status == refused_with


def test_a_cluster_none_of_whose_nodes_answers_is_unavailable() -> None:
    """RedisCluster raises RedisClusterException (not a RedisError) when no startup node
    answers: it is the store being away like any other, so the fail modes apply and the
    breaker counts it, rather than a policy error (500) on every call."""
    rules = {"concurrency": {**TIGHT["concurrency"], "fail_mode": "closed"}}
    url = f"redis+cluster://127.0.0.1:{closed_port()}"
    engine = PolicyEngine(policy(rules), RedisStore(url, timeout=0.5, clock=None, breaker_failures=2))
    verdict = decide(engine, attempt("a"))
    assert isinstance(verdict, Reject) and verdict.status == 503
    store = engine.store
    assert isinstance(store, RedisStore) and store.errors_total == 1
    open_engine = PolicyEngine(policy(TIGHT), store)  # fail_mode: open, the same (failing) store
    assert isinstance(decide(open_engine, attempt("b")), Accept)
    assert store.breaker == "open"


def test_emergency_calls_never_touch_the_store() -> None:
    rules = {"concurrency": {**TIGHT["concurrency"], "fail_mode": "closed"}}
    engine = engine_on(f"redis://127.0.0.1:{closed_port()}/0", rules)
    verdict = engine.decide_now(attempt("sos", uri="sip:911@pbx.example.com"))
    assert isinstance(verdict, Accept) and engine.counters.store_unavailable == 0


def test_two_engines_sharing_redis_enforce_one_cap(redis_server: RedisServer) -> None:
    """Two sipguard instances (two engines, two clients) on one real redis-server: a
    per-number cap of 2 stays 2 across the pair, and a release on one frees the slot
    for the other."""
    redis_server.command("FLUSHALL")

    async def scenario() -> list[bool]:
        rules = {"concurrency": {"per_number": 2, "per_account": None}}
        first, second = engine_on(redis_server.url, rules), engine_on(redis_server.url, rules)
        calls = [attempt(f"c{n}", caller=OWNED) for n in range(4)]
        outcomes = [
            isinstance(await engine.decide(call), Accept)
            for engine, call in zip((first, second, first, second), calls, strict=True)
        ]
        end(first, calls[0])  # the first instance's call hangs up, freeing a slot ...
        await asyncio.gather(*first._background)
        outcomes.append(isinstance(await second.decide(attempt("c4", caller=OWNED)), Accept))  # ... here
        for engine in (first, second):
            await engine.store.close()  # type: ignore[attr-defined]
        return outcomes

    assert asyncio.run(scenario()) == [True, True, False, False, True]


def test_a_call_another_rule_refuses_keeps_that_answer_while_redis_is_away() -> None:
    """fail_mode: closed turns would-be accepts into 503, never a caller-ID refusal into one."""
    rules = {"caller_id": {}, "concurrency": {**TIGHT["concurrency"], "fail_mode": "closed"}}
    engine = engine_on(f"redis://127.0.0.1:{closed_port()}/0", rules)
    verdict = decide(engine, attempt("spoofed", caller="+14155559999"))
    assert isinstance(verdict, Reject) and verdict.status == 403


def test_renewal_puts_back_live_slots_redis_lost_never_released_ones(redis_server: RedisServer) -> None:
    """A Redis restarted without persistence has lost every slot: the next renewal puts
    back the live calls' slots (so caps count them again), but not a call's released
    meanwhile, even one released while that renewal was on its way, naming it: the
    release waits for the renewal to land, then takes the slot out again."""
    redis_server.command("FLUSHALL")
    slot = TakeSlot(key="conc:num:+14155550100", limit=10, rule="concurrency", label="calls")

    async def scenario() -> tuple[bool, int]:
        store = RedisStore(redis_server.url, timeout=0.5, clock=None)
        for member in ("live", "ended", "ending"):
            await store.check_and_take(member, [slot], 1_000.0)
        redis_server.command("FLUSHALL")  # as a restart without persistence
        await store.release("ended", [slot.key], 1_000.0)
        # a renewal held up on its way to Redis (a slow network), naming "ending" ...
        landing = asyncio.Event()
        renew_script = store._renew

        async def held_up(**arguments: Any) -> Any:
            await landing.wait()
            return await renew_script(**arguments)

        store._renew = held_up
        renewal = asyncio.ensure_future(store.renew_now(1_001.0))
        await asyncio.sleep(0)
        # ... while "ending" ends: its release must not overtake the renewal
        releasing = asyncio.ensure_future(store.release("ending", [slot.key], 1_001.0))
        overtook, _ = await asyncio.wait({releasing}, timeout=0.3)
        landing.set()
        await asyncio.gather(renewal, releasing)
        probe = TakeSlot(key=slot.key, limit=1_000, enforced=False)
        [result] = await store.check_and_take("probe", [probe], 1_002.0, blocked=True)
        await store.close()
        return bool(overtook), result.count - 1

    assert asyncio.run(scenario()) == (False, 1)  # only "live" holds a slot


def test_stopping_gives_back_the_slots_of_calls_that_just_ended(redis_server: RedisServer) -> None:
    """A call that ends as the instance stops: its release (in the background, no call
    waits for it) lands in Redis before the store closes, instead of its slot staying
    taken for a whole lease (cli closed the store without waiting for it)."""
    redis_server.command("FLUSHALL")

    async def scenario() -> tuple[bool, int]:
        engine = engine_on(redis_server.url, TIGHT)
        call = attempt("a")
        assert engine.decide_now(call) is None
        assert isinstance(await engine.decide(call), Accept)
        [key] = engine.held[call.attempt_id]
        store = engine.store
        assert isinstance(store, RedisStore)
        release_script, may_land = store._release, asyncio.Event()

        async def held_up(**arguments: Any) -> Any:  # a release slow on its way to Redis
            await may_land.wait()
            return await release_script(**arguments)

        store._release = held_up
        end(engine, call)
        closing = asyncio.ensure_future(engine.close())
        closed_first, _ = await asyncio.wait({closing}, timeout=0.3)
        may_land.set()
        await closing
        reader = RedisStore(redis_server.url, timeout=0.5, clock=None)
        probe = TakeSlot(key=key, limit=1_000, enforced=False)
        [result] = await reader.check_and_take("probe", [probe], call.now + 61, blocked=True)
        await reader.close()
        return bool(closed_first), result.count

    assert asyncio.run(scenario()) == (False, 1)  # close waited; then only the probe holds a slot


def test_a_renewal_that_raises_does_not_end_the_renewals(redis_server: RedisServer) -> None:
    """A renewal that raises something else than StoreUnavailableError (a bug, a
    library's surprise) is logged with its traceback, and the next renewal still comes:
    before, the renewing task died silently and every slot lapsed one lease later."""
    slot = TakeSlot(key="conc:num:+14155550100", limit=10, rule="concurrency", label="calls")

    async def scenario() -> tuple[int, list[dict[str, Any]]]:
        store = RedisStore(redis_server.url, slot_lease=0.3, timeout=0.5)  # renews every 0.1 s
        attempts, renewed_after_the_error = 0, asyncio.Event()

        async def broken_once(**arguments: Any) -> Any:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise RuntimeError("a surprise")
            renewed_after_the_error.set()
            return 0

        store._renew = broken_once
        with capture_logs() as logs:
            await store.check_and_take("live", [slot], time.time())  # starts the renewals
            await asyncio.wait_for(renewed_after_the_error.wait(), timeout=10)
        await store.close()
        return attempts, logs

    attempts, logs = asyncio.run(scenario())
    assert attempts >= 2
    failed = [entry for entry in logs if entry["event"] == "state.renew_failed"]
    assert failed[0]["error"] == "a surprise" and failed[0]["log_level"] == "error"


def test_live_slots_are_put_back_as_soon_as_redis_answers_again(tmp_path: Path) -> None:
    """Redis restarted empty: the first round trip that answers after the failures
    starts a renewal at once, which puts the live calls' slots back. Before, the caps were
    blind to them until the next periodic renewal, up to lease / 3 (20 s) later."""
    server = start_redis(tmp_path)
    slot = TakeSlot(key="conc:num:+14155550100", limit=10, rule="concurrency", label="calls")

    async def scenario() -> int:
        store = RedisStore(server.url, slot_lease=60.0, timeout=0.5)  # periodic renewal: every 20 s
        await store.check_and_take("live", [slot], time.time())
        renewed = asyncio.Event()
        renew_script = store._renew

        async def renewal(**arguments: Any) -> Any:
            result = await renew_script(**arguments)
            renewed.set()
            return result

        store._renew = renewal
        server.stop()
        with pytest.raises(StoreUnavailableError):
            await store.check_and_take("lost", [slot], time.time())
        back = start_redis(tmp_path, port=server.port)  # empty, where the store points
        await store.check_and_take("next", [slot], time.time())  # answers: recovered
        await asyncio.wait_for(renewed.wait(), timeout=10)
        [result] = await store.check_and_take("probe", [slot], time.time(), blocked=True)
        await store.close()
        back.stop()
        return result.count - 1

    assert asyncio.run(scenario()) == 2  # "live" put back, beside "next"


def test_renewal_goes_in_bounded_batches_and_skips_calls_released_meanwhile(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance holding many slots renews them RENEW_BATCH at a time (one script call
    with every slot outlasted the timeout from ~10^5 slots on: the renewal then always
    failed and every slot lapsed). A call released between two batches is not put back
    by a later one."""
    redis_server.command("FLUSHALL")
    monkeypatch.setattr(redis_store, "RENEW_BATCH", 3, raising=False)
    account = TakeSlot(key="conc:acct:acme", limit=100, rule="concurrency", label="calls")
    members = [f"call-{n}" for n in range(8)]

    async def scenario() -> tuple[list[int], int]:
        store = RedisStore(redis_server.url, timeout=0.5, clock=None)
        for index, member in enumerate(members):
            number = TakeSlot(key=f"conc:num:+1415555010{index}", limit=2, rule="concurrency", label="c")
            await store.check_and_take(member, [account, number], 1_000.0)
        redis_server.command("FLUSHALL")  # lost: the renewal puts back every live call's slots
        sizes: list[int] = []
        releases: list[asyncio.Future[None]] = []
        renew_script = store._renew

        async def counted(*, keys: list[str], args: list[Any]) -> Any:
            sizes.append(len(args) - 2 - len(keys))  # the members named
            if len(sizes) == 1:  # while the first batch is on its way, call-7 ends
                ending = store.release("call-7", [account.key, "conc:num:+14155550107"], 1_001.0)
                releases.append(asyncio.ensure_future(ending))
            return await renew_script(keys=keys, args=args)

        store._renew = counted
        await store.renew_now(1_001.0)
        await asyncio.gather(*releases)
        probe = TakeSlot(key=account.key, limit=1_000, enforced=False)
        [result] = await store.check_and_take("probe", [probe], 1_002.0, blocked=True)
        await store.close()
        return sizes, result.count - 1

    sizes, held = asyncio.run(scenario())
    assert max(sizes) <= 3 and sum(sizes) == 2 * len(members) - 2  # call-7's two slots skipped
    assert held == len(members) - 1
    assert int(redis_server.command("EXISTS", "sg:{sg}:conc:num:+14155550107")[1:]) == 0


def test_a_take_that_timed_out_after_redis_ran_it_leaves_no_slot(redis_server: RedisServer) -> None:
    """The script ran in Redis, but its answer came after ``timeout``: the call was
    counted locally (or refused), so the slots the script took are given back, not left
    taken (never renewed) for a whole lease."""
    redis_server.command("FLUSHALL")
    slot = TakeSlot(key="conc:num:+14155550100", limit=2, rule="concurrency", label="calls")

    async def scenario() -> int:
        store = RedisStore(redis_server.url, timeout=0.3, clock=None)
        run_script = store._check_and_take

        async def answered_late(**arguments: Any) -> Any:
            await run_script(**arguments)  # done in Redis ...
            await asyncio.Event().wait()  # ... but the answer never comes in time

        store._check_and_take = answered_late
        with pytest.raises(StoreUnavailableError):
            await store.check_and_take("late", [slot], 1_000.0)
        await store.close()  # waits for what the store still had to send
        store = RedisStore(redis_server.url, timeout=2.0, clock=None)
        probe = TakeSlot(key=slot.key, limit=1_000, enforced=False)
        [result] = await store.check_and_take("probe", [probe], 1_001.0, blocked=True)
        await store.close()
        return result.count - 1

    assert asyncio.run(scenario()) == 0


def test_an_instance_with_a_shorter_lease_does_not_expire_the_others_slots(
    redis_server: RedisServer,
) -> None:
    """Two instances during a rolling change of state.lease (600 s, then 60 s) share a
    key: the one with the short lease taking or renewing a slot there must not set the
    key's TTL below the other's leases, or the key (with the other's live calls in it)
    would vanish long before those leases end, and before that instance renews them."""
    redis_server.command("FLUSHALL")
    slot = TakeSlot(key="conc:acct:acme", limit=100, rule="concurrency", label="calls")
    key = "sg:{sg}:conc:acct:acme"

    async def scenario() -> list[int]:
        old = RedisStore(redis_server.url, slot_lease=600.0, timeout=2.0, clock=None)
        new = RedisStore(redis_server.url, slot_lease=60.0, timeout=2.0, clock=None)
        await old.check_and_take("old-call", [slot], 1_000.0)
        await new.check_and_take("new-call", [slot], 1_000.0)
        ttls = [int(redis_server.command("PTTL", key)[1:])]
        await new.renew_now(1_001.0)
        ttls.append(int(redis_server.command("PTTL", key)[1:]))
        for store in (old, new):
            await store.close()
        return ttls

    assert all(ttl > 590_000 for ttl in asyncio.run(scenario()))


def test_circuit_breaker_opens_then_lets_one_probe_through() -> None:
    """Three failures open the breaker: calls then fail at once, without touching the
    network; once the reset time has passed, exactly one call probes while the others
    still fail at once."""

    async def errors(store: RedisStore, count: int) -> list[str]:
        operation = [TakeSlot(key="conc:num:+14155550100", limit=2)]
        outcomes = await asyncio.gather(
            *(store.check_and_take(f"m{n}", operation, 0.0) for n in range(count)), return_exceptions=True
        )
        assert all(isinstance(outcome, StoreUnavailableError) for outcome in outcomes)
        return [str(outcome) for outcome in outcomes]

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        url = f"redis://127.0.0.1:{closed_port()}/0"
        store = RedisStore(url, timeout=0.5, clock=None, breaker_failures=3, breaker_reset=60.0)
        tripping = [await errors(store, 1) for _ in range(3)]
        assert (store.breaker, store.stats.errors, store.stats.breaker_opens) == ("open", 3, 1)
        open_now = await errors(store, 5)
        assert store.stats.errors == 3  # turned away at once: no new attempt, no new error
        store.breaker_reset = 0.0  # the reset time has passed: half-open
        store._open_until = 0.0
        half_open = await errors(store, 5)
        await store.close()
        return [e for t in tripping for e in t], open_now, half_open

    tripping, open_now, half_open = asyncio.run(scenario())
    assert "circuit breaker open" not in tripping  # the first three really tried
    assert open_now == ["circuit breaker open"] * 5
    assert sorted(half_open).count("circuit breaker open") == 4  # one probe, four turned away


# -- Redis Cluster and Sentinel ------------------------------------------------------------------
def _command_calls(node: RedisServer, command: str) -> int:
    """How many times ``node`` ran ``command`` since its stats were reset (INFO commandstats)."""
    stats = node.command("INFO", "commandstats").decode()
    found = re.search(rf"cmdstat_{re.escape(command)}:calls=(\d+)", stats)
    return int(found[1]) if found else 0


def test_cluster_runs_the_scripts_on_the_node_owning_the_sg_slot(redis_cluster: RedisCluster) -> None:
    """With every key under the one hash tag, RedisCluster sends EVALSHA straight to the
    node owning that slot (no MOVED detour, no other node); a node without the scripts
    (NOSCRIPT) gets them loaded on every primary, so a failover finds them there too."""
    for node in redis_cluster.nodes:
        node.flushall()
        assert node.command("SCRIPT", "FLUSH").startswith(b"+OK")
        assert node.command("CONFIG", "RESETSTAT").startswith(b"+OK")
    slots = [
        TakeSlot(key=f"conc:num:+1415555010{n}", limit=2, rule="concurrency", label="calls") for n in range(5)
    ]

    async def scenario() -> None:
        store = RedisStore(redis_cluster.url, timeout=2.0, clock=None)
        for member in ("a", "b", "c"):
            await store.check_and_take(member, slots, 1_000.0)
        await store.renew_now(1_001.0)
        await store.release("a", [slot.key for slot in slots], 1_002.0)
        await store.close()

    asyncio.run(scenario())
    evalsha = [_command_calls(node, "evalsha") for node in redis_cluster.nodes]
    keys = [int(node.command("DBSIZE")[1:]) for node in redis_cluster.nodes]
    owner = max(range(len(keys)), key=keys.__getitem__)
    assert keys[owner] == len(slots) and sum(keys) == len(slots)
    # one NOSCRIPT per script (3), then its 5 calls again
    assert evalsha[owner] == 3 + 5 and sum(evalsha) == evalsha[owner]
    assert [_command_calls(node, "script|load") for node in redis_cluster.nodes] == [3, 3, 3]


def test_sentinel_without_the_service_is_unavailable(redis_sentinel: RedisSentinel) -> None:
    """A service name the sentinels do not monitor: no master, so the store is unavailable
    (the engine's fail modes apply), not an error that escapes."""
    url = f"redis+sentinel://127.0.0.1:{redis_sentinel.sentinel.port}/no-such-service"

    async def scenario() -> str:
        store = RedisStore(url, timeout=0.5, clock=None)
        try:
            await store.check_and_take("a", [TakeSlot(key="conc:num:+14155550100", limit=1)], 1_000.0)
        except StoreUnavailableError as error:
            return str(error)
        finally:
            await store.close()
        return "answered"

    assert "No master found for 'no-such-service'" in asyncio.run(scenario())
