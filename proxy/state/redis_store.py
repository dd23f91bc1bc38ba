"""The Redis state store: the same operations as the memory store, shared by every
sipguard instance that points at one Redis: one server (redis://, rediss://, unix://), a
master found through Sentinel (redis+sentinel://) or a Redis Cluster (redis+cluster://);
see redis_url.py for the URLs and ``make_client`` for the client each one gets.

Strategy:
- One round trip per INVITE: a Lua script evaluates every operation, then commits them
  by the same rules as the memory store (slots all-or-nothing; rate hits per their
  flags), atomically. Slots are sorted-set members scored by lease end, never bare
  counters; rate buckets are one GCRA arrival time per hash, with the interval it is in
  (a changed rate rescales it, as in the memory store). Every key has a TTL.
- Leases: an instance renews the slots of its live calls every ``lease / 3``, and at
  once when Redis answers again after failures, in script calls of RENEW_BATCH slots
  each; a dead instance stops renewing and its slots lapse within one lease. Renewing
  also puts back a live call's slot that Redis lost (restarted without persistence, or
  the lease lapsed while it was unreachable), so once Redis is back the caps count every
  live call again; a release waits for a renewal in flight, so that renewal cannot bring
  back a slot released meanwhile. Times are wall-clock milliseconds (instances agree
  through NTP), except when the store is built with ``clock=None`` for tests, which
  then pass ``now`` themselves.
- Keys: ``sg:{sg}:<operation key>``. The one hash tag puts every key on one Cluster
  shard, so a script never spans slots (RedisCluster sends EVALSHA to the node owning
  the keys' slot, and SCRIPT LOAD, after a NOSCRIPT, to every primary);
  ``shard_by_account`` (not yet exposed) would split by account at the price of
  per-account destination counts.
- Failure: a call that times out or errors raises StoreUnavailableError after at most
  ``timeout``; after ``breaker_failures`` in a row the breaker opens and calls fail at
  once for ``breaker_reset`` seconds, then one probe is let through. The engine turns
  StoreUnavailableError into each rule's fail mode; slots a timed-out check-and-take
  may have taken all the same are released. Nothing here blocks the event loop.
- Metrics: every round trip that answers is timed into a LatencyHistogram, every one that
  fails is counted (``errors_total``); ``ping`` lets /readyz probe through the breaker.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as redis_asyncio
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.exceptions import RedisClusterException, RedisError

from .ops import Operation, OpResult, TakeSlot, UseQuota
from .redis_url import NODES_SCHEMES, parse_nodes_url

log = structlog.get_logger("sipguard.state")

_CHECK_AND_TAKE = """
-- KEYS: one per operation. ARGV: now_ms, member, blocked (0/1), lease_ms, then five
-- fields per operation: kind (S slot | R rate | Q quota), limit or interval_ms, burst or
-- amount, enforced, count_if_blocked or ttl_ms. Returns four fields per operation:
-- allowed, count, limit, retry_ms.
local now = tonumber(ARGV[1])
-- arrivals within 1 ms are one instant, as in the memory store (floats cannot hold every
-- emission interval exactly)
local EPSILON = 1
local member = ARGV[2]
local blocked = ARGV[3] == '1'
local lease = tonumber(ARGV[4])
local allowed, count, limit, retry = {}, {}, {}, {}
-- a slot key lives as long as its longest lease: an instance with a shorter lease (a
-- rolling change of state.lease) must not cut the others' short
local function outlive(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
-- a rate bucket's arrival time (not before now) at this interval, and its last member;
-- built at another interval (a reload changed the rate, field i), the same number of calls
-- at the new one, as in the memory store
local function arrival(key, interval)
  local state = redis.call('HMGET', key, 'tat', 'm', 'i')
  local tat, built_at = tonumber(state[1]) or now, tonumber(state[3]) or interval
  if tat <= now then return now, state[2] end
  if built_at == interval then return tat, state[2] end
  return now + (tat - now) * interval / built_at, state[2]
end
for i = 1, #KEYS do
  local at = 4 + (i - 1) * 5
  if ARGV[at + 1] == 'S' then
    local cap = tonumber(ARGV[at + 2])
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local live = redis.call('ZCARD', KEYS[i])
    if redis.call('ZSCORE', KEYS[i], member) then
      allowed[i], count[i] = 1, live
    else
      allowed[i], count[i] = (live < cap) and 1 or 0, live + 1
    end
    limit[i], retry[i] = cap, -1
  elseif ARGV[at + 1] == 'Q' then
    local cap, amount = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    allowed[i], count[i], limit[i], retry[i] = (used < cap) and 1 or 0, used + amount, cap, -1
  else
    local interval, burst = tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
    local tat, last = arrival(KEYS[i], interval)
    limit[i], retry[i] = burst, -1
    if last == member then
      allowed[i], count[i] = 1, math.max(0, math.ceil((tat - now - EPSILON) / interval))
    else
      local tolerance = (burst - 1) * interval
      if tat - tolerance <= now + EPSILON then allowed[i] = 1 else
        allowed[i], retry[i] = 0, tat - tolerance - now
      end
      count[i] = math.max(0, math.ceil((tat + interval - now - EPSILON) / interval))
    end
  end
  if allowed[i] == 0 and ARGV[at + 4] == '1' then blocked = true end
end
for i = 1, #KEYS do
  local at = 4 + (i - 1) * 5
  if ARGV[at + 1] == 'S' then
    if not blocked then
      redis.call('ZADD', KEYS[i], now + lease, member)
      outlive(KEYS[i], lease)
    end
  elseif ARGV[at + 1] == 'Q' then
    if not blocked and ARGV[at + 3] ~= '0' then
      redis.call('INCRBY', KEYS[i], ARGV[at + 3])
      redis.call('PEXPIRE', KEYS[i], ARGV[at + 5])
    end
  elseif (allowed[i] == 1 or ARGV[at + 4] == '0') and (not blocked or ARGV[at + 5] == '1') then
    local interval = tonumber(ARGV[at + 2])
    local tat, last = arrival(KEYS[i], interval)
    if last ~= member then
      tat = tat + interval
      redis.call('HSET', KEYS[i], 'tat', string.format('%.17g', tat), 'm', member, 'i', ARGV[at + 2])
      redis.call('PEXPIRE', KEYS[i], math.ceil(tat - now + interval))
    end
    if blocked then
      -- a refused attempt that counts: the wait is from the bucket with it
      local burst = tonumber(ARGV[at + 3])
      local wait = arrival(KEYS[i], interval) - (burst - 1) * interval - now
      retry[i] = (wait > EPSILON) and wait or -1
    end
  end
end
local out = {}
for i = 1, #KEYS do
  out[#out + 1] = allowed[i]
  out[#out + 1] = count[i]
  out[#out + 1] = limit[i]
  out[#out + 1] = string.format('%.17g', retry[i])
end
return out
"""

_RECORD = """
-- ARGV: per key, the amount to add and the total's TTL in ms
for i = 1, #KEYS do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i - 1])
  redis.call('PEXPIRE', KEYS[i], ARGV[2 * i])
end
return 0
"""

_RELEASE = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 0
"""

_RENEW = """
-- ARGV: now_ms, lease_ms, then per key: its member count and the members (live calls:
-- one missing is put back). Returns how many were missing.
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
local at, restored = 3, 0
for i = 1, #KEYS do
  local n = tonumber(ARGV[at]); at = at + 1
  for j = 1, n do
    restored = restored + redis.call('ZADD', KEYS[i], now + lease, ARGV[at]); at = at + 1
  end
  if redis.call('PTTL', KEYS[i]) < lease then redis.call('PEXPIRE', KEYS[i], lease) end
end
return restored
"""


class StoreStats:
    """Round trips, errors and latency since they were last taken (for logs and metrics)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.round_trips = self.errors = self.breaker_opens = 0
        self.latency_total_ms = self.latency_max_ms = 0.0

    def record(self, latency_ms: float) -> None:
        self.round_trips += 1
        self.latency_total_ms += latency_ms
        self.latency_max_ms = max(self.latency_max_ms, latency_ms)

    def take(self) -> dict[str, float]:
        taken = {
            "round_trips": self.round_trips,
            "errors": self.errors,
            "breaker_opens": self.breaker_opens,
            "latency_mean_ms": round(self.latency_total_ms / self.round_trips, 3)
            if self.round_trips
            else 0.0,
            "latency_max_ms": round(self.latency_max_ms, 3),
        }
        self.reset()
        return taken


# seconds: a round trip on a LAN takes ~0.2 ms; the default timeout is 0.25 s
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class LatencyHistogram:
    """Round-trip times since start, in cumulative-histogram buckets (Prometheus's ``le``:
    a time equal to a bound counts in that bucket). A round trip pays a bisect and two
    additions; proxy/metrics.py turns the counts into the metric when scraped."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


MAX_CONNECTIONS = 64  # one INVITE holds one for a round trip (~0.1 ms at Redis)
# Slots renewed per script call: ~1 ms of Redis (renewing 10^5 in one call took 0.6 s,
# past the default timeout of 0.25 s, with every INVITE of every instance waiting).
RENEW_BATCH = 1000


class StoreUnavailableError(Exception):
    """The shared store did not answer in time (or the breaker is open)."""


class _BlockingSentinelPool(SentinelConnectionPool, redis_asyncio.BlockingConnectionPool):
    """Sentinel's pool (each new connection asks the sentinels where the master is)
    with the blocking pool's waiting for a free connection."""


def make_client(url: str, timeout: float) -> Any:
    """The redis-py client for a state URL, with the same limits on each: at most
    MAX_CONNECTIONS connections (to the one server, the master, or each Cluster node),
    socket and connect timeouts of ``timeout``, no retry on timeout for one server or a
    Sentinel master (RedisStore bounds every call by ``timeout`` anyway)."""
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if not url.startswith(NODES_SCHEMES):
        # A blocking pool: under overload a call waits (up to ``timeout``) for one of
        # MAX_CONNECTIONS connections instead of failing, which would trip the breaker.
        pool = redis_asyncio.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout, retry_on_timeout=False, **common
        )
        return redis_asyncio.Redis(connection_pool=pool)
    target = parse_nodes_url(url)
    if target.kind == "sentinel":
        assert target.service is not None
        # The sentinels are asked with the same timeouts, without the master's password.
        sentinel = Sentinel(list(target.nodes), sentinel_kwargs=dict(common))  # type: ignore[no-untyped-call]
        return sentinel.master_for(
            target.service,
            connection_pool_class=_BlockingSentinelPool,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            retry_on_timeout=False,
            db=target.db,
            username=target.username,
            password=target.password,
            **common,
        )
    # RedisCluster has no blocking pool: past MAX_CONNECTIONS to one node a call fails at
    # once (MaxConnectionsError, counted by the breaker) instead of waiting. It retries
    # on its own after a connection error or MOVED (to follow a failover); RedisStore's
    # ``timeout`` still bounds the whole call.
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_connections=MAX_CONNECTIONS,
        username=target.username,
        password=target.password,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


class RedisStore:
    def __init__(
        self,
        url: str,
        *,
        slot_lease: float = 60.0,
        timeout: float = 0.25,
        breaker_failures: int = 3,
        breaker_reset: float = 5.0,
        clock: Callable[[], float] | None = time.time,
        client: Any = None,
    ) -> None:
        self.url = url
        self.slot_lease = slot_lease
        self.timeout = timeout
        self.breaker_failures = breaker_failures
        self.breaker_reset = breaker_reset
        self._clock = clock
        self.client = client if client is not None else make_client(url, timeout)
        self._check_and_take = self.client.register_script(_CHECK_AND_TAKE)
        self._release = self.client.register_script(_RELEASE)
        self._record = self.client.register_script(_RECORD)
        self._renew = self.client.register_script(_RENEW)
        self.held: dict[str, set[str]] = {}  # slot key -> our calls' members, for renewal
        self._failures = 0
        self._open_until = 0.0
        self._probing = False  # a half-open probe is in flight
        self._renewer: asyncio.Task[None] | None = None
        # set when Redis answers again after failures: renew now, not up to lease / 3 later
        # (a Redis restarted empty leaves the caps blind to live calls until then)
        self._renew_soon = asyncio.Event()
        self._renewal_idle = asyncio.Event()  # cleared while a renewal is in flight
        self._renewal_idle.set()
        self._undoing: set[asyncio.Future[None]] = set()  # releases of timed-out takes
        self.stats = StoreStats()  # since the last state.stats line
        self.latency = LatencyHistogram()  # since start, as errors_total
        self.errors_total = 0

    # -- the StateStore protocol ---------------------------------------------------------------
    def check_and_take_now(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult] | None:
        return None  # always a round trip

    async def check_and_take(
        self, member: str, operations: Sequence[Operation], now: float, *, blocked: bool = False
    ) -> list[OpResult]:
        if not operations:
            return []
        args: list[Any] = [self._now_ms(now), member, int(blocked), int(self.slot_lease * 1000)]
        for op in operations:
            if isinstance(op, TakeSlot):
                args += ["S", op.limit, 0, int(op.enforced), 0]
            elif isinstance(op, UseQuota):
                args += ["Q", op.limit, op.amount, int(op.enforced), int(op.ttl * 1000)]
            else:
                args += ["R", 60_000.0 / op.per_minute, op.burst, int(op.enforced), int(op.count_if_blocked)]
        keys = [_key(op.key) for op in operations]
        try:
            raw = await self._call(lambda: self._check_and_take(keys=keys, args=args))
        except StoreUnavailableError as error:
            # A timeout does not stop the script: Redis may have run it, taking slots for a
            # call the engine now counts locally or refuses. Give them back (idempotent),
            # or they would stay taken, never renewed, for a whole lease.
            slot_keys = [op.key for op in operations if isinstance(op, TakeSlot)]
            if isinstance(error.__cause__, TimeoutError) and slot_keys and not blocked:
                self._undo(member, slot_keys)
            raise
        results = []
        for index in range(len(operations)):
            allowed, count, limit, retry_ms = raw[index * 4 : index * 4 + 4]
            retry = float(retry_ms)
            results.append(
                OpResult(bool(allowed), int(count), int(limit), None if retry < 0 else retry / 1000)
            )
        committed = not blocked and not any(
            op.enforced and not result.allowed for op, result in zip(operations, results, strict=True)
        )
        if committed:  # remember our slots, to renew their leases while the call lives
            for op in operations:
                if isinstance(op, TakeSlot):
                    self.held.setdefault(op.key, set()).add(member)
        self._ensure_renewer()
        return results

    def record(self, usage: Sequence[UseQuota], now: float) -> Awaitable[None] | None:
        if not usage:
            return None
        args: list[Any] = []
        for op in usage:
            args += [op.amount, int(op.ttl * 1000)]
        return self._record_remote([_key(op.key) for op in usage], args)

    async def _record_remote(self, keys: list[str], args: list[Any]) -> None:
        try:
            await self._call(lambda: self._record(keys=keys, args=args))
        except StoreUnavailableError as error:  # talk time lost: quotas undercount, never block
            log.warning("state.record_failed", error=str(error), keys=len(keys))

    def hold(self, member: str, slot_keys: Sequence[str], now: float) -> None:
        """A live call counted locally while Redis was away: renewed from now on like the
        calls Redis admitted, so the first renewal Redis answers puts its slots in and the
        other instances count it too (``release`` takes them out)."""
        for key in slot_keys:
            self.held.setdefault(key, set()).add(member)
        self._ensure_renewer()

    def release(self, member: str, slot_keys: Sequence[str], now: float) -> Awaitable[None]:
        for key in slot_keys:
            members = self.held.get(key)
            if members is not None:
                members.discard(member)
                if not members:
                    del self.held[key]
        return self._release_remote(member, list(slot_keys))

    # -- internals ---------------------------------------------------------------------------------
    def _undo(self, member: str, slot_keys: list[str]) -> None:
        task = asyncio.ensure_future(self._release_remote(member, slot_keys))
        self._undoing.add(task)
        task.add_done_callback(self._undoing.discard)

    async def _release_remote(self, member: str, slot_keys: list[str]) -> None:
        # a renewal in flight may still name this member: let it land first, or it
        # would put the slot back after this removes it
        await self._renewal_idle.wait()
        # if Redis is away the lease frees the slot: nobody renews a released call
        keys = [_key(key) for key in slot_keys]
        with contextlib.suppress(StoreUnavailableError):
            await self._call(lambda: self._release(keys=keys, args=[member]))

    async def renew_now(self, now: float | None = None) -> None:
        """Push our live calls' leases forward, RENEW_BATCH slots per script call (an
        instance at 500 calls/s holds ~10^5 slots: in one call, Redis would be blocked
        for longer than ``timeout``, the renewal would fail every time and every slot
        would lapse). A slot released while the renewal goes on is not renewed after."""
        pairs = [(key, member) for key, members in self.held.items() for member in sorted(members)]
        restored = 0
        try:
            for start in range(0, len(pairs), RENEW_BATCH):
                batch: dict[str, list[str]] = {}
                for key, member in pairs[start : start + RENEW_BATCH]:
                    if member in self.held.get(key, ()):
                        batch.setdefault(key, []).append(member)
                if batch:
                    restored += await self._renew_batch(batch, now)
        finally:
            if restored:  # Redis had lost live calls' slots (restarted, or leases lapsed)
                log.warning("state.leases_restored", slots=restored)

    async def _renew_batch(self, batch: dict[str, list[str]], now: float | None) -> int:
        args: list[Any] = [self._now_ms(now or 0.0), int(self.slot_lease * 1000)]
        for members in batch.values():
            args += [len(members), *members]
        keys = [_key(key) for key in batch]
        self._renewal_idle.clear()
        try:
            return int(await self._call(lambda: self._renew(keys=keys, args=args)))
        finally:
            self._renewal_idle.set()

    def _ensure_renewer(self) -> None:
        if self._renewer is None and self._clock is not None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renew_soon.wait(), self.slot_lease / 3)
            self._renew_soon.clear()
            self.log_stats()
            try:
                await self.renew_now()
            except StoreUnavailableError as error:
                log.warning("state.renew_failed", error=str(error))
            except Exception as error:  # a bug must not end the renewals: every slot would lapse
                log.exception("state.renew_failed", error=_describe(error))

    async def ping(self) -> None:
        """One PING through the circuit breaker; StoreUnavailableError if it fails. /readyz
        asks, so that an idle instance learns that Redis is away, and that it is back (an
        answered probe closes the breaker), without waiting for a call to find out."""
        await self._call(self.client.ping)

    async def _call(self, request: Callable[[], Awaitable[Any]]) -> Any:
        """One round trip (``request()``: a script call), bounded by ``timeout``, through
        the circuit breaker: closed (calls go through), open (calls fail at once until
        ``breaker_reset`` has passed), half-open (one probe goes through; the others fail
        at once until it answers)."""
        wall = time.monotonic()
        probe = False
        if self._failures >= self.breaker_failures:
            if self._open_until > wall or self._probing:
                raise StoreUnavailableError("circuit breaker open")
            probe = self._probing = True
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(request(), self.timeout)
        # RedisClusterException is not a RedisError: RedisCluster raises it when no
        # startup node answers, or the slots are not covered
        except (RedisError, RedisClusterException, OSError, TimeoutError) as error:
            self.stats.errors += 1
            self.errors_total += 1
            self._failures += 1
            if self._failures >= self.breaker_failures:
                self._open_until = time.monotonic() + self.breaker_reset
                if self._failures == self.breaker_failures or probe:
                    self.stats.breaker_opens += 1
                    log.warning("state.breaker_open", failures=self._failures, error=_describe(error))
            raise StoreUnavailableError(_describe(error)) from error
        finally:
            if probe:
                self._probing = False
        if self._failures:
            log.info("state.recovered", after_failures=self._failures)
            self._renew_soon.set()
        self._failures = 0
        elapsed = time.perf_counter() - started
        self.stats.record(elapsed * 1000)
        self.latency.observe(elapsed)
        return result

    @property
    def available(self) -> bool:
        """The breaker is closed: the last round trip answered (or too few failed to open it)."""
        return self._failures < self.breaker_failures

    @property
    def breaker(self) -> str:
        if self._failures < self.breaker_failures:
            return "closed"
        return "half-open" if self._open_until <= time.monotonic() else "open"

    def log_stats(self) -> None:
        """One line for operators: round trips, errors and latency since the last line."""
        log.info("state.stats", breaker=self.breaker, held_keys=len(self.held), **self.stats.take())

    def _now_ms(self, now: float) -> float:
        return (self._clock() if self._clock is not None else now) * 1000.0

    async def close(self) -> None:
        self.log_stats()
        await asyncio.gather(*self._undoing)  # each bounded by ``timeout``
        if self._renewer is not None:
            self._renewer.cancel()
        pool = getattr(self.client, "connection_pool", None)
        await self.client.aclose()
        if isinstance(pool, SentinelConnectionPool):  # and the sentinels' own connections
            await pool.sentinel_manager.aclose()


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _key(operation_key: str) -> str:
    return f"sg:{{sg}}:{operation_key}"
