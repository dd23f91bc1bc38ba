"""The usage rule (policies/usage.py) through the engine: daily and monthly quotas of
calls and answered minutes per number and per account, kept in the state store, with
periods that begin at midnight in the rule's time zone; the keepalive it hands the proxy
core (probing itself is tested in test_core_keepalive.py); and the policy-file checks.

Wall-clock time is the engine's ``now + wall_offset``: tests set the offset, never read
a clock.
"""

from __future__ import annotations

import copy
import textwrap
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml
from test_engine import ACCOUNTS, OWNED, OWNED_TOO, STRIP, T0, attempt, decide, engine_for
from test_policyfile import EXAMPLE

from policies.usage import KeepaliveConfig
from proxy.cli import main
from proxy.engine import PolicyEngine
from proxy.policyfile import PolicyFileError, compile_policy, load_policy
from proxy.sip.events import Accept, Address, CallAnswered, CallEnded, CallInfo, EndReason, Keepalive, Reject

ACCEPTED = Accept(remove_headers=STRIP)
OVER = Reject(status=403, reason="Usage limit reached")
NOON_UTC = datetime(2026, 11, 23, 12, 0, tzinfo=ZoneInfo("UTC")).timestamp()


def engine_at(wall_time: float, rules: dict, accounts: dict | None = None) -> PolicyEngine:
    engine = engine_for(rules, accounts)
    engine.wall_offset = wall_time - T0  # T0 (monotonic) is this wall-clock instant
    return engine


def talk(engine: PolicyEngine, name: str, seconds: float, *, caller: str = OWNED, at: float = T0) -> None:
    """A call placed at ``at``, answered at once and ended ``seconds`` later."""
    call = attempt(name, caller=caller, now=at)
    assert decide(engine, call) == ACCEPTED
    info = CallInfo(call_id=call.request.call_id, from_tag="t", attempt_id=call.attempt_id,
                    source=call.source, from_customer=True, started_at=at)  # fmt: skip
    engine.call_answered(CallAnswered(call=info, now=at))
    engine.call_ended(CallEnded(call=info, reason=EndReason.BYE, now=at + seconds, answered_at=at))


def test_calls_per_day_per_number_then_a_new_day() -> None:
    engine = engine_at(NOON_UTC, {"usage": {"calls_per_day": {"per_number": 3}}})
    assert [decide(engine, attempt(f"c{index}")) for index in range(4)] == [ACCEPTED] * 3 + [OVER]
    assert decide(engine, attempt("other", caller=OWNED_TOO)) == ACCEPTED
    tomorrow = T0 + 12 * 3600  # midnight UTC has passed
    assert decide(engine, attempt("next-day", now=tomorrow)) == ACCEPTED


def test_the_day_begins_at_midnight_in_the_rules_time_zone() -> None:
    rules = {"usage": {"calls_per_day": {"per_number": 1}, "timezone": "America/New_York"}}
    engine = engine_at(NOON_UTC, rules)  # 07:00 in New York
    assert decide(engine, attempt("morning")) == ACCEPTED
    assert decide(engine, attempt("evening", now=T0 + 11 * 3600)) == OVER  # 23:00 UTC, 18:00 there
    assert decide(engine, attempt("after-midnight-there", now=T0 + 17.5 * 3600)) == ACCEPTED


def test_answered_minutes_per_account_are_added_when_calls_end() -> None:
    engine = engine_at(NOON_UTC, {"usage": {"minutes_per_day": {"per_account": 60}}})
    talk(engine, "long", 50 * 60)
    assert decide(engine, attempt("still-under", now=T0 + 3001)) == ACCEPTED  # 50 of 60 minutes
    talk(engine, "more", 15 * 60, caller=OWNED_TOO, at=T0 + 3100)
    assert decide(engine, attempt("over", now=T0 + 4100)) == OVER  # 65 minutes: the account is done


def test_unanswered_calls_add_no_minutes() -> None:
    engine = engine_at(NOON_UTC, {"usage": {"minutes_per_day": {"per_number": 1}}})
    call = attempt("unanswered")
    decide(engine, call)
    info = CallInfo(call_id=call.request.call_id, from_tag="t", attempt_id=call.attempt_id,
                    source=call.source, from_customer=True, started_at=T0)  # fmt: skip
    engine.call_ended(CallEnded(call=info, reason=EndReason.CANCELLED, now=T0 + 500))
    assert decide(engine, attempt("next", now=T0 + 600)) == ACCEPTED


def test_monthly_quota_and_the_decision_counters() -> None:
    engine = engine_at(NOON_UTC, {"usage": {"calls_per_month": {"per_account": 2}}})
    decide(engine, attempt("a"))
    decide(engine, attempt("b", now=T0 + 86_400 * 3))
    assert decide(engine, attempt("c", now=T0 + 86_400 * 6)) == OVER
    assert decide(engine, attempt("december", now=T0 + 86_400 * 9)) == ACCEPTED
    assert engine.counters.rejections == {("usage", OVER.status): 1}


def test_account_limits_shorthand() -> None:
    accounts = copy.deepcopy(ACCOUNTS)
    accounts["acme"]["limits"] = {"calls_per_day": 1, "minutes_per_day_per_number": 5}
    policy = compile_policy({"accounts": accounts, "rules": {"usage": {}}}, {}, "test.yaml")
    [(_, config)] = policy.account_rules["acme"]
    assert config.calls_per_day.per_account == 1
    assert config.minutes_per_day.per_number == 5
    engine = engine_at(NOON_UTC, {"usage": {}}, accounts)
    assert [decide(engine, attempt(name)) for name in "ab"] == [ACCEPTED, OVER]


