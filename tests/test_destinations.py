"""The ``destinations`` rule (traffic pumping, toll fraud) and the prefix lists it reads:
longest-prefix decisions over nested block and allow lists, prefix files (comments,
separators, bad lines named file:line), the allow-only style, callees phonenumbers does
not call valid, and the rule in a policy file, in ``sipguard check`` and in the engine.

Pure: hand-built CallContexts (test_policies.call), list files written to tmp_path.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sipsim import invite
from test_engine import ACCOUNTS, ELSEWHERE, attempt, decide, engine_for
from test_policies import ACME, call

from policies.base import ALLOW, CallContext, Deny, Verdict
from policies.destinations import DestinationsConfig, DestinationsPolicy
from policies.lists import POLICY_FILE, ListedPrefixes, PrefixTable, e164_digits
from policies.telemarketing import DoNotCallConfig
from proxy.cli import main
from proxy.policyfile import PolicyFileError, load_policy
from proxy.sip import Request, parse_message
from proxy.sip.events import Accept, Reject

LONDON = "+442071234567"  # inside +4420, inside +44
LONDON_DRAMA_RANGE = "+442079460123"  # inside +44207946 (Ofcom's numbers for drama), inside +4420
PREMIUM = "+449098790000"  # UK premium rate, inside +44
PARIS = "+33142685300"  # listed nowhere
NEW_YORK = "+12125551234"


def config(tmp_path: Path | None = None, **settings: Any) -> DestinationsConfig:
    """The rule's config as the policy file would give it (list files relative to tmp_path)."""
    context = {POLICY_FILE: str(tmp_path / "policy.yaml")} if tmp_path else None
    return DestinationsConfig.model_validate(settings, context=context)


def check(context: CallContext, settings: DestinationsConfig | dict[str, Any]) -> Verdict:
    rule_config = settings if isinstance(settings, DestinationsConfig) else config(**settings)
    return DestinationsPolicy().check(context, rule_config)


def dialling(uri: str, callee: str | None = None, **kwargs: Any) -> CallContext:
    """A call whose Request-URI is ``uri``, with ``callee`` as the engine normalised it."""
    request = parse_message(invite(uri=uri))
    assert isinstance(request, Request)
    return dataclasses.replace(call(**kwargs), request=request, callee=callee, callee_presented=uri)


# -- prefixes as written ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("written", "digits"),
    [("+882", "882"), ("+44 9", "449"), ("4420", "4420"), ("+1 (212) 555-12.34", "12125551234")],
)
def test_prefixes_are_e164_digits_with_separators_ignored(written: str, digits: str) -> None:
    assert e164_digits(written) == digits


@pytest.mark.parametrize("written", ["", "+", "0044", "+44x", "+1234567890123456", "44 9 #"])
def test_what_is_not_an_e164_prefix(written: str) -> None:
    with pytest.raises(ValueError, match=r"is not an E\.164 number or prefix"):
        e164_digits(written)


# -- the longest prefix decides -------------------------------------------------------------------
NESTED = {"block": ["+44", "+44 207946"], "allow": ["+4420"]}


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (PREMIUM, Deny(f"{PREMIUM} is in blocked prefix +44 (block[0])")),
        (LONDON, ALLOW),  # +4420 inside the blocked +44
        (LONDON_DRAMA_RANGE, Deny(f"{LONDON_DRAMA_RANGE} is in blocked prefix +44207946 (block[1])")),
        (PARIS, ALLOW),  # unlisted
    ],
)
def test_nested_block_and_allow_lists(number: str, expected: Verdict) -> None:
    assert check(call(callee=number), NESTED) == expected


