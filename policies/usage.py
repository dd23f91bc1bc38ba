"""usage — AUP: "continual, uninterrupted or consistently excessive use".

A maximum call duration: once answered, a call may last ``max_call_duration`` seconds,
then sipguard ends it with a BYE to both sides (the proxy core has the dialog's route
set, tags and CSeqs from call tracking).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .base import ALLOW, CallContext, Policy, Reply, Require, RuleConfig, Verdict


class UsageConfig(RuleConfig):
    reply: Reply = Reply(code=403, reason="Usage limit reached")
    max_call_duration: float | None = Field(
        default=None, gt=0, description="seconds an answered call may last; then BYE to both sides"
    )


class UsagePolicy(Policy[UsageConfig]):
    name = "usage"
    Config = UsageConfig
    description = "excessive use: maximum call duration"

    def check(self, call: CallContext, config: UsageConfig) -> Verdict:
        if config.max_call_duration is None:
            return ALLOW
        return Require((), max_duration=config.max_call_duration)

    def account_overrides(self, limits: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        return {"max_call_duration": limits["max_call_duration"]} if "max_call_duration" in limits else {}

    def warnings(self, config: UsageConfig) -> list[str]:
        if config.max_call_duration is None:
            return ["usage has no limit set (max_call_duration): it never fires"]
        return []
