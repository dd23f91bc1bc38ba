"""dialer — AUP: auto-dialing "in an abusive manner", use "inconsistent with typical
human operation", bulk calling. A dialer that stays under every per-minute rate still
looks nothing like a person; these signatures see it.

Six signatures, each measured per caller number and/or per account over the recent
calls the engine records (proxy/state/history.py):

- sequential: a run of numerically adjacent callees (…0100, …0101, …0102);
- bulk: distinct callees in the window;
- short_calls: share of answered calls shorter than ``short_call_seconds`` (< 30 s is
  the industry's red flag);
- answer_seizure: answered / attempted, below a floor (a dialer burns through numbers
  nobody answers);
- abandonment: answered calls the caller hangs up within ``abandoned_call_seconds`` (the
  predictive dialer's "drop" when no agent is free; US rule: at most 3 % of answered);
- pacing: new calls a second or two after the previous hang-up, with gaps so regular
  (low coefficient of variation) that no person dials like that.

Each has a warning and a critical threshold (OpenSIPS fraud_detection's model). Warning
logs the call and tags it for the PBX. Critical refuses it and puts the number (or the
account) in the penalty box for ``penalty_seconds``, during which every new call gets
the rule's reply. Ratios and pacing need ``min_calls`` samples first, so one unlucky
minute never blocks a person.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

from pydantic import BaseModel, Field

from proxy.state.history import HistorySettings, SubjectHistory

from .base import ALLOW, SETTINGS, CallContext, Deny, Policy, Reply, RuleConfig, Verdict, Warn

Scope = Literal["number", "account"]


class _Signature(BaseModel):
    model_config = SETTINGS

    warning: float | None = None
    critical: float | None = None
    # Per caller number by default. "account" judges the account's calls together (and a
    # critical finding boxes the whole account): for accounts that are one dialer.
    scopes: tuple[Scope, ...] = ("number",)


class SequentialSignature(_Signature):
    """Thresholds are run lengths: adjacent callees dialled one after another."""

    warning: float | None = 4
    critical: float | None = 8


class BulkSignature(_Signature):
    """Thresholds are distinct callees in the window (an account's agents together reach
    many people legitimately: scope ``account`` needs thresholds of its own)."""

    warning: float | None = 60
    critical: float | None = 150


class _RatioSignature(_Signature):
    min_calls: int = Field(default=20, ge=1, description="calls in the window before the ratio counts")


class ShortCallsSignature(_RatioSignature):
    """Thresholds are the share (0-1) of answered calls that were short."""

    warning: float | None = Field(default=0.7, ge=0, le=1)
    critical: float | None = Field(default=0.9, ge=0, le=1)


class AnswerSeizureSignature(_RatioSignature):
    """Thresholds are floors: answered / attempted at or below them trips."""

    warning: float | None = Field(default=0.2, ge=0, le=1)
    critical: float | None = Field(default=0.08, ge=0, le=1)
    min_calls: int = Field(default=30, ge=1)


class AbandonmentSignature(_RatioSignature):
    """Thresholds are the share of answered calls the caller dropped at once."""

    warning: float | None = Field(default=0.03, ge=0, le=1)
    critical: float | None = Field(default=0.10, ge=0, le=1)


class PacingSignature(_RatioSignature):
    """Thresholds are floors of the gaps' coefficient of variation (stdev / mean): a
    person's gaps vary (CV well above 0.5); a machine's barely do."""

    max_gap: float = Field(default=3.0, gt=0, description="mean seconds from hang-up to next call, at most")
    warning: float | None = Field(default=0.25, ge=0)
    critical: float | None = Field(default=0.1, ge=0)
    min_calls: int = Field(default=10, ge=2)


class DialerConfig(RuleConfig):
    reply: Reply = Reply(code=403, reason="Automated dialing not permitted")
    penalty_seconds: float = Field(default=900.0, gt=0, description="time in the penalty box")
    # How calls are measured (the same for every account: the history measures each call once)
    window: float = Field(default=3600.0, gt=0, description="seconds of calls the signatures look at")
    short_call_seconds: float = Field(default=30.0, gt=0)
    abandoned_call_seconds: float = Field(default=2.0, gt=0)
    # Each signature: null turns it off
    sequential: SequentialSignature | None = SequentialSignature()
    bulk: BulkSignature | None = BulkSignature()
    short_calls: ShortCallsSignature | None = ShortCallsSignature()
    answer_seizure: AnswerSeizureSignature | None = AnswerSeizureSignature()
    abandonment: AbandonmentSignature | None = AbandonmentSignature()
    pacing: PacingSignature | None = PacingSignature()

    @property
    def signatures(self) -> tuple[_Signature, ...]:
        """The signatures turned on."""
        every = (
            self.sequential,
            self.bulk,
            self.short_calls,
            self.answer_seizure,
            self.abandonment,
            self.pacing,
        )
        return tuple(signature for signature in every if signature is not None)

    @cached_property
    def judges_accounts(self) -> bool:
        """Whether any signature looks at accounts (most setups: none; skip the work)."""
        return any("account" in signature.scopes for signature in self.signatures)


class DialerPolicy(Policy[DialerConfig]):
    name = "dialer"
    Config = DialerConfig
    description = "auto-dialer signatures: sequential, bulk, short calls, ASR, abandonment, pacing"
    uses_history = True  # kept in this instance's memory, not in the state store

    def keeps_counters(self, config: DialerConfig) -> bool:
        return False

    def history_settings(self, config: DialerConfig) -> HistorySettings:
        pacing = config.pacing.min_calls if config.pacing else 0
        return HistorySettings(
            window=config.window,
            short_call=config.short_call_seconds,
            abandoned_call=config.abandoned_call_seconds,
            pacing_samples=max(20, pacing),
        )

    def check(self, call: CallContext, config: DialerConfig) -> Verdict:
        history = call.history
        if history is None:
            return ALLOW
        now = call.now
        subjects: list[tuple[Scope, str, str]] = []
        if call.caller is not None:
            subjects.append(("number", f"num:{call.caller}", call.caller))
        if call.account is not None:
            subjects.append(("account", f"acct:{call.account.name}", f"account {call.account.name}"))
        for _, key, label in subjects:
            penalty = history.penalty(key, now)
            if penalty is not None:
                return Deny(f"{label} in the penalty box {penalty.until - now:.0f} s more: {penalty.reason}")
        callee = int(call.callee[1:]) if call.callee and call.callee[1:].isdigit() else None
        critical: list[str] = []
        boxed: list[str] = []
        warnings: list[str] = []
        for scope, key, label in subjects:
            if scope == "account" and not config.judges_accounts:
                continue
            subject = history.subject(key, now)
            if subject is None:
                continue  # a first call has no pattern
            for finding, level in _findings(subject, scope, callee, now, config):
                if level == "critical":
                    critical.append(f"{label}: {finding}")
                    if key not in boxed:
                        boxed.append(key)
                else:
                    warnings.append(f"{label}: {finding}")
        if critical:
            return Deny("; ".join(critical), penalise=tuple(boxed), penalty_seconds=config.penalty_seconds)
        if warnings:
            return Warn("; ".join(warnings))
        return ALLOW

    def warnings(self, config: DialerConfig) -> list[str]:
        if not config.signatures:
            return ["dialer has every signature turned off: it only enforces penalties already given"]
        return []


def _findings(
    subject: SubjectHistory, scope: Scope, callee: int | None, now: float, config: DialerConfig
) -> list[tuple[str, str]]:
    """(what was seen, "warning" | "critical") for each signature this call trips. On the
    hot path: the measures are O(1) reads, and text is only built for what trips."""
    found: list[tuple[str, str]] = []
    sequential = config.sequential
    if sequential is not None and scope in sequential.scopes:
        run = subject.run_with(callee)
        if level := _level(sequential, run):
            found.append(_finding(sequential, level, f"sequential {run} adjacent callees in a row"))
    bulk = config.bulk
    if bulk is not None and scope in bulk.scopes:
        distinct = len(subject.callees) + subject.is_new_callee(callee)
        if level := _level(bulk, distinct):
            text = f"bulk {distinct} distinct callees in {config.window:g} s"
            found.append(_finding(bulk, level, text))
    answered = subject.answered
    short_calls = config.short_calls
    if short_calls is not None and scope in short_calls.scopes and answered >= short_calls.min_calls:
        ratio = subject.short / answered
        if level := _level(short_calls, ratio):
            text = (
                f"short calls {ratio:.0%} of {answered} answered calls under {config.short_call_seconds:g} s"
            )
            found.append(_finding(short_calls, level, text))
    seizure = config.answer_seizure
    if seizure is not None and scope in seizure.scopes and subject.ended >= seizure.min_calls:
        ratio = answered / subject.ended
        if level := _level(seizure, ratio, floor=True):
            text = f"answer-seizure ratio {ratio:.0%} of {subject.ended} calls"
            found.append(_finding(seizure, level, text, floor=True))
    abandonment = config.abandonment
    if abandonment is not None and scope in abandonment.scopes and answered >= abandonment.min_calls:
        ratio = subject.abandoned / answered
        if level := _level(abandonment, ratio):
            text = f"abandonment {ratio:.0%} of {answered} answered calls dropped by the caller"
            found.append(_finding(abandonment, level, text))
    pacing = config.pacing
    if pacing is not None and scope in pacing.scopes:
        gap = now - subject.last_hangup if subject.last_hangup is not None else None
        samples, mean, variation = subject.gap_stats_with(gap)
        regular = samples >= pacing.min_calls and mean <= pacing.max_gap
        if regular and (level := _level(pacing, variation, floor=True)):
            text = f"pacing next call {mean:.1f} s after hang-up on average, variation {variation:.2f}"
            found.append(_finding(pacing, level, text, floor=True))
    return found


def _level(signature: _Signature, value: float, floor: bool = False) -> str | None:
    """The worst threshold ``value`` reaches: at or above it, or at or below for a floor."""
    for level, threshold in (("critical", signature.critical), ("warning", signature.warning)):
        if threshold is not None and (value <= threshold if floor else value >= threshold):
            return level
    return None


def _finding(signature: _Signature, level: str, seen: str, floor: bool = False) -> tuple[str, str]:
    threshold = signature.critical if level == "critical" else signature.warning
    return f"{seen} ({level} {'≤' if floor else '≥'} {threshold:g})", level