def test_prefix_table_lookup_is_by_length_not_by_order() -> None:
    london = ListedPrefixes("allow", "allow", {"+4420": 0}, in_file=False)
    premium = ListedPrefixes("block", "premium.txt", {"+44": 3, "+449": 7})
    table = PrefixTable([london, premium])
    assert table.longest_match(PREMIUM) == ("+449", premium)
    assert table.longest_match(LONDON) == ("+4420", london)
    assert table.longest_match("+442890123456") == ("+44", premium)
    assert (london.where("+4420"), premium.where("+449")) == ("allow[0]", "premium.txt:7")
    assert table.longest_match(PARIS) is None
    assert table.longest_match("+4") is None  # shorter than every prefix
    assert (len(table), table.blocked, table.allowed) == (3, 2, 1)


def test_a_prefix_both_allowed_and_blocked_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "premium.txt").write_text("# UK premium\n+449\n+4420\n")
    with pytest.raises(
        ValidationError, match=r"\+4420 is both allowed and blocked \(allow\[0\] and .*premium.txt:3\)"
    ):
        config(tmp_path, allow=["+4420"], block_files=["premium.txt"])


def test_allow_only_for_an_account_restricted_to_domestic_calls() -> None:
    """``unlisted: block``: only the allowed prefixes may be called; a blocked range inside
    them (+1 900 premium) stays blocked, being the longer prefix."""
    domestic = {"allow": ["+1"], "block": ["+1900"], "unlisted": "block"}
    assert check(call(callee=NEW_YORK), domestic) == ALLOW
    assert check(call(callee="+19005551234"), domestic) == Deny(
        "+19005551234 is in blocked prefix +1900 (block[0])"
    )
    assert check(call(callee=LONDON), domestic) == Deny(f"{LONDON} is in no allowed prefix")


# -- what was dialled -----------------------------------------------------------------------------
def test_a_callee_that_is_not_a_number_is_allowed_or_refused_as_configured() -> None:
    alice = dialling("sip:alice@pbx.example.com")
    assert check(alice, {"block": ["+882"]}) == ALLOW
    assert check(alice, {"block": ["+882"], "non_number": "block"}) == Deny(
        "callee sip:alice@pbx.example.com is not a telephone number"
    )


@pytest.mark.parametrize(
    ("uri", "account"),
    [
        ("sip:+8821234567@pbx.example.com", ACME),  # not valid for phonenumbers: still +882...
        ("sip:0118821234567@pbx.example.com", ACME),  # US international form (011), region US
        ("tel:+882-123-4567", None),
    ],
)
def test_numbers_phonenumbers_calls_invalid_cannot_slip_past_a_block(uri: str, account: Any) -> None:
    """An unallocated or newly allocated range is what a pumping scheme may dial: the
    engine finds no valid E.164 callee, and the rule reads the dialled digits itself."""
    verdict = check(dialling(uri, account=account), {"block": ["+882"]})
    assert verdict == Deny("+8821234567 is in blocked prefix +882 (block[0])")


def test_national_digits_without_a_region_are_not_a_number() -> None:
    """With no region to read 0118... in (a context built without one): not a number."""
    context = dialling("sip:0118821234567@pbx.example.com", account=None)
    assert check(context, {"block": ["+882"]}) == ALLOW
    assert isinstance(check(context, {"block": ["+882"], "non_number": "block"}), Deny)


def test_a_caller_of_no_account_dials_in_the_default_region() -> None:
    """numbering.default_region reads the national and international forms of callers of
    no account, for the block list too: 011 882... from them is +882..., refused as the
    +882... form is (it was taken for no number, and let through)."""
    engine = engine_for({"destinations": {"block": ["+882"]}}, numbering={"default_region": "US"})
    refused = Reject(status=403, reason="Destination not permitted")
    for name, dialled in (("plus", "+8821234567"), ("011", "0118821234567")):
        call = attempt(name, uri=f"sip:{dialled}@pbx.example.com", source=ELSEWHERE)
        assert decide(engine, call) == refused, dialled


# -- prefix files ---------------------------------------------------------------------------------
PREMIUM_FILE = """\
# UK premium rate and international networks
+44 9        # premium
+882
  +883   \r
4420x        # (never reached: see the bad-line test)
"""


