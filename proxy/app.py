"""The running proxy: binds the listeners, feeds the core, executes its actions.

This is the only place where the clock is read (``loop.time()``, monotonic; the wall
clock once, at start, to show operators when a ban ends) and where the core's single
timer is armed. Each initial INVITE's verdict is awaited in its own task, so a slow
state store delays that call only. Every message first passes the flood guard, which
drops those of banned sources before anything is parsed. What happens is counted in
plain Counters (here, in the core and in the engine) that proxy/metrics.py reads when
scraped; a one-second tick ends bans and takes the snapshots that calls/s is read from.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from .flood import Ban, BanListFull, Banned, EmergencyPassed, FloodEvent, FloodGuard, FloodSettings, Unbanned
from .hooks import AcceptAll, DecisionHook
from .policyfile import CompiledPolicy, FloodSection, unadvertised
from .sip import COMPILED
from .sip.core import CoreConfig, Listener, ProxyCore
from .sip.errors import ParseError
from .sip.events import (
    Action,
    Address,
    ByeRefused,
    CallAnswered,
    CallAttempt,
    CallEnded,
    Decide,
    Discarded,
    EndReason,
    Reject,
    Send,
    Verdict,
)
from .sip.hosts import is_ip
from .sip.message import Request, parse_message
from .transport import Transports

log = structlog.get_logger("sipguard")
TICK = 1.0  # seconds between housekeeping ticks: ended bans swept, call attempts sampled
FLOOD_LINES_PER_TICK = 20  # flood.* log lines per tick at most: a flood must not become a log flood
RATE_WINDOW_TICKS = 10  # calls per second are averaged over this many ticks
# CPython collects its youngest generation once tracked objects outnumber those freed by
# this much (700 by default). A call leaves objects alive for 32 s (its completed
# transactions), so at the default the collector ran ~50 times a second under load and
# promoted them into full collections that walked the whole 32 s of calls, every ~3 s, in
# pauses growing to 300-400 ms, finding no garbage (refcounting frees sipguard's objects).
# At 20,000, 45 s at 1,000 calls/s with the mission rules: no full collection after start,
# the longest pause 148 ms, GC time 4.4 s -> 1.1 s, 0 failed calls instead of 1,541.
GC_YOUNG_THRESHOLD = 20_000
# call ends logged at info: sipguard hung up, or a verdict came after it had answered 503
ENDED_BY_SIPGUARD = frozenset(
    {EndReason.MAX_DURATION, EndReason.KEEPALIVE_FAILED, EndReason.DECISION_TIMEOUT}
)
_FLOOD_COUNTERS = {
    Banned: "flood_bans",
    Unbanned: "flood_unbans",
    BanListFull: "flood_ban_list_full",
    EmergencyPassed: "flood_emergency_passed",
}


@dataclass(kw_only=True)
class ProxySettings:
    listen: list[Address]
    upstream: Address
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    advertise: str | None = None
    max_calls: int = 100_000
    max_call_lifetime: float = 4 * 3600.0
    early_timeout: float = 180.0
    tcp_idle_timeout: float = 600.0
    decision_timeout: float = 5.0
    shutdown_grace: float = 10.0
    server_header: str | None = "sipguard"
    flood: FloodSettings = field(default_factory=FloodSettings)

    @classmethod
    def from_policy(
        cls, policy: CompiledPolicy, *, listen: list[Address] | None = None, upstream: Address | None = None
    ) -> ProxySettings:
        """The policy file's ``proxy:`` section, with command-line flags taking precedence."""
        section = policy.proxy
        trusted = tuple(ipaddress.ip_network(text, strict=False) for text in section.trusted_peers)
        upstream = upstream or policy.upstream
        return cls(
            listen=listen or policy.listen,
            upstream=upstream,
            trusted_networks=trusted,
            advertise=section.advertise,
            max_calls=section.max_calls,
            max_call_lifetime=section.max_call_lifetime,
            early_timeout=section.ringing_timeout,
            tcp_idle_timeout=section.tcp_idle_timeout,
            server_header=section.server_header,
            flood=flood_settings(policy.flood, trusted, upstream),
        )


