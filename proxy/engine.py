"""The policy engine: the proxy's DecisionHook, running the policy file's rules.

Per initial INVITE from a customer: find the account (source network, then auth
username, then From domain); let emergency calls through unjudged and uncounted (an
asserted identity kept only if the account owns it); build the CallContext (identities
normalised once); ask each rule; run every state operation the rules require in one
atomic store call; turn the answers into one verdict according to each rule's mode;
log one line that explains it. A call the PBX challenges (401/407) and the caller sends
again with credentials is one call: its retry is judged and takes its slots again, but
is not counted again (rates, call quotas, the dialer's history) in what its first
INVITE counted; a counter that INVITE did not touch (the account its credentials name,
a caller or callee it changed) counts at the retry.

Slots a call holds are remembered here by attempt id, exactly as they were taken, and
given back when the core reports the call's end; a reload swaps the compiled policy
but keeps those, so live calls keep their slots and counters survive.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from policies.base import (
    Account,
    CallContext,
    CallOutcome,
    Deny,
    Identity,
    Mode,
    Policy,
    Require,
    RuleConfig,
    Warn,
)
from policies.caller_id import CallerIdConfig
from policies.numbering import (
    NumberSet,
    caller_digits,
    dialled_digits,
    digits_outside_context,
    is_anonymous,
    normalise,
)

from .decisions import Decision, DecisionMemory
from .policyfile import CompiledPolicy
from .sip import NameAddr, ParseError, Request
from .sip.events import Accept, CallAnswered, CallAttempt, CallEnded, EndReason, Keepalive, Reject, Verdict
from .sip.headers import credential_params
from .sip.hosts import unmapped
from .state import HitRate, MemoryStore, Operation, OpResult, StateStore, TakeSlot, UseQuota
from .state.history import CallHistory, LiveRecord
from .state.redis_store import StoreUnavailableError

log = structlog.get_logger("sipguard.policy")
TAG_HEADER = "X-Sipguard-Tag"
_IDENTITY_HEADERS = ("p-asserted-identity", "p-preferred-identity", "remote-party-id")
ACCEPT = Accept()
UNTRUSTED_IDENTITY_HEADERS = ("p-asserted-identity", "remote-party-id")
# Only sipguard tags calls for the PBX: a customer's own tag header would be a forged verdict.
FORGEABLE_HEADERS = (TAG_HEADER.lower(),)
# A PBX that authenticates answers the first INVITE 401/407, and the caller sends it again
# with credentials (RFC 3261 §22.2: same Call-ID and From tag, CSeq + 1) within moments;
# 32 s is the life of the challenged transaction (Timer B).
CHALLENGES = (401, 407)
CHALLENGE_RETRY_WINDOW = 32.0
MAX_CHALLENGES = 100_000


@dataclass(slots=True)
class _Plan:
    """One INVITE, judged as far as the rules go without the state store."""

    attempt: CallAttempt
    context: CallContext | None
    configs: dict[str, RuleConfig]
    operations: list[Operation]
    denials: list[tuple[str, str]]  # (rule, detail) of every Deny, in rule order
    blocked: bool  # an enforced rule denied already
    strip: tuple[str, ...]
    final: Verdict | None = None  # decided without the store (emergency, malformed)
    max_duration: float | None = None  # the shortest any rule allows, once answered
    keepalive: Keepalive | None = None  # probes of both parties, from the first rule asking
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (rule, detail) of every Warn
    history_warnings: list[tuple[str, str]] = field(default_factory=list)  # ... by rules reading the history
    history_keys: tuple[str, ...] = ()  # the call's subjects, when a rule reads the history
    hooked: tuple[tuple[Policy[Any], RuleConfig], ...] = ()  # rules told how the call ends
    retry: _Challenge | None = None  # the call was challenged, and this is it again


@dataclass(slots=True)
class PolicyCounters:
    """What the engine decided, counted for the metrics (proxy/metrics.py). Every key is
    bounded by the policy file (rule names, modes, reply codes) or by the code."""

    verdicts: Counter[str] = field(default_factory=Counter)  # accepted | rejected | emergency | error
    # (rule, mode, "deny" | "warn"): every finding, in every mode, in accepted and refused calls
    findings: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    rejections: Counter[tuple[str, int]] = field(default_factory=Counter)  # (rule that refused, status)
    penalised: Counter[str] = field(default_factory=Counter)  # rule -> subjects it put in the penalty box
    hook_errors: Counter[str] = field(default_factory=Counter)  # rule -> its call_ended hook raised
    store_unavailable: int = 0  # calls judged while the shared store did not answer


@dataclass(slots=True)
class _Challenge:
    """A call the PBX challenged, waiting for the caller to send it again with credentials."""

    at: float
    history: LiveRecord | None
    # what the rules reading the history found of its first INVITE, (rule, detail): the
    # retry is the same call, and the history already holds it, so they are not asked again
    history_warnings: tuple[tuple[str, str], ...] = ()
    # the rate and quota keys its first INVITE counted: the retry counts only others (an
    # account its credentials name, a caller or callee it changed)
    counted: frozenset[str] = frozenset()


@dataclass(slots=True)
class _LiveCall:
    """A forwarded call whose rules want to hear how it ends (not its request: too big to keep)."""

    call_id: str
    account: str | None
    caller: str | None
    callee: str | None
    source_host: str
    started_at: float
    wall_time: float
    rules: tuple[tuple[Policy[Any], RuleConfig], ...]
    answered_at: float | None = None


class PolicyEngine:
    def __init__(
        self, policy: CompiledPolicy, store: StateStore | None = None, *, wall_offset: float = 0.0
    ) -> None:
        self.policy = policy
        # CallAttempt.now is monotonic; now + wall_offset is the wall clock (epoch seconds),
        # set by the adapter that owns the clocks (and shifted by tests and what-if replays).
        self.wall_offset = wall_offset
        self.live: dict[str, _LiveCall] = {}  # by attempt id, for the rules' outcome hooks
        self.history = CallHistory(policy.history)
        self.store: StateStore = store or MemoryStore(slot_lease=policy.local_slot_lease)
        self.held: dict[str, tuple[str, ...]] = {}
        # Call-ID -> attempt id of each emergency call up now (for the flood guard: a ban
        # must not cut one short); bounded by the live calls, each of which ends once
        self.emergency_calls: dict[str, str] = {}
        self.counters = PolicyCounters()
        self.decisions = DecisionMemory(policy.admin.recent_calls)  # for sipguard explain and status
        self._accounts_by_host: dict[str, Account | None] = {}
        self._background: set[asyncio.Future[None]] = set()
        # where calls are counted while a shared store is unreachable (fail_mode: open); it
        # holds the slots of every live call of this instance, the shared store's mirrored,
        # so that the limits count them all while it is away
        self.local: MemoryStore = (
            self.store
            if isinstance(self.store, MemoryStore)
            else MemoryStore(slot_lease=policy.local_slot_lease)
        )
        self.held_locally: set[str] = set()
        self._planned: dict[str, _Plan] = {}  # judged by decide_now, waiting for decide
        # by (Call-ID, From tag, source host): calls the PBX challenged, counted already
        self._challenged: dict[tuple[str, str, str], _Challenge] = {}
        self._retries: set[str] = set()  # live calls that are a challenged call sent again
        # by attempt id: the Warn findings of rules reading the history, for a challenged retry
        self._history_warnings: dict[str, tuple[tuple[str, str], ...]] = {}
        # by attempt id: the rate and quota keys each live call counted, should the PBX challenge it
        self._counted: dict[str, frozenset[str]] = {}
        # Given each judged call's call.decision fields whatever the log level (what-if replay)
        self.on_decision: Callable[[dict[str, Any]], None] | None = None

    def replace(self, policy: CompiledPolicy) -> None:
        """Apply a reloaded policy to new INVITEs; held slots and counters stay."""
        self.policy = policy
        self._accounts_by_host.clear()
        self.history.configure(policy.history)

    # -- DecisionHook -------------------------------------------------------------------------
    def decide_now(self, attempt: CallAttempt) -> Verdict | None:
        plan = self._plan(attempt)
        if plan.final is not None:
            return plan.final
        results = self.store.check_and_take_now(
            attempt.attempt_id, plan.operations, attempt.now, blocked=plan.blocked
        )
        if results is None:  # a remote store: ``decide`` will be awaited, with this plan
            self._planned[attempt.attempt_id] = plan
            return None
        return self._finish(plan, results)

    async def decide(self, attempt: CallAttempt) -> Verdict:
        plan = self._planned.pop(attempt.attempt_id, None) or self._plan(attempt)
        if plan.final is not None:
            return plan.final
        try:
            results = await self.store.check_and_take(
                attempt.attempt_id, plan.operations, attempt.now, blocked=plan.blocked
            )
        except StoreUnavailableError as error:
            return self._degraded(plan, str(error))
        verdict = self._finish(plan, results)
        if self.local is not self.store:
            self._mirror(plan)
        return verdict

    def _mirror(self, plan: _Plan) -> None:
        """What the shared store just counted of this instance's call, counted in the local
        store too: its slots held, its rate hits, its quota use. While the shared store is
        away (fail_mode: open) the local count then starts from this instance's own
        traffic, not from nothing: a dialer gets no fresh burst, a customer over a daily
        quota no fresh quota, with each outage."""
        attempt = plan.attempt
        admitted = attempt.attempt_id in self.held
        slot_keys = self.held.get(attempt.attempt_id)
        if slot_keys:
            self.local.hold(attempt.attempt_id, slot_keys, attempt.now)
        counted = [op for op in plan.operations if not isinstance(op, TakeSlot)]
        if counted:  # (never stricter than the shared store: this instance's calls are among its)
            self.local.check_and_take_now(attempt.attempt_id, counted, attempt.now, blocked=not admitted)

    def _degraded(self, plan: _Plan, error: str) -> Verdict:
        """The shared store is away: rules that fail closed refuse the call; the others
        count on this instance alone (a local store), so limits still hold per instance."""
        self.counters.store_unavailable += 1
        closed = sorted({op.rule for op in plan.operations if plan.configs[op.rule].fails_closed})
        if closed and not plan.blocked:  # (a call another rule refused keeps that rule's answer)
            self.counters.verdicts["error"] += 1
            detail = f"the shared state store is unreachable ({error}); {', '.join(closed)} fail closed"
            self._remember(plan, "reject", "state", detail, (), code=503)
            log.warning(
                "state.unavailable", call_id=plan.attempt.request.call_id, error=error, refused_by=closed
            )
            return Reject(status=503, reason="Service Unavailable", headers=(("Retry-After", "5"),))
        log.warning("state.unavailable", call_id=plan.attempt.request.call_id, error=error, counted="locally")
        results = self.local.check_and_take_now(
            plan.attempt.attempt_id, plan.operations, plan.attempt.now, blocked=plan.blocked
        )
        verdict = self._finish(plan, results)
        slot_keys = self.held.get(plan.attempt.attempt_id)
        if slot_keys:
            self.held_locally.add(plan.attempt.attempt_id)
            # and in the shared store from its next lease renewal Redis answers: once it is
            # back, the other instances count this call too, not only this one
            self.store.hold(plan.attempt.attempt_id, slot_keys, plan.attempt.now)
        return verdict

    def call_answered(self, event: CallAnswered) -> None:
        self.history.call_answered(event.call.attempt_id, event.now)
        self.decisions.answered(event.call.attempt_id, event.now)
        live = self.live.get(event.call.attempt_id)
        if live is not None:
            live.answered_at = event.now

    def call_ended(self, event: CallEnded) -> None:
        attempt_id = event.call.attempt_id
        if self._challenged_once(event):
            self._expect_retry(event, self.history.call_challenged(attempt_id))
        else:
            self.history.call_ended(attempt_id, event.now, event.by_caller)
        self._retries.discard(attempt_id)
        self._history_warnings.pop(attempt_id, None)
        self._counted.pop(attempt_id, None)
        if self.emergency_calls.get(event.call.call_id) == attempt_id:
            del self.emergency_calls[event.call.call_id]
        self.decisions.ended(event)
        live = self.live.pop(event.call.attempt_id, None)
        if live is not None:
            self._tell_rules(live, event)
        keys = self.held.pop(event.call.attempt_id, None)
        if keys:
            if self.local is not self.store:  # counted there (the shared store was away), or mirrored
                self.local.release(attempt_id, keys, event.now)
            self.held_locally.discard(attempt_id)
            self._in_background(self.store.release(attempt_id, keys, event.now))

    def _challenged_once(self, event: CallEnded) -> bool:
        """A call the rules counted, refused by the PBX asking for credentials. Only the
        first challenge: a retry challenged again (wrong credentials) does not make the
        next INVITE free, or password guessing in one Call-ID would never be counted."""
        attempt_id = event.call.attempt_id
        return (
            event.reason is EndReason.REJECTED
            and event.status in CHALLENGES
            and attempt_id in self.held
            and attempt_id not in self._retries
        )

    def _expect_retry(self, event: CallEnded, history: LiveRecord | None) -> None:
        if len(self._challenged) >= MAX_CHALLENGES:  # callers that never retried (scanners)
            expired = event.now - CHALLENGE_RETRY_WINDOW
            self._challenged = {key: c for key, c in self._challenged.items() if c.at >= expired}
            if len(self._challenged) >= MAX_CHALLENGES // 2:  # a flood: not worth a pass each time
                self._challenged.clear()
        call = event.call
        findings = self._history_warnings.get(call.attempt_id, ())
        counted = self._counted.get(call.attempt_id, frozenset())
        self._challenged[(call.call_id, call.from_tag, unmapped(call.source.host))] = _Challenge(
            event.now, history, findings, counted
        )

    def _retry_of(self, attempt: CallAttempt) -> _Challenge | None:
        """The challenge this INVITE answers, if it is a challenged call sent again."""
        request = attempt.request
        # (the retry may come over TCP, grown past the MTU with its credentials: RFC 3261 §18.1.1)
        key = (request.call_id, request.from_.tag or "", unmapped(attempt.source.host))
        challenge = self._challenged.pop(key, None)
        if challenge is None or attempt.now - challenge.at > CHALLENGE_RETRY_WINDOW:
            return None
        return challenge

    def _tell_rules(self, live: _LiveCall, event: CallEnded) -> None:
        outcome = CallOutcome(
            attempt_id=event.call.attempt_id,
            call_id=live.call_id,
            account=live.account,
            caller=live.caller,
            callee=live.callee,
            source_host=live.source_host,
            started_at=live.started_at,
            answered_at=event.answered_at if event.answered_at is not None else live.answered_at,
            ended_at=event.now,
            wall_time=live.wall_time,
            reason=event.reason.value,
            status=event.status,
            by_caller=event.by_caller,
        )
        operations: list[Operation] = []
        for rule, config in live.rules:
            try:
                operations += rule.call_ended(outcome, config)
            except Exception:  # a rule's bug (a third-party one's) must not keep the call's slots
                self.counters.hook_errors[rule.name] += 1
                log.exception("policy.error", call_id=live.call_id, rule=rule.name)
        if operations:
            self._record(event.call.attempt_id, operations, event.now)

    def _penalise(self, verdict: Deny, rule: str, now: float, call_id: str) -> None:
        until = now + verdict.penalty_seconds
        for key in verdict.penalise:
            self.history.penalise(key, until, rule, verdict.detail, now=now)
        self.counters.penalised[rule] += len(verdict.penalise)
        log.warning("penalty.boxed", rule=rule, subjects=list(verdict.penalise),
                    seconds=verdict.penalty_seconds, reason=verdict.detail, call_id=call_id)  # fmt: skip

    def _record(self, attempt_id: str, operations: list[Operation], now: float) -> None:
        usage = [op for op in operations if isinstance(op, UseQuota)]
        if self.local is not self.store:  # counted there (the shared store was away), or mirrored
            self.local.record(usage, now)
        if attempt_id not in self.held_locally:
            self._in_background(self.store.record(usage, now))

    def follow_wall_clock(self, wall_offset: float) -> None:
        """The adapter's wall clock against ``CallAttempt.now``, read again (a stepped clock)."""
        self.wall_offset = wall_offset

    async def close(self) -> None:
        """Stopping: let the store writes no call waits for finish (the releases of calls
        that just ended, talk time; each bounded by the store's timeout), then close a
        shared store. Else those slots would stay taken in Redis for a whole lease."""
        await asyncio.gather(*self._background, return_exceptions=True)
        close = getattr(self.store, "close", None)
        if close is not None:  # a shared store's connections and lease renewal
            await close()

    def _in_background(self, pending: Awaitable[None] | None) -> None:
        """A remote store's write that no call waits for (a release, talk time)."""
        if pending is not None:
            task = asyncio.ensure_future(pending)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # -- judging --------------------------------------------------------------------------------
    def _plan(self, attempt: CallAttempt) -> _Plan:
        request = attempt.request
        policy = self.policy
        # RFC 3325: identity a customer asserts is not believed beyond sipguard, whichever
        # rules run; caller_id's strip_untrusted_identity: false is the one way to keep it.
        plan = _Plan(attempt, None, {}, [], [], False, UNTRUSTED_IDENTITY_HEADERS + FORGEABLE_HEADERS)
        if not policy.rules:  # no rules configured: a plain proxy
            self.counters.verdicts["accepted"] += 1
            plan.final = ACCEPT
            self.decisions.forwarded(self._remember(plan, "accept", None, "no rules configured", ()))
            return plan
        try:
            account = self._account_for(attempt.source.host, request)
            region = account.region if account else policy.region
            if policy.emergency.matches(request.uri, region):
                self.counters.verdicts["emergency"] += 1
                decision = self._remember(plan, "emergency", None, None, (), account=account)
                self.decisions.forwarded(decision)
                log.info("call.emergency", **decision.fields())
                self.emergency_calls[request.call_id] = attempt.attempt_id
                plan.final = self._emergency_verdict(request, region, account)
                return plan
            identities = self._identities(request, region, account.numbers if account else None)
        except ParseError as error:
            plan.final = Reject(status=400, reason=error.reason)
            self.counters.verdicts["rejected"] += 1
            self.counters.rejections[("parse", 400)] += 1
            self._log(self._remember(plan, "reject", "parse", error.reason, (), code=400))
            return plan
        callee_digits = dialled_digits(request.uri)
        rules = policy.account_rules.get(account.name, policy.rules) if account else policy.rules
        reads_history = any(rule.uses_history for rule, _ in rules)
        plan.context = context = CallContext(
            attempt_id=attempt.attempt_id,
            call_id=request.call_id,
            now=attempt.now,
            wall_time=attempt.now + self.wall_offset,
            source_host=unmapped(attempt.source.host),  # one per-source counter per peer
            account=account,
            identities=identities,
            caller=_caller(identities),
            callee=normalise(callee_digits, region).e164 if callee_digits else None,
            callee_presented=str(request.uri),
            request=request,
            history=self.history if reads_history else None,
            region=region,
        )
        if reads_history:
            plan.history_keys = _subjects(context)
        plan.retry = self._retry_of(attempt)
        plan.hooked = tuple(
            (rule, config) for rule, config in rules if type(rule).call_ended is not Policy.call_ended
        )
        for rule, config in rules:
            name = rule.name
            plan.configs[name] = config
            if isinstance(config, CallerIdConfig) and not config.strip_untrusted_identity:
                plan.strip = FORGEABLE_HEADERS  # the operator chose to pass customers' assertions on
            if plan.retry is not None and rule.uses_history:  # judged at its first INVITE already
                found = [finding for finding in plan.retry.history_warnings if finding[0] == name]
                plan.warnings += found
                plan.history_warnings += found
                continue
            verdict = rule.check(context, config)
            if isinstance(verdict, Deny):
                plan.denials.append((name, verdict.detail))
                plan.blocked |= config.mode is Mode.ENFORCE
                if verdict.penalise:  # in every mode: monitor goes on logging what it would refuse
                    self._penalise(verdict, name, attempt.now, request.call_id)
            elif isinstance(verdict, Warn):
                plan.warnings.append((name, verdict.detail))
                if rule.uses_history:
                    plan.history_warnings.append((name, verdict.detail))
            elif isinstance(verdict, Require):
                plan.operations += _owned(verdict.operations, rule, config)
                if verdict.max_duration is not None and config.mode is Mode.ENFORCE:
                    limits = (verdict.max_duration, plan.max_duration or math.inf)
                    plan.max_duration = min(limits)
                if verdict.keepalive is not None and config.mode is Mode.ENFORCE:
                    plan.keepalive = plan.keepalive or verdict.keepalive
        if plan.retry is not None:  # counted at its first INVITE: its slots are to take again
            counted = plan.retry.counted
            plan.operations = [op for op in plan.operations if not (_counts_calls(op) and op.key in counted)]
        return plan

    def _finish(self, plan: _Plan, results: list[OpResult]) -> Verdict:
        configs = plan.configs
        failures = list(plan.denials)
        retry_after: dict[str, float] = {}
        counters: list[tuple[Operation, OpResult]] = []
        for operation, result in zip(plan.operations, results, strict=True):
            counters.append((operation, result))
            if not result.allowed:
                failures.append((operation.rule, f"{operation.label}: {result.count} > {result.limit}"))
            # every bucket of the rule: one that admitted this attempt may be full with it now
            if result.retry_after is not None:
                retry_after[operation.rule] = max(retry_after.get(operation.rule, 0.0), result.retry_after)
        findings = self.counters.findings
        for rule, _ in failures:
            findings[(rule, configs[rule].mode.value, "deny")] += 1
        for rule, _ in plan.warnings:
            findings[(rule, configs[rule].mode.value, "warn")] += 1
        enforced = [(rule, detail) for rule, detail in failures if configs[rule].mode is Mode.ENFORCE]
        if enforced:
            rule, detail = enforced[0]
            others = list(failures)
            others.remove(enforced[0])  # every other failure, whatever its mode, goes to "also"
            reply = configs[rule].reply
            headers: tuple[tuple[str, str], ...] = ()
            if rule in retry_after:
                headers = (("Retry-After", str(max(1, math.ceil(retry_after[rule])))),)
            self.counters.verdicts["rejected"] += 1
            self.counters.rejections[(rule, reply.code)] += 1
            self._log(self._remember(plan, "reject", rule, detail, counters, others, code=reply.code))
            return Reject(status=reply.code, reason=reply.reason, headers=headers)
        attempt_id = plan.attempt.attempt_id
        self.held[attempt_id] = tuple(op.key for op in plan.operations if isinstance(op, TakeSlot))
        if plan.retry is not None:
            self._retries.add(attempt_id)
        if plan.retry is not None and plan.retry.history is not None:
            self.history.call_retried(attempt_id, plan.retry.history)
        elif plan.history_keys and plan.context is not None:
            self.history.call_started(attempt_id, plan.history_keys, plan.context.callee, plan.attempt.now)
        counted = frozenset(op.key for op in plan.operations if _counts_calls(op))
        if counted:  # kept while the call lives, should the PBX challenge it
            self._counted[attempt_id] = counted
        if plan.history_warnings:  # kept while the call lives, should the PBX challenge it
            self._history_warnings[attempt_id] = tuple(plan.history_warnings)
        if plan.hooked and plan.context is not None:
            context = plan.context
            self.live[attempt_id] = _LiveCall(
                call_id=context.call_id,
                account=context.account.name if context.account else None,
                caller=context.caller,
                callee=context.callee,
                source_host=context.source_host,
                started_at=context.now,
                wall_time=context.wall_time,
                rules=plan.hooked,
            )
        tagged = [(rule, detail) for rule, detail in failures if configs[rule].mode is Mode.TAG]
        tagged += [(rule, detail) for rule, detail in plan.warnings if configs[rule].mode is not Mode.MONITOR]
        tags = tuple((TAG_HEADER, f"{rule}; {_header_safe(detail)}") for rule, detail in tagged)
        self.counters.verdicts["accepted"] += 1
        self.decisions.forwarded(self._log(self._remember(plan, "accept", None, None, counters, failures)))
        if not tags and not plan.strip and plan.max_duration is None and plan.keepalive is None:
            return ACCEPT
        return Accept(
            add_headers=tags,
            remove_headers=plan.strip,
            max_duration=plan.max_duration,
            keepalive=plan.keepalive,
        )

    # -- helpers ------------------------------------------------------------------------------------
    def _emergency_verdict(self, request: Request, region: str, account: Account | None) -> Accept:
        """An emergency call passes unjudged, but the emergency service must not be handed
        a callback number its caller does not own: a P-Asserted-Identity or Remote-Party-ID
        naming only numbers the account owns is kept (the callback number), any other is
        removed, and so is a forged X-Sipguard-Tag. Never a refusal: a header that does
        not parse is removed too. caller_id's strip_untrusted_identity: false keeps all."""
        if self._passes_asserted_identity(account):
            return Accept(remove_headers=FORGEABLE_HEADERS)
        owned = account.numbers if account else None
        strip = list(FORGEABLE_HEADERS)
        for header in UNTRUSTED_IDENTITY_HEADERS:
            if not request.has(header):
                continue
            try:
                identities = [
                    self._identity(header, value, region, owned) for value in _name_addrs(request, header)
                ]
            except ParseError:
                identities = []
            if not identities or not all(
                owned is not None and identity.e164 is not None and owned.lists(identity.e164)
                for identity in identities
            ):
                strip.append(header)
        return Accept(remove_headers=tuple(strip))

    def untrusted_headers(self, request: Request, source_host: str) -> tuple[str, ...]:
        """For the core: the headers to remove from a customer's request other than a judged
        INVITE (REGISTER, MESSAGE, REFER..., and every request inside a call, whichever side
        placed it): the identity it asserts, as from its INVITEs; nothing with no rules (a
        plain proxy)."""
        if not self.policy.rules:
            return ()
        try:
            account = self._account_for(source_host, request)
        except ParseError:
            account = None
        if self._passes_asserted_identity(account):
            return FORGEABLE_HEADERS
        return UNTRUSTED_IDENTITY_HEADERS + FORGEABLE_HEADERS

    def _passes_asserted_identity(self, account: Account | None) -> bool:
        """caller_id's strip_untrusted_identity: false, for this account: the operator chose
        to pass its assertions on."""
        policy = self.policy
        rules = policy.account_rules.get(account.name, policy.rules) if account else policy.rules
        return any(
            isinstance(config, CallerIdConfig) and not config.strip_untrusted_identity for _, config in rules
        )

    def is_emergency(self, request: Request, source_host: str) -> bool:
        """Does this INVITE call an emergency number, as ``_plan`` would find? For the
        core and the flood guard, which ask before refusing a call for their own reasons."""
        policy = self.policy
        try:
            account = self._account_for(source_host, request)
        except ParseError:  # e.g. a From that does not parse: the default region
            account = None
        return policy.emergency.matches(request.uri, account.region if account else policy.region)

    def _account_for(self, host: str, request: Request) -> Account | None:
        policy = self.policy
        if host in self._accounts_by_host:
            account = self._accounts_by_host[host]
        else:
            account = _by_network(policy, unmapped(host))  # a [::] listener's IPv4 peers too
            if len(self._accounts_by_host) > 100_000:
                self._accounts_by_host.clear()
            self._accounts_by_host[host] = account
        if account is not None:
            return account
        if policy.auth_usernames:
            username = _auth_username(request)
            if username is not None and username in policy.auth_usernames:
                return policy.accounts[policy.auth_usernames[username]]
        if policy.from_domains:
            uri = request.from_.uri
            name = policy.from_domains.get(getattr(uri, "host", "").lower())
            if name is not None:
                return policy.accounts[name]
        return None

    def _identities(self, request: Request, region: str, owned: NumberSet | None) -> tuple[Identity, ...]:
        identities = [self._identity("from", request.from_, region, owned)]
        for header in _IDENTITY_HEADERS:
            if request.has(header):
                identities += [
                    self._identity(header, value, region, owned) for value in _name_addrs(request, header)
                ]
        return tuple(identities)

    def _identity(self, header: str, value: NameAddr, region: str, owned: NumberSet | None) -> Identity:
        presented = str(value.uri)
        if header == "from" and is_anonymous(value.uri, value.display_name):
            return Identity(header=header, presented=presented, e164=None, anonymous=True)
        digits = caller_digits(value.uri)
        if digits is None:
            return Identity(header=header, presented=presented, e164=None, problem="no telephone number")
        emergency = digits.lstrip("+") in self.policy.emergency.numbers
        e164: str | None = digits  # when the account's own number, in E.164 already
        problem: str | None = None
        if owned is None or not owned.lists(digits):
            number = normalise(digits, region)
            e164, problem = number.e164, number.problem
        # a local number in a global phone-context: the PBX may read its digits alone, as a
        # national number; when they are one, and not owned, that is the number presented
        local = digits_outside_context(value.uri)
        if e164 is not None and local is not None:
            bare = normalise(local, region).e164
            if bare is not None and bare != e164 and (owned is None or bare not in owned):
                e164 = bare
        return Identity(header=header, presented=presented, e164=e164, problem=problem, emergency=emergency)

    def _log(self, decision: Decision) -> Decision:
        """One ``call.decision`` line, written from the record ``sipguard explain`` shows.
        Accepted calls without findings log at debug: in production no line is built."""
        if self.on_decision is not None:
            self.on_decision(decision.fields())
        if decision.verdict == "reject" or decision.also or decision.warnings:
            if log.is_enabled_for(logging.INFO):
                log.info("call.decision", **decision.fields())
        elif log.is_enabled_for(logging.DEBUG):
            log.debug("call.decision", **decision.fields())
        return decision

    def _remember(
        self,
        plan: _Plan,
        verdict: str,
        rule: str | None,
        detail: str | None,
        counters: list[tuple[Operation, OpResult]] | tuple[()],
        others: list[tuple[str, str]] | None = None,
        code: int | None = None,
        *,
        account: Account | None = None,
    ) -> Decision:
        """Record what was decided (references only: formatted when asked)."""
        attempt, context = plan.attempt, plan.context
        warnings = plan.warnings
        also = tuple((name, plan.configs[name].mode.value, text) for name, text in others) if others else ()
        if context is not None:
            decision = Decision(
                attempt.attempt_id, context.call_id, context.now, context.wall_time,
                context.account.name if context.account else None, context.source_host,
                context.identities[0].presented, context.caller, context.callee or context.callee_presented,
                verdict, rule, detail, code, counters, also, warnings,
            )  # fmt: skip
        else:  # not judged by the rules: malformed, an emergency call, no rules
            request = attempt.request
            decision = Decision(
                attempt.attempt_id, request.call_id, attempt.now, attempt.now + self.wall_offset,
                account.name if account else None, attempt.source.host, _presented_caller(request), None,
                str(getattr(request, "uri", "")), verdict, rule, detail, code, counters, also, warnings,
            )  # fmt: skip
        self.decisions.record(decision)
        return decision