def test_prefix_files_with_comments_separators_and_crlf(tmp_path: Path) -> None:
    (tmp_path / "premium.txt").write_text(
        PREMIUM_FILE.replace("4420x        # (never reached: see the bad-line test)\n", "")
    )
    (tmp_path / "london.txt").write_text("+4420\n")
    rule = config(tmp_path, block=["+44"], block_files=["premium.txt"], allow_files=["london.txt"])
    premium = rule.block_files[0]
    assert premium.lines == {"+449": 2, "+882": 3, "+883": 4}  # prefix -> line
    assert check(call(callee=PREMIUM), rule) == Deny(
        f"{PREMIUM} is in blocked prefix +449 ({premium.path}:2)"
    )
    assert check(call(callee=LONDON), rule) == ALLOW
    assert check(call(callee="+442890123456"), rule) == Deny(
        "+442890123456 is in blocked prefix +44 (block[0])"
    )
    assert DestinationsPolicy().describe(rule) == [
        "4 blocked and 1 allowed prefixes; unlisted numbers: allow"
    ]
    assert rule.model_dump()["block_files"] == [str(tmp_path / "premium.txt")]


def test_a_bad_line_in_a_prefix_file_is_named_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "premium.txt").write_text(PREMIUM_FILE)
    with pytest.raises(ValidationError) as caught:
        config(tmp_path, block_files=["premium.txt"])
    (error,) = caught.value.errors()
    assert error["loc"] == ("block_files", 0)
    assert error["msg"].endswith(f"{tmp_path / 'premium.txt'}:5: '4420x' is not an E.164 number or prefix "
                                 "(+ optional, then the country code, 1-15 digits)")  # fmt: skip


@pytest.mark.parametrize(
    ("name", "error", "also_as_numbers"),
    [
        ("missing.txt", "missing.txt: cannot read: No such file or directory", True),
        ("folder", "folder: cannot read: Is a directory", True),
        # (a number file is read as bytes: there a stray byte is a bad line, not bad text)
        ("latin1.txt", "latin1.txt:2: not UTF-8 text (invalid continuation byte)", False),
    ],
)
def test_unreadable_list_files(tmp_path: Path, name: str, error: str, also_as_numbers: bool) -> None:
    (tmp_path / "latin1.txt").write_bytes(b"+44\n+33 # caf\xe9\n")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValidationError) as caught:
        config(tmp_path, block_files=[name])
    assert f"Value error, {tmp_path}/{error} " in str(caught.value)
    if also_as_numbers:
        with pytest.raises(ValidationError) as caught:
            DoNotCallConfig.model_validate({"files": [str(tmp_path / name)]})
        assert f"Value error, {tmp_path}/{error} " in str(caught.value)


def test_an_unchanged_file_is_read_once_and_a_changed_one_again(tmp_path: Path) -> None:
    """A policy reload with the same list file shares the loaded list; editing the file
    (a new mtime or size) or replacing it (a new inode) loads it anew."""
    path = tmp_path / "premium.txt"
    path.write_text("+449\n")
    first = config(tmp_path, block_files=["premium.txt"])
    again = config(tmp_path, block_files=[str(path)])  # relative or absolute: the same file
    assert again.block_files[0] is first.block_files[0]
    path.write_text("+449\n+882\n")
    edited = config(tmp_path, block_files=["premium.txt"])
    assert edited.block_files[0] is not first.block_files[0]
    assert list(edited.block_files[0].lines) == ["+449", "+882"]
    replacement = tmp_path / "new.txt"
    replacement.write_text("+449\n+883\n")
    stat = path.stat()
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime and size
    replacement.replace(path)
    replaced = config(tmp_path, block_files=["premium.txt"])
    assert list(replaced.block_files[0].lines) == ["+449", "+883"]