def flood_settings(
    section: FloodSection,
    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
    upstream: Address,
) -> FloodSettings:
    """The policy file's ``flood:`` section; trusted peers and the upstream PBX's host (any
    port: a PBX may send from several) are exempt besides the section's own networks."""
    exempt = [*trusted, *(ipaddress.ip_network(text, strict=False) for text in section.exempt)]
    if is_ip(upstream.host):
        exempt.append(ipaddress.ip_network(upstream.host))
    return FloodSettings(
        enabled=section.enabled,
        messages_per_second=section.messages_per_second,
        burst=section.burst,
        ban_seconds=section.ban_seconds,
        max_ban_seconds=section.max_ban_seconds,
        user_agents=tuple(section.user_agents),
        exempt=tuple(exempt),
        max_sources=section.max_sources,
    )


class RateWindow:
    """How fast a count grows, over its last ``span`` samples: sampled on the tick, read
    when scraped, so that counting stays one increment per event."""

    def __init__(self, span: int) -> None:
        self._samples: deque[tuple[float, int]] = deque(maxlen=span + 1)

    def sample(self, now: float, count: int) -> None:
        self._samples.append((now, count))

    def per_second(self) -> float:
        """0 until two samples are in; over fewer than ``span`` intervals just after start."""
        if len(self._samples) < 2:
            return 0.0
        (first_at, first), (last_at, last) = self._samples[0], self._samples[-1]
        return (last - first) / (last_at - first_at) if last_at > first_at else 0.0


