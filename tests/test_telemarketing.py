"""The telemarketing rules: ``calling_hours`` (a window of the callee's local time) and
``do_not_call`` (numbers from files of millions), for accounts marked
``telemarketing: true`` only.

Calling hours are judged at ``wall_time`` passed in (an ISO 8601 instant): across time
zones, the DST changes, numbers spanning several zones and weekday edges. Do-not-call
files are parsed by numpy a chunk at a time (the chunk is made tiny here so lines
straddle chunks), with a line-by-line path for everything that is not a bare number.
"""

from __future__ import annotations

import dataclasses
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from test_engine import ELSEWHERE, T0, attempt, decide, policy
from test_policies import ACME, call

import policies.lists
from policies.base import ALLOW, Account, Deny, Verdict
from policies.lists import POLICY_FILE, NumberFile
from policies.telemarketing import (
    CallingHoursConfig,
    CallingHoursPolicy,
    DoNotCallConfig,
    DoNotCallPolicy,
    callee_zones,
)
from proxy.cli import main
from proxy.engine import PolicyEngine
from proxy.policyfile import PolicyFileError, load_policy
from proxy.sip.events import Accept, Reject

TELEMARKETER = dataclasses.replace(ACME, name="dialer", telemarketing=True)
NEW_YORK = "+12125551234"
LOS_ANGELES = "+13105551234"
TOKYO = "+81312345678"
LONDON = "+442071234567"
ALASKA = "+19075551234"  # America/Adak and America/Anchorage, an hour apart
AU_MOBILE = "+61412345678"  # every Australian zone, Perth to Lord Howe
US_TOLL_FREE = "+18005551234"  # 42 zones: Newfoundland to Hawaii, Guam, Samoa


def at(instant: str) -> float:
    """Epoch seconds of an ISO 8601 instant with its offset."""
    return datetime.fromisoformat(instant).timestamp()


def hours(
    callee: str | None, instant: str, account: Account | None = TELEMARKETER, **settings: Any
) -> Verdict:
    context = dataclasses.replace(call(account=account, callee=callee), wall_time=at(instant))
    return CallingHoursPolicy().check(context, CallingHoursConfig.model_validate(settings))


# -- calling hours ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("local", "expected"),
    [
        ("07:59:59", Deny(f"{NEW_YORK}: Mon 07:59 in America/New_York, calls 08:00-21:00")),
        ("08:00:00", ALLOW),
        ("20:59:59", ALLOW),
        ("21:00:00", Deny(f"{NEW_YORK}: Mon 21:00 in America/New_York, calls 08:00-21:00")),
        ("03:00:00", Deny(f"{NEW_YORK}: Mon 03:00 in America/New_York, calls 08:00-21:00")),
    ],
)
def test_default_window_is_8_to_21_in_the_callees_time(local: str, expected: Verdict) -> None:
    assert hours(NEW_YORK, f"2026-06-15T{local}-04:00") == expected  # a Monday, EDT


def test_the_zone_is_the_callees_not_the_proxys() -> None:
    """One instant, 13:00 UTC: 09:00 in New York and 14:00 in London are inside the
    window; 06:00 in Los Angeles and 22:00 in Tokyo are not."""
    instant = "2026-06-15T13:00:00+00:00"
    assert hours(NEW_YORK, instant) == ALLOW
    assert hours(LONDON, instant) == ALLOW
    assert hours(LOS_ANGELES, instant) == Deny(
        f"{LOS_ANGELES}: Mon 06:00 in America/Los_Angeles, calls 08:00-21:00"
    )
    assert hours(TOKYO, instant) == Deny(f"{TOKYO}: Mon 22:00 in Asia/Tokyo, calls 08:00-21:00")


