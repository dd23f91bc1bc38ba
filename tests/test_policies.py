"""Each built-in policy as the pure function it is: a hand-built CallContext and a typed
config in, a verdict out (Allow, Deny with why, or Require with state operations).

No engine, no store, no clock: the engine's side (normalising identities, stamping
operations with their rule, running them) is tested in test_engine.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from sipsim import invite

from policies.base import ALLOW, Account, CallContext, Deny, Identity, Mode, Require, Verdict
from policies.call_rate import CallRateConfig, CallRatePolicy, RateLimit
from policies.caller_id import CallerIdConfig, CallerIdPolicy
from policies.concurrency import ConcurrencyConfig, ConcurrencyPolicy
from policies.numbering import NumberSet
from policies.registry import BUILTIN, available_policies
from proxy.sip import Request, parse_message
from proxy.state import HitRate, TakeSlot

ACME = Account(name="acme", numbers=NumberSet(["+14155550100-+14155550199"], "US"), region="US")
OWNED = "+14155550142"
OWNED_TOO = "+14155550143"
NOT_OWNED = "+14155559999"
CALLEE = "+14155552000"
REQUEST = parse_message(invite())
assert isinstance(REQUEST, Request)
TO_NO_NUMBER = parse_message(invite(uri="sip:alice@pbx.example.com"))  # a callee that is no number
assert isinstance(TO_NO_NUMBER, Request)


def identity(header: str, e164: str | None, **kwargs: Any) -> Identity:
    presented = kwargs.pop("presented", f"sip:{e164}@customer.example")
    return Identity(header=header, presented=presented, e164=e164, **kwargs)


ANONYMOUS_FROM = Identity(
    header="from", presented="sip:anonymous@anonymous.invalid", e164=None, anonymous=True
)


def call(
    *identities: Identity,
    account: Account | None = ACME,
    caller: str | None = OWNED,
    callee: str | None = CALLEE,
    source: str = "192.0.2.10",
) -> CallContext:
    return CallContext(
        attempt_id="attempt-1",
        call_id="call-1@192.0.2.10",
        now=1000.0,
        wall_time=1_790_000_000.0,
        source_host=source,
        account=account,
        identities=identities or (identity("from", OWNED),),
        caller=caller,
        callee=callee,
        callee_presented=f"sip:{callee}@pbx.example.com" if callee else str(TO_NO_NUMBER.uri),
        request=REQUEST if callee else TO_NO_NUMBER,
        region=account.region if account else None,
    )


def caller_id(context: CallContext, **settings: Any) -> Verdict:
    return CallerIdPolicy().check(context, CallerIdConfig.model_validate(settings))


# -- registry ---------------------------------------------------------------------------------
def test_builtin_policies_by_name() -> None:
    assert set(BUILTIN) == {
        "caller_id",
        "concurrency",
        "call_rate",
        "usage",
        "dialer",
        "destinations",
        "calling_hours",
        "do_not_call",
    }
    assert all(policy.name == name for name, policy in BUILTIN.items())
    assert {name: available_policies()[name] for name in BUILTIN} == BUILTIN


@pytest.mark.parametrize("policy", list(BUILTIN.values()))
def test_every_setting_has_a_default(policy: Any) -> None:
    config = policy.Config.model_validate({})
    assert config.mode is Mode.ENFORCE
    assert 400 <= config.reply.code <= 699


def test_configs_forbid_unknown_keys() -> None:
    with pytest.raises(ValidationError, match="per_numbr"):
        ConcurrencyConfig.model_validate({"per_numbr": 3})


def test_policies_are_pure() -> None:
    context = call(identity("from", NOT_OWNED), caller=NOT_OWNED)
    config = CallerIdConfig()
    assert CallerIdPolicy().check(context, config) == CallerIdPolicy().check(context, config)


# -- caller_id ----------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["from", "p-asserted-identity", "p-preferred-identity", "remote-party-id"])
def test_caller_id_owned_identity_passes(header: str) -> None:
    identities = {identity("from", OWNED), identity(header, OWNED_TOO)}
    assert caller_id(call(*identities)) == ALLOW


@pytest.mark.parametrize("header", ["from", "p-asserted-identity", "p-preferred-identity", "remote-party-id"])
def test_caller_id_unowned_identity_is_denied(header: str) -> None:
    identities = [identity("from", OWNED if header != "from" else NOT_OWNED)]
    if header != "from":
        identities.append(identity(header, NOT_OWNED))
    assert caller_id(call(*identities)) == Deny(f"{header} {NOT_OWNED} not owned by acme")


def test_caller_id_checks_every_identity_not_just_the_first() -> None:
    verdict = caller_id(
        call(
            identity("from", OWNED),
            identity("p-asserted-identity", OWNED_TOO),
            identity("p-asserted-identity", NOT_OWNED),
        )
    )
    assert verdict == Deny(f"p-asserted-identity {NOT_OWNED} not owned by acme")


def test_caller_id_checks_only_the_configured_headers() -> None:
    context = call(identity("from", OWNED), identity("remote-party-id", NOT_OWNED))
    assert caller_id(context, identities=["from", "p-asserted-identity"]) == ALLOW
    assert isinstance(caller_id(context), Deny)


@pytest.mark.parametrize(
    ("setting", "behind", "expected"),
    [
        ("with-owned-identity", None, "anonymous From without an owned P-Preferred/Asserted-Identity"),
        ("with-owned-identity", identity("p-preferred-identity", OWNED), None),
        ("with-owned-identity", identity("p-asserted-identity", OWNED), None),
        ("with-owned-identity", identity("p-preferred-identity", NOT_OWNED), "not owned by acme"),
        # Remote-Party-ID is checked but does not vouch for an anonymous From
        (
            "with-owned-identity",
            identity("remote-party-id", OWNED),
            "anonymous From without an owned P-Preferred/Asserted-Identity",
        ),
        ("allow", None, None),
        ("allow", identity("p-preferred-identity", OWNED), None),
        ("allow", identity("p-asserted-identity", NOT_OWNED), "not owned by acme"),
        ("reject", None, "anonymous From refused"),
        ("reject", identity("p-preferred-identity", OWNED), "anonymous From refused"),
        ("reject", identity("p-asserted-identity", OWNED), "anonymous From refused"),
    ],
)
def test_caller_id_anonymous_from(setting: str, behind: Identity | None, expected: str | None) -> None:
    identities = (ANONYMOUS_FROM,) if behind is None else (ANONYMOUS_FROM, behind)
    verdict = caller_id(call(*identities, caller=behind.e164 if behind else None), anonymous=setting)
    if expected is None:
        assert verdict == ALLOW
    else:
        assert isinstance(verdict, Deny)
        assert expected in verdict.detail


def test_caller_id_anonymous_from_is_not_checked_when_from_is_not_configured() -> None:
    verdict = caller_id(call(ANONYMOUS_FROM), identities=["p-asserted-identity"], anonymous="reject")
    assert verdict == ALLOW


def test_caller_id_number_that_cannot_exist() -> None:
    bad = identity("from", None, presented="sip:+19995550100@customer.example", problem="number cannot exist")
    assert caller_id(call(bad, caller=None)) == Deny(
        "from sip:+19995550100@customer.example: number cannot exist"
    )


def test_caller_id_identity_without_a_number() -> None:
    bad = identity(
        "p-asserted-identity", None, presented="sip:alice@x.example", problem="no telephone number"
    )
    verdict = caller_id(call(identity("from", OWNED), bad))
    assert verdict == Deny("p-asserted-identity sip:alice@x.example: no telephone number")


@pytest.mark.parametrize(
    "emergency",
    [
        # as the engine builds them: a short code is no E.164 number, but it is an emergency one
        identity(
            "from", None, presented="sip:911@customer.example", problem="number cannot exist", emergency=True
        ),
        identity(
            "p-asserted-identity", None, presented="tel:112", problem="number cannot exist", emergency=True
        ),
    ],
)
def test_caller_id_emergency_number_as_caller_id(emergency: Identity) -> None:
    identities = (emergency,) if emergency.header == "from" else (identity("from", OWNED), emergency)
    verdict = caller_id(call(*identities))
    assert verdict == Deny(f"{emergency.header} {emergency.presented} is an emergency number")


def test_caller_id_without_an_account() -> None:
    verdict = caller_id(call(account=None))
    assert verdict == Deny("source 192.0.2.10 belongs to no account")


# -- concurrency ---------------------------------------------------------------------------------
def concurrency(context: CallContext, **settings: Any) -> Verdict:
    return ConcurrencyPolicy().check(context, ConcurrencyConfig.model_validate(settings))


def slots(verdict: Verdict) -> list[tuple[str, int, str]]:
    assert isinstance(verdict, Require)
    assert all(isinstance(op, TakeSlot) for op in verdict.operations)
    return [(op.key, op.limit, op.label) for op in verdict.operations if isinstance(op, TakeSlot)]


def rates(verdict: Verdict) -> list[tuple[str, float, int, bool, str]]:
    assert isinstance(verdict, Require)
    assert all(isinstance(op, HitRate) for op in verdict.operations)
    return [
        (op.key, op.per_minute, op.burst, op.count_if_blocked, op.label)
        for op in verdict.operations
        if isinstance(op, HitRate)
    ]


def test_concurrency_defaults_per_number_and_per_account() -> None:
    assert slots(concurrency(call())) == [
        (f"conc:num:{OWNED}", 2, f"calls from {OWNED}"),
        ("conc:acct:acme", 30, "calls of acme"),
    ]


def test_concurrency_per_destination() -> None:
    assert slots(concurrency(call(), per_number=1, per_account=5, per_destination=3)) == [
        (f"conc:num:{OWNED}", 1, f"calls from {OWNED}"),
        ("conc:acct:acme", 5, "calls of acme"),
        (f"conc:dst:{CALLEE}", 3, f"calls to {CALLEE}"),
    ]


def test_concurrency_skips_what_the_call_lacks() -> None:
    assert concurrency(call(account=None, caller=None, callee=None), per_destination=3) == ALLOW
    assert slots(concurrency(call(account=None), per_destination=3)) == [
        (f"conc:num:{OWNED}", 2, f"calls from {OWNED}"),
        (f"conc:dst:{CALLEE}", 3, f"calls to {CALLEE}"),
    ]


def test_concurrency_with_no_limits_allows_and_warns() -> None:
    config = ConcurrencyConfig(per_number=None, per_account=None, per_destination=None)
    assert ConcurrencyPolicy().check(call(), config) == ALLOW
    assert ConcurrencyPolicy().warnings(config) == [
        "concurrency has no limit set (per_number, per_account, per_destination): it never fires"
    ]
    assert ConcurrencyPolicy().warnings(ConcurrencyConfig()) == []


def test_concurrency_limits_must_be_positive() -> None:
    with pytest.raises(ValidationError):
        ConcurrencyConfig(per_number=0)


def test_concurrency_account_limits_shorthand() -> None:
    limits = {
        "concurrent_per_number": 3,
        "concurrent": 40,
        "concurrent_per_destination": 5,
        "calls_per_minute": 100,
    }
    assert ConcurrencyPolicy().account_overrides(limits, {"per_number": 1}) == {
        "per_number": 3,
        "per_account": 40,
        "per_destination": 5,
    }
    assert ConcurrencyPolicy().account_overrides({}, {"per_number": 1}) == {}


# -- call_rate ----------------------------------------------------------------------------------
def call_rate(context: CallContext, **settings: Any) -> Verdict:
    return CallRatePolicy().check(context, CallRateConfig.model_validate(settings))


def test_call_rate_defaults_per_number_and_per_account() -> None:
    assert rates(call_rate(call())) == [
        (f"rate:num:{OWNED}", 10, 3, True, f"calls from {OWNED}"),
        ("rate:acct:acme", 120, 20, True, "calls of acme"),
    ]


def test_call_rate_per_source_and_count_rejected() -> None:
    verdict = call_rate(
        call(source="2001:db8::7"),
        per_number=None,
        per_account={"per_minute": 30, "burst": 5},
        per_source={"per_minute": 6, "burst": 1},
        count_rejected=False,
    )
    assert rates(verdict) == [
        ("rate:acct:acme", 30, 5, False, "calls of acme"),
        ("rate:src:2001:db8::7", 6, 1, False, "calls from address 2001:db8::7"),
    ]


def test_call_rate_skips_what_the_call_lacks() -> None:
    assert call_rate(call(account=None, caller=None)) == ALLOW
    assert [key for key, *_ in rates(call_rate(call(account=None)))] == [f"rate:num:{OWNED}"]


def test_rate_limit_shorthand() -> None:
    config = CallRateConfig.model_validate({"per_number": 30, "per_account": 2.5})
    assert config.per_number == RateLimit(per_minute=30, burst=3)
    assert config.per_account == RateLimit(per_minute=2.5, burst=3)
    for bad in (True, 0, {"per_minute": 10, "burst": 0}, {"per_minute": 10, "bursts": 2}):
        with pytest.raises(ValidationError):
            CallRateConfig.model_validate({"per_number": bad})


def test_call_rate_account_limits_shorthand_keeps_the_rules_burst() -> None:
    limits = {
        "calls_per_minute_per_number": 5,
        "calls_per_minute": 200,
        "calls_per_minute_per_source": {"per_minute": 60, "burst": 2},
        "concurrent": 4,
    }
    settings = {"per_number": {"per_minute": 10, "burst": 4}}
    overrides = CallRatePolicy().account_overrides(limits, settings)
    config = CallRateConfig.model_validate({**settings, **overrides})
    assert (config.per_number, config.per_account, config.per_source) == (
        RateLimit(per_minute=5, burst=4),  # the rule's burst
        RateLimit(per_minute=200, burst=20),  # the default burst of per_account
        RateLimit(per_minute=60, burst=2),  # the long form says it all
    )
    assert CallRatePolicy().account_overrides({"concurrent": 4}, settings) == {}


def test_call_rate_with_no_limits_allows_and_warns() -> None:
    config = CallRateConfig(per_number=None, per_account=None, per_source=None)
    assert CallRatePolicy().check(call(), config) == ALLOW
    assert CallRatePolicy().warnings(config) == [
        "call_rate has no limit set (per_number, per_account, per_source, per_destination): it never fires"
    ]
    assert CallRatePolicy().warnings(CallRateConfig()) == []


def test_call_rate_per_destination_counts_calls_to_one_number_from_anyone() -> None:
    """Traffic pumping: many sources calling one number. The key is the callee alone, so
    calls to it from any caller, account or address hit the same bucket."""
    settings = {"per_number": None, "per_account": None, "per_destination": {"per_minute": 4, "burst": 2}}
    expected = [(f"rate:dst:{CALLEE}", 4, 2, True, f"calls to {CALLEE}")]
    assert rates(call_rate(call(), **settings)) == expected
    assert rates(call_rate(call(account=None, caller=None, source="198.51.100.9"), **settings)) == expected
    assert call_rate(call(callee=None), **settings) == ALLOW  # a callee that is not a number


def test_call_rate_per_destination_account_shorthand() -> None:
    limits = {"calls_per_minute_per_destination": 6}
    settings = {"per_destination": {"per_minute": 30, "burst": 5}}
    overrides = CallRatePolicy().account_overrides(limits, settings)
    config = CallRateConfig.model_validate({**settings, **overrides})
    assert config.per_destination == RateLimit(per_minute=6, burst=5)  # the rule's burst kept
    overrides = CallRatePolicy().account_overrides(limits, {})
    assert CallRateConfig.model_validate(overrides).per_destination == RateLimit(per_minute=6, burst=3)
    assert CallRateConfig().per_destination is None  # off unless asked for
