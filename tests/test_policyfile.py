"""The policy file (proxy/policyfile.py) and ``sipguard check`` (proxy/cli.py).

Every mistake must be an error that names the file, the line and the key path, and
a typo must say what was meant: a misspelt key that was silently ignored would switch
a rule off. Files are written to tmp_path and loaded as the proxy loads them.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from policies import numbering
from policies.base import Mode
from policies.call_rate import CallRateConfig, RateLimit
from policies.caller_id import CallerIdConfig
from policies.concurrency import ConcurrencyConfig
from policies.numbering import NumberSet
from proxy.cli import main
from proxy.policyfile import CompiledPolicy, PolicyFileError, default_policy, load_policy
from proxy.sip import parse_uri
from proxy.state.redis_url import NodesUrl, parse_nodes_url

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "policies" / "example.yaml"

GOOD = """\
proxy:
  listen: [udp:127.0.0.1:5060, "tcp:[::1]:5060"]
  upstream: udp:127.0.0.1:5070
  trusted_peers: [10.0.0.0/8]
numbering:
  default_region: us
emergency_numbers: [911, 112, 000, +1911]
accounts:
  acme:
    sources: [192.0.2.0/24, 2001:db8::/32]
    numbers: ["+14155550100-+14155550199", "+1415555123*", 4155559999]
    limits:
      concurrent: 20
      calls_per_minute_per_number: 5
  office:
    sources: [192.0.2.128/25]
    auth_usernames: [office-trunk]
    from_domains: [PBX.Office.example]
    region: gb
    numbers: ["020 7946 0000-020 7946 0999"]
    rules:
      concurrency: {mode: monitor}
rules:
  caller_id:
  concurrency:
    per_number: 1
    reply: {code: 480, reason: Busy trunk}
  call_rate:
    per_number: {per_minute: 10, burst: 4}
"""


@pytest.fixture(autouse=True, params=["libyaml", "pure-python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with libyaml's parser and with PyYAML's own (used where PyYAML is
    built without libyaml): the same files must load the same, with the same errors."""
    if request.param == "libyaml" and not yaml.__with_libyaml__:
        pytest.skip("PyYAML is built without libyaml")
    monkeypatch.setattr("proxy.policyfile.LIBYAML", request.param == "libyaml")
    return str(request.param)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> CompiledPolicy:
    return load_policy(write(tmp_path, text))