@pytest.mark.parametrize(
    ("instant", "local"),
    [
        ("2026-03-07T12:30:00+00:00", None),  # Saturday: 07:30 EST
        ("2026-03-08T12:30:00+00:00", "Sun 08:30"),  # DST began at 02:00: 08:30 EDT
        ("2026-10-31T12:30:00+00:00", "Sat 08:30"),  # EDT
        ("2026-11-01T12:30:00+00:00", None),  # DST ended at 02:00: 07:30 EST
    ],
)
def test_daylight_saving_time_moves_the_window_in_utc(instant: str, local: str | None) -> None:
    verdict = hours(NEW_YORK, instant)
    if local is None:
        assert isinstance(verdict, Deny) and "07:30 in America/New_York" in verdict.detail
    else:
        assert verdict == ALLOW


def test_a_number_spanning_zones_must_be_inside_the_window_in_every_one() -> None:
    """Alaska: America/Anchorage and America/Adak, an hour behind. 08:30 in Anchorage is
    07:30 in Adak: refused; an hour later both are inside."""
    assert [zone.key for zone in callee_zones(ALASKA)] == ["America/Adak", "America/Anchorage"]
    assert hours(ALASKA, "2026-01-12T08:30:00-09:00") == Deny(
        f"{ALASKA}: Mon 07:30 in America/Adak, calls 08:00-21:00"
    )
    assert hours(ALASKA, "2026-01-12T09:30:00-09:00") == ALLOW
    assert hours(ALASKA, "2026-01-12T21:00:00-09:00") == Deny(
        f"{ALASKA}: Mon 21:00 in America/Anchorage, calls 08:00-21:00"
    )


def test_mobiles_of_a_multi_zone_country_get_every_zone_of_it() -> None:
    """An Australian mobile may ring anywhere from Perth (UTC+8) to Lord Howe (UTC+11 in
    January): calls only while it is 08:00-21:00 in all of them."""
    zones = [zone.key for zone in callee_zones(AU_MOBILE)]
    assert "Australia/Perth" in zones and "Australia/Lord_Howe" in zones
    assert [zone.key for zone in callee_zones("+61298765432")] == ["Australia/Sydney"]  # a Sydney fixed line
    assert hours(AU_MOBILE, "2026-01-12T12:00:00+08:00") == ALLOW  # Perth noon: 10:30-15:00 elsewhere
    early = "2026-01-12T08:30:00+08:00"  # inside in Perth and Sydney, not on Christmas Island (UTC+7)
    assert hours(AU_MOBILE, early) == Deny(f"{AU_MOBILE}: Mon 07:30 in Indian/Christmas, calls 08:00-21:00")
    assert hours("+61298765432", early) == ALLOW
    late = "2026-01-12T18:30:00+08:00"  # Adelaide (UTC+10:30 in summer) has reached 21:00
    assert hours(AU_MOBILE, late) == Deny(f"{AU_MOBILE}: Mon 21:00 in Australia/Adelaide, calls 08:00-21:00")


def test_a_number_in_many_zones_leaves_only_their_common_hours() -> None:
    """A US toll-free number may ring in 42 zones, St John's (UTC-2:30 in summer) to
    Guam (UTC+10) the long way round: 08:00-21:00 in all of them is only 22:00-23:30
    UTC in June. Checked on the hour over a day."""
    assert len(callee_zones(US_TOLL_FREE)) == 42
    allowed = [
        hour for hour in range(24) if hours(US_TOLL_FREE, f"2026-06-15T{hour:02d}:00:00+00:00") == ALLOW
    ]
    assert allowed == [22, 23]
    assert isinstance(hours(US_TOLL_FREE, "2026-06-15T23:30:00+00:00"), Deny)  # 21:00 in St John's


