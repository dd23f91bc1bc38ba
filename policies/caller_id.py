"""caller_id — AUP: caller-ID spoofing and forged identity headers.

Every identity an INVITE presents (From, P-Asserted-Identity, P-Preferred-Identity,
Remote-Party-ID) must be a real E.164 number the sending account owns. An anonymous
From passes only with an owned P-Preferred/Asserted-Identity behind it (RFC 3323/3325),
unless configured otherwise. The engine also strips PAI/RPID that customers send
before forwarding (RFC 3325 trust domain), so they never vouch for a call upstream.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ALLOW, CallContext, Deny, Policy, Reply, RuleConfig, Verdict

IdentityHeader = Literal["from", "p-asserted-identity", "p-preferred-identity", "remote-party-id"]


class CallerIdConfig(RuleConfig):
    reply: Reply = Reply(code=403, reason="Caller ID not permitted")
    identities: list[IdentityHeader] = Field(
        default=["from", "p-asserted-identity", "p-preferred-identity", "remote-party-id"],
        description="the headers whose numbers must be owned",
    )
    anonymous: Literal["with-owned-identity", "allow", "reject"] = "with-owned-identity"
    strip_untrusted_identity: bool = Field(
        default=True,
        description="remove P-Asserted-Identity and Remote-Party-ID sent by customers (done whenever any "
        "rule runs; false here is the one way to pass them on)",
    )


class CallerIdPolicy(Policy[CallerIdConfig]):
    name = "caller_id"
    Config = CallerIdConfig
    description = "caller numbers must be owned by the sending account"

    def keeps_counters(self, config: CallerIdConfig) -> bool:
        return False

    def check(self, call: CallContext, config: CallerIdConfig) -> Verdict:
        if call.account is None:
            return Deny(f"source {call.source_host} belongs to no account")
        checked = [identity for identity in call.identities if identity.header in config.identities]
        anonymous_from = False
        vouched = False
        for identity in checked:
            if identity.anonymous:
                anonymous_from |= identity.header == "from"
                continue
            if identity.emergency:  # first: a short code like 911 is no E.164 number either
                return Deny(f"{identity.header} {identity.presented} is an emergency number")
            if identity.e164 is None:
                return Deny(f"{identity.header} {identity.presented}: {identity.problem}")
            if identity.e164 not in call.account.numbers:
                return Deny(f"{identity.header} {identity.e164} not owned by {call.account.name}")
            vouched |= identity.header in ("p-asserted-identity", "p-preferred-identity")
        if anonymous_from:
            if config.anonymous == "reject":
                return Deny("anonymous From refused")
            if config.anonymous == "with-owned-identity" and not vouched:
                return Deny("anonymous From without an owned P-Preferred/Asserted-Identity")
        return ALLOW