def errors(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(PolicyFileError) as caught:
        load_policy(path)
    prefix = f"{path}:"
    assert all(line.startswith(prefix) for line in caught.value.errors), caught.value.errors
    return [line.removeprefix(prefix) for line in caught.value.errors]


# -- a good file ----------------------------------------------------------------------------------
def test_a_valid_file_compiles(tmp_path: Path) -> None:
    policy = load(tmp_path, GOOD)
    assert policy.warnings == []
    assert policy.region == "US"
    assert policy.proxy.trusted_peers == ["10.0.0.0/8"]
    assert [str(address) for address in policy.listen] == ["udp:127.0.0.1:5060", "tcp:[::1]:5060"]
    assert str(policy.upstream) == "udp:127.0.0.1:5070"
    assert policy.emergency.numbers == frozenset({"911", "112", "000", "1911"})

    assert [rule.name for rule, _ in policy.rules] == ["caller_id", "concurrency", "call_rate"]
    caller_id, concurrency, call_rate = (config for _, config in policy.rules)
    assert caller_id == CallerIdConfig()
    assert isinstance(concurrency, ConcurrencyConfig)
    assert (concurrency.per_number, concurrency.per_account, concurrency.reply.code) == (1, 30, 480)
    assert isinstance(call_rate, CallRateConfig)
    assert call_rate.per_number == RateLimit(per_minute=10, burst=4)

    acme, office = policy.accounts["acme"], policy.accounts["office"]
    assert (acme.region, office.region) == ("US", "GB")
    assert "+14155550150" in acme.numbers
    assert "+14155551234" in acme.numbers
    assert "+14155559999" in acme.numbers  # an unquoted national number
    assert "+442079460500" in office.numbers
    assert [(str(net), name) for net, name in policy.networks] == [
        ("2001:db8::/32", "acme"),
        ("192.0.2.128/25", "office"),  # most specific first
        ("192.0.2.0/24", "acme"),
    ]
    assert policy.auth_usernames == {"office-trunk": "office"}
    assert policy.from_domains == {"pbx.office.example": "office"}

    acme_rules = dict((rule.name, config) for rule, config in policy.account_rules["acme"])
    assert isinstance(acme_rules["concurrency"], ConcurrencyConfig)
    assert (acme_rules["concurrency"].per_number, acme_rules["concurrency"].per_account) == (1, 20)
    assert isinstance(acme_rules["call_rate"], CallRateConfig)
    assert acme_rules["call_rate"].per_number == RateLimit(per_minute=5, burst=4)  # the rule's burst kept
    office_rules = dict((rule.name, config) for rule, config in policy.account_rules["office"])
    assert office_rules["concurrency"].mode is Mode.MONITOR
    assert office_rules["concurrency"].reply.code == 480
    assert [config.mode for _, config in policy.rules] == [Mode.ENFORCE] * 3


def test_an_empty_file_is_the_default_policy_with_a_warning(tmp_path: Path) -> None:
    policy = load(tmp_path, "# nothing yet\n")
    assert (policy.rules, policy.accounts) == ((), {})
    assert policy.warnings == [f"{policy.path}:1: rules: no rules: every call is forwarded unjudged"]
    assert policy.proxy == default_policy().proxy
    assert default_policy().warnings == []  # no file at all: a plain proxy, as asked


def test_mode_override_reaches_account_rules(tmp_path: Path) -> None:
    policy = load(tmp_path, GOOD + "mode_override: tag\n")
    modes = {config.mode for _, config in policy.rules}
    modes |= {config.mode for rules in policy.account_rules.values() for _, config in rules}
    assert modes == {Mode.TAG}


def test_numbers_stay_text(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        """\
        emergency_numbers: [000, 0118, 911]
        accounts:
          au:
            sources: [192.0.2.1/32]
            region: AU
            numbers: [0255501234]
        """,
    )
    assert policy.emergency.numbers == frozenset({"000", "0118", "911"})
    assert "+61255501234" in policy.accounts["au"].numbers


def test_an_emergency_number_that_could_never_match_is_an_error(tmp_path: Path) -> None:
    """A call to 911 must never be refused: an entry that can never match what is dialled
    (YAML's yes, a spaced or lettered number) used to load as the text 'True', '9 1 1' ..."""
    text = 'emergency_numbers:\n  - 911\n  - yes\n  - "9 1 1"\n  - 9II\n  - 1.5\n  - "+1911"\n'
    assert errors(tmp_path, text) == [
        "3: emergency_numbers.1: Input should be a valid string; found True",
        "4: emergency_numbers.2: Value error, an emergency number is digits, with or without a leading + "
        "(911, 112, +1911); found '9 1 1'",
        "5: emergency_numbers.3: Value error, an emergency number is digits, with or without a leading + "
        "(911, 112, +1911); found '9II'",
        "6: emergency_numbers.4: Input should be a valid string; found 1.5",
    ]


# -- typos ----------------------------------------------------------------------------------------
TYPOS = """\
proxy:
  listen: [udp:127.0.0.1:5060]
  upstraem: udp:127.0.0.1:5070
numbering:
  default_regoin: US
acounts: {}
accounts:
  acme:
    sources: [192.0.2.0/24]
    numbers: ["+14155550100"]
    auth_username: [acme]
    limits:
      concurent: 5
      calls_per_minute: 30
    rules:
      concurency: {per_number: 3}
      call_rate:
        per_numbr: 4
rules:
  callerid: {}
  concurrency:
    per_acount: 10
    reply: {code: 486, reasn: Busy}
  call_rate:
    per_number: {per_minute: 10, burts: 3}
"""


def by_line(lines: list[str]) -> list[str]:
    return sorted(lines, key=lambda line: int(line.split(":")[0]))


def test_typos_at_every_level_say_where_and_what_was_meant(tmp_path: Path) -> None:
    # the file's sections and every rule are checked in one run (the account's rules: need a
    # valid file first: see below)
    assert by_line(errors(tmp_path, TYPOS)) == [
        "3: proxy.upstraem: unknown key 'upstraem' (did you mean 'upstream'?)",
        "5: numbering.default_regoin: unknown key 'default_regoin' (did you mean 'default_region'?)",
        "6: acounts: unknown key 'acounts' (did you mean 'accounts'?)",
        "11: accounts.acme.auth_username: unknown key 'auth_username' (did you mean 'auth_usernames'?)",
        "13: accounts.acme.limits.concurent: unknown key 'concurent' (did you mean 'concurrent'?)",
        "20: rules.callerid: unknown rule 'callerid' (did you mean 'caller_id'?)",
        "22: rules.concurrency.per_acount: unknown key 'per_acount' (did you mean 'per_account'?)",
        "23: rules.concurrency.reply.reason: Field required; found {'code': 486, 'reasn': 'Busy'}",
        "23: rules.concurrency.reply.reasn: unknown key 'reasn' (did you mean 'reason'?)",
        "25: rules.call_rate.per_number.burts: unknown key 'burts' (did you mean 'burst'?)",
    ]


def test_typos_in_account_rule_overrides(tmp_path: Path) -> None:
    text = """\
    accounts:
      acme:
        sources: [192.0.2.0/24]
        rules:
          concurency: {per_number: 3}
          call_rate:
            per_numbr: 4
    rules:
      concurrency: {}
      call_rate: {}
    """
    assert errors(tmp_path, text) == [
        "5: accounts.acme.rules.concurency: unknown rule 'concurency' (did you mean 'concurrency'?)",
        "7: accounts.acme.rules.call_rate.per_numbr: unknown key 'per_numbr' (did you mean 'per_number'?)",
    ]


def test_a_bad_account_limit_is_reported_where_it_is_written(tmp_path: Path) -> None:
    """A limit is validated as the rule setting it maps onto; its errors used to name that
    setting (accounts.acme.rules.call_rate.per_number...), a key not in the file, at the
    account's line."""
    text = """\
    accounts:
      acme:
        sources: [192.0.2.0/24]
        limits:
          calls_per_minute_per_number: {per_minute: 5, burts: 3}
          calls_per_minute: -5
        rules:
          call_rate: {per_source: {per_minute: 0}}
    rules:
      call_rate:
    """
    assert errors(tmp_path, text) == [
        "5: accounts.acme.limits.calls_per_minute_per_number.burts: unknown key 'burts' "
        "(did you mean 'burst'?)",
        "6: accounts.acme.limits.calls_per_minute: Input should be greater than 0; found -5.0",
        "8: accounts.acme.rules.call_rate.per_source.per_minute: Input should be greater than 0; found 0",
    ]


def test_a_known_rule_not_enabled_cannot_be_overridden(tmp_path: Path) -> None:
    text = """\
    accounts:
      acme:
        sources: [192.0.2.0/24]
        rules:
          call_rate: {per_number: 4}
    rules:
      concurrency: {}
    """
    assert errors(tmp_path, text) == [
        "5: accounts.acme.rules.call_rate: rule 'call_rate' is not enabled under rules:"
    ]


def test_an_unknown_key_with_no_close_match_lists_the_known_ones(tmp_path: Path) -> None:
    assert errors(tmp_path, "zzz: 1\n") == [
        "1: zzz: unknown key 'zzz' (expected one of: accounts, admin, emergency_numbers, flood, "
        "mode_override, numbering, proxy, rules, state)"
    ]


# -- wrong types and values ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "proxy:\n  max_calls: lots\n",
            "2: proxy.max_calls: Input should be a valid integer, unable to parse string as an integer; "
            "found 'lots'",
        ),
        (
            "proxy:\n  ringing_timeout: -1\n",
            "2: proxy.ringing_timeout: Input should be greater than 0; found -1",
        ),
        (
            "mode_override: monitr\n",
            "1: mode_override: Input should be 'enforce', 'monitor' or 'tag'; found 'monitr'",
        ),
        (
            "accounts:\n  acme:\n    sources: 192.0.2.0/24\n",
            "3: accounts.acme.sources: Input should be a valid list; found '192.0.2.0/24'",
        ),
        ("accounts: [acme]\n", "1: accounts: Input should be a valid dictionary; found ['acme']"),
        (
            "accounts:\n  acme:\n    limits:\n      concurrent: 0\n",
            "4: accounts.acme.limits.concurrent: Input should be greater than or equal to 1; found 0",
        ),
        (
            "rules:\n  concurrency:\n    per_number: two\n",
            "3: rules.concurrency.per_number: Input should be a valid integer, unable to parse string as an "
            "integer; found 'two'",
        ),
        (
            "rules:\n  caller_id:\n    anonymous: maybe\n",
            "3: rules.caller_id.anonymous: Input should be 'with-owned-identity', 'allow' or 'reject'; "
            "found 'maybe'",
        ),
        (
            "rules:\n  caller_id:\n    mode: enforcing\n",
            "3: rules.caller_id.mode: Input should be 'enforce', 'monitor' or 'tag'; found 'enforcing'",
        ),
        (
            "rules:\n  caller_id:\n    reply: {code: 200, reason: OK}\n",
            "3: rules.caller_id.reply.code: Input should be greater than or equal to 400; found 200",
        ),
        (
            "rules:\n  call_rate:\n    per_number: {per_minute: 0}\n",
            "3: rules.call_rate.per_number.per_minute: Input should be greater than 0; found 0",
        ),
        (
            "rules:\n  concurrency: 5\n",
            "2: rules.concurrency: Input should be a valid dictionary; found 5",
        ),
    ],
)
def test_wrong_types_say_what_was_expected_and_found(tmp_path: Path, text: str, expected: str) -> None:
    assert errors(tmp_path, text) == [expected]


