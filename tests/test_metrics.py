"""Prometheus metrics and the health checks (proxy/metrics.py, the admin listener's
/metrics, /healthz, /readyz).

- The collector over a real ProxyCore and PolicyEngine fed calls through the sans-I/O API
  (wire bytes from sipsim, ``now`` passed in), its exposition parsed back with
  prometheus_client's own parser: messages by direction, kind and method, parse errors,
  verdicts, rule hits in every mode, rejections by rule and code, live calls, the penalty
  box; the state-store families against a real redis-server and a port where none
  listens.
- docs/metrics.md lists exactly the families the collector yields, with their types and
  labels.
- End to end: a real sipguard process between SIPp customers and a SIPp PBX, scraped over
  HTTP: the counters match what SIPp saw. /healthz and /readyz need no token, /metrics
  does; /readyz says 503 while sipguard drains. While its Redis is down it follows
  fail_mode: 200 and degraded when every rule that keeps counters fails open (calls go
  on, counted locally), 503 when one fails closed (calls get 503); plain 200 once Redis
  is back.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from policy_e2e import ACME, CALLEE, PolicyGuard, PolicyLab, assert_calls
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from redis_server import RedisServer, start_redis
from sipp import LOOPBACK, SippResult, TracedMessage, free_ports, installed_sipguard, wait_until
from sipsim import (
    LOCAL_UDP,
    UPSTREAM,
    Sim,
    in_dialog_from_customer,
    invite,
    of_type,
    only_send,
    parse_response,
    request,
    response,
)
from test_dialer import DIALER, Phone, callee, only
from test_engine import OWNED, attempt, engine_for, policy

from policies.base import ALLOW, CallContext, Policy, Reply, RuleConfig, Verdict
from policies.call_rate import CallRateConfig, CallRatePolicy, RateLimit
from policies.concurrency import ConcurrencyConfig, ConcurrencyPolicy
from policies.registry import BUILTIN
from policies.usage import QuotaLimits, UsageConfig, UsagePolicy
from proxy.admin import AdminServer, HttpRequest
from proxy.app import ProxySettings, RateWindow, SipGuard
from proxy.engine import PolicyEngine
from proxy.metrics import Readiness, SipguardCollector, readiness
from proxy.reload import Reloader
from proxy.sip.core import KNOWN_METHODS
from proxy.sip.events import Accept, Action, CallEnded, Reject, Send
from proxy.state.redis_store import LatencyHistogram, RedisStore, StoreUnavailableError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"
TOKEN = "metrics-token-0123456789"
SPOOFED = "+14155559999"  # owned by no account: caller_id refuses it
ACME_NUMBER = "+14155550100"
SCANNER = "127.0.0.4"

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape_text(text: str) -> Samples:
    """Every sample of an exposition: name -> sorted label pairs -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def scrape(collector: SipguardCollector) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    return scrape_text(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def by_label(samples: Samples, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    """One metric's non-zero samples, keyed by the values of ``labels``."""
    found = {}
    for pairs, number in samples.get(name, {}).items():
        named = dict(pairs)
        if number:
            found[tuple(named[label] for label in labels)] = number
    return found


# -- the collector over the sans-I/O core and the engine --------------------------------------------
ACCOUNTS = {"acme": {"sources": ["192.0.2.0/24"], "numbers": ["+14155550100-+14155550199"]}}
RULES = {"caller_id": {}, "destinations": {"mode": "monitor", "block": ["+1415555"]}}
CALLEE_URI = "sip:+14155552000@pbx.example.com"  # under the prefix destinations monitors


class Proxy:
    """A ProxyCore (sipsim's Sim) and a PolicyEngine wired as SipGuard wires them, minus
    the sockets: each Decide is answered by the engine at once, each call's end reported."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.sim = Sim.make()
        self.engine = engine
        self.guard = SipGuard(ProxySettings(listen=[LOCAL_UDP], upstream=UPSTREAM), engine)
        self.guard.core = self.sim.core  # read by the collector; never started: no sockets
        self.collector = SipguardCollector(self.guard, engine, clock=lambda: self.sim.now)

    def judged(self, n: int, caller: str) -> list[Action]:
        """INVITE number ``n`` from ``caller``, judged: what the core did with the verdict."""
        decide = self.sim.offer(self.invite(n, caller))
        verdict = self.engine.decide_now(decide.attempt)
        assert verdict is not None
        return self.sim.decide(decide.attempt.attempt_id, verdict)

    def connect(self, n: int) -> None:
        """A call from acme's own number: forwarded, answered, ACKed."""
        forwarded = only_send(self.judged(n, OWNED))
        self.sim.answer(forwarded.data)
        ack = in_dialog_from_customer(
            "ACK", cseq=1, branch=f"z9hG4bKack{n}", contact=None, call_id=call_id(n)
        )
        only_send(self.sim.customer(ack))

    def hang_up(self, n: int) -> None:
        """The caller's BYE, forwarded; the PBX's 200 relayed back, which ends the call."""
        actions = self.sim.hang_up(
            in_dialog_from_customer("BYE", branch=f"z9hG4bKbye{n}", call_id=call_id(n))
        )
        (ended,) = of_type(actions, CallEnded)
        self.engine.call_ended(ended)

    def refused(self, n: int) -> int:
        """A spoofed call: refused by sipguard, which absorbs the caller's ACK. Its status."""
        reply, _ = self.judged(n, SPOOFED)
        assert isinstance(reply, Send)
        refusal = parse_response(reply.data)
        ack = request("ACK", vias=(invite_via(n),), call_id=call_id(n), to_tag=refusal.to.tag, contact=None)
        assert self.sim.customer(ack) == []
        return refusal.status_code

    @staticmethod
    def invite(n: int, caller: str = OWNED, callee: str = CALLEE_URI, **kwargs: Any) -> bytes:
        return invite(
            uri=callee, from_=f"<sip:{caller}@customer.example>", vias=(invite_via(n),), call_id=call_id(n),
            **kwargs,
        )  # fmt: skip


def call_id(n: int) -> str:
    return f"call-{n}@192.0.2.10"


def invite_via(n: int) -> str:
    return f"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKinv{n}"


def test_the_collector_counts_what_the_core_and_the_engine_did() -> None:
    """3 calls connect and 2 are refused by caller_id; destinations (monitor) finds every
    call would have been refused; a garbage datagram is dropped, an INVITE with a broken
    Max-Forwards answered 400, an unknown method forwarded as "other"."""
    proxy = Proxy(engine_for(RULES, ACCOUNTS))
    for n in range(3):
        proxy.connect(n)
    assert [proxy.refused(n) for n in (3, 4)] == [403, 403]
    proxy.sim.customer(b"HELLO\r\n\r\n")
    broken = proxy.sim.customer(proxy.invite(5, max_forwards=None, headers=[("Max-Forwards", "many")]))
    assert parse_response(of_type(broken, Send)[0].data).status_code == 400
    only_send(proxy.sim.customer(request("FOOBAR", vias=("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKfoo",))))

    during = scrape(proxy.collector)
    assert value(during, "sipguard_live_calls") == 3
    for n in range(3):
        proxy.hang_up(n)
    after = scrape(proxy.collector)

    assert value(after, "sipguard_live_calls") == 0
    messages = by_label(after, "sipguard_sip_messages_total", "direction", "kind", "method")
    assert messages == {
        # in: 5 INVITEs judged + the one answered 400; 3 ACKs of 200s + 2 of 403s; 3 BYEs
        ("in", "request", "INVITE"): 6, ("in", "request", "ACK"): 5, ("in", "request", "BYE"): 3,
        ("in", "request", "other"): 1,
        ("in", "response", "INVITE"): 3, ("in", "response", "BYE"): 3,  # the PBX's 200s
        ("out", "request", "INVITE"): 3, ("out", "request", "ACK"): 3, ("out", "request", "BYE"): 3,
        ("out", "request", "other"): 1,
        ("out", "response", "INVITE"): 6,  # 3 relayed 200s, 2 × 403, the 400
        ("out", "response", "BYE"): 3,
    }  # fmt: skip
    assert by_label(after, "sipguard_parse_errors_total", "answered") == {("true",): 1, ("false",): 1}
    assert by_label(after, "sipguard_call_decisions_total", "verdict") == {("accepted",): 3, ("rejected",): 2}
    assert by_label(after, "sipguard_rejections_total", "rule", "code") == {("caller_id", "403"): 2}
    assert by_label(after, "sipguard_rule_hits_total", "rule", "mode", "severity") == {
        ("caller_id", "enforce", "deny"): 2,
        ("destinations", "monitor", "deny"): 5,  # every call, the refused ones too
    }
    assert value(after, "sipguard_state_store_up") == 1
    assert value(after, "sipguard_policy_loaded_timestamp_seconds") == proxy.engine.policy.loaded_at
    assert "sipguard_state_store_latency_seconds_count" not in after  # in memory: no round trips


def test_unknown_methods_are_one_label_however_many_are_invented() -> None:
    proxy = Proxy(engine_for({}, ACCOUNTS))
    for index in range(50):
        via = f"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKx{index}"
        proxy.sim.customer(request(f"X{index}", vias=(via,), call_id=f"x{index}"))
    methods = by_label(scrape(proxy.collector), "sipguard_sip_messages_total", "direction", "method")
    assert methods == {("in", "other"): 50, ("out", "other"): 50}
    assert set(proxy.sim.core.requests_in) == {*KNOWN_METHODS, "other"}  # no key was added
    assert "INVITE" in KNOWN_METHODS and "other" not in KNOWN_METHODS


def test_an_empty_policy_still_counts_its_verdicts() -> None:
    proxy = Proxy(engine_for({}, ACCOUNTS))
    proxy.connect(0)
    assert by_label(scrape(proxy.collector), "sipguard_call_decisions_total", "verdict") == {("accepted",): 1}


def test_emergency_calls_are_their_own_verdict() -> None:
    proxy = Proxy(engine_for(RULES, ACCOUNTS))
    decide = proxy.sim.offer(proxy.invite(0, callee="sip:911@pbx.example.com"))
    assert proxy.engine.decide_now(decide.attempt) == Accept(remove_headers=("x-sipguard-tag",))  # not judged
    samples = scrape(proxy.collector)
    assert by_label(samples, "sipguard_call_decisions_total", "verdict") == {("emergency",): 1}
    assert by_label(samples, "sipguard_rule_hits_total", "rule") == {}  # not judged: no finding


def test_the_penalty_box_gauge_empties_when_penalties_end() -> None:
    engine = engine_for(only("sequential", warning=None, critical=3))
    dialer = Phone(engine, DIALER)
    for index in range(3):
        dialer.call(callee(100 + index), gap=120)
    now = dialer.now
    collector = SipguardCollector(SipGuard(ProxySettings(listen=[LOCAL_UDP], upstream=UPSTREAM)), engine,
                                  clock=lambda: now)  # fmt: skip
    boxed = scrape(collector)
    assert value(boxed, "sipguard_penalty_box_entries_total", rule="dialer") == 1
    assert value(boxed, "sipguard_penalty_box_size") == 1
    assert value(boxed, "sipguard_rejections_total", rule="dialer", code="403") == 1
    now += 3600  # past penalty_seconds
    assert value(scrape(collector), "sipguard_penalty_box_size") == 0


def test_calls_per_second_over_the_sampled_window() -> None:
    rate = RateWindow(10)
    assert rate.per_second() == 0.0
    rate.sample(100.0, 0)
    assert rate.per_second() == 0.0  # one sample: no interval yet
    for second in range(1, 16):
        rate.sample(100.0 + second, 30 * second)  # 30 calls a second
    assert rate.per_second() == 30.0
    rate.sample(116.0, 30 * 15)  # a quiet second: the average over the last 10 s drops
    assert rate.per_second() == 27.0


def test_latency_buckets_count_a_time_on_a_bound_in_that_bucket() -> None:
    histogram = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0002, 0.001, 0.005, 0.5):
        histogram.observe(seconds)
    assert histogram.counts == [2, 1, 1]
    assert histogram.sum == pytest.approx(0.5062)


# -- the state store: a real redis-server, and a port where none listens -------------------------
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def redis_engine(store: RedisStore) -> PolicyEngine:
    return PolicyEngine(policy({"concurrency": {"per_number": 1, "per_account": None}}, ACCOUNTS), store)


def test_state_store_families_against_a_real_redis(redis_server: RedisServer) -> None:
    redis_server.flushall()
    engine = redis_engine(RedisStore(redis_server.url, timeout=0.5, clock=None))
    proxy = Proxy(engine)
    guard = proxy.guard

    async def judge_and_probe() -> Readiness:
        decide = proxy.sim.offer(proxy.invite(0))
        assert engine.decide_now(decide.attempt) is None  # a round trip
        assert isinstance(await engine.decide(decide.attempt), Accept)
        return await readiness(guard, engine)

    assert asyncio.run(judge_and_probe()) == Readiness()  # listening (a core), not draining, Redis answers
    samples = scrape(proxy.collector)
    assert value(samples, "sipguard_state_store_latency_seconds_count") == 2  # the call and the PING
    assert value(samples, "sipguard_state_store_latency_seconds_bucket", le="+Inf") == 2
    assert value(samples, "sipguard_state_store_latency_seconds_sum") > 0
    assert value(samples, "sipguard_state_store_errors_total") == 0
    assert value(samples, "sipguard_state_store_up") == 1


# /readyz while Redis is away follows fail_mode: what the engine does with the calls
AWAY = "state store (Redis) unavailable: "
COUNTED_LOCALLY = "; limits are counted on this instance alone (fail_mode: open)"
FAIL_CLOSED = "; rules that fail closed refuse new calls with 503: "
NOTHING_COUNTED = "; no rule keeps counters in it, so calls are not affected"
BREAKER_OPEN = AWAY + "circuit breaker open"
OPEN_CAP = {"concurrency": {"per_number": 1, "per_account": None}}
CLOSED_CAP = {"concurrency": {"per_number": 1, "per_account": None, "fail_mode": "closed"}}
READYZ = HttpRequest(method="GET", path="/readyz", query="", headers={}, body=b"")


def readyz(engine: PolicyEngine, probes: int = 1, *, draining: bool = False) -> tuple[int, Any]:
    """The admin listener's /readyz handler (no socket) asked ``probes`` times, of a proxy
    that listens: its last status and body."""
    proxy = Proxy(engine)
    if draining:
        proxy.guard.request_stop()
    admin = AdminServer(proxy.guard, LOOPBACK, 0, engine=engine)

    async def ask() -> tuple[int, Any]:
        for _ in range(probes):
            answer = await admin.readyz(READYZ)
        return answer.status, answer.body

    return asyncio.run(ask())


def test_a_store_that_does_not_answer_is_down_and_ready_but_degraded() -> None:
    """A rule keeps counters, failing open (the default): calls go on, counted locally."""
    store = RedisStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5, clock=None)
    engine = redis_engine(store)
    proxy = Proxy(engine)

    async def probe(times: int) -> list[Readiness]:
        return [await readiness(proxy.guard, engine) for _ in range(times)]

    first, *_, last = asyncio.run(probe(4))  # three failures open the breaker
    (degraded,) = first.degraded
    assert first.problems == () and degraded.startswith(AWAY) and degraded.endswith(COUNTED_LOCALLY)
    assert "circuit breaker" not in degraded  # the first one made a round trip
    assert last == Readiness(degraded=(BREAKER_OPEN + COUNTED_LOCALLY,))
    samples = scrape(proxy.collector)
    assert value(samples, "sipguard_state_store_errors_total") == 3  # the fourth made no round trip
    assert value(samples, "sipguard_state_store_up") == 0
    assert value(samples, "sipguard_state_store_latency_seconds_count") == 0
    with pytest.raises(StoreUnavailableError, match="circuit breaker open"):
        asyncio.run(store.ping())


