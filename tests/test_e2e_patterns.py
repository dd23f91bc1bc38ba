"""End to end: the abuse-pattern policies (issue 5) with real SIPp customers and a SIPp
stand-in PBX, as tests/test_e2e_policies.py does for the three mission policies (its
module docstring explains the set-up; the helpers are in tests/policy_e2e.py).
"""

from __future__ import annotations

import pytest
from policy_e2e import (
    ACME,
    CALLEE,
    PolicyLab,
    assert_calls,
    assert_pbx_clean,
    decision_of,
    final_statuses,
    in_call_order,
)

pytestmark = [pytest.mark.sipp]

DIALER_NUMBER = "+14155550100"
PERSON_NUMBER = "+14155550101"  # the same account's


# -- dialer signatures: sequential dialing and the penalty box ---------------------------------------
SEQUENTIAL = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["+14155550100-+14155550199"]
rules:
  dialer:
    sequential: {{warning: 3, critical: 5}}
    penalty_seconds: 600
"""


def test_sequential_dialer_is_penalty_boxed_person_on_same_account_is_not(policy_lab: PolicyLab) -> None:
    """A dialer calling +12125550101, ...0102, ... one after another: the 3rd and 4th calls
    are tagged (warning), the 5th is refused 403 and puts its number in the penalty box, so
    the 6th to 8th are refused too. A person on the same account, calling meanwhile and
    after, connects every time; so does nothing of theirs get tagged."""
    guard = policy_lab.start(SEQUENTIAL)
    dialer = policy_lab.call("uac_sequential.xml", DIALER_NUMBER, dialled="+1212555010", calls=8,
                             rate=5, hold_ms=100)  # fmt: skip
    person = policy_lab.run("uac_caller.xml", PERSON_NUMBER, calls=3, rate=2, hold_ms=100)
    boxed_calls = dialer.wait()
    guard.wait_for("penalty.boxed")
    elsewhere = policy_lab.run("uac_sequential.xml", DIALER_NUMBER, dialled="+4420794600")  # not adjacent
    person_after = policy_lab.run("uac_caller.xml", PERSON_NUMBER, hold_ms=100)

    log, pbx = policy_lab.finish()
    statuses = assert_calls(boxed_calls, [200] * 4 + [403] * 4)
    assert_calls(person, [200] * 3)
    assert_calls(person_after, [200])
    assert_calls(elsewhere, [403])
    dialer_calls = [decision_of(log, call_id) for call_id in in_call_order(statuses)]
    assert [call.get("warnings", [{}])[0].get("rule") for call in dialer_calls[:4]] == [
        None, None, "dialer", "dialer",
    ]  # fmt: skip
    fifth = dialer_calls[4]
    assert (fifth["verdict"], fifth["rule"]) == ("reject", "dialer")
    assert fifth["detail"] == f"{DIALER_NUMBER}: sequential 5 adjacent callees in a row (critical ≥ 5)"
    for boxed in [*dialer_calls[5:], decision_of(log, next(iter(final_statuses(elsewhere))))]:
        assert boxed["rule"] == "dialer" and "in the penalty box" in boxed["detail"], boxed
    (penalty,) = log.named("penalty.boxed")
    assert (penalty["subjects"], penalty["seconds"]) == ([f"num:{DIALER_NUMBER}"], 600.0)
    for call_id in [*final_statuses(person), *final_statuses(person_after)]:
        decision = decision_of(log, call_id)
        assert decision["verdict"] == "accept" and "warnings" not in decision, decision
        assert decision["callee"] == CALLEE
    assert_pbx_clean(pbx, invites=4 + 3 + 1)
    tagged = [m for m in pbx.requests("received", "INVITE") if m.headers("x-sipguard-tag")]
    assert len(tagged) == 2 and all(m.headers("x-sipguard-tag")[0].startswith("dialer; ") for m in tagged)