class SipGuard:
    def __init__(
        self,
        settings: ProxySettings,
        hook: DecisionHook | None = None,
        *,
        on_reload: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.hook: DecisionHook = hook or AcceptAll()
        self.on_reload = on_reload  # called on SIGHUP
        self.transports = Transports(self.deliver, self.unreachable)
        self.core: ProxyCore | None = None
        self.counters: Counter[str] = Counter()
        self.ended_by_reason: Counter[EndReason] = Counter()
        self.bans_by_reason: Counter[str] = Counter()  # "rate" or "user-agent"
        self.attempt_rate = RateWindow(RATE_WINDOW_TICKS)  # call attempts per second
        self.flood = FloodGuard(settings.flood, self._places_emergency_call, self.hook.emergency_calls)
        self.wall_offset = 0.0  # loop.time() + wall_offset: the wall clock, refreshed every tick
        # added to the system's wall clock: --wall-clock's pretend time (tests, trying rules)
        self.wall_clock_skew = 0.0
        # told each new wall_offset (the policy engine's calendar rules follow it)
        self.on_wall_offset: Callable[[float], object] | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._flood_lines = 0
        self._flood_lines_suppressed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._drained = asyncio.Event()

    async def start(self) -> list[Address]:
        self._loop = asyncio.get_running_loop()
        self._follow_wall_clock()
        bound = [await self.transports.listen(address) for address in self.settings.listen]
        advertise = self.settings.advertise
        self.core = ProxyCore(
            CoreConfig(
                listeners=tuple(
                    Listener(address=a, advertise=advertise, takes_ipv4=self.transports.takes_ipv4(a))
                    for a in bound
                ),
                upstream=self.settings.upstream,
                trusted_networks=self.settings.trusted_networks,
                branch_secret=os.urandom(16),
                server_header=self.settings.server_header,
                max_calls=self.settings.max_calls,
                max_call_lifetime=self.settings.max_call_lifetime,
                early_timeout=self.settings.early_timeout,
                decision_timeout=self.settings.decision_timeout + 1.0,
                is_emergency=self.hook.is_emergency,
                untrusted_headers=self.hook.untrusted_headers,
            )
        )
        for problem in unadvertised(bound, self.settings.advertise):  # e.g. --listen udp:0.0.0.0:5060
            log.warning("proxy.advertise_missing", problem=problem)
        # Everything built so far lives as long as the process: keep it out of every GC pass.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        self.attempt_rate.sample(self._loop.time(), 0)  # the rate's window opens at start
        self._tick = self._loop.call_later(TICK, self._on_tick)
        log.info(
            "proxy.started",
            listen=[str(a) for a in bound],
            upstream=str(self.settings.upstream),
            compiled=COMPILED,  # proxy/sip as mypyc's C (setup.py), or interpreted
        )
        return bound

    # -- the core's inputs ------------------------------------------------------------------
    def deliver(self, data: bytes, source: Address, local: Address) -> None:
        assert self.core is not None and self._loop is not None
        self.counters["messages_in"] += 1
        now = self._loop.time()
        flood = self.flood
        try:
            admitted = flood.admit(source.host, data, now)
            if flood.events:
                self._log_flood(flood.take_events())
            if not admitted:
                self.counters["flood_dropped"] += 1  # silently: no reply, no log line per message
                return
            actions = self.core.receive(data, source, local, now)
        except Exception:  # a bug must cost one message, never the proxy
            self.counters["internal_errors"] += 1
            log.exception("proxy.internal_error", source=str(source), size=len(data))
            return
        self._execute(actions)

    def _places_emergency_call(self, data: bytes, host: str) -> bool:
        """For the flood guard: does this message from a banned ``host`` place a new call
        to an emergency number?"""
        try:
            message = parse_message(data, stream=False)
            return (
                isinstance(message, Request)
                and message.method == "INVITE"
                and message.to.tag is None
                and self.hook.is_emergency(message, host)
            )
        except ParseError:
            return False

    def unreachable(self, next_hop: Address) -> None:
        """The transports could not reach ``next_hop``: what waits on it fails now (503)."""
        assert self.core is not None and self._loop is not None
        try:
            actions = self.core.unreachable(next_hop, self._loop.time())
        except Exception:  # a bug must cost these transactions, never the proxy
            self.counters["internal_errors"] += 1
            log.exception("proxy.internal_error", next_hop=str(next_hop))
            return
        self._execute(actions)

    def _on_timer(self) -> None:
        assert self.core is not None and self._loop is not None
        self._timer = self._timer_when = None
        self._execute(self.core.handle_timer(self._loop.time()))

    async def _decide(self, attempt: CallAttempt) -> None:
        assert self.core is not None and self._loop is not None
        verdict: Verdict
        try:
            verdict = await asyncio.wait_for(self.hook.decide(attempt), self.settings.decision_timeout)
        except TimeoutError:
            self.counters["policy_timeouts"] += 1
            log.warning("policy.timeout", call_id=attempt.request.call_id)
            verdict = Reject(status=503, reason="Policy Decision Timeout", headers=(("Retry-After", "5"),))
        except Exception:  # a broken policy must not take the proxy down
            self.counters["policy_errors"] += 1
            log.exception("policy.error", call_id=attempt.request.call_id)
            verdict = Reject(status=500, reason="Policy Error")
        self._execute(self.core.decided(attempt.attempt_id, verdict, self._loop.time()))

    # -- flood defence ----------------------------------------------------------------------------
    def reconfigure_flood(self, section: FloodSection) -> None:
        """A reloaded policy's ``flood:`` section; bans are kept."""
        assert self._loop is not None
        settings = self.settings
        flood = flood_settings(section, settings.trusted_networks, settings.upstream)
        self.flood.configure(flood, now=self._loop.time())
        self._log_flood(self.flood.take_events(), always=True)

    def unban(self, address: str) -> dict[str, object] | None:
        """An operator lifts a ban: the ban as it was listed, or None if ``address`` had none."""
        assert self._loop is not None
        ban = self.flood.unban(address)
        self._log_flood(self.flood.take_events(), always=True)
        return None if ban is None else self._describe(ban, self._loop.time())

    def list_bans(self) -> list[dict[str, object]]:
        """The current bans as operators see them (times in ISO 8601 UTC)."""
        assert self._loop is not None
        now = self._loop.time()
        return [self._describe(ban, now) for ban in self.flood.bans if ban.until > now]

    def _describe(self, ban: Ban, now: float) -> dict[str, object]:
        return {
            "address": ban.host,
            "reason": ban.reason,
            "detail": ban.detail,
            "since": self._wall(ban.since),
            "until": self._wall(ban.until),
            "seconds_left": round(max(0.0, ban.until - now), 1),
            "dropped": ban.dropped,
            "offences": ban.offences,
        }

    def _wall(self, moment: float) -> str:
        return datetime.fromtimestamp(moment + self.wall_offset, UTC).isoformat(timespec="seconds")

    def _follow_wall_clock(self) -> None:
        """The wall clock against the monotonic one, read again every tick: a clock stepped
        after start (NTP at boot, a VM resumed) would otherwise shift calling hours and
        quota days until a restart."""
        assert self._loop is not None
        self.wall_offset = time.time() + self.wall_clock_skew - self._loop.time()
        if self.on_wall_offset is not None:
            self.on_wall_offset(self.wall_offset)

    def _on_tick(self) -> None:
        assert self._loop is not None
        self._follow_wall_clock()
        self.sweep_flood()
        idle = self.transports.tcp.close_idle(self.settings.tcp_idle_timeout)
        if idle:
            self.counters["tcp_idle_closed"] += idle
            log.info("tcp.idle_closed", connections=idle, idle_timeout=self.settings.tcp_idle_timeout)
        self.attempt_rate.sample(self._loop.time(), self.counters["call_attempts"])
        self._tick = self._loop.call_later(TICK, self._on_tick)

    def sweep_flood(self) -> None:
        """Every TICK: end the bans that are over, and say how many flood.* lines the last
        tick left out."""
        assert self._loop is not None
        if self._flood_lines_suppressed:
            log.warning("flood.lines_suppressed", count=self._flood_lines_suppressed, seconds=TICK)
        self._flood_lines = self._flood_lines_suppressed = 0
        self.flood.expire(self._loop.time())
        self._log_flood(self.flood.take_events())

    def _log_flood(self, events: list[FloodEvent], *, always: bool = False) -> None:
        """One line per event, at most FLOOD_LINES_PER_TICK a tick unless ``always`` (what
        an operator did is always logged)."""
        for event in events:
            self.counters[_FLOOD_COUNTERS[type(event)]] += 1
            if isinstance(event, Banned):
                self.bans_by_reason[event.reason] += 1
            always_logged = always or isinstance(event, EmergencyPassed)  # a life-safety audit trail
            if self._flood_lines >= FLOOD_LINES_PER_TICK and not always_logged:
                self._flood_lines_suppressed += 1
                continue
            self._flood_lines += 1
            if isinstance(event, Banned):
                log.warning(
                    "flood.banned",
                    host=event.host,
                    reason=event.reason,
                    detail=event.detail,
                    rate=round(event.rate, 1),
                    messages=event.messages,
                    seconds=event.seconds,
                    until=self._wall(event.until),
                    offences=event.offences,
                )
            elif isinstance(event, Unbanned):
                log.info(
                    "flood.unbanned", host=event.host, by=event.by, reason=event.reason, dropped=event.dropped
                )
            elif isinstance(event, BanListFull):
                log.error("flood.ban_list_full", host=event.host, size=event.size)
            elif isinstance(event, EmergencyPassed):
                log.warning(
                    "flood.emergency_passed", host=event.host, call_id=event.call_id, calls=event.calls
                )

    # -- the core's outputs -----------------------------------------------------------------
    def _execute(self, actions: list[Action]) -> None:
        assert self._loop is not None and self.core is not None
        for action in actions:
            try:
                self._execute_one(action)
            except Exception:  # a bug costs this action, not the rest: a CallEnded gives slots back
                self.counters["internal_errors"] += 1
                log.exception("proxy.internal_error", action=type(action).__name__)
        self._arm_timer()
        if self._stopping.is_set() and self.core.pending == 0:
            self._drained.set()

    def _execute_one(self, action: Action) -> None:
        assert self._loop is not None and self.core is not None
        if isinstance(action, Send):
            self.transports.send(action.data, action.destination, action.local)
        elif isinstance(action, Decide):
            self.counters["call_attempts"] += 1
            try:
                verdict = self.hook.decide_now(action.attempt)
            except Exception:
                self.counters["policy_errors"] += 1
                log.exception("policy.error", call_id=action.attempt.request.call_id)
                verdict = Reject(status=500, reason="Policy Error")
            if verdict is not None:
                self._execute(self.core.decided(action.attempt.attempt_id, verdict, self._loop.time()))
                return
            task = self._loop.create_task(self._decide(action.attempt))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(action, CallAnswered):
            self.counters["calls_answered"] += 1
            self.hook.call_answered(action)
        elif isinstance(action, CallEnded):
            self.counters["calls_ended"] += 1
            self.ended_by_reason[action.reason] += 1
            ended = {
                "call_id": action.call.call_id,
                "reason": action.reason.value,
                "status": action.status,
                "duration": round(action.now - action.call.started_at, 3),
            }
            if action.reason in ENDED_BY_SIPGUARD:  # sipguard's own doing: operators must see it
                log.info("call.ended", **ended)
            else:  # per call: debug, or the log costs more CPU than the call
                log.debug("call.ended", **ended)
            self.hook.call_ended(action)
        elif isinstance(action, ByeRefused):
            self.counters["byes_refused"] += 1
            log.info(
                "call.bye_refused",
                call_id=action.call.call_id,
                status=action.status,
                by="caller" if action.by_caller else "callee",
            )
        elif isinstance(action, Discarded):
            self.counters["discarded"] += 1
            log.info(
                "message.refused" if action.status else "message.dropped",
                reason=action.reason,
                status=action.status,
                source=str(action.source),
                call_id=action.call_id,
            )

    def _arm_timer(self) -> None:
        assert self.core is not None and self._loop is not None
        when = self.core.get_timer()
        if when is None or (self._timer_when is not None and self._timer_when <= when):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def listening(self) -> bool:
        """Every listener is bound (``start`` has returned)."""
        return self.core is not None

    @property
    def draining(self) -> bool:
        """SIGTERM came: new calls get 503 while transactions in flight finish."""
        return self._stopping.is_set()

    def request_stop(self) -> None:
        if self._stopping.is_set():
            return
        log.info("proxy.stopping", pending=self.core.pending if self.core else 0)
        self._stopping.set()
        if self.core is not None:
            self.core.stop_accepting()
            if self.core.pending == 0:
                self._drained.set()

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT stop, SIGHUP reloads. Called before ``start``: a signal that
        arrives while sipguard binds its sockets must not find the default action (which
        ends the process, for SIGHUP too)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        if self.on_reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self.on_reload)

    async def run_until_stopped(self) -> None:
        """Serve until asked to stop, then let transactions in flight finish (bounded)."""
        await self._stopping.wait()
        try:
            await asyncio.wait_for(self._drained.wait(), self.settings.shutdown_grace)
        except TimeoutError:
            log.warning("proxy.drain_timeout", pending=self.core.pending if self.core else 0)
        await self.close()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._tick is not None:
            self._tick.cancel()
        await self.transports.close()
        live = self.core.calls.live if self.core else 0
        counters = {**self.counters, **{f"calls_ended_{r.value}": n for r, n in self.ended_by_reason.items()}}
        log.info("proxy.stopped", live_calls=live, **dict(sorted(counters.items())))