@pytest.mark.parametrize(
    ("rules", "overrides", "status", "body", "refused"),
    [
        pytest.param(
            {"caller_id": {}, "call_rate": {}, **OPEN_CAP}, {}, 200,
            {"status": "ready", "degraded": [BREAKER_OPEN + COUNTED_LOCALLY]}, False,
            id="every-counting-rule-fails-open",
        ),
        pytest.param(
            {"caller_id": {}, "call_rate": {}, **CLOSED_CAP}, {}, 503,
            {"status": "not ready", "reasons": [BREAKER_OPEN + FAIL_CLOSED + "concurrency"]}, True,
            id="a-counting-rule-fails-closed",
        ),
        pytest.param(
            {"call_rate": {}, **OPEN_CAP}, {"concurrency": {"fail_mode": "closed"}}, 503,
            {"status": "not ready", "reasons": [BREAKER_OPEN + FAIL_CLOSED + "concurrency (accounts: acme)"]},
            True, id="an-account-makes-a-counting-rule-fail-closed",
        ),
        pytest.param(  # caller_id never counts; usage with no quota (a duration cap) neither
            {"caller_id": {"fail_mode": "closed"}, "call_rate": {},
             "usage": {"max_call_duration": 3600, "fail_mode": "closed"}},
            {}, 200, {"status": "ready", "degraded": [BREAKER_OPEN + COUNTED_LOCALLY]}, False,
            id="closed-only-where-nothing-is-counted",
        ),
        pytest.param(  # monitor never refuses a call: it counts locally, as open does
            {"concurrency": {**CLOSED_CAP["concurrency"], "mode": "monitor"}}, {}, 200,
            {"status": "ready", "degraded": [BREAKER_OPEN + COUNTED_LOCALLY]}, False,
            id="a-monitored-rule-failing-closed",
        ),
        pytest.param(
            {"caller_id": {"fail_mode": "closed"}, "destinations": {"block": ["+1900"]}}, {}, 200,
            {"status": "ready", "degraded": [BREAKER_OPEN + NOTHING_COUNTED]}, False,
            id="no-rule-keeps-counters",
        ),
    ],
)  # fmt: skip
def test_readyz_with_redis_away_follows_what_the_engine_does_with_calls(
    rules: dict[str, Any], overrides: dict[str, Any], status: int, body: dict[str, Any], refused: bool
) -> None:
    """Not ready exactly when the engine refuses calls for want of Redis (a rule that keeps
    counters fails closed, for callers of no account or by an account's override);
    otherwise ready, saying what is degraded. A call from acme shows what the engine does."""
    accounts = {"acme": {**ACCOUNTS["acme"], "rules": overrides}}
    store = RedisStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5, clock=None)
    engine = PolicyEngine(policy(rules, accounts), store)
    assert readyz(engine, probes=4) == (status, body)  # three failures open the breaker
    call = attempt("away")
    assert engine.decide_now(call) is None
    verdict = asyncio.run(engine.decide(call))
    assert isinstance(verdict, Reject if refused else Accept), verdict
    assert engine.counters.verdicts == ({"error": 1} if refused else {"accepted": 1})


