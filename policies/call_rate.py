"""call_rate — AUP: auto-/predictive dialing. New calls per caller number, account and
source address, as a sustained rate with a burst; and, against traffic pumping (many
sources calling one number), per destination number.

GCRA (the generic cell rate algorithm) rather than a sliding window: one timestamp per
key instead of one entry per call, so a 1,000-CPS dialer costs the same memory as a
person; it answers "when may the next call go?" exactly, which becomes Retry-After;
and it is a few lines of atomic Lua on Redis. ``per_minute`` is the sustained rate and
``burst`` how many calls may go back to back after a quiet spell.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from proxy.state import HitRate

from .base import ALLOW, SETTINGS, CallContext, Policy, Reply, Require, RuleConfig, Verdict


class RateLimit(BaseModel):
    model_config = SETTINGS

    per_minute: float = Field(gt=0, description="sustained calls per minute")
    burst: int = Field(default=3, ge=1, description="calls allowed back to back")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``per_number: 10`` means 10 calls a minute with the default burst."""
        return (
            {"per_minute": value} if isinstance(value, int | float) and not isinstance(value, bool) else value
        )


class CallRateConfig(RuleConfig):
    reply: Reply = Reply(code=503, reason="Call rate exceeded")
    per_number: RateLimit | None = RateLimit(per_minute=10, burst=3)
    per_account: RateLimit | None = RateLimit(per_minute=120, burst=20)
    per_source: RateLimit | None = None
    per_destination: RateLimit | None = Field(default=None, description="calls to one number (default off)")
    count_rejected: bool = Field(default=True, description="attempts other rules or limits refused count too")


class CallRatePolicy(Policy[CallRateConfig]):
    name = "call_rate"
    Config = CallRateConfig
    description = "new calls per minute per number, account and source address"

    def check(self, call: CallContext, config: CallRateConfig) -> Verdict:
        operations: list[HitRate] = []
        subjects = (
            (config.per_number, "num", call.caller, "calls from"),
            (config.per_account, "acct", call.account.name if call.account else None, "calls of"),
            (config.per_source, "src", call.source_host, "calls from address"),
            (config.per_destination, "dst", call.dialled_number(), "calls to"),
        )
        for limit, kind, subject, label in subjects:
            if limit is not None and subject is not None:
                operations.append(
                    HitRate(
                        key=f"rate:{kind}:{subject}",
                        per_minute=limit.per_minute,
                        burst=limit.burst,
                        count_if_blocked=config.count_rejected,
                        rule=self.name,
                        enforced=config.enforced,
                        label=f"{label} {subject}",
                    )
                )
        return Require(tuple(operations)) if operations else ALLOW

    def account_overrides(self, limits: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        """``calls_per_minute: 200`` changes the rate and keeps the rule's burst."""
        names = {"calls_per_minute_per_number": "per_number", "calls_per_minute": "per_account"}
        names["calls_per_minute_per_source"] = "per_source"
        names["calls_per_minute_per_destination"] = "per_destination"
        overrides: dict[str, Any] = {}
        for key, value in limits.items():
            if key not in names:
                continue
            base = settings.get(names[key], getattr(CallRateConfig(), names[key]))
            if isinstance(value, int | float) and isinstance(base, RateLimit):
                base = base.model_dump()
            if isinstance(value, int | float) and isinstance(base, dict):
                value = {**base, "per_minute": value}
            overrides[names[key]] = value
        return overrides

    def keeps_counters(self, config: CallRateConfig) -> bool:
        limits = (config.per_number, config.per_account, config.per_source, config.per_destination)
        return any(limit is not None for limit in limits)

    def warnings(self, config: CallRateConfig) -> list[str]:
        if not self.keeps_counters(config):
            names = "per_number, per_account, per_source, per_destination"
            return [f"call_rate has no limit set ({names}): it never fires"]
        return []