def test_weekday_windows_and_closed_days_in_the_callees_calendar() -> None:
    weekends = {"days": {"sat": "10:00-17:00", "sun": "closed"}}
    assert hours(NEW_YORK, "2026-06-20T09:30:00-04:00", **weekends) == Deny(
        f"{NEW_YORK}: Sat 09:30 in America/New_York, calls 10:00-17:00"
    )
    assert hours(NEW_YORK, "2026-06-20T10:00:00-04:00", **weekends) == ALLOW
    assert hours(NEW_YORK, "2026-06-21T12:00:00-04:00", **weekends) == Deny(
        f"{NEW_YORK}: Sun 12:00 in America/New_York, no calls that day"
    )
    assert hours(NEW_YORK, "2026-06-19T20:30:00-04:00", **weekends) == ALLOW  # Friday: start-end
    # Saturday 03:30 UTC is still Friday 20:30 in Los Angeles, but Saturday 04:30 in London
    assert hours(LOS_ANGELES, "2026-06-20T03:30:00+00:00", **weekends) == ALLOW
    assert hours(LONDON, "2026-06-20T03:30:00+00:00", **weekends) == Deny(
        f"{LONDON}: Sat 04:30 in Europe/London, calls 10:00-17:00"
    )


def test_a_window_to_midnight_and_the_day_after() -> None:
    all_day_but_sunday = {"start": "00:00", "end": "24:00", "days": {"sun": "closed"}}
    assert hours(NEW_YORK, "2026-06-20T23:59:59-04:00", **all_day_but_sunday) == ALLOW  # Saturday
    assert hours(NEW_YORK, "2026-06-21T00:00:00-04:00", **all_day_but_sunday) == Deny(
        f"{NEW_YORK}: Sun 00:00 in America/New_York, no calls that day"
    )
    assert hours(NEW_YORK, "2026-06-22T00:00:00-04:00", **all_day_but_sunday) == ALLOW  # Monday


def test_unknown_zone_is_refused_or_judged_in_the_fallback_zone() -> None:
    international_network = "+883510000000"  # a valid number with no time zone
    assert callee_zones(international_network) == ()
    three_am_chicago = "2026-06-15T03:00:00-05:00"
    assert hours(international_network, three_am_chicago) == Deny(
        f"no time zone known for callee {international_network}"
    )
    assert hours(None, three_am_chicago) == Deny("no time zone known for callee sip:alice@pbx.example.com")
    chicago = {"unknown_zone": "America/Chicago"}
    assert hours(international_network, three_am_chicago, **chicago) == Deny(
        f"{international_network}: Mon 03:00 in America/Chicago, calls 08:00-21:00"
    )
    assert hours(international_network, "2026-06-15T09:00:00-05:00", **chicago) == ALLOW