def test_a_hundred_thousand_prefixes_load_and_match(tmp_path: Path) -> None:
    """Scale, not speed (the benchmark times it): every listed prefix is found, the
    longest one wins, and a number under none is unlisted."""
    prefixes = [f"+{7_000_000 + 37 * index}" for index in range(100_000)]  # 8 digits, distinct
    (tmp_path / "many.txt").write_text("\n".join(prefixes) + "\n")
    rule = config(tmp_path, block_files=["many.txt"], allow=[prefixes[500] + "5"])
    assert len(rule.table) == 100_001
    assert check(call(callee=prefixes[99_999] + "123"), rule) == Deny(
        f"{prefixes[99_999]}123 is in blocked prefix {prefixes[99_999]} ({tmp_path / 'many.txt'}:100000)"
    )
    assert check(call(callee=prefixes[500] + "5123"), rule) == ALLOW
    assert check(call(callee="+69000000123"), rule) == ALLOW


# -- in a policy file, sipguard check and the engine ---------------------------------------------
def test_policy_file_lists_relative_to_it_and_errors_with_both_lines(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "premium.txt").write_text("+449\n+88 2\n+883 x\n")
    path = tmp_path / "policy.yaml"
    path.write_text(
        textwrap.dedent("""\
        rules:
          destinations:
            block:
              - +44 9
              - +44y
            block_files: [lists/premium.txt]
        """)
    )
    with pytest.raises(PolicyFileError) as caught:
        load_policy(path)
    assert caught.value.errors == [
        f"{path}:5: rules.destinations.block.1: Value error, '+44y' is not an E.164 number or prefix "
        "(+ optional, then the country code, 1-15 digits); found '+44y'",
        f"{path}:6: rules.destinations.block_files.0: Value error, {tmp_path}/lists/premium.txt:3: "
        "'+883 x' is not an E.164 number or prefix (+ optional, then the country code, 1-15 digits); "
        "found 'lists/premium.txt'",
    ]


def test_check_prints_the_list_sizes_and_warns_about_an_empty_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "premium.txt").write_text("+449\n+882\n+883\n")
    path = tmp_path / "policy.yaml"
    path.write_text(
        textwrap.dedent("""\
        accounts:
          domestic:
            sources: [192.0.2.0/24]
            rules:
              destinations: {allow: ["+1"], unlisted: block}
        rules:
          destinations:
            block: [+44]
            allow: [+4420]
            block_files: [premium.txt]
        """)
    )
    assert main(["check", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "      4 blocked and 1 allowed prefixes; unlisted numbers: allow\n" in out
    account_line = "    destinations: allow=['+1'], unlisted=block\n"
    assert account_line + "      4 blocked and 1 allowed prefixes; unlisted numbers: block\n" in out
    assert "warnings" not in out
    path.write_text("rules:\n  destinations: {}\n")
    assert main(["check", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert f"{path}:2: rules.destinations: destinations lists no prefix" in out


def test_engine_refuses_with_the_rules_reply_and_account_overrides_apply() -> None:
    """In the engine: the rule's 403 for a blocked destination; an account restricted to
    domestic calls (per-account ``rules:``) refused an international one others may call."""
    accounts = {
        **ACCOUNTS,
        "beta": {**ACCOUNTS["beta"], "rules": {"destinations": {"allow": ["+1"], "unlisted": "block"}}},
    }
    engine = engine_for({"destinations": {"block": ["+449"]}}, accounts)
    refused = Reject(status=403, reason="Destination not permitted")
    assert decide(engine, attempt("premium", callee=PREMIUM)) == refused
    assert isinstance(decide(engine, attempt("london", callee=LONDON)), Accept)
    beta = {"headers": [("Proxy-Authorization", 'Digest username="beta-trunk"')], "source": ELSEWHERE}
    assert decide(engine, attempt("beta-intl", callee=LONDON, **beta)) == refused
    assert isinstance(decide(engine, attempt("beta-home", callee=NEW_YORK, **beta)), Accept)
    assert engine.counters.rejections == {("destinations", 403): 2}
