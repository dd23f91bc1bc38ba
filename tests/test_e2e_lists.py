"""End to end: the list rules with real SIPp customers and a SIPp stand-in PBX, as
tests/test_e2e_policies.py runs them (sipguard and SIPp on loopback; customers told apart
by source address; readiness from sipguard's log).

- destinations: a call to a blocked prefix (inline, from a list file, and a number
  phonenumbers calls invalid) is refused 403 while a call inside an allowed prefix
  within the blocked one connects.
- calling_hours: sipguard started with ``--wall-clock`` at 03:00 in New York refuses a
  telemarketing account's call to New York, while the same call from an ordinary
  account, and the telemarketer's call to Tokyo (16:00 there), connect.
- do_not_call: at 14:00 in New York the same call connects, a call to a listed number
  gets 608, and the ordinary account's call to that number connects.

Refused calls use sipp-scenarios/uac_refused.xml (any policy code; the test checks which).
"""

from __future__ import annotations

import pytest
from policy_e2e import (
    ACME,
    GLOBEX,
    PolicyLab,
    assert_calls,
    decision_of,
    decisions,
    final_responses,
    only_call_id,
)
from sipp import SippResult
from test_e2e_policies import assert_guard_clean, pbx_call_ids

pytestmark = [pytest.mark.sipp]

CALLER = "+14155550100"
LONDON = "+442071234567"
PREMIUM = "+449098790000"
INTERNATIONAL_NETWORK = "+8821234567"  # not valid for phonenumbers: matched on its digits
NEW_YORK = "+12125551234"
TOKYO = "+81312345678"
LISTED = "+12125550199"
ACCOUNTS = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    telemarketing: true
  globex:
    sources: [{GLOBEX}/32]
"""


def refused(result: SippResult, status: int, reason: str) -> str:
    """The one call of ``result`` was refused ``status reason``: its Call-ID."""
    assert_calls(result, [status])
    (answer,) = final_responses(result, status)
    assert answer.first_line == f"SIP/2.0 {status} {reason}"
    return only_call_id(result)


def test_blocked_destinations_refused_allowed_destination_connects(policy_lab: PolicyLab) -> None:
    (policy_lab.lab.workdir / "premium.txt").write_text(
        "# premium rate, international networks\n+449\n+882\n"
    )
    policy_lab.start(f"""
        accounts:
          acme: {{sources: [{ACME}/32]}}
        rules:
          destinations:
            block: ["+44"]
            allow: ["+4420"]
            block_files: [premium.txt]
        """)

    london = policy_lab.run("uac_caller.xml", CALLER, dialled=LONDON)
    premium = policy_lab.run("uac_refused.xml", CALLER, dialled=PREMIUM)
    network = policy_lab.run("uac_refused.xml", CALLER, dialled=INTERNATIONAL_NETWORK)

    log, pbx = policy_lab.finish()
    assert_calls(london, [200])
    premium_list = policy_lab.lab.workdir / "premium.txt"
    for result, detail in [
        (premium, f"{PREMIUM} is in blocked prefix +449 ({premium_list}:2)"),
        (network, f"{INTERNATIONAL_NETWORK} is in blocked prefix +882 ({premium_list}:3)"),
    ]:
        decision = decision_of(log, refused(result, 403, "Destination not permitted"))
        assert (decision["verdict"], decision["rule"], decision["detail"]) == (
            "reject",
            "destinations",
            detail,
        )
    assert decision_of(log, only_call_id(london))["verdict"] == "accept"
    assert len(decisions(log)) == 3
    assert pbx_call_ids(pbx) == {only_call_id(london)}
    assert_guard_clean(log, ended_by_bye=1)


def test_calling_hours_at_3am_in_new_york(policy_lab: PolicyLab) -> None:
    policy_lab.start(ACCOUNTS + "rules:\n  calling_hours: {}\n", wall_clock="2026-06-15T03:00:00-04:00")

    night = policy_lab.run("uac_refused.xml", CALLER, source=ACME, dialled=NEW_YORK)
    ordinary = policy_lab.run("uac_caller.xml", CALLER, source=GLOBEX, dialled=NEW_YORK)
    tokyo = policy_lab.run("uac_caller.xml", CALLER, source=ACME, dialled=TOKYO)

    log, pbx = policy_lab.finish()
    decision = decision_of(log, refused(night, 403, "Outside permitted calling hours"))
    assert (decision["account"], decision["rule"], decision["detail"]) == (
        "acme", "calling_hours", f"{NEW_YORK}: Mon 03:00 in America/New_York, calls 08:00-21:00",
    )  # fmt: skip
    assert_calls(ordinary, [200])
    assert_calls(tokyo, [200])  # 16:00 in Tokyo
    assert decision_of(log, only_call_id(ordinary))["account"] == "globex"
    assert pbx_call_ids(pbx) == {only_call_id(ordinary), only_call_id(tokyo)}
    assert_guard_clean(log, ended_by_bye=2)


def test_do_not_call_at_2pm_in_new_york(policy_lab: PolicyLab) -> None:
    (policy_lab.lab.workdir / "dnc.txt").write_text(f"# do not call\n+12125550100\n{LISTED}\n")
    rules = "rules:\n  calling_hours: {}\n  do_not_call: {files: [dnc.txt]}\n"
    policy_lab.start(ACCOUNTS + rules, wall_clock="2026-06-15T14:00:00-04:00")

    afternoon = policy_lab.run("uac_caller.xml", CALLER, source=ACME, dialled=NEW_YORK)
    listed = policy_lab.run("uac_refused.xml", CALLER, source=ACME, dialled=LISTED)
    ordinary = policy_lab.run("uac_caller.xml", CALLER, source=GLOBEX, dialled=LISTED)

    log, pbx = policy_lab.finish()
    assert_calls(afternoon, [200])  # the call refused at 03:00
    decision = decision_of(log, refused(listed, 608, "Rejected: do-not-call list"))
    dnc = policy_lab.lab.workdir / "dnc.txt"
    assert (decision["account"], decision["rule"], decision["detail"]) == (
        "acme", "do_not_call", f"{LISTED} is on the do-not-call list {dnc}",
    )  # fmt: skip
    assert "also" not in decision  # inside calling hours
    assert_calls(ordinary, [200])
    assert pbx_call_ids(pbx) == {only_call_id(afternoon), only_call_id(ordinary)}
    assert_guard_clean(log, ended_by_bye=2)