def _owned(operations: tuple[Operation, ...], rule: Policy[Any], config: RuleConfig) -> list[Operation]:
    """Stamp each operation with its rule and whether it is enforced (cheap when already right)."""
    enforced = config.mode is Mode.ENFORCE
    return [
        op
        if op.rule == rule.name and op.enforced == enforced
        else replace(op, rule=rule.name, enforced=enforced)
        for op in operations
    ]


def _counts_calls(operation: Operation) -> bool:
    """A rate hit or a quota of calls: what a call adds once, unlike a slot it holds."""
    return isinstance(operation, HitRate) or (isinstance(operation, UseQuota) and operation.amount > 0)


def _subjects(context: CallContext) -> tuple[str, ...]:
    """The history's keys for a call: its caller number and its account."""
    keys = (f"num:{context.caller}",) if context.caller else ()
    return (*keys, f"acct:{context.account.name}") if context.account else keys


def _caller(identities: tuple[Identity, ...]) -> str | None:
    """The number the call is made from: the From's, else an asserted or preferred one."""
    for header in ("from", "p-preferred-identity", "p-asserted-identity"):
        for identity in identities:
            if identity.header == header and identity.e164 is not None:
                return identity.e164
    return None


def _presented_caller(request: Request) -> str | None:
    """The From URI as sent, for a call the rules did not judge (it may be what was malformed)."""
    try:
        return str(request.from_.uri)
    except ParseError:
        return None


def _name_addrs(request: Request, header: str) -> tuple[NameAddr, ...]:
    if header == "p-asserted-identity":
        return request.p_asserted_identities
    if header == "p-preferred-identity":
        return request.p_preferred_identities
    return request.remote_party_ids


def _auth_username(request: Request) -> str | None:
    """The one digest username the request's credentials name, or None when they name none
    or several: the PBX verifies the credentials of its own realm, in Authorization or
    Proxy-Authorization, and that may be any of them. ``username*`` (RFC 7616) stays
    encoded, so it is never an account's name, and next to a plain one it is a second."""
    names = {
        text
        for header in ("proxy-authorization", "authorization")
        for value in request.values(header)
        for name, text in credential_params(value)
        if name in ("username", "username*")
    }
    return names.pop() if len(names) == 1 else None


def _by_network(policy: CompiledPolicy, host: str) -> Account | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    for network, name in policy.networks:
        if address.version == network.version and address in network:
            return policy.accounts[name]
    return None


def _header_safe(text: str) -> str:
    return re.sub(r"[\r\n\x00]", " ", text)[:200]