@pytest.mark.parametrize("reason", [r'"Refused\r\nX-Injected: 1"', r'"Refused\0"', r'"Refused\e[31m"'])
def test_a_reply_reason_with_control_characters_is_an_error(tmp_path: Path, reason: str) -> None:
    """The reason phrase goes on the status line; RFC 3261 §25.1 allows no control character
    in it but HTAB. Only CR and LF used to be refused: a NUL or an escape reached the wire."""
    [error] = errors(tmp_path, f"rules:\n  caller_id:\n    reply: {{code: 403, reason: {reason}}}\n")
    assert error.startswith(
        "3: rules.caller_id.reply.reason: Value error, a reason phrase is text on one line, without "
        "control characters; found "
    )


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("rules:\n  call_rate: {per_number: .inf}\n", "2: rules.call_rate.per_number.per_minute"),
        ("rules:\n  usage: {max_call_duration: .inf}\n", "2: rules.usage.max_call_duration"),
        ("rules:\n  dialer: {bulk: {warning: .nan}}\n", "2: rules.dialer.bulk.warning"),
        ("proxy:\n  ringing_timeout: .inf\n", "2: proxy.ringing_timeout"),
        ("state:\n  timeout: .nan\n", "2: state.timeout"),
        (
            "accounts:\n  acme:\n    limits: {calls_per_minute: .inf}\n",
            "3: accounts.acme.limits.calls_per_minute",
        ),
    ],
)
def test_infinity_and_nan_are_errors(tmp_path: Path, text: str, where: str) -> None:
    """YAML reads .inf and .nan as floats: per_minute .inf loaded, then every INVITE the
    rule judged raised ZeroDivisionError (60 / inf is 0 s between calls)."""
    found = errors(tmp_path, text)
    assert {error.split(": Input")[0] for error in found} == {where}
    assert f"{where}: Input should be a finite number; found {text.split('.')[-1][:3]}" in found


def test_the_file_must_be_a_mapping(tmp_path: Path) -> None:
    assert errors(tmp_path, "- rules\n") == [
        "1: the file must be a mapping of sections (proxy, accounts, rules ...)"
    ]


def test_invalid_yaml(tmp_path: Path) -> None:
    [error] = errors(tmp_path, "rules:\n  caller_id: {mode: enforce\nproxy: {}\n")
    assert error.startswith("3: not valid YAML: ")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("emergency_numbers: &numbers [911, *numbers]\n", "1: emergency_numbers.1"),
        ("accounts:\n  acme: &acme\n    sources: []\n    rules: *acme\n", "4: accounts.acme.rules"),
        ("accounts:\n  acme: &acme\n    <<: *acme\n", "2: accounts.acme"),
    ],
)
def test_an_alias_inside_its_own_anchor_is_an_error(tmp_path: Path, text: str, where: str) -> None:
    """Such a value is infinitely deep: building it used to end in a RecursionError traceback."""
    assert errors(tmp_path, text) == [f"{where}: an alias refers to the mapping or list it is part of"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2001-02-30", "cannot read '2001-02-30' as !!timestamp (quote it to make it text)"),
        ("!!int abc", "cannot read 'abc' as !!int (quote it to make it text)"),
        ("!!bool maybe", "cannot read 'maybe' as !!bool (quote it to make it text)"),
        ("!foo bar", "unknown tag '!foo'"),
        ("!!python/name:os.system x", "unknown tag '!!python/name:os.system'"),
    ],
)
def test_a_value_yaml_cannot_construct_is_an_error(tmp_path: Path, value: str, problem: str) -> None:
    """These used to end in a ValueError, KeyError or ConstructorError traceback."""
    assert errors(tmp_path, f"proxy:\n  server_header: {value}\n") == [
        f"2: proxy.server_header: not valid YAML: {problem}"
    ]


@pytest.mark.parametrize(
    "text", ["accounts:\n  ? [acme, beta]\n  : {sources: []}\n", "accounts:\n  {acme: 1}: {}\n"]
)
def test_a_key_that_is_a_list_or_mapping_is_an_error(tmp_path: Path, text: str) -> None:
    """Such a key cannot be a Python dict key: it used to end in a TypeError traceback."""
    [error] = errors(tmp_path, text)
    assert error.startswith("2: accounts: a key must be a single value (a name or a number); found ")