def test_an_unknown_time_zone_is_refused_with_its_line() -> None:
    lines = {("rules", "usage", "timezone"): 7}
    with pytest.raises(PolicyFileError) as refused:
        compile_policy({"rules": {"usage": {"timezone": "Mars/Olympus"}}}, lines, "p.yaml")
    [error] = refused.value.errors
    assert error.startswith("p.yaml:7: rules.usage.timezone: Value error, unknown time zone 'Mars/Olympus'")


def test_a_day_with_a_dst_change_lasts_25_hours() -> None:
    from policies.usage import _period

    zone = "America/New_York"
    morning = datetime(2026, 11, 1, 0, 30, tzinfo=ZoneInfo(zone)).timestamp()  # DST ends at 02:00
    name, kept = _period(morning, zone, "day")
    assert name == "day:2026-11-01"
    assert kept == 24.5 * 3600 + 3600  # to the next midnight (25 h after the last), plus the margin
    assert _period(morning + 24.4 * 3600, zone, "day")[0] == "day:2026-11-01"
    assert _period(morning + 24.6 * 3600, zone, "day")[0] == "day:2026-11-02"


# -- the keepalive ------------------------------------------------------------------------------------
def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def probed(keepalive: Keepalive) -> Accept:
    return Accept(remove_headers=STRIP, keepalive=keepalive)


def test_the_keepalive_flows_from_the_policy_file_to_the_core_per_account(tmp_path: Path) -> None:
    """Off unless asked for; ``{}`` takes the defaults; an account can change it or turn it
    off through its own rule settings; a rule in monitor mode hands nothing to the core."""
    path = policy_file(
        tmp_path,
        """
        accounts:
          acme: {sources: [192.0.2.0/25], numbers: ["+14155550100-+14155550199"]}
          quick:
            sources: [192.0.2.128/26]
            numbers: ["+14155550200"]
            rules: {usage: {keepalive: {interval: 5}}}
          quiet:
            sources: [192.0.2.192/26]
            numbers: ["+14155550300"]
            rules: {usage: {keepalive: null}}
        rules:
          usage:
            keepalive: {}
        """,
    )
    engine = PolicyEngine(load_policy(path))
    calls = {"acme": "192.0.2.10", "quick": "192.0.2.130", "quiet": "192.0.2.200"}
    numbers = {"acme": OWNED, "quick": "+14155550200", "quiet": "+14155550300"}
    verdicts = {
        name: decide(engine, attempt(name, caller=numbers[name], source=Address("udp", host, 5060)))
        for name, host in calls.items()
    }
    assert verdicts == {
        "acme": probed(Keepalive(interval=30.0, failed_limit=3, timeout=10.0)),
        # the timeout is never longer than the interval: the next probe is due
        "quick": probed(Keepalive(interval=5.0, failed_limit=3, timeout=5.0)),
        "quiet": ACCEPTED,
    }
    monitoring = engine_for({"usage": {"keepalive": {"interval": 60}, "mode": "monitor"}})
    assert decide(monitoring, attempt("watched")) == ACCEPTED
    both = engine_for({"usage": {"keepalive": {"failed_limit": 2, "timeout": 3}, "max_call_duration": 600}})
    assert decide(both, attempt("both")) == Accept(
        remove_headers=STRIP,
        max_duration=600.0,
        keepalive=Keepalive(interval=30.0, failed_limit=2, timeout=3.0),
    )


@pytest.mark.parametrize(
    ("keepalive", "error"),
    [
        ("{interval: 10, timeout: 20}", "Value error, timeout (20 s) is longer than interval (10 s): "
         "a probe must be over before the next one is due; found {'interval': 10, 'timeout': 20}"),
        ("{interval: 0.5}", "Input should be greater than or equal to 1; found 0.5"),
        ("{failed_limit: 0}", "Input should be greater than or equal to 1; found 0"),
        ("{timeout: 0}", "Input should be greater than 0; found 0"),
        ("{intervall: 30}", "unknown key 'intervall' (did you mean 'interval'?)"),
        ("yes", "Input should be a valid dictionary or instance of KeepaliveConfig; found True"),
    ],
)  # fmt: skip
def test_a_bad_keepalive_is_refused_with_its_line(tmp_path: Path, keepalive: str, error: str) -> None:
    path = policy_file(tmp_path, f"rules:\n  usage:\n    keepalive: {keepalive}\n")
    with pytest.raises(PolicyFileError) as refused:
        load_policy(path)
    [line] = refused.value.errors
    assert line.startswith(f"{path}:3: rules.usage.keepalive"), line
    assert line.endswith(error), line


def test_check_describes_the_keepalive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = policy_file(tmp_path, "rules:\n  usage:\n    keepalive: {interval: 20, failed_limit: 2}\n")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "keepalive: OPTIONS to both parties every 20 s once answered; 2 in a row unanswered within "
        "10 s (or 408/481) end the call, at most 50 s after a party vanished"
    ) in out
    assert "warnings" not in out  # a usage rule with only a keepalive is not a rule that never fires


def test_the_example_files_keepalive_line_gives_the_defaults() -> None:
    """policies/example.yaml shows the keepalive commented out, with the default values."""
    [line] = [line for line in EXAMPLE.read_text().splitlines() if line.strip().startswith("# keepalive:")]
    shown = yaml.safe_load(line.strip().removeprefix("# ").split("  #")[0])["keepalive"]
    assert KeepaliveConfig.model_validate(shown).settings == KeepaliveConfig().settings
    assert KeepaliveConfig().settings == Keepalive(interval=30.0, failed_limit=3, timeout=10.0)
