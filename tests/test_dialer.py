"""Dialer signatures (policies/dialer.py) over the call history (proxy/state/history.py),
driven through the policy engine with generated call sequences and a fake clock.

Each signature: a person-like sequence stays clean; the dialer pattern warns (tag) at
its warning threshold, refuses and penalty-boxes at its critical one, and never fires
below its minimum sample size. Calls are placed, answered and ended as the proxy core
would report them; ``now`` is only ever passed in.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from structlog.testing import capture_logs
from test_engine import ACCOUNTS, STRIP, T0, attempt, challenged, decide, decisions, end, engine_for

from proxy.engine import TAG_HEADER, PolicyEngine
from proxy.sip.events import Accept, CallAnswered, CallEnded, CallInfo, EndReason, Reject, Verdict
from proxy.state.history import CallHistory, HistorySettings

DIALER = "+14155550150"  # both acme's
PERSON = "+14155550160"
DAY = {"window": 86_400}
REFUSED = Reject(status=403, reason="Automated dialing not permitted")
ONLY = ("sequential", "bulk", "short_calls", "answer_seizure", "abandonment", "pacing")


def only(signature: str, rule: dict[str, Any] | None = None, **settings: Any) -> dict[str, Any]:
    """A dialer rule (``rule`` settings) with one signature on (``settings``), the others off."""
    dialer: dict[str, Any] = {name: None for name in ONLY if name != signature}
    dialer[signature] = settings
    return {"dialer": {**dialer, **(rule or {})}}


@dataclass
class Phone:
    """One caller number placing calls through the engine; a clock it owns."""

    engine: PolicyEngine
    caller: str
    now: float = T0
    calls: int = 0
    verdicts: list[Verdict] = field(default_factory=list)

    def call(
        self, callee: str, *, talk: float | None = 60.0, gap: float = 0.0, by_caller: bool = True
    ) -> Verdict:
        """Wait ``gap`` s, dial; if forwarded: answered after 5 s and ended ``talk`` s later
        (``None``: never answered, ended by a 480 after 20 s)."""
        self.now += gap
        self.calls += 1
        call = attempt(f"{self.caller}-{self.calls}", caller=self.caller, callee=callee, now=self.now)
        verdict = decide(self.engine, call)
        self.verdicts.append(verdict)
        if isinstance(verdict, Accept):
            info = CallInfo(call_id=call.request.call_id, from_tag="t", attempt_id=call.attempt_id,
                            source=call.source, from_customer=True, started_at=self.now)  # fmt: skip
            if talk is None:
                self.now += 20
                ended = CallEnded(call=info, reason=EndReason.REJECTED, now=self.now, status=480)
            else:
                self.now += 5
                self.engine.call_answered(CallAnswered(call=info, now=self.now))
                answered_at = self.now
                self.now += talk
                ended = CallEnded(call=info, reason=EndReason.BYE, now=self.now,
                                  answered_at=answered_at, by_caller=by_caller)  # fmt: skip
            self.engine.call_ended(ended)
        return verdict


def tags(verdict: Verdict) -> list[str]:
    assert isinstance(verdict, Accept), verdict
    return [value for name, value in verdict.add_headers if name == TAG_HEADER]


def clean(verdict: Verdict) -> bool:
    return verdict == Accept(remove_headers=STRIP)


def callee(number: int) -> str:
    return f"+1212555{number:04d}"


# -- a person ------------------------------------------------------------------------------------
def test_a_person_like_day_trips_no_signature() -> None:
    """Eight hours of calls: varied gaps, callees, answers and lengths, a few redials."""
    rng = random.Random(7)
    phone = Phone(engine_for({"dialer": {}}), PERSON)
    recent: list[str] = []
    for _ in range(60):
        number = rng.choice(recent) if recent and rng.random() < 0.2 else callee(rng.randrange(10_000))
        recent.append(number)
        answered = rng.random() < 0.6
        talk = rng.choice([8.0, 25.0, 90.0, 240.0, 600.0]) if answered else None
        phone.call(number, talk=talk, gap=rng.uniform(60, 900))
    assert all(clean(verdict) for verdict in phone.verdicts), phone.verdicts


# -- sequential ---------------------------------------------------------------------------------------
def test_sequential_warns_at_its_run_then_penalty_boxes_the_number() -> None:
    engine = engine_for(only("sequential", warning=4, critical=8))
    dialer = Phone(engine, DIALER)
    verdicts = [dialer.call(callee(100 + index), gap=120) for index in range(8)]
    assert all(clean(verdict) for verdict in verdicts[:3])
    assert tags(verdicts[3]) == [f"dialer; {DIALER}: sequential 4 adjacent callees in a row (warning ≥ 4)"]
    assert verdicts[7] == REFUSED
    # the penalty box: any call from the number, adjacent or not, for penalty_seconds
    assert dialer.call(callee(5000), gap=60) == REFUSED
    person = Phone(engine, PERSON, now=dialer.now)
    assert clean(person.call(callee(7000))), "the account's other numbers go on"
    assert clean(dialer.call(callee(6000), gap=900))  # out of the box after 900 s


def test_a_run_below_the_warning_or_broken_by_another_callee_is_clean() -> None:
    engine = engine_for(only("sequential", warning=4, critical=8))
    dialer = Phone(engine, DIALER)
    numbers = [100, 101, 102, 500, 501, 502, 103, 104, 105]  # runs of 3, turned back, restarted
    assert all(clean(dialer.call(callee(number), gap=120)) for number in numbers)


def test_a_run_spread_over_more_than_the_window_is_not_sequential() -> None:
    """Adjacent callees a day apart (a company's numbers, one a day): the signatures look
    at the calls of the last window, and so does the run."""
    engine = engine_for(only("sequential", warning=4, critical=8))
    dialer = Phone(engine, DIALER)
    assert all(clean(dialer.call(callee(100 + index), gap=86_400)) for index in range(10))
    # inside one window the run counts again from the first of its calls still in it
    verdicts = [dialer.call(callee(110 + index), gap=120) for index in range(3)]
    assert all(clean(verdict) for verdict in verdicts[:2])
    assert tags(verdicts[2]) == [f"dialer; {DIALER}: sequential 4 adjacent callees in a row (warning ≥ 4)"]


def test_a_challenged_calls_retry_keeps_the_warning_its_first_invite_had() -> None:
    """The 4th adjacent call is tagged; the PBX challenges it (407) and the caller sends
    it again with credentials. The retry is that same call, already in the history, so
    the rule is not asked again (it would see a run of 1): it is tagged as the first
    INVITE was, and the run goes on from it (the 5th call is tagged 5)."""
    engine = engine_for(only("sequential", warning=4, critical=8))
    dialer = Phone(engine, DIALER)
    assert all(clean(dialer.call(callee(100 + index), gap=120)) for index in range(3))
    fourth = attempt("fourth", caller=DIALER, callee=callee(103), now=dialer.now + 120)
    warning = f"dialer; {DIALER}: sequential 4 adjacent callees in a row (warning ≥ 4)"
    assert tags(decide(engine, fourth)) == [warning]
    retry = challenged(engine, fourth)
    assert tags(decide(engine, retry)) == [warning]
    dialer.now = retry.now + 60
    end(engine, retry, dialer.now)
    assert tags(dialer.call(callee(104), gap=120)) == [
        f"dialer; {DIALER}: sequential 5 adjacent callees in a row (warning ≥ 4)"
    ]


# -- bulk -----------------------------------------------------------------------------------------------
def test_bulk_counts_distinct_callees_in_the_window() -> None:
    engine = engine_for(only("bulk", warning=20, critical=40))
    dialer = Phone(engine, DIALER)
    rng = random.Random(3)
    numbers = rng.sample(range(0, 10_000, 7), 40)  # never adjacent
    verdicts = [dialer.call(callee(number), gap=rng.uniform(20, 60), talk=30) for number in numbers]
    assert all(clean(verdict) for verdict in verdicts[:19])
    assert tags(verdicts[19])[0].endswith("bulk 20 distinct callees in 3600 s (warning ≥ 20)")
    assert verdicts[39] == REFUSED


def test_bulk_forgets_callees_older_than_the_window() -> None:
    engine = engine_for(only("bulk", {"window": 600}, warning=None, critical=10))
    dialer = Phone(engine, DIALER)
    assert all(clean(dialer.call(callee(number * 7), gap=100, talk=10)) for number in range(30))


def test_redialling_the_same_people_is_not_bulk() -> None:
    engine = engine_for(only("bulk", warning=5, critical=8))
    dialer = Phone(engine, DIALER)
    assert all(clean(dialer.call(callee(number % 4 * 7), gap=200)) for number in range(40))


# -- short calls -------------------------------------------------------------------------------------------
def test_short_calls_trip_only_after_min_calls_answered() -> None:
    engine = engine_for(only("short_calls", warning=0.7, critical=0.9, min_calls=20))
    dialer = Phone(engine, DIALER)
    verdicts = [dialer.call(callee(number * 7), talk=10, gap=120) for number in range(21)]
    assert all(clean(verdict) for verdict in verdicts[:20]), "19 answered calls: below min_calls"
    assert verdicts[20] == REFUSED  # 20 answered, all short
    [boxed] = engine.history.penalties(dialer.now)
    assert boxed == f"num:{DIALER}"


def test_some_short_calls_among_long_ones_warn_at_most() -> None:
    engine = engine_for(only("short_calls", DAY, warning=0.7, critical=0.9, min_calls=10))
    dialer = Phone(engine, DIALER)
    for number in range(29):
        dialer.call(callee(number * 7), talk=10 if number % 4 else 200, gap=120)  # 21 of 29 short
    assert not any(isinstance(verdict, Reject) for verdict in dialer.verdicts)
    assert tags(dialer.call(callee(9000), gap=120)) == [
        f"dialer; {DIALER}: short calls 72% of 29 answered calls under 30 s (warning ≥ 0.7)"
    ]


# -- answer-seizure ratio -------------------------------------------------------------------------------
def test_answer_seizure_floor_after_min_calls() -> None:
    engine = engine_for(only("answer_seizure", warning=0.2, critical=0.08, min_calls=30))
    dialer = Phone(engine, DIALER)
    verdicts = [dialer.call(callee(number * 7), talk=None, gap=60) for number in range(31)]
    assert all(clean(verdict) for verdict in verdicts[:30])
    assert verdicts[30] == REFUSED


def test_answer_seizure_of_a_person_who_reaches_a_third_of_callees_is_clean() -> None:
    engine = engine_for(only("answer_seizure", warning=0.2, critical=0.08, min_calls=30))
    dialer = Phone(engine, DIALER)
    for number in range(60):
        dialer.call(callee(number * 7), talk=120 if number % 3 == 0 else None, gap=60)
    assert all(clean(verdict) for verdict in dialer.verdicts)


# -- abandonment ------------------------------------------------------------------------------------------
def test_abandonment_counts_answered_calls_the_caller_drops_at_once() -> None:
    engine = engine_for(only("abandonment", DAY, warning=0.03, critical=0.10, min_calls=20))
    dialer = Phone(engine, DIALER)
    for number in range(19):
        dialer.call(callee(number * 7), talk=120, gap=60)
    dialer.call(callee(500), talk=1.0, gap=60)  # 1 of 20: 5 %
    assert tags(dialer.call(callee(600), gap=60))[0].endswith(
        "abandonment 5% of 20 answered calls dropped by the caller (warning ≥ 0.03)"
    )
    dialer.call(callee(700), talk=1.0, gap=60, by_caller=False)  # the callee hung up: not a drop
    assert tags(dialer.call(callee(800), gap=60))[0].startswith(f"dialer; {DIALER}: abandonment 5% of 22")
    dialer.call(callee(900), talk=0.5, gap=60)
    dialer.call(callee(1000), talk=0.5, gap=60)  # 3 of 24: 12.5 %
    assert dialer.call(callee(1100), gap=60) == REFUSED


# -- pacing -------------------------------------------------------------------------------------------------
def test_machine_regular_pacing_trips_after_min_calls_gaps() -> None:
    engine = engine_for(only("pacing", max_gap=3.0, warning=0.25, critical=0.1, min_calls=10))
    dialer = Phone(engine, DIALER)
    rng = random.Random(5)
    verdicts = [
        dialer.call(callee(number * 7), talk=45, gap=1.0 + rng.uniform(-0.05, 0.05)) for number in range(12)
    ]
    # the first call has no previous hang-up: gaps come from the second call on
    assert all(clean(verdict) for verdict in verdicts[:10])
    assert verdicts[10] == REFUSED


def test_a_person_redialling_quickly_but_irregularly_is_clean() -> None:
    engine = engine_for(only("pacing", max_gap=3.0, warning=0.25, critical=0.1, min_calls=10))
    person = Phone(engine, PERSON)
    rng = random.Random(11)
    for number in range(40):
        person.call(callee(number * 7), talk=rng.uniform(20, 300), gap=rng.choice([0.5, 1.5, 3.0, 4.5]))
    assert all(clean(verdict) for verdict in person.verdicts)


def test_an_account_asking_for_more_pacing_samples_than_the_file_wide_rule_still_trips() -> None:
    """The history keeps as many gaps as any account's min_calls needs: kept to the
    file-wide rule's 20, an account's min_calls of 30 could never be reached."""
    accounts = {**ACCOUNTS, "acme": {**ACCOUNTS["acme"], "rules": {"dialer": {"pacing": {"min_calls": 30}}}}}
    engine = engine_for(only("pacing", max_gap=3.0, warning=0.25, critical=0.1, min_calls=10), accounts)
    dialer = Phone(engine, DIALER)
    rng = random.Random(5)
    for number in range(31):
        dialer.call(callee(number * 7), talk=45, gap=1.0 + rng.uniform(-0.05, 0.05))
    assert all(clean(verdict) for verdict in dialer.verdicts[:30]), "29 gaps: below the account's min_calls"
    assert dialer.verdicts[30] == REFUSED


# -- scopes, modes, the penalty box ---------------------------------------------------------------------
def test_an_account_wide_critical_boxes_every_number_of_the_account() -> None:
    engine = engine_for(only("answer_seizure", warning=None, critical=0.1, min_calls=6, scopes=["account"]))
    numbers = [f"+141555501{index:02d}" for index in range(6)]  # six numbers, one unanswered call each
    phones = [Phone(engine, number) for number in numbers]
    for index, phone in enumerate(phones):
        phone.now = T0 + 60 * index
        phone.call(callee(index * 7), talk=None)
    late = Phone(engine, PERSON, now=T0 + 1000)
    assert late.call(callee(9000)) == REFUSED
    assert "acct:acme" in engine.history.penalties(late.now)
    assert engine.history.release("acct:acme")  # an operator's unban: a fresh start
    assert clean(late.call(callee(9100)))
    assert not engine.history.release("acct:acme")


def test_monitor_mode_forwards_but_logs_the_would_be_refusals_and_the_box() -> None:
    engine = engine_for(only("sequential", {"mode": "monitor"}, warning=None, critical=3))
    dialer = Phone(engine, DIALER)
    for number in range(3):
        dialer.call(callee(100 + number), gap=120)
    with capture_logs() as logs:
        assert clean(dialer.call(callee(4000), gap=60))  # in the box: would be refused
    [line] = decisions(logs)
    assert line["also"][0]["mode"] == "monitor"
    assert "penalty box" in line["also"][0]["detail"]
    assert all(isinstance(verdict, Accept) for verdict in dialer.verdicts)
    assert engine.counters.penalised == {"dialer": 1}


def test_the_decision_line_explains_a_penalty() -> None:
    engine = engine_for(only("sequential", warning=None, critical=3))
    dialer = Phone(engine, DIALER)
    with capture_logs() as logs:
        for number in range(3):
            dialer.call(callee(100 + number), gap=120)
    [boxed] = [entry for entry in logs if entry["event"] == "penalty.boxed"]
    assert boxed["subjects"] == [f"num:{DIALER}"] and boxed["seconds"] == 900.0
    [refusal] = [line for line in decisions(logs) if line["verdict"] == "reject"]
    assert refusal["rule"] == "dialer"
    assert refusal["detail"] == f"{DIALER}: sequential 3 adjacent callees in a row (critical ≥ 3)"


def test_an_account_can_loosen_a_signature() -> None:
    accounts = {
        **ACCOUNTS,
        "acme": {**ACCOUNTS["acme"], "rules": {"dialer": {"sequential": {"warning": None, "critical": 50}}}},
    }
    engine = engine_for(only("sequential", warning=None, critical=3), accounts)
    dialer = Phone(engine, DIALER)
    assert all(clean(dialer.call(callee(100 + number), gap=120)) for number in range(10))


def test_a_reload_keeps_the_history_and_the_box() -> None:
    rules = only("sequential", warning=None, critical=3)
    engine = engine_for(rules)
    dialer = Phone(engine, DIALER)
    for number in range(3):
        dialer.call(callee(100 + number), gap=120)
    engine.replace(engine_for(rules).policy)
    assert dialer.call(callee(5000), gap=60) == REFUSED


# -- the history itself ----------------------------------------------------------------------------------
def test_history_is_bounded_by_subjects() -> None:
    history = CallHistory(HistorySettings(window=60, max_subjects=100))
    for index in range(1000):
        history.call_started(f"a{index}", (f"num:+1{index:010d}",), "+12125550100", now=float(index))
        history.call_ended(f"a{index}", float(index) + 1, by_caller=True)
    assert len(history) <= 100


def test_the_penalty_box_is_bounded_too() -> None:
    """A penalty is looked at again only when its subject calls: a dialer that moves to a
    new number after each box leaves one behind each time. Past the bound, the penalties
    that are over go; in a flood of live ones, those ending soonest."""
    history = CallHistory(HistorySettings(max_subjects=100))
    for index in range(1000):  # one number boxed every 10 s, each for 60 s
        history.penalise(f"num:+1{index:010d}", index * 10.0 + 60, "dialer", "sequential", now=index * 10.0)
    assert len(history._penalties) <= 100
    assert len(history.penalties(9990.0)) == 6, "the ones still running are kept"
    for index in range(1000):  # a flood: every one still running
        history.penalise(f"num:+2{index:010d}", 20_000.0 + index, "dialer", "bulk", now=10_000.0)
    assert len(history._penalties) <= 100
    assert history.penalty("num:+20000000999", 10_000.0) is not None, "the longest-running stays"


def test_history_windows_drop_old_calls() -> None:
    history = CallHistory(HistorySettings(window=100))
    for index in range(10):
        history.call_started(f"a{index}", ("num:+1",), f"+1212555{index * 7:04d}", now=float(index * 20))
        history.call_ended(f"a{index}", float(index * 20 + 5), by_caller=None)
    subject = history.subject("num:+1", now=200.0)
    assert subject is not None
    assert (len(subject.attempts), len(subject.callees), subject.ended) == (5, 5, 5)