def test_a_value_nested_thousands_deep_is_an_error(tmp_path: Path) -> None:
    """PyYAML composes nodes recursively: this used to end in a RecursionError traceback."""
    [error] = errors(tmp_path, "proxy: {}\nrules: " + "[\n" * 5000 + "]" * 5000 + "\n")
    line, message = error.split(": ", 1)
    assert (int(line) > 2, message) == (True, "not valid YAML: nested too deeply")  # where it got too deep


def test_a_control_character_is_an_error_naming_its_line(tmp_path: Path) -> None:
    """PyYAML's parser raised it as a traceback; libyaml's named line 1 and "<unicode string>"."""
    assert errors(tmp_path, 'proxy:\n  server_header: "Acme\x07"\n') == [
        "2: not valid YAML: character U+0007 in column 23: control characters are not allowed"
    ]


def test_a_syntax_error_names_the_same_line_with_either_parser(tmp_path: Path) -> None:
    """libyaml words some problems differently from PyYAML; the line is the same."""
    text = "accounts:\n  acme:\n    sources: [192.0.2.0/24\n  beta: {}\nrules: {}\n"
    [error] = errors(tmp_path, text)
    assert error.startswith("4: not valid YAML: ")


def test_a_value_nested_a_hundred_thousand_deep_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """libyaml's own composer (yaml.CSafeLoader) recurses in C: this killed the process
    with SIGSEGV, and a SIGHUP reload of such a file would have taken the proxy down."""
    [error] = errors(tmp_path, "rules: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert error == "1: not valid YAML: nested too deeply"


def test_bytes_that_are_not_utf8_name_their_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(b"rules:\n  caller_id:\n    reply: {code: 403, reason: Caf\xe9}\n")  # Latin-1
    with pytest.raises(PolicyFileError) as caught:
        load_policy(path)
    assert caught.value.errors == [
        f"{path}:3: cannot read: not UTF-8: byte 0xe9 in column 35 (save the file as UTF-8)"
    ]


def test_an_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(PolicyFileError, match=f"^{missing}: cannot read: "):
        load_policy(missing)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rules: {}\nproxy: {}\nrules: {}\n", ["3: rules: duplicate key (YAML keeps only the last one)"]),
        (
            "accounts:\n  acme:\n    sources: [192.0.2.0/24]\n    numbers: []\n    sources: [10.0.0.0/8]\n",
            ["5: accounts.acme.sources: duplicate key (YAML keeps only the last one)"],
        ),
        (
            "accounts:\n  acme: {}\n  beta: {}\n  acme: {}\n",
            ["4: accounts.acme: duplicate key (YAML keeps only the last one)"],
        ),
        (
            "rules:\n  concurrency: {per_number: 1, per_number: 5}\n",
            ["2: rules.concurrency.per_number: duplicate key (YAML keeps only the last one)"],
        ),
    ],
)
def test_duplicate_keys_are_errors(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert errors(tmp_path, text) == expected


def test_merge_keys_share_settings_and_explicit_keys_win(tmp_path: Path) -> None:
    """``<<: *anchor`` is how engineers share one account's settings with the next; it used
    to crash the load with a traceback."""
    policy = load(
        tmp_path,
        """\
        accounts:
          acme: &trunk
            sources: [192.0.2.0/24]
            numbers: ["+14155550100-+14155550199"]
            limits: {concurrent: 5, concurrent_per_number: 3}
          beta:
            <<: *trunk
            sources: [198.51.100.0/24]
          gamma:
            <<: [{limits: {concurrent: 7}}, *trunk]
            sources: [203.0.113.0/24]
            numbers: ["+14155550200"]
        rules:
          concurrency:
        """,
    )
    assert "+14155550150" in policy.accounts["beta"].numbers
    assert "+14155550150" not in policy.accounts["gamma"].numbers  # its own key wins over <<
    assert [(str(net), name) for net, name in policy.networks] == [
        ("192.0.2.0/24", "acme"),
        ("198.51.100.0/24", "beta"),
        ("203.0.113.0/24", "gamma"),
    ]
    beta = dict((rule.name, config) for rule, config in policy.account_rules["beta"])
    gamma = dict((rule.name, config) for rule, config in policy.account_rules["gamma"])
    assert (beta["concurrency"].per_account, beta["concurrency"].per_number) == (5, 3)
    assert gamma["concurrency"].per_account == 7  # the first mapping listed under << wins


def test_a_typo_inside_a_merged_mapping_names_the_line_it_is_on(tmp_path: Path) -> None:
    text = "accounts:\n  acme: &trunk\n    limits: {concurent: 5}\n  beta:\n    <<: *trunk\n"
    assert errors(tmp_path, text) == [
        "3: accounts.acme.limits.concurent: unknown key 'concurent' (did you mean 'concurrent'?)",
        "3: accounts.beta.limits.concurent: unknown key 'concurent' (did you mean 'concurrent'?)",
    ]


def test_a_merge_key_must_name_mappings(tmp_path: Path) -> None:
    assert errors(tmp_path, "accounts:\n  acme:\n    <<: [1, 2]\n") == [
        "3: accounts.acme.<<: merges mappings (<<: *anchor or <<: [*a, *b]); found 1"
    ]


@pytest.mark.parametrize(
    ("numbers", "message"),
    [
        ('["+14155550199-+14155550100"]', "must run low to high"),
        ('["+19995550100"]', "'+19995550100': number cannot exist"),
        ('["415555*"]', "prefix '415555*' must be + and digits, then *"),
        ('["acme"]', "'acme': not a telephone number"),
    ],
)
def test_bad_number_specs(tmp_path: Path, numbers: str, message: str) -> None:
    text = f"accounts:\n  acme:\n    sources: [192.0.2.0/24]\n    numbers: {numbers}\n"
    [error] = errors(tmp_path, text)
    assert error.startswith("4: accounts.acme.numbers: ")
    assert message in error


@pytest.mark.parametrize(
    ("text", "prefix", "message"),
    [
        (
            "accounts:\n  acme:\n    numbers: []\n    sources: [192.0.2.0/33]\n",
            "4: accounts.acme.sources: ",
            "'192.0.2.0/33' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            "accounts:\n  acme:\n    sources: [acme.example]\n",
            "3: accounts.acme.sources: ",
            "'acme.example' does not appear to be an IPv4 or IPv6 network",
        ),
        (
            "proxy:\n  trusted_peers: [10.0.0.0/8, 300.0.0.1]\n",
            "2: proxy.trusted_peers: ",
            "'300.0.0.1' does not appear to be an IPv4 or IPv6 network",
        ),
        ("proxy:\n  listen: [udp:127.0.0.1:sip]\n", "2: proxy.listen: ", "not an address"),
        ("proxy:\n  upstream: udp:pbx:99999\n", "2: proxy.upstream: ", "port out of range"),
    ],
)
def test_bad_addresses(tmp_path: Path, text: str, prefix: str, message: str) -> None:
    [error] = errors(tmp_path, text)
    assert error.startswith(prefix)
    assert message in error


@pytest.mark.parametrize("value", [r'"sipguard\r\nX-Injected: 1"', r'"sipguard\n"', r'"sip\0guard"'])
def test_a_server_header_on_more_than_one_line_is_an_error(tmp_path: Path, value: str) -> None:
    """It is written into every reply sipguard sends: a CR or LF in it would add header lines."""
    [error] = errors(tmp_path, f"proxy:\n  server_header: {value}\n")
    assert error.startswith(
        "2: proxy.server_header: Value error, a header value is printable text on one line; found "
    )


@pytest.mark.parametrize(
    "advertise",
    [r'"sbc.example.net\r\nX-Injected: 1"', '"sbc example"', "198.51.100.10:5060", '"[2001:db8::5]"'],
)
def test_advertise_must_be_a_host(tmp_path: Path, advertise: str) -> None:
    """It is written into Via and Record-Route (host:port): anything but a host breaks them."""
    [error] = errors(tmp_path, f"proxy:\n  listen: [udp:0.0.0.0:5060]\n  advertise: {advertise}\n")
    assert error.startswith(
        "3: proxy.advertise: Value error, expected an IP address or a host name (IPv6 without brackets, "
        "no port); found "
    )


@pytest.mark.parametrize("advertise", ["sbc.example.net", "198.51.100.10", '"2001:db8::5"', "SBC-1.example"])
def test_advertise_takes_ip_addresses_and_host_names(tmp_path: Path, advertise: str) -> None:
    policy = load(tmp_path, f"proxy:\n  listen: [udp:0.0.0.0:5060]\n  advertise: {advertise}\n")
    assert policy.proxy.advertise == advertise.strip('"')


def test_unknown_regions(tmp_path: Path) -> None:
    text = """\
    numbering:
      default_region: XX
    accounts:
      acme:
        sources: [192.0.2.0/24]
        region: Narnia
        numbers: ["+14155550100"]
      beta:
        sources: [198.51.100.0/24]
        region: null
    """
    assert errors(tmp_path, text) == [
        "2: numbering.default_region: Value error, unknown region 'XX' (ISO 3166 code such as US, GB, DE); "
        "found 'XX'",
        "6: accounts.acme.region: Value error, unknown region 'Narnia' (ISO 3166 code such as US, GB, DE); "
        "found 'Narnia'",
    ]


def test_errors_in_sections_and_rules_are_reported_together(tmp_path: Path) -> None:
    text = """\
    proxy: {max_calls: 0}
    rules:
      concurrency: {per_number: 0}
      caller_id: {anonymous: nope}
    """
    assert [error.split(":")[0] for error in errors(tmp_path, text)] == ["1", "3", "4"]


# -- warnings -----------------------------------------------------------------------------------
def test_overlapping_numbers_warn(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        """\
        accounts:
          acme:
            sources: [192.0.2.0/24]
            numbers: ["+14155550100-+14155550199"]
          beta:
            sources: [198.51.100.0/24]
            numbers:
              - "+14155550150"
              - "+1415555019*"
        rules:
          caller_id:
        """,
    )
    assert policy.warnings == [
        f"{policy.path}:7: accounts.beta.numbers: accounts 'acme' and 'beta' both own "
        "+14155550150, +14155550190-+14155550199"
    ]


def test_accounts_that_share_no_number_are_not_compared_pair_by_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Comparing every pair of accounts took 17 minutes for 20,000 accounts (200 million
    pairs), for sipguard check and for each reload, which holds the event loop meanwhile."""
    compared: list[tuple[int, int]] = []
    overlaps = NumberSet.overlaps
    monkeypatch.setattr(
        NumberSet,
        "overlaps",
        lambda one, other: compared.append((len(one), len(other))) or overlaps(one, other),
    )
    accounts = "".join(
        f"  a{n:02d}:\n    sources: [10.0.{n}.0/24]\n    numbers: ['+1415555{n:02d}00-+1415555{n:02d}99']\n"
        for n in range(60)
    )
    late = "  late:\n    sources: [10.1.0.0/24]\n    numbers: ['+14155550150', '+141555559*']\n"
    policy = load(tmp_path, "accounts:\n" + accounts + late + "rules: {caller_id: }\n")
    assert [warning.split(": ", 2)[2] for warning in policy.warnings] == [
        "accounts 'a01' and 'late' both own +14155550150",
        "accounts 'a59' and 'late' both own +14155555900-+14155555999",
    ]
    assert len(compared) == 2  # the two pairs that share numbers, not 61 * 60 / 2


def test_a_source_username_or_domain_claimed_by_two_accounts_warns(tmp_path: Path) -> None:
    """A copied account whose sources were not changed: one of the two never gets those
    calls, and nothing used to say so."""
    text = """\
    accounts:
      acme:
        sources: [192.0.2.0/24]
        auth_usernames: [trunk-1]
        from_domains: [pbx.acme.example]
      acme2:
        sources: [192.0.2.7/24]
        auth_usernames: [trunk-1]
        from_domains: [PBX.acme.example]
    rules: {caller_id: }
    """
    policy = load(tmp_path, text)
    assert [warning.removeprefix(f"{policy.path}:") for warning in policy.warnings] == [
        "7: accounts.acme2.sources.0: 192.0.2.7/24 has host bits set: it means 192.0.2.0/24 (the host "
        "alone is 192.0.2.7)",
        "7: accounts.acme2.sources: 192.0.2.0/24 is also account 'acme''s: its calls go to 'acme' alone",
        "8: accounts.acme2.auth_usernames: trunk-1 is also account 'acme''s: its calls go to 'acme2' alone",
        "9: accounts.acme2.from_domains: pbx.acme.example is also account 'acme''s: its calls go to "
        "'acme2' alone",
    ]


def test_an_account_no_call_can_match_warns(tmp_path: Path) -> None:
    policy = load(tmp_path, "accounts:\n  lost:\n    numbers: ['+14155550100']\nrules: {caller_id: }\n")
    assert policy.warnings == [
        f"{policy.path}:2: accounts.lost: account 'lost' has no sources, from_domains or auth_usernames: "
        "no call can match it"
    ]


@pytest.mark.parametrize(
    ("rule", "body"),
    [
        ("concurrency", "{per_number: null, per_account: null}"),
        ("call_rate", "{per_number: null, per_account: null, per_source: null}"),
    ],
)
def test_a_rule_with_no_limit_warns(tmp_path: Path, rule: str, body: str) -> None:
    policy = load(tmp_path, f"proxy: {{}}\nrules:\n  {rule}: {body}\n")
    [warning] = policy.warnings
    assert warning.startswith(f"{policy.path}:3: rules.{rule}: {rule} has no limit set")
    assert warning.endswith("it never fires")


def test_a_file_with_its_rules_cut_off_warns(tmp_path: Path) -> None:
    """A file truncated (or emptied) before its rules loads: SIGHUP applied it and every
    call went through unjudged, with nothing said."""
    text = "accounts:\n  acme:\n    sources: [192.0.2.0/24]\n    numbers: ['+14155550100']\n"
    assert load(tmp_path, text).warnings == [
        f"{tmp_path / 'policy.yaml'}:1: rules: no rules: every call is forwarded unjudged"
    ]
    assert load(tmp_path, text + "rules: {}\n").warnings == [
        f"{tmp_path / 'policy.yaml'}:5: rules: no rules: every call is forwarded unjudged"
    ]
    assert load(tmp_path, text + "rules: {caller_id: }\n").warnings == []


def test_no_emergency_numbers_warns(tmp_path: Path) -> None:
    policy = load(tmp_path, "rules: {caller_id: }\nemergency_numbers: []\n")
    assert policy.warnings == [
        f"{policy.path}:2: emergency_numbers: empty: no dialled number is an emergency call "
        "(urn:service:sos still is), so calls to 911 or 112 are judged, counted and refused like any other"
    ]


def test_an_account_owning_an_emergency_number_warns(tmp_path: Path) -> None:
    """A call to a number EmergencyNumbers takes for 911 (+1911: its national number is 911)
    bypasses every rule, whichever account owns it. A prefix that is a whole country code
    (+1*, +44*) claims every number there and is not warned about."""
    text = """\
    emergency_numbers: [911, 999, "18002738255"]
    accounts:
      short:
        sources: [192.0.2.0/24]
        numbers: ["+14155550100", "+1911*"]
      crisis:
        sources: [192.0.2.0/25]
        region: GB
        numbers:
          - "+18002738200-+18002738299"
          - "+4499*"
      wholesale:
        sources: [198.51.100.0/24]
        numbers: ["+1*", "+44*", "+14155550100-+14155550199"]
    rules: {caller_id: }
    """
    policy = load(tmp_path, text)
    owned = [w.removeprefix(f"{policy.path}:") for w in policy.warnings if "emergency number" in w]
    assert owned == [
        "5: accounts.short.numbers: account 'short' owns +1911 (in +1911*), which dials emergency number "
        "911: calls to it bypass every rule",
        "9: accounts.crisis.numbers: account 'crisis' owns +44999 (in +4499*), which dials emergency "
        "number 999: calls to it bypass every rule",
        "9: accounts.crisis.numbers: account 'crisis' owns +18002738255 (in +18002738200-+18002738299), "
        "which dials emergency number 18002738255: calls to it bypass every rule",
    ]
    # what the warning says is what the engine does: a call to each is an emergency call
    for number in ("+1911", "+44999", "+18002738255"):
        assert policy.emergency.matches(parse_uri(f"tel:{number}"), "US"), number


def test_accounts_owning_emergency_numbers_are_found_once_per_list_not_per_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Which E.164 numbers dial an emergency number takes ~1,700 phonenumbers parses for the
    default list: done once per list (and reload), never once per account of 20,000."""
    parses: list[str] = []
    national = numbering._national_significant
    monkeypatch.setattr(
        numbering, "_national_significant", lambda *args: parses.append(args[0]) or national(*args)
    )
    numbering._emergency_forms.cache_clear()
    accounts = "".join(
        f"  a{n:02d}:\n    sources: [10.0.{n}.0/24]\n    numbers: ['+1415555{n:02d}00-+1415555{n:02d}99']\n"
        for n in range(60)
    )
    text = "emergency_numbers: [911, 112]\naccounts:\n" + accounts + "rules: {caller_id: }\n"
    assert load(tmp_path, text).warnings == []
    once = len(parses)
    assert 0 < once <= 2 * 250  # each number after each country code (~215 of them)
    load(tmp_path, text)
    assert len(parses) == once  # a reload with the same list parses none again


@pytest.mark.parametrize(
    ("section", "key"), [("proxy", "trusted_peers"), ("flood", "exempt"), ("accounts.acme", "sources")]
)
def test_a_network_with_host_bits_set_warns(tmp_path: Path, section: str, key: str) -> None:
    """ipaddress reads 192.0.2.7/24 as 192.0.2.0/24 (strict=False): the whole network where
    the host alone may have been meant."""
    indent = "    " if "." in section else "  "
    head = "accounts:\n  acme:\n" if "." in section else f"{section}:\n"
    text = (
        head + f"{indent}{key}:\n"
        f"{indent}  - 192.0.2.0/24\n"
        f"{indent}  - 10.0.0.10\n"
        f"{indent}  - 198.51.100.7/24\n"
        f"{indent}  - 2001:db8::5/64\n"
        "rules: {caller_id: }\n"
    )
    policy = load(tmp_path, text)
    first = 2 if "." not in section else 3
    path = f"{section}.{key}"
    assert [w.removeprefix(f"{policy.path}:") for w in policy.warnings] == [
        f"{first + 3}: {path}.2: 198.51.100.7/24 has host bits set: it means 198.51.100.0/24 "
        "(the host alone is 198.51.100.7)",
        f"{first + 4}: {path}.3: 2001:db8::5/64 has host bits set: it means 2001:db8::/64 "
        "(the host alone is 2001:db8::5)",
    ]


def test_a_limit_no_enabled_rule_reads_warns(tmp_path: Path) -> None:
    text = """\
        accounts:
          acme:
            sources: [192.0.2.0/24]
            limits: {concurrent: 5, calls_per_minute: 20}
        rules:
          concurrency: {}
        """
    policy = load(tmp_path, text)
    assert policy.warnings == [
        f"{policy.path}:4: accounts.acme.limits.calls_per_minute: limit calls_per_minute is read by no "
        "enabled rule: enable call_rate under rules: for it to apply"
    ]


@pytest.mark.parametrize(
    ("listen", "advertise", "warned"),
    [
        ("[udp:0.0.0.0:5060, udp:127.0.0.1:5062]", None, ["udp:0.0.0.0:5060"]),
        ('["tcp:[::]:5060"]', None, ["tcp:[::]:5060"]),
        ("[udp:0.0.0.0:5060]", "sbc.example.net", []),
        ("[udp:192.0.2.1:5060, udp:localhost:5062]", None, []),
    ],
)
def test_a_wildcard_listen_without_advertise_warns(
    tmp_path: Path, listen: str, advertise: str | None, warned: list[str]
) -> None:
    advertised = f"\n  advertise: {advertise}" if advertise else ""
    policy = load(tmp_path, f"proxy:\n  listen: {listen}{advertised}\nrules: {{caller_id: }}\n")
    assert policy.warnings == [
        f"{policy.path}:2: proxy.listen: {address} is a wildcard address: set proxy.advertise to the "
        "address peers reach this instance at (it goes into Via and Record-Route, where in-dialog "
        "requests are sent)"
        for address in warned
    ]


@pytest.mark.parametrize(
    ("proxy", "warned"),
    [
        ("{upstream: udp:pbx.example.net:5060}", True),
        ("{upstream: udp:pbx.example.net:5060, trusted_peers: [192.0.2.10/32]}", False),
        ("{upstream: udp:192.0.2.10:5060}", False),
    ],
)
def test_a_host_name_upstream_without_trusted_peers_warns(tmp_path: Path, proxy: str, warned: bool) -> None:
    policy = load(tmp_path, f"proxy: {proxy}\nrules: {{caller_id: }}\n")
    expected = (
        f"{policy.path}:1: proxy.upstream: pbx.example.net is a host name: requests from the PBX are told "
        "apart by their source address, so list its addresses in proxy.trusted_peers, or its calls are "
        "judged as a customer's"
    )
    assert policy.warnings == ([expected] if warned else [])


# -- sipguard check ---------------------------------------------------------------------------------
def test_check_reports_a_typo_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "rules:\n  concurrency:\n    per_numbr: 3\n")
    assert main(["check", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        f"{path}:3: rules.concurrency.per_numbr: unknown key 'per_numbr' (did you mean 'per_number'?)\n"
    )


def test_check_summarises_a_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"{path}: OK\n")
    assert "emergency 000, 112, 1911, 911" in out
    assert "rules (3), in the order they run:" in out
    assert "accounts (2):" in out
    assert "acme: region US; sources 2001:db8::/32, 192.0.2.0/24; owns" in out
    assert "office: region GB" in out
    assert "warnings" not in out