def test_which_rules_keep_counters_that_fail_mode_is_about() -> None:
    """The rules docs/deployment.md says keep counters, when configured to; a rule that
    does not say (a plugin) is taken to keep some."""
    defaults = {name: rule().keeps_counters(rule.Config.model_validate({})) for name, rule in BUILTIN.items()}
    assert {name for name, counts in defaults.items() if counts} == {"concurrency", "call_rate"}
    usage, concurrency, call_rate = UsagePolicy(), ConcurrencyPolicy(), CallRatePolicy()
    assert usage.keeps_counters(UsageConfig(minutes_per_month=QuotaLimits(per_account=600)))
    assert not usage.keeps_counters(UsageConfig(calls_per_day=QuotaLimits(), max_call_duration=60))
    assert not concurrency.keeps_counters(ConcurrencyConfig(per_number=None, per_account=None))
    assert concurrency.keeps_counters(ConcurrencyConfig(per_number=None, per_account=None, per_destination=1))
    assert not call_rate.keeps_counters(CallRateConfig(per_number=None, per_account=None))
    per_source = RateLimit(per_minute=60)
    assert call_rate.keeps_counters(CallRateConfig(per_number=None, per_account=None, per_source=per_source))

    class Plugin(Policy[RuleConfig]):
        name = "plugin"
        Config = RuleConfig

        def check(self, call: CallContext, config: RuleConfig) -> Verdict:
            return ALLOW

    assert Plugin().keeps_counters(RuleConfig(reply=Reply(code=403, reason="Forbidden")))