def test_other_accounts_calls_pass_without_a_look() -> None:
    three_am = "2026-06-15T03:00:00-04:00"
    assert isinstance(hours(NEW_YORK, three_am), Deny)
    assert hours(NEW_YORK, three_am, account=ACME) == ALLOW
    assert hours(NEW_YORK, three_am, account=None) == ALLOW
    assert hours(None, three_am, account=ACME) == ALLOW


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"start": "8"}, "'8' is not a time of day"),
        ({"end": "21:60"}, "'21:60' is not a time of day"),
        ({"end": 1260}, 'write times of day in quotes, "HH:MM"'),  # what YAML 1.1 makes of 21:00
        ({"start": "21:00", "end": "08:00"}, "the calling window must end after it starts (21:00 to 08:00)"),
        ({"days": {"sat": "10:00"}}, 'expected "HH:MM-HH:MM" or closed'),
        ({"days": {"sun": "closd"}}, 'expected "HH:MM-HH:MM" or closed'),
        ({"days": {"fri": "18:00-09:00"}}, "must end after it starts"),
        ({"days": {"sunday": "closed"}}, "Extra inputs are not permitted"),
        ({"unknown_zone": "Mars/Olympus"}, "'Mars/Olympus' is neither refuse nor an IANA time zone"),
    ],
)
def test_calling_hours_settings_are_checked(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        CallingHoursConfig.model_validate(settings)
    assert message in str(caught.value)


def test_calling_hours_config_accepts_short_hours_and_spaces() -> None:
    config = CallingHoursConfig.model_validate({"start": "8:00", "days": {"mon": " 09:00 - 17:30 "}})
    assert config.windows == ((540, 1050),) + ((480, 1260),) * 6


# -- do-not-call files -----------------------------------------------------------------------------
DNC_FILE = (
    "# national do-not-call registry extract\r\n"
    "+12125550100\r\n"
    "12125550101\n"
    "\n"
    "   +1 212-555-0102   # separators and spaces: read line by line\n"
    "+12125550100\n"  # a duplicate
    "+442071234567\n"
    "+1212555 0099"  # unsorted, no newline at the end
)
DNC_NUMBERS = [12125550099, 12125550100, 12125550101, 12125550102, 442071234567]


def number_file(tmp_path: Path, text: str, name: str = "dnc.txt") -> NumberFile:
    path = tmp_path / name
    path.write_text(text, newline="")
    return NumberFile(path)


def test_a_number_file_with_comments_separators_crlf_and_duplicates(tmp_path: Path) -> None:
    listed = number_file(tmp_path, DNC_FILE)
    assert listed.numbers.dtype == np.int64
    assert listed.numbers.tolist() == DNC_NUMBERS  # sorted, unique
    assert listed.numbers.nbytes == 8 * len(listed) == 40
    for number in ("+12125550100", "12125550101", "+442071234567", "+12125550099"):
        assert number in listed
    for number in (
        "+12125550103",
        "+1212555010",
        "+",
        "",
        "+1212555010a",
        "+1²",
        "+12125550100000000",
        12125550100,
    ):
        assert number not in listed


@pytest.mark.parametrize("chunk_bytes", [1, 7, 16, 64])
def test_lines_straddling_chunks_are_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int
) -> None:
    monkeypatch.setattr(policies.lists, "_CHUNK_BYTES", chunk_bytes)
    assert number_file(tmp_path, DNC_FILE).numbers.tolist() == DNC_NUMBERS


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("0044207123", "'0044207123'"),
        ("+1234567890123456", "'+1234567890123456'"),
        ("+", "'+'"),
        ("1-800-FLOWERS", "'1-800-FLOWERS'"),
    ],
)
@pytest.mark.parametrize("chunk_bytes", [8 << 20, 16])
def test_a_bad_line_is_named_by_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, line: str, shown: str
) -> None:
    monkeypatch.setattr(policies.lists, "_CHUNK_BYTES", chunk_bytes)
    text = "# header\n+12125550100\n\n+12125550101\n" + line + "  # oops\n+12125550102\n"
    with pytest.raises(ValueError) as caught:
        number_file(tmp_path, text)
    assert str(caught.value) == (
        f"{tmp_path / 'dnc.txt'}:5: {shown} is not an E.164 number or prefix "
        "(+ optional, then the country code, 1-15 digits)"
    )


def test_an_empty_file_and_a_file_of_comments(tmp_path: Path) -> None:
    assert len(number_file(tmp_path, "")) == 0
    comments = number_file(tmp_path, "# nothing yet\n\n# still nothing\n", "comments.txt")
    assert len(comments) == 0 and "+12125550100" not in comments