class _CountedNetworks(tuple[Any, ...]):
    walks = 0

    def __iter__(self) -> Iterator[Any]:
        type(self).walks += 1
        return super().__iter__()


def test_check_walks_the_source_networks_once_not_once_per_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The summary looked up each account's sources in every network: 20,000 accounts took
    400 million steps (about 25 s of a sipguard check) before printing anything."""
    monkeypatch.setattr(_CountedNetworks, "walks", 0)  # counted afresh for each YAML parser
    policy = load(tmp_path, GOOD)
    counted = dataclasses.replace(policy, networks=_CountedNetworks(policy.networks))
    monkeypatch.setattr("proxy.cli.load_policy", lambda path: counted)
    assert main(["check", policy.path]) == 0
    assert "acme: region US; sources 2001:db8::/32, 192.0.2.0/24; owns" in capsys.readouterr().out
    assert _CountedNetworks.walks == 1


def test_check_lists_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "accounts:\n  lost: {}\nrules:\n  concurrency: {}\n")
    assert main(["check", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert f"warnings (1):\n  {path}:2: accounts.lost: account 'lost' has no sources" in out


def test_check_the_shipped_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert EXAMPLE.is_file(), "policies/example.yaml is the documented starting point"
    assert main(["check", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"{EXAMPLE}: OK\n")
    assert "warnings" not in out
    policy = load_policy(EXAMPLE)
    assert [rule.name for rule, _ in policy.rules] == [
        "caller_id",
        "concurrency",
        "call_rate",
        "dialer",
        "usage",
        "destinations",
        "calling_hours",
        "do_not_call",
    ]
    assert "000" in policy.emergency.numbers


def test_state_takes_memory_or_a_redis_url(tmp_path: Path) -> None:
    assert errors(tmp_path, "state: redis+sentinal://127.0.0.1:26379/mymaster\n") == [
        "1: state.url: Value error, expected memory or a Redis URL (redis://, rediss://, unix://, "
        "redis+sentinel://, redis+cluster://...); found 'redis+sentinal://127.0.0.1:26379/mymaster'"
    ]
    policy = load(tmp_path, "state: {url: 'redis://127.0.0.1:6379/0', lease: 30}\n")
    state = policy.state
    assert (state.url, state.lease, state.timeout) == ("redis://127.0.0.1:6379/0", 30.0, 0.25)


def test_a_redis_timeout_past_the_decision_timeouts_reach_is_refused(tmp_path: Path) -> None:
    """A verdict is given up after 5 s (503 Policy Decision Timeout): a Redis wait that
    long would make every rule's fail_mode moot."""
    [line] = errors(tmp_path, "state: {url: 'redis://127.0.0.1:6379/0', timeout: 5}\n")
    assert line.startswith("1: state.timeout: Input should be less than or equal to 2"), line
    assert load(tmp_path, "state: {url: 'redis://127.0.0.1:6379/0', timeout: 2}\n").state.timeout == 2.0


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        (
            "redis+sentinel://10.0.0.5:26379,10.0.0.6:26379,[2001:db8::7]:26380/sipguard",
            NodesUrl(
                "sentinel", (("10.0.0.5", 26379), ("10.0.0.6", 26379), ("2001:db8::7", 26380)), "sipguard"
            ),
        ),
        (
            "redis+sentinel://:p%40ss%2Fword@sentinel-1.example.net:26379/sipguard/2",
            NodesUrl("sentinel", (("sentinel-1.example.net", 26379),), "sipguard", 2, None, "p@ss/word"),
        ),
        (
            "redis+cluster://10.0.0.5:6379,10.0.0.6:6379",
            NodesUrl("cluster", (("10.0.0.5", 6379), ("10.0.0.6", 6379))),
        ),
        (
            "redis+cluster://sipguard:secret@10.0.0.5:7000",
            NodesUrl("cluster", (("10.0.0.5", 7000),), username="sipguard", password="secret"),
        ),
    ],
)
def test_state_takes_sentinel_and_cluster_urls(tmp_path: Path, url: str, parsed: NodesUrl) -> None:
    assert load(tmp_path, f"state: {{url: '{url}', timeout: 0.5}}\n").state.url == url
    assert parse_nodes_url(url) == parsed


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis://10.0.0.5:abc/0", "Port could not be cast to integer value as 'abc'"),
        ("redis://10.0.0.5:99999/0", "Port out of range 0-65535"),
        ("redis://[2001:db8::7:6379/0", "Invalid IPv6 URL"),
        ("redis://10.0.0.5:6379/zero", "database 'zero' is not a number"),
        ("redis://10.0.0.5:6379/0?db=zero", "Invalid value for 'db' in connection URL."),
        ("redis://10.0.0.5:6379/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://10.0.0.5:6379/0?sockettimeout=1", "redis-py does not take this URL: "),
        ("redis://10.0.0.5:6379/0?ssl_cert_reqs=none", "redis-py does not take this URL: "),
        ("rediss://10.0.0.5:6380/0?ssl_cert_reqs=maybe", "redis-py does not take this URL: "),
        ("unix://", "no socket path"),
    ],
)
def test_malformed_single_server_urls_are_refused(tmp_path: Path, url: str, error: str) -> None:
    """Checked as redis-py will read them: before, ``sipguard check`` said OK and then
    ``run`` stopped with a traceback (a bad port), quietly used database 0 (``/zero``),
    or failed every call with 500 (an option redis-py does not take)."""
    [line] = errors(tmp_path, f"state: {url}\n")
    assert line.startswith(f"1: state.url: Value error, {error}"), line


