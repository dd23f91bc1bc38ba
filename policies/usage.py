"""usage — AUP: "continual, uninterrupted or consistently excessive use".

- Quotas of calls and of answered minutes, per day and per month, per caller number and
  per account. A call is refused once a total has reached its limit; talk time is
  added when a call ends (to the period the call started in). Periods begin at
  midnight in ``timezone``. Totals live in the state store (shared through Redis), one
  counter per subject and period, kept until the period is over.
- A maximum call duration: once answered, a call may last ``max_call_duration``
  seconds, then sipguard ends it with a BYE to both sides (the proxy core has the
  dialog's route set, tags and CSeqs from call tracking).
- A keepalive (off unless configured): once answered, sipguard sends each party an
  in-dialog OPTIONS every ``interval``; a party that misses ``failed_limit`` in a row
  (no answer within ``timeout``, or 408 / 481) has vanished, and the call is ended the
  same way, so its slots and minutes stop counting (a phone that lost power never
  sends BYE).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field, field_validator, model_validator

from proxy.sip.events import Keepalive
from proxy.state import UseQuota

from .base import (
    ALLOW,
    SETTINGS,
    CallContext,
    CallOutcome,
    Policy,
    Reply,
    Require,
    RuleConfig,
    Verdict,
    is_time_zone,
)

PERIODS = ("day", "month")
MARGIN = 3600.0  # a total outlives its period by this much (clock skew between instances)
# A probe's answer comes back in well under a second from a live party; over UDP ten
# seconds are five sends (0, 0.5, 1.5, 3.5, 7.5 s), so one lost datagram is never a miss.
# Kamailio waits tm's fr_timer (30 s by default) as long as its shortest interval: a
# third of the interval ends a vanished party's call 20 s sooner.
PROBE_TIMEOUT = 10.0


class QuotaLimits(BaseModel):
    model_config = SETTINGS

    per_number: int | None = Field(default=None, ge=1, description="for each caller number")
    per_account: int | None = Field(default=None, ge=1, description="for the whole account")


class KeepaliveConfig(BaseModel):
    """In-dialog OPTIONS probes of both parties of an answered call. The defaults:
    Kamailio's dialog module probes no more often than every 30 s (the floor of its
    ka_interval), and by default ends a call at the first failed probe (ka_failed_limit
    1), which one lost UDP burst or a busy PBX turns into a dropped call; three in a row
    means a party silent for a minute and a half."""

    model_config = SETTINGS

    interval: float = Field(default=30.0, ge=1, description="seconds between probes of each party")
    failed_limit: int = Field(
        default=3, ge=1, description="probes in a row a party may miss (unanswered, 408, 481); then BYE"
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        description=f"seconds a probe waits for its answer ({PROBE_TIMEOUT:g}, or the interval)",
    )

    @model_validator(mode="after")
    def _over_before_the_next(self) -> KeepaliveConfig:
        if self.timeout is not None and self.timeout > self.interval:
            raise ValueError(
                f"timeout ({self.timeout:g} s) is longer than interval ({self.interval:g} s): "
                "a probe must be over before the next one is due"
            )
        return self

    @cached_property
    def settings(self) -> Keepalive:
        """What the proxy core is given (one object for every call this config judges)."""
        timeout = self.timeout if self.timeout is not None else min(PROBE_TIMEOUT, self.interval)
        return Keepalive(interval=self.interval, failed_limit=self.failed_limit, timeout=timeout)


class UsageConfig(RuleConfig):
    reply: Reply = Reply(code=403, reason="Usage limit reached")
    max_call_duration: float | None = Field(
        default=None, gt=0, description="seconds an answered call may last; then BYE to both sides"
    )
    timezone: str = Field(default="UTC", description="where days and months begin (IANA name)")
    calls_per_day: QuotaLimits | None = None
    calls_per_month: QuotaLimits | None = None
    minutes_per_day: QuotaLimits | None = Field(default=None, description="answered minutes")
    minutes_per_month: QuotaLimits | None = None
    keepalive: KeepaliveConfig | None = Field(
        default=None, description="probe both parties of answered calls; end calls whose party vanished"
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        if not is_time_zone(value):
            raise ValueError(f"unknown time zone {value!r} (an IANA name: UTC, America/New_York)")
        return value


class UsagePolicy(Policy[UsageConfig]):
    name = "usage"
    Config = UsageConfig
    description = (
        "excessive use: daily and monthly quotas of calls and minutes, maximum call duration, keepalive"
    )

    def check(self, call: CallContext, config: UsageConfig) -> Verdict:
        subjects = _subjects(call.caller, call.account.name if call.account else None)
        operations: list[UseQuota] = []
        for period in PERIODS:
            calls, minutes = _quotas(config, period)
            if calls is None and minutes is None:
                continue
            name, ttl = _period(call.wall_time, config.timezone, period)
            for kind, subject, label in subjects:
                if calls is not None and (limit := getattr(calls, kind)) is not None:
                    key, what = f"quota:calls:{name}:{subject}", f"calls this {period} {label}"
                    operations.append(UseQuota(key=key, limit=limit, amount=1, ttl=ttl, label=what,
                                               rule=self.name, enforced=config.enforced))  # fmt: skip
                if minutes is not None and (limit := getattr(minutes, kind)) is not None:
                    key, what = f"quota:secs:{name}:{subject}", f"seconds talked this {period} {label}"
                    operations.append(UseQuota(key=key, limit=limit * 60, amount=0, ttl=ttl, label=what,
                                               rule=self.name, enforced=config.enforced))  # fmt: skip
        keepalive = config.keepalive.settings if config.keepalive is not None else None
        if not operations and config.max_call_duration is None and keepalive is None:
            return ALLOW
        return Require(tuple(operations), max_duration=config.max_call_duration, keepalive=keepalive)

    def call_ended(self, outcome: CallOutcome, config: UsageConfig) -> tuple[UseQuota, ...]:
        seconds = math.ceil(outcome.talk_time)
        if not seconds:
            return ()
        usage: list[UseQuota] = []
        for period in PERIODS:
            minutes = _quotas(config, period)[1]
            if minutes is None:
                continue
            # counted in the period the call started in, and kept as long as its totals
            name, ttl = _period(outcome.wall_time, config.timezone, period)
            ttl = max(MARGIN, ttl - (outcome.ended_at - outcome.started_at))
            for kind, subject, _ in _subjects(outcome.caller, outcome.account):
                if (limit := getattr(minutes, kind)) is not None:
                    key = f"quota:secs:{name}:{subject}"
                    usage.append(UseQuota(key=key, limit=limit * 60, amount=seconds, ttl=ttl))
        return tuple(usage)

    def account_overrides(self, limits: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        if "max_call_duration" in limits:
            overrides["max_call_duration"] = limits["max_call_duration"]
        for shorthand, setting, kind in (
            ("calls_per_day", "calls_per_day", "per_account"),
            ("calls_per_day_per_number", "calls_per_day", "per_number"),
            ("minutes_per_day", "minutes_per_day", "per_account"),
            ("minutes_per_day_per_number", "minutes_per_day", "per_number"),
        ):
            if shorthand in limits:
                base = overrides.get(setting) or settings.get(setting) or {}
                overrides[setting] = {**dict(base), kind: limits[shorthand]}
        return overrides

    def keeps_counters(self, config: UsageConfig) -> bool:
        """Quotas are counters; max_call_duration and keepalive alone keep none."""
        quotas = (*_quotas(config, "day"), *_quotas(config, "month"))
        limits = [(quota.per_number, quota.per_account) for quota in quotas if quota is not None]
        return any(limit is not None for pair in limits for limit in pair)

    def warnings(self, config: UsageConfig) -> list[str]:
        quotas = (*_quotas(config, "day"), *_quotas(config, "month"))
        unset = config.max_call_duration is None and config.keepalive is None
        if unset and all(quota is None for quota in quotas):
            return [
                "usage has no limit set (max_call_duration, calls_per_*, minutes_per_*, keepalive): "
                "it never fires"
            ]
        return []

    def describe(self, config: UsageConfig) -> list[str]:
        if config.keepalive is None:
            return []
        probes = config.keepalive.settings
        worst = probes.interval * probes.failed_limit + probes.timeout
        return [
            f"keepalive: OPTIONS to both parties every {probes.interval:g} s once answered; "
            f"{probes.failed_limit} in a row unanswered within {probes.timeout:g} s (or 408/481) "
            f"end the call, at most {worst:g} s after a party vanished"
        ]


def _quotas(config: UsageConfig, period: str) -> tuple[QuotaLimits | None, QuotaLimits | None]:
    """The (calls, minutes) limits of a period."""
    if period == "day":
        return config.calls_per_day, config.minutes_per_day
    return config.calls_per_month, config.minutes_per_month


def _subjects(caller: str | None, account: str | None) -> list[tuple[str, str, str]]:
    """(QuotaLimits field, key part, label) for the caller number and the account."""
    subjects = [("per_number", f"num:{caller}", f"from {caller}")] if caller else []
    if account:
        subjects.append(("per_account", f"acct:{account}", f"of {account}"))
    return subjects


# (timezone, period) -> (name, start, end) of the period seen last: calls come in order,
# so nearly every call reuses it (datetime arithmetic in a zone costs ~6 us a call)
_PERIODS: dict[tuple[str, str], tuple[str, float, float]] = {}


def _period(wall_time: float, timezone: str, period: str) -> tuple[str, float]:
    """The period's name (``day:2026-11-22``, ``month:2026-11``) and the seconds its totals
    are kept: to its end, plus a margin."""
    cached = _PERIODS.get((timezone, period))
    if cached is None or not cached[1] <= wall_time < cached[2]:
        cached = _PERIODS[(timezone, period)] = _period_around(wall_time, timezone, period)
    name, _, end = cached
    return name, end - wall_time + MARGIN


def _period_around(wall_time: float, timezone: str, period: str) -> tuple[str, float, float]:
    zone = ZoneInfo(timezone)
    now = datetime.fromtimestamp(wall_time, zone)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        name = f"day:{now:%Y-%m-%d}"
        end = start + timedelta(days=1)
    else:
        name = f"month:{now:%Y-%m}"
        start = start.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # wall-clock arithmetic across a DST change: the zone's real start and end of the period
    start, end = (
        start.replace(tzinfo=None).replace(tzinfo=zone),
        end.replace(tzinfo=None).replace(tzinfo=zone),
    )
    return name, start.timestamp(), end.timestamp()