def test_a_draining_proxy_with_redis_away_says_both() -> None:
    store = RedisStore(f"redis://127.0.0.1:{closed_port()}/0", timeout=0.5, clock=None)
    assert readyz(redis_engine(store), probes=4, draining=True) == (
        503,
        {
            "status": "not ready",
            "reasons": ["draining: shutting down, new calls get 503"],
            "degraded": [BREAKER_OPEN + COUNTED_LOCALLY],
        },
    )


@pytest.mark.parametrize("rules", [OPEN_CAP, CLOSED_CAP], ids=["open", "closed"])
def test_with_redis_up_readyz_is_plainly_ready(redis_server: RedisServer, rules: dict[str, Any]) -> None:
    store = RedisStore(redis_server.url, timeout=0.5, clock=None)
    assert readyz(PolicyEngine(policy(rules, ACCOUNTS), store)) == (200, {"status": "ready"})
    assert sum(store.latency.counts) == 1  # Redis answered the PING


def test_a_proxy_not_started_or_draining_is_not_ready() -> None:
    guard = SipGuard(ProxySettings(listen=[LOCAL_UDP], upstream=UPSTREAM))
    assert asyncio.run(readiness(guard, None)) == Readiness(problems=("not listening yet",))
    guard.core = Sim.make().core
    assert asyncio.run(readiness(guard, None)) == Readiness()
    guard.request_stop()
    draining = ("draining: shutting down, new calls get 503",)
    assert asyncio.run(readiness(guard, None)) == Readiness(problems=draining)