@pytest.mark.parametrize("url", ["redis://:s3cret@10.0.0.5:abc/0", "rediss://sipguard:s3cret@h:6380/0?bad=1"])
def test_an_error_about_a_url_never_shows_its_password(tmp_path: Path, url: str) -> None:
    """Errors reach logs (a refused reload) and terminals: the shared store's password
    is shown as ***."""
    [line] = errors(tmp_path, f"state: {url}\n")
    assert "s3cret" not in line and ":***@" in line, line


@pytest.mark.parametrize(
    "url",
    [
        "redis://:p%40ss@10.0.0.5:6379/2",
        "redis://sipguard:secret@redis.example.net:6379",
        "redis://[2001:db8::7]:6379/0",
        "rediss://10.0.0.5:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ssl/redis-ca.pem",
        "unix:///run/redis/redis.sock?db=1",
    ],
)
def test_single_server_urls_are_taken(tmp_path: Path, url: str) -> None:
    assert load(tmp_path, f"state: '{url}'\n").state.url == url


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("redis+sentinel://10.0.0.5:26379", "no service name"),
        ("redis+sentinel://10.0.0.5:26379/", "no service name"),
        ("redis+sentinel://10.0.0.5:26379/sipguard/zero", "database 'zero' is not a number"),
        ("redis+sentinel://10.0.0.5/sipguard", "'10.0.0.5' is not HOST:PORT"),
        ("redis+sentinel://10.0.0.5:26379,/sipguard", "'' is not HOST:PORT"),
        ("redis+sentinel://secret@10.0.0.5:26379/sipguard", "credentials go as :PASSWORD@"),
        ("redis+cluster://10.0.0.5:6379/0", "a Redis Cluster has no database or service name"),
        ("redis+cluster://10.0.0.5:99999", "'10.0.0.5:99999' is not HOST:PORT"),
        ("redis+cluster://10.0.0.5:6379?ssl=true", "no query string or fragment"),
    ],
)
def test_malformed_sentinel_and_cluster_urls_are_refused(tmp_path: Path, url: str, error: str) -> None:
    [line] = errors(tmp_path, f"state: {url}\n")
    assert line.startswith(f"1: state.url: Value error, {error}"), line
    assert line.endswith(f"; found '{url}'"), line