def test_a_large_file_matches_a_reference_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200,000 random numbers of every length 1-15 (the short ones repeat), some with + or
    CRLF, over chunks of 64 KiB and duplicates dropped a block of 997 at a time: the
    vectorised parse agrees with int() line by line, in random order and sorted."""
    monkeypatch.setattr(policies.lists, "_CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(policies.lists, "_BLOCK", 997)
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 16, 200_000)
    numbers = [int(rng.integers(10 ** (n - 1), 10**n)) for n in lengths.tolist()]
    plus = rng.random(200_000) < 0.5
    crlf = rng.random(200_000) < 0.1
    lines = [
        ("+" if p else "") + str(n) + ("\r\n" if c else "\n")
        for n, p, c in zip(numbers, plus, crlf, strict=True)
    ]
    expected = sorted(set(numbers))
    assert len(expected) < len(numbers) - 1000  # duplicates, across blocks
    assert number_file(tmp_path, "".join(lines)).numbers.tolist() == expected
    in_order = "".join(f"+{number}\n" for number in sorted(numbers))
    assert number_file(tmp_path, in_order, "sorted.txt").numbers.tolist() == expected


# -- do_not_call ------------------------------------------------------------------------------------
def dnc_config(tmp_path: Path, **settings: Any) -> DoNotCallConfig:
    return DoNotCallConfig.model_validate(settings, context={POLICY_FILE: str(tmp_path / "policy.yaml")})


def test_do_not_call_refuses_listed_numbers_of_telemarketing_accounts(tmp_path: Path) -> None:
    (tmp_path / "dnc.txt").write_text(DNC_FILE)
    config = dnc_config(tmp_path, files=["dnc.txt"], numbers=["+1 415 555 0100"])
    rule = DoNotCallPolicy()
    assert (config.reply.code, config.reply.reason) == (608, "Rejected: do-not-call list")
    assert rule.check(call(account=TELEMARKETER, callee="+12125550101"), config) == Deny(
        f"+12125550101 is on the do-not-call list {tmp_path / 'dnc.txt'}"
    )
    assert rule.check(call(account=TELEMARKETER, callee="+14155550100"), config) == Deny(
        "+14155550100 is on the do-not-call list numbers"
    )
    assert rule.check(call(account=TELEMARKETER, callee="+12125550103"), config) == ALLOW
    assert rule.check(call(account=TELEMARKETER, callee=None), config) == ALLOW
    assert rule.check(call(account=ACME, callee="+12125550101"), config) == ALLOW  # not telemarketing
    assert rule.check(call(account=None, callee="+12125550101"), config) == ALLOW
    assert rule.describe(config) == [f"{tmp_path / 'dnc.txt'}: 5 numbers", "numbers: 1 inline"]
    assert rule.warnings(config) == []
    assert rule.warnings(DoNotCallConfig()) == [
        "do_not_call lists no number (files, numbers): it never fires"
    ]


def test_a_reload_with_unchanged_files_reads_nothing_and_a_changed_file_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two policy loads (a SIGHUP reload) share the loaded list while the file is
    unchanged, as do the accounts whose rules repeat it; after an edit the new numbers
    count. Reads are counted at the parser."""
    reads: list[Path] = []
    parse = policies.lists._read_numbers
    monkeypatch.setattr(policies.lists, "_read_numbers", lambda path: reads.append(path) or parse(path))
    (tmp_path / "dnc.txt").write_text("+12125550100\n")
    path = tmp_path / "policy.yaml"
    path.write_text(
        textwrap.dedent("""\
        accounts:
          dialer: {sources: [192.0.2.0/24], telemarketing: true, rules: {do_not_call: {mode: monitor}}}
        rules:
          do_not_call: {files: [dnc.txt]}
        """)
    )
    first = load_policy(path)
    reloaded = load_policy(path)
    loaded = [config.files[0] for config in _do_not_call_configs(first) + _do_not_call_configs(reloaded)]
    assert len(loaded) == 4 and all(listed is loaded[0] for listed in loaded)
    assert reads == [tmp_path / "dnc.txt"]
    (tmp_path / "dnc.txt").write_text("+12125550100\n+12125550101\n")
    edited = load_policy(path)
    assert len(reads) == 2
    assert "+12125550101" in _do_not_call_configs(edited)[0].files[0]
    assert "+12125550101" not in _do_not_call_configs(first)[0].files[0]  # the old policy keeps its list


def _do_not_call_configs(policy: Any) -> list[DoNotCallConfig]:
    rule_sets = [policy.rules, *policy.account_rules.values()]
    return [config for rules in rule_sets for _, config in rules if isinstance(config, DoNotCallConfig)]


# -- policy file, sipguard check, engine ------------------------------------------------------------
TELEMARKETING_POLICY = """\
accounts:
  dialer:
    sources: [192.0.2.0/24]
    numbers: ["+14155550100-+14155550199"]
    telemarketing: true
  office:
    sources: [198.51.100.0/24]
rules:
  do_not_call:
    files: [lists/dnc.txt]
  calling_hours:
    start: 08:00
    end: 21:00        # unquoted: YAML 1.1 would read 1260
    days: {sun: closed}
"""