# -- docs/metrics.md ------------------------------------------------------------------------------
ROW = re.compile(r"^\| `(sipguard_\w+)` \| (counter|gauge|histogram) \|([^|]*)\|", re.MULTILINE)


def documented() -> dict[str, tuple[str, tuple[str, ...]]]:
    """docs/metrics.md's table rows: name -> (type, label names)."""
    rows = {}
    for name, kind, labels in ROW.findall(DOCS.read_text()):
        rows[name] = (kind, tuple(re.findall(r"`(\w+)`", labels)))
    return rows


def yielded() -> dict[str, tuple[str, tuple[str, ...]]]:
    """What the collector yields, over sources that fill every labelled family."""
    proxy = Proxy(engine_for(RULES, ACCOUNTS))
    proxy.connect(0)
    proxy.refused(1)
    proxy.hang_up(0)
    collector = SipguardCollector(proxy.guard, proxy.engine, Reloader(proxy.engine, proxy.guard, None))
    proxy.guard.bans_by_reason["rate"] += 1
    proxy.engine.counters.penalised["dialer"] += 1
    proxy.engine.counters.hook_errors["usage"] += 1
    proxy.engine.counters.findings[("dialer", "tag", "warn")] += 1
    families = {}
    for family in collector.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = {label for sample in family.samples for label in sample.labels if label != "le"}
        families[name] = (family.type, tuple(sorted(labels)))
    return families


