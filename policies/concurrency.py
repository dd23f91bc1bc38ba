"""concurrency — AUP: trunking. Caps live calls (ringing and answered) per caller
number, per account and, against traffic pumping, per destination number.

A slot is a set member keyed by the call's attempt id, taken when the INVITE is
judged and given back on every call end the proxy core reports.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from proxy.state import TakeSlot

from .base import ALLOW, CallContext, Policy, Reply, Require, RuleConfig, Verdict


class ConcurrencyConfig(RuleConfig):
    reply: Reply = Reply(code=486, reason="Too many simultaneous calls")
    per_number: int | None = Field(default=2, ge=1, description="live calls per caller number")
    per_account: int | None = Field(default=30, ge=1, description="live calls per account")
    per_destination: int | None = Field(default=None, ge=1, description="live calls to one number")


class ConcurrencyPolicy(Policy[ConcurrencyConfig]):
    name = "concurrency"
    Config = ConcurrencyConfig
    description = "simultaneous calls per number, account and destination"

    def check(self, call: CallContext, config: ConcurrencyConfig) -> Verdict:
        subjects = (
            (config.per_number, "num", call.caller, "calls from"),
            (config.per_account, "acct", call.account.name if call.account else None, "calls of"),
            (config.per_destination, "dst", call.dialled_number(), "calls to"),
        )
        operations = tuple(
            TakeSlot(
                key=f"conc:{kind}:{subject}",
                limit=limit,
                rule=self.name,
                enforced=config.enforced,
                label=f"{label} {subject}",
            )
            for limit, kind, subject, label in subjects
            if limit is not None and subject is not None
        )
        return Require(operations) if operations else ALLOW

    def account_overrides(self, limits: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        names = {"concurrent_per_number": "per_number", "concurrent": "per_account"}
        names["concurrent_per_destination"] = "per_destination"
        return {names[key]: value for key, value in limits.items() if key in names}

    def keeps_counters(self, config: ConcurrencyConfig) -> bool:
        limits = (config.per_number, config.per_account, config.per_destination)
        return any(limit is not None for limit in limits)

    def warnings(self, config: ConcurrencyConfig) -> list[str]:
        if not self.keeps_counters(config):
            return ["concurrency has no limit set (per_number, per_account, per_destination): it never fires"]
        return []