def test_telemarketing_accounts_in_the_policy_file_and_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "dnc.txt").write_text(DNC_FILE)
    path = tmp_path / "policy.yaml"
    path.write_text(TELEMARKETING_POLICY)
    loaded = load_policy(path)
    assert (loaded.accounts["dialer"].telemarketing, loaded.accounts["office"].telemarketing) == (True, False)
    hours_config = _rule_config(loaded, "calling_hours")
    assert (hours_config.start, hours_config.end) == ("08:00", "21:00")
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"      {tmp_path}/lists/dnc.txt: 5 numbers\n" in out
    assert "  dialer: region US; sources 192.0.2.0/24; owns 1 ranges (100 numbers); telemarketing\n" in out
    assert "  office: region US; sources 198.51.100.0/24; owns none (0 numbers)\n" in out
    path.write_text(TELEMARKETING_POLICY.replace("sun: closed", "sun: shut") + "    unknown_zone: Nowhere\n")
    with pytest.raises(PolicyFileError) as caught:
        load_policy(path)
    assert caught.value.errors == [
        f'{path}:14: rules.calling_hours.days.sun: Value error, expected "HH:MM-HH:MM" or closed; '
        "found 'shut'",
        f"{path}:15: rules.calling_hours.unknown_zone: Value error, 'Nowhere' is neither refuse nor an "
        "IANA time zone such as America/New_York; found 'Nowhere'",
    ]


def _rule_config(loaded: Any, name: str) -> Any:
    (config,) = [config for rule, config in loaded.rules if rule.name == name]
    return config


def test_engine_judges_at_its_wall_clock_with_each_rules_reply(tmp_path: Path) -> None:
    """The engine's wall clock (monotonic + offset, what ``run --wall-clock`` sets) is what
    calling_hours reads: a call to New York at 03:00 there is refused 403, the same call
    from a non-telemarketing account goes through, and at 14:00 a listed number gets 608."""
    (tmp_path / "dnc.txt").write_text("+12125550100\n")
    accounts = {
        "dialer": {"sources": ["192.0.2.0/24"], "telemarketing": True},
        "office": {"sources": ["198.51.100.0/24"]},
    }
    rules = {"calling_hours": {}, "do_not_call": {"files": [str(tmp_path / "dnc.txt")]}}
    compiled = policy(rules, accounts)
    night = PolicyEngine(compiled, wall_offset=at("2026-06-15T03:00:00-04:00") - T0)
    assert decide(night, attempt("night", callee=NEW_YORK)) == Reject(
        status=403, reason="Outside permitted calling hours"
    )
    assert isinstance(decide(night, attempt("office", callee=NEW_YORK, source=ELSEWHERE)), Accept)
    day = PolicyEngine(compiled, wall_offset=at("2026-06-15T14:00:00-04:00") - T0)
    assert isinstance(decide(day, attempt("day", callee=NEW_YORK)), Accept)
    assert decide(day, attempt("listed", callee="+12125550100")) == Reject(
        status=608, reason="Rejected: do-not-call list"
    )


def test_a_listed_number_phonenumbers_calls_invalid_is_still_refused(tmp_path: Path) -> None:
    """A range newer than phonenumbers' metadata (+1 355 is no US area code to it): the
    engine finds no valid callee, and do_not_call looks the dialled digits up itself, in
    the E.164 and the national form."""
    (tmp_path / "dnc.txt").write_text("+13555550123\n")
    accounts = {"dialer": {"sources": ["192.0.2.0/24"], "telemarketing": True}}
    engine = PolicyEngine(policy({"do_not_call": {"files": [str(tmp_path / "dnc.txt")]}}, accounts))
    refused = Reject(status=608, reason="Rejected: do-not-call list")
    assert decide(engine, attempt("e164", uri="sip:+13555550123@pbx.example.com")) == refused
    assert decide(engine, attempt("national", uri="sip:3555550123@pbx.example.com")) == refused
    assert isinstance(decide(engine, attempt("other", uri="sip:+13555550124@pbx.example.com")), Accept)