def test_docs_list_every_family_with_its_type_and_labels() -> None:
    docs, families = documented(), yielded()
    assert sorted(docs) == sorted(families), "docs/metrics.md and the collector disagree"
    for name, (kind, labels) in families.items():
        assert (docs[name][0], tuple(sorted(docs[name][1]))) == (kind, labels), name


def test_docs_examples_name_only_real_metrics() -> None:
    families = yielded()
    histograms = [name for name, (kind, _) in families.items() if kind == "histogram"]
    series = set(families) | {
        f"{name}{suffix}" for name in histograms for suffix in ("_bucket", "_sum", "_count")
    }
    named = set(re.findall(r"\b(sipguard_\w+)", DOCS.read_text()))
    assert named - series == set()


# -- end to end: a real sipguard, SIPp on both sides, scraped over HTTP --------------------------
def admin_port(guard: PolicyGuard) -> int:
    return int(guard.wait_for("admin.started")["port"])


def http_get(
    port: int, path: str, *, token: str | None = None, accept: str | None = None
) -> tuple[int, str, str]:
    """GET ``path`` from the admin listener: status, Content-Type, body."""
    head = f"GET {path} HTTP/1.1\r\nHost: sipguard\r\n"
    head += f"Authorization: Bearer {token}\r\n" if token else ""
    head += f"Accept: {accept}\r\n" if accept else ""
    with socket.create_connection((LOOPBACK, port), timeout=10) as connection:
        connection.sendall((head + "\r\n").encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    assert int(headers["content-length"]) == len(body)
    return int(lines[0].split()[1]), headers["content-type"], body.decode()


def json_get(port: int, path: str) -> tuple[int, Any]:
    status, content_type, body = http_get(port, path)
    assert content_type == "application/json"
    return status, json.loads(body)


def metrics_over_http(port: int) -> Samples:
    status, content_type, body = http_get(port, "/metrics", token=TOKEN)
    assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8"), body
    return scrape_text(body)


def method_of(message: TracedMessage) -> str:
    """A traced message's method label: a request's own, a response's CSeq method."""
    method = message.method or message.headers("cseq")[0].split()[1]
    return method if method in KNOWN_METHODS else "other"


def seen_by_sipp(results: Iterable[SippResult], direction: str) -> Counter[tuple[str, str]]:
    """(kind, method) of every message the SIPp peers ``direction`` (sent or received)."""
    return Counter(
        ("request" if message.method else "response", method_of(message))
        for result in results
        for message in result.messages
        if message.direction == direction
    )


# the admin listener on a free loopback port, with a token, and one customer account
ADMIN_AND_ACME = f"""\
admin:
  listen: "{LOOPBACK}:0"
  token: {TOKEN}
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["{ACME_NUMBER}"]
"""


@pytest.mark.sipp
def test_metrics_after_a_sipp_run_match_what_sipp_saw(policy_lab: PolicyLab) -> None:
    """5 calls from acme's own number connect; 3 presenting a number acme does not own are
    refused 403 by caller_id; destinations in monitor mode would have refused all 8. Then,
    with the PBX stopped so no message is in flight, /metrics (with the token) says so,
    message by message, as the SIPp traces do."""
    connected, refused = 5, 3
    guard = policy_lab.start(
        ADMIN_AND_ACME
        + f'rules:\n  caller_id: {{}}\n  destinations: {{mode: monitor, block: ["{CALLEE[:5]}"]}}\n'
    )
    port = admin_port(guard)
    assert http_get(port, "/metrics")[0] == 401  # the token is required
    assert http_get(port, "/metrics", token="wrong-token-0123456789")[0] == 401
    assert json_get(port, "/healthz") == (200, {"status": "ok"})  # no token needed
    assert json_get(port, "/readyz") == (200, {"status": "ready"})

    callers = policy_lab.call("uac_caller.xml", ACME_NUMBER, calls=connected, rate=20, hold_ms=300)
    spoofers = policy_lab.call("uac_spoofed.xml", SPOOFED, calls=refused, rate=20)
    callers_result, spoofers_result = callers.wait(), spoofers.wait()
    assert_calls(callers_result, [200] * connected)
    assert_calls(spoofers_result, [403] * refused)
    assert policy_lab.pbx is not None
    pbx_result = policy_lab.pbx.stop()
    wait_until(lambda: value(metrics_over_http(port), "sipguard_live_calls") == 0, 10, "live calls back to 0")

    # the calls were placed in the last 10 s: the next one-second sample shows them
    wait_until(lambda: value(metrics_over_http(port), "sipguard_calls_per_second") > 0, 5, "calls/s above 0")
    samples = metrics_over_http(port)
    peers = [callers_result, spoofers_result, pbx_result]
    for direction, sipp_direction in (("in", "sent"), ("out", "received")):
        counted = by_label(samples, "sipguard_sip_messages_total", "direction", "kind", "method")
        ours = {(kind, method): n for (way, kind, method), n in counted.items() if way == direction}
        assert ours == seen_by_sipp(peers, sipp_direction), direction
    total = connected + refused
    assert value(samples, "sipguard_call_attempts_total") == total
    assert by_label(samples, "sipguard_call_decisions_total", "verdict") == {
        ("accepted",): connected, ("rejected",): refused,
    }  # fmt: skip
    assert by_label(samples, "sipguard_rejections_total", "rule", "code") == {("caller_id", "403"): refused}
    assert by_label(samples, "sipguard_rule_hits_total", "rule", "mode", "severity") == {
        ("caller_id", "enforce", "deny"): refused,
        ("destinations", "monitor", "deny"): total,
    }
    assert value(samples, "sipguard_calls_answered_total") == connected
    assert by_label(samples, "sipguard_calls_ended_total", "reason") == {("bye",): connected}
    assert by_label(samples, "sipguard_parse_errors_total", "answered") == {}
    assert value(samples, "sipguard_internal_errors_total") == 0
    assert value(samples, "sipguard_state_store_up") == 1
    assert value(samples, "process_resident_memory_bytes") > 0  # prometheus_client's process collector

    assert value(samples, "sipguard_banned_sources") == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as scanner:
        scanner.bind((SCANNER, 0))
        via = f"SIP/2.0/UDP {SCANNER}:5060;branch=z9hG4bKscan"
        probe = request("OPTIONS", vias=(via,), call_id="scan", headers=[("User-Agent", "friendly-scanner")])
        scanner.sendto(probe, (LOOPBACK, policy_lab.proxy))  # SIPVicious's signature: banned at once
        guard.wait_for("flood.banned", host=SCANNER)
    flood = metrics_over_http(port)
    assert by_label(flood, "sipguard_flood_bans_total", "reason") == {("user-agent",): 1}
    assert value(flood, "sipguard_banned_sources") == 1
    assert value(flood, "sipguard_flood_dropped_total") == 1  # the message that earned the ban
    assert flood["sipguard_sip_messages_total"] == samples["sipguard_sip_messages_total"]  # dropped unread

    status, content_type, body = http_get(
        port, "/metrics", token=TOKEN, accept="application/openmetrics-text"
    )
    assert status == 200 and content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    log = guard.stop()
    assert log.returncode == 0 and log.counter("internal_errors") == 0, log.summary()


@pytest.mark.sipp
def test_readyz_says_503_while_draining(tmp_path: Path) -> None:
    """sipguard holds an INVITE the PBX has not answered when SIGTERM comes: while it
    drains, /readyz answers 503 with the reason (and /healthz still 200); once the PBX
    answers, the drain ends and sipguard exits."""
    proxy_port, admin = free_ports(2)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as pbx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as customer,
    ):
        pbx.bind((LOOPBACK, 0))
        customer.bind((LOOPBACK, 0))
        for sock in (pbx, customer):
            sock.settimeout(10)
        config = tmp_path / "policy.yaml"
        upstream = f"udp:{LOOPBACK}:{pbx.getsockname()[1]}"
        config.write_text(
            f"proxy: {{listen: [udp:{LOOPBACK}:{proxy_port}], upstream: '{upstream}'}}\n"
            f"admin: {{listen: '{LOOPBACK}:{admin}', token: {TOKEN}}}\n"
        )
        guard = PolicyGuard([installed_sipguard(), "run", "--config", str(config), "--log-format", "json"],
                            tmp_path / "sipguard.log")  # fmt: skip
        guard.start()
        try:
            guard.wait_for("admin.started")
            branch = "z9hG4bKdrain1"
            via = f"SIP/2.0/UDP {LOOPBACK}:{customer.getsockname()[1]};branch={branch}"
            customer.sendto(invite(vias=(via,), call_id="drain@test"), (LOOPBACK, proxy_port))
            forwarded, source = pbx.recvfrom(65535)  # forwarded: a transaction in flight
            mark = guard.mark()
            guard.send_signal(signal.SIGTERM)
            guard.wait_for("proxy.stopping", since=mark)
            assert json_get(admin, "/readyz") == (
                503, {"status": "not ready", "reasons": ["draining: shutting down, new calls get 503"]}
            )  # fmt: skip
            assert json_get(admin, "/healthz") == (200, {"status": "ok"})
            pbx.sendto(response(forwarded, 486), source)
            assert customer.recv(65535).startswith(b"SIP/2.0 486 ")
            wait_until(lambda: guard.exited, 10, "sipguard to exit once drained")
            log = guard.stop()
            assert log.returncode == 0 and log.stopped["live_calls"] == 0, log.summary()
            assert log.named("proxy.drain_timeout") == [], log.summary()
        finally:
            guard.kill()


