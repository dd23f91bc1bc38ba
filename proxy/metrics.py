"""Prometheus metrics and health checks, for the admin listener's /metrics, /healthz, /readyz.

Strategy: the hot path only increments plain Counters and ints that the proxy keeps
anyway (the core's message counts, the engine's verdicts and findings, SipGuard's
counters, the Redis store's latency buckets); ``SipguardCollector`` reads them when
/metrics is scraped and yields metric families. Nothing here runs per message, and a
scrape costs a few dict walks.

Labels are bounded: methods by proxy.sip.core.KNOWN_METHODS (others are "other"), rules,
modes and reply codes by the policy file, end and ban reasons by the code. There is no
per-number, per-account or per-address label: `sipguard status` and the decision log
name those. Every family is listed, with PromQL examples, in docs/metrics.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .app import SipGuard
from .engine import PolicyEngine
from .policyfile import CompiledPolicy
from .reload import Reloader
from .sip.events import EndReason
from .state.redis_store import RedisStore, StoreUnavailableError

VERDICTS = ("accepted", "rejected", "emergency", "error")


class SipguardCollector(Collector):
    """Reads one proxy's counters at scrape time. ``engine`` and ``reloader`` are None when
    the proxy runs without them (tests of the listener); their families are then empty.
    ``clock`` reads the proxy's monotonic clock (the event loop's), in which bans and
    penalties end."""

    def __init__(
        self,
        guard: SipGuard,
        engine: PolicyEngine | None = None,
        reloader: Reloader | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.guard = guard
        self.engine = engine
        self.reloader = reloader
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        yield from self._messages()
        yield from self._calls()
        yield from self._policy(now)
        yield from self._state_store()
        yield from self._flood(now)
        yield _counter(
            "sipguard_internal_errors",
            "Messages whose handling failed with an internal error (a bug: each is logged).",
            self.guard.counters["internal_errors"],
        )

    def _messages(self) -> Iterator[Metric]:
        core = self.guard.core
        yield _counter(
            "sipguard_sip_messages",
            "SIP messages received (in) and sent (out), by request or response and method "
            "(a response's CSeq method; methods sipguard does not know are 'other').",
            labels=("direction", "kind", "method"),
            samples=core.message_counts() if core else {},
        )
        answered = core.parse_errors if core else {}
        yield _counter(
            "sipguard_parse_errors",
            "Messages that could not be parsed: answered with a 4xx/5xx (true) or dropped (false).",
            labels=("answered",),
            samples={(flag,): answered.get(flag == "true", 0) for flag in ("true", "false")},
        )

    def _calls(self) -> Iterator[Metric]:
        guard = self.guard
        counters = guard.counters
        yield _counter(
            "sipguard_call_attempts",
            "Initial INVITEs from customers put to the policy (retransmissions count once).",
            counters["call_attempts"],
        )
        verdicts = self.engine.counters.verdicts if self.engine else {}
        errors = counters["policy_errors"] + counters["policy_timeouts"]  # the engine never answered
        yield _counter(
            "sipguard_call_decisions",
            "Policy verdicts on call attempts: accepted (forwarded, monitor and tag findings "
            "included), rejected by a rule, emergency (passed unjudged), error (no verdict: a "
            "policy error or timeout, or the state store away with a rule failing closed).",
            labels=("verdict",),
            samples={(v,): verdicts.get(v, 0) + (errors if v == "error" else 0) for v in VERDICTS},
        )
        yield _counter(
            "sipguard_calls_answered", "Calls answered (2xx to the INVITE).", counters["calls_answered"]
        )
        yield _counter(
            "sipguard_calls_ended",
            "Calls that ended (every call sipguard forwarded, answered or not), by reason.",
            labels=("reason",),
            samples={(reason.value,): guard.ended_by_reason[reason] for reason in EndReason},
        )
        yield _gauge(
            "sipguard_live_calls",
            "Calls tracked now (ringing or up).",
            guard.core.calls.live if guard.core else 0,
        )
        yield _gauge(
            "sipguard_calls_per_second",
            "Call attempts per second over the last 10 s (sampled each second).",
            guard.attempt_rate.per_second(),
        )

    def _policy(self, now: float) -> Iterator[Metric]:
        engine = self.engine
        counters = engine.counters if engine else None
        yield _counter(
            "sipguard_rule_hits",
            "Rule findings in every mode, in accepted and refused calls alike: severity deny "
            "(the rule would refuse the call; in enforce mode it did unless another rule "
            "refused first) or warn.",
            labels=("rule", "mode", "severity"),
            samples=counters.findings if counters else {},
        )
        yield _counter(
            "sipguard_rejections",
            "Calls refused, by the rule that refused them and the SIP status sent "
            "(rule 'parse': a From or identity header that could not be read, 400).",
            labels=("rule", "code"),
            samples=counters.rejections if counters else {},
        )
        yield _counter(
            "sipguard_penalty_box_entries",
            "Subjects (caller numbers, accounts) put in the penalty box, by rule.",
            labels=("rule",),
            samples={(rule,): n for rule, n in counters.penalised.items()} if counters else {},
        )
        yield _counter(
            "sipguard_rule_hook_errors",
            "A rule's call_ended hook raised (a bug): the call's slots were given back all the same.",
            labels=("rule",),
            samples={(rule,): n for rule, n in counters.hook_errors.items()} if counters else {},
        )
        yield _gauge(
            "sipguard_penalty_box_size",
            "Subjects in the penalty box now.",
            len(engine.history.penalties(now)) if engine else 0,
        )
        reloader = self.reloader
        yield _counter(
            "sipguard_policy_reloads",
            "Policy reloads (SIGHUP, POST /reload): ok (applied) or failed (the running policy kept).",
            labels=("result",),
            samples={("ok",): reloader.succeeded, ("failed",): reloader.failed} if reloader else {},
        )
        if engine is not None:
            yield _gauge(
                "sipguard_policy_loaded_timestamp_seconds",
                "When the running policy file was loaded (Unix time).",
                engine.policy.loaded_at,
            )

    def _state_store(self) -> Iterator[Metric]:
        store = self.engine.store if self.engine else None
        remote = store if isinstance(store, RedisStore) else None
        latency = HistogramMetricFamily(
            "sipguard_state_store_latency_seconds",
            "Round trips to the shared state store (Redis) that it answered, in seconds "
            "(empty with the in-memory store).",
        )
        if remote is not None:
            histogram = remote.latency
            buckets, below = [], 0
            for bound, count in zip([*map(repr, histogram.bounds), "+Inf"], histogram.counts, strict=True):
                below += count
                buckets.append((bound, below))
            latency.add_metric([], buckets, histogram.sum)
        yield latency
        yield _counter(
            "sipguard_state_store_errors",
            "Round trips to the shared state store that failed (timeout, connection or Redis error).",
            remote.errors_total if remote else 0,
        )
        yield _gauge(
            "sipguard_state_store_up",
            "1 if the state store can be used (always, in memory; for Redis: its circuit "
            "breaker is closed), else 0.",
            1 if store_usable(self.engine) else 0,
        )

    def _flood(self, now: float) -> Iterator[Metric]:
        guard = self.guard
        yield _counter(
            "sipguard_flood_dropped",
            "Messages dropped unread because their source is banned or over its rate.",
            guard.counters["flood_dropped"],
        )
        yield _counter(
            "sipguard_flood_bans",
            "Sources banned by the flood defence, by reason (rate or user-agent).",
            labels=("reason",),
            samples={(reason,): n for reason, n in guard.bans_by_reason.items()},
        )
        yield _counter(
            "sipguard_flood_emergency_passed",
            "Emergency calls of banned sources let through (emergency numbers are never blocked).",
            guard.counters["flood_emergency_passed"],
        )
        yield _gauge(
            "sipguard_banned_sources",
            "Sources banned now.",
            guard.flood.banned(now),
        )


def _counter(
    name: str,
    documentation: str,
    value: float | None = None,
    *,
    labels: tuple[str, ...] = (),
    samples: Mapping[Any, float] | None = None,
) -> CounterMetricFamily:
    """A counter family (``name`` without ``_total``): one ``value``, or one sample per
    ``samples`` key, a tuple of label values (ints and bools spelt as Prometheus does)."""
    family = CounterMetricFamily(
        name, documentation, value=value, labels=labels if samples is not None else None
    )
    for key, count in (samples or {}).items():
        family.add_metric([_label(part) for part in key], count)
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _label(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# -- health -----------------------------------------------------------------------------------------
def store_usable(engine: PolicyEngine | None) -> bool:
    """The state store can be used right now, as far as is known without a round trip."""
    store = engine.store if engine else None
    return not isinstance(store, RedisStore) or store.available


@dataclass(frozen=True, slots=True, kw_only=True)
class Readiness:
    """What /readyz answers: ``problems``, why this instance should not get new calls (none:
    it should); ``degraded``, what works less well while it still serves calls."""

    problems: tuple[str, ...] = ()
    degraded: tuple[str, ...] = ()


async def readiness(guard: SipGuard, engine: PolicyEngine | None) -> Readiness:
    """Whether this instance should get new calls. A remote store is asked (one PING
    through its circuit breaker), so an idle instance notices Redis going away and coming
    back. Redis away makes it not ready only if a rule that keeps counters there fails
    closed (refuses calls 503 meanwhile); otherwise calls go on, counted on this instance
    alone, and it is ready but degraded: every instance shares one Redis, and a load
    balancer steering by /readyz would otherwise take the whole fleet out at once."""
    problems, degraded = [], []
    if not guard.listening:
        problems.append("not listening yet")
    if guard.draining:
        problems.append("draining: shutting down, new calls get 503")
    if engine is not None and isinstance(engine.store, RedisStore):
        try:
            await engine.store.ping()
        except StoreUnavailableError as error:
            away = f"state store (Redis) unavailable: {error}"
            rules = counting_rules(engine.policy)
            closed = [_closed_where(rule, scopes) for rule, scopes in rules.items() if scopes]
            if closed:
                problems.append(
                    f"{away}; rules that fail closed refuse new calls with 503: {', '.join(closed)}"
                )
            elif rules:
                degraded.append(f"{away}; limits are counted on this instance alone (fail_mode: open)")
            else:
                degraded.append(f"{away}; no rule keeps counters in it, so calls are not affected")
    return Readiness(problems=tuple(problems), degraded=tuple(degraded))


def counting_rules(policy: CompiledPolicy) -> dict[str, list[str | None]]:
    """The enabled rules that keep counters in the state store, in file order, each with
    where it fails closed (``RuleConfig.fails_closed``, as the engine asks): None for the
    policy's own ``rules:`` section, else the accounts whose ``rules:`` override says so."""
    rules: dict[str, list[str | None]] = {}
    for account, rule_set in ((None, policy.rules), *policy.account_rules.items()):
        for rule, config in rule_set:
            if rule.keeps_counters(config):
                closed = rules.setdefault(rule.name, [])
                if config.fails_closed:
                    closed.append(account)
    return rules


def _closed_where(rule: str, scopes: list[str | None]) -> str:
    if None in scopes:
        return rule
    return f"{rule} (accounts: {', '.join(scope for scope in scopes if scope is not None)})"


# -- exposition -------------------------------------------------------------------------------------
def metrics_registry(
    guard: SipGuard,
    engine: PolicyEngine | None = None,
    reloader: Reloader | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> CollectorRegistry:
    """One proxy's registry: its own collector and the process_* metrics (CPU, memory,
    open files), apart from prometheus_client's global registry."""
    registry = CollectorRegistry()
    registry.register(SipguardCollector(guard, engine, reloader, clock=clock))
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's samples in the format the scraper's Accept header asks for
    (Prometheus text by default, OpenMetrics if asked), and its Content-Type."""
    encode, content_type = choose_encoder(accept or "")
    return encode(registry), content_type