@pytest.mark.sipp
@pytest.mark.parametrize("fail_mode", ["open", "closed"])
def test_readyz_follows_redis_down_and_back(policy_lab: PolicyLab, fail_mode: str) -> None:
    """With Redis stopped, /readyz follows concurrency's fail_mode, as the calls do: open,
    200 saying the state store is away and limits are counted locally (a call connects);
    closed, 503 naming the rule (a call gets 503). /metrics shows the store down either
    way. Restarted on the same port, /readyz is plainly ready again within the breaker's
    reset (5 s) with no call needed to find out."""
    redis = start_redis(policy_lab.lab.workdir)
    try:
        guard = policy_lab.start(
            f'state: {{url: "{redis.url}", timeout: 0.25}}\n'
            + ADMIN_AND_ACME
            + f"rules:\n  concurrency: {{per_number: 2, per_account: null, fail_mode: {fail_mode}}}\n"
        )
        port = admin_port(guard)
        assert json_get(port, "/readyz") == (200, {"status": "ready"})
        assert_calls(policy_lab.run("uac_caller.xml", ACME_NUMBER), [200])
        up = metrics_over_http(port)
        assert value(up, "sipguard_state_store_up") == 1
        assert (
            value(up, "sipguard_state_store_latency_seconds_count") >= 2
        )  # readyz's PING, the call's script

        redis.stop()
        status, answer = json_get(port, "/readyz")
        if fail_mode == "open":
            assert status == 200 and set(answer) == {"status", "degraded"}, answer
            assert answer["status"] == "ready"
            (reason,) = answer["degraded"]
            assert reason.endswith("; limits are counted on this instance alone (fail_mode: open)"), answer
        else:
            assert status == 503 and answer["status"] == "not ready" and "degraded" not in answer, answer
            (reason,) = answer["reasons"]
            assert reason.endswith("; rules that fail closed refuse new calls with 503: concurrency"), answer
        assert reason.startswith("state store (Redis) unavailable: "), answer
        for _ in range(2):
            http_get(port, "/readyz")  # three failures in a row open the breaker
        down = metrics_over_http(port)
        assert value(down, "sipguard_state_store_up") == 0
        assert value(down, "sipguard_state_store_errors_total") >= 3
        if fail_mode == "open":  # as /readyz said: calls go on, counted on this instance
            assert_calls(policy_lab.run("uac_caller.xml", ACME_NUMBER), [200])
        else:
            assert_calls(policy_lab.run("uac_refused.xml", ACME_NUMBER), [503])

        redis = start_redis(policy_lab.lab.workdir, redis.port)
        wait_until(
            lambda: json_get(port, "/readyz") == (200, {"status": "ready"}),
            15,
            "plainly ready once Redis is back",
            interval=0.25,
        )
        assert value(metrics_over_http(port), "sipguard_state_store_up") == 1
        assert_calls(policy_lab.run("uac_caller.xml", ACME_NUMBER), [200])
        log, _ = policy_lab.finish()
        assert log.returncode == 0 and log.counter("internal_errors") == 0, log.summary()
    finally:
        redis.stop()
