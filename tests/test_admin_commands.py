"""The admin commands: ``sipguard status``, ``explain``, ``unban`` and ``reload``.

First the recent-decisions memory (proxy/decisions.py) fed by a PolicyEngine directly:
bounded, updated when a call is answered and ends, live calls counted by account and
number, and the ``explain`` text. Then against a live sipguard (tests/policy_e2e.py) with
its admin listener on a free loopback port and SIPp customers, the CLI driven through
``main([...])`` (and once as the installed console script): status while calls are up and
after, explain of a refused and of an accepted call, unban of a penalty-boxed number,
reload of a good and of a broken file, and the token.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.server
import json
import logging
import socket
import subprocess
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from policy_e2e import (
    ACME,
    CALLEE,
    GLOBEX,
    PolicyLab,
    admin_address,
    assert_calls,
    cli,
    final_statuses,
    only_call_id,
)
from sipp import LOOPBACK, checkout_env, free_ports, installed_sipguard, wait_until
from sipsim import invite
from structlog.testing import capture_logs

from proxy.admin import UNBAN_USAGE
from proxy.admin_client import RELOAD_TIMEOUT, admin_call, explain_lines, status_lines
from proxy.cli import main
from proxy.engine import PolicyEngine
from proxy.policyfile import CompiledPolicy, FloodSection, PolicyFileError, compile_policy, load_policy
from proxy.reload import Reloader, ReloadResult
from proxy.sip import Request, parse_message
from proxy.sip.events import (
    Accept,
    Address,
    CallAnswered,
    CallAttempt,
    CallEnded,
    CallInfo,
    EndReason,
    Reject,
    Verdict,
)

WALL_T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z: the engine's wall clock at now = 0
ACME_SOURCE = Address("udp", "192.0.2.10", 5060)
GLOBEX_SOURCE = Address("udp", "198.51.100.20", 5060)
ACME_NUMBER = "+14155550100"
ACME_OTHER = "+14155550101"
GLOBEX_NUMBER = "+14155550200"
TOKEN = "admin-token-0123456789"


class Judge:
    """A PolicyEngine, and the calls it has been asked about by name."""

    def __init__(self, rules: dict[str, Any], recent_calls: int = 100) -> None:
        accounts = {
            "acme": {"sources": ["192.0.2.0/24"], "numbers": ["+14155550100-+14155550199"]},
            "globex": {"sources": ["198.51.100.0/24"], "numbers": ["+14155550200-+14155550299"]},
        }
        data = {"accounts": accounts, "rules": rules, "admin": {"recent_calls": recent_calls}}
        self.engine = PolicyEngine(compile_policy(data, {}, "admin-test.yaml"), wall_offset=WALL_T0)
        self.calls: dict[str, CallInfo] = {}

    def invite(
        self, name: str, caller: str, now: float, *, source: Address = ACME_SOURCE, callee: str = CALLEE
    ) -> Verdict:
        request = parse_message(
            invite(uri=f"sip:{callee}@pbx.example", from_=f"<sip:{caller}@customer.example>", call_id=name)
        )
        assert isinstance(request, Request)
        attempt_id = f"attempt-{name}-{now}"
        verdict = self.engine.decide_now(
            CallAttempt(attempt_id=attempt_id, request=request, source=source, now=now)
        )
        assert verdict is not None
        self.calls[name] = CallInfo(call_id=name, from_tag="t", attempt_id=attempt_id, source=source,
                                    from_customer=True, started_at=now)  # fmt: skip
        return verdict

    def answer(self, name: str, now: float) -> None:
        self.engine.call_answered(CallAnswered(call=self.calls[name], now=now))

    def end(self, name: str, now: float, reason: EndReason = EndReason.BYE, **details: Any) -> None:
        self.engine.call_ended(CallEnded(call=self.calls[name], reason=reason, now=now, **details))

    def explain(self, name: str, now: float) -> list[dict[str, Any]]:
        return [decision.explain(now) for decision in self.engine.decisions.attempts(name)]


# -- the memory -------------------------------------------------------------------------------------
def test_the_memory_keeps_the_last_n_decisions_and_every_call_still_up() -> None:
    judge = Judge({"caller_id": {}}, recent_calls=3)
    for index in range(5):
        assert isinstance(judge.invite(f"call-{index}", ACME_NUMBER, now=float(index)), Accept)
    memory = judge.engine.decisions
    assert [d.call_id for d in memory.recent] == ["call-2", "call-3", "call-4"]
    assert memory.totals == {"accept": 5}
    # call-0 left the memory but is still up: explain still finds it, until it ends
    assert [entry["call_id"] for entry in judge.explain("call-0", now=10.0)] == ["call-0"]
    judge.end("call-0", now=11.0)
    assert judge.explain("call-0", now=12.0) == []
    assert memory.live_summary()["total"] == 4


def test_explain_follows_a_call_to_its_end() -> None:
    judge = Judge({"caller_id": {}})
    judge.invite("talk", ACME_NUMBER, now=100.0)
    (ringing,) = judge.explain("talk", now=100.5)
    assert ringing["outcome"]["state"] == "ringing" and ringing["outcome"]["seconds"] == 0.5
    judge.answer("talk", now=101.0)
    (up,) = judge.explain("talk", now=111.0)
    assert (up["outcome"]["state"], up["outcome"]["talk_seconds"]) == ("answered", 10.0)
    judge.end("talk", now=161.0, by_caller=True, answered_at=101.0)
    (ended,) = judge.explain("talk", now=500.0)
    assert ended["at"] == "2026-09-21T14:15:00.000+00:00"  # WALL_T0 + 100 s
    assert ended["outcome"] == {
        "state": "ended",
        "answered_at": "2026-09-21T14:15:01.000+00:00",
        "ended_at": "2026-09-21T14:16:01.000+00:00",
        "reason": "bye",
        "status": None,
        "by_caller": True,
        "seconds": 61.0,
        "talk_seconds": 60.0,
    }
    text = "\n".join(explain_lines({"call_id": "talk", "attempts": [ended]}))
    assert "forwarded to the PBX" in text
    assert (
        "call      answered 2026-09-21T14:15:01.000+00:00; ended 2026-09-21T14:16:01.000+00:00 "
        "(bye from the caller), talked 60.0 s; 61.0 s from the INVITE"
    ) in text


def test_a_refusal_is_explained_as_it_is_logged_with_its_counters() -> None:
    judge = Judge({"caller_id": {}, "concurrency": {"per_number": 1, "per_account": 5}})
    assert isinstance(judge.invite("first", ACME_NUMBER, now=1.0), Accept)
    with capture_logs() as logs:
        verdict = judge.invite("second", ACME_NUMBER, now=2.0)
    assert verdict == Reject(status=486, reason="Too many simultaneous calls")
    (line,) = [entry for entry in logs if entry["event"] == "call.decision"]
    (explained,) = judge.explain("second", now=5.0)
    shared = {key: value for key, value in explained.items() if key not in ("at", "outcome")}
    assert {key: value for key, value in line.items() if key not in ("event", "log_level")} == shared
    assert (explained["verdict"], explained["rule"], explained["code"], explained["outcome"]) == (
        "reject", "concurrency", 486, None,
    )  # fmt: skip
    assert {"rule": "concurrency", "what": f"calls from {ACME_NUMBER}", "count": 2, "limit": 1} in (
        explained["counters"]
    )
    text = explain_lines({"call_id": "second", "attempts": [explained]})
    assert f"  verdict   refused 486 by concurrency: calls from {ACME_NUMBER}: 2 > 1" in text
    counters = text[text.index(next(line for line in text if line.startswith("  counters"))) :][:4]
    assert counters == [
        "  counters  RULE         COUNTER                  COUNT  LIMIT",
        f"            concurrency  calls from {ACME_NUMBER}      2      1  over",
        "            concurrency  calls of acme                2      5",
    ]


def test_the_same_call_id_twice_shows_both_attempts_and_monitor_findings() -> None:
    judge = Judge({"caller_id": {"mode": "monitor"}, "concurrency": {"per_number": 1}})
    judge.invite("retried", ACME_NUMBER, now=1.0)
    judge.invite("retried", GLOBEX_NUMBER, now=2.0)  # acme presenting globex's number: monitored
    first, second = judge.explain("retried", now=3.0)
    assert (first["caller_e164"], second["caller_e164"]) == (ACME_NUMBER, GLOBEX_NUMBER)
    assert second["verdict"] == "accept" and second["also"] == [
        {"rule": "caller_id", "mode": "monitor", "detail": f"from {GLOBEX_NUMBER} not owned by acme"}
    ]
    text = explain_lines({"call_id": "retried", "attempts": [first, second]})
    assert text[0] == "Call-ID retried: 2 INVITEs judged"
    assert f"  also      caller_id (monitor): from {GLOBEX_NUMBER} not owned by acme" in text


def test_emergency_and_malformed_calls_are_remembered_too() -> None:
    judge = Judge({"caller_id": {}})
    judge.invite("sos", ACME_NUMBER, now=1.0, callee="911")
    judge.invite("anonymous-number", "not-a-number", now=2.0)
    (sos,) = judge.explain("sos", now=3.0)
    assert (sos["verdict"], sos["account"], sos["callee"], sos["outcome"]["state"]) == (
        "emergency", "acme", "sip:911@pbx.example", "ringing",
    )  # fmt: skip
    assert judge.engine.decisions.totals == {"emergency": 1, "reject": 1}
    assert judge.engine.decisions.live_summary()["total"] == 1


def test_live_calls_by_account_and_number_and_top_callers_over_a_minute() -> None:
    judge = Judge({"caller_id": {}, "concurrency": {"per_number": 2}})
    judge.invite("old", ACME_OTHER, now=0.0)
    judge.end("old", now=1.0)
    for index in range(3):
        judge.invite(f"a{index}", ACME_NUMBER, now=100.0 + index)  # the third is over per_number
    judge.invite("g", GLOBEX_NUMBER, now=104.0, source=GLOBEX_SOURCE)
    memory = judge.engine.decisions
    assert memory.live_summary() == {
        "total": 3,
        "by_account": [{"account": "acme", "calls": 2}, {"account": "globex", "calls": 1}],
        "top_numbers": [{"number": ACME_NUMBER, "calls": 2}, {"number": GLOBEX_NUMBER, "calls": 1}],
    }
    top = memory.top_callers(now=130.0)  # "old" is 130 s back: outside the minute
    assert top == {
        "window_seconds": 60.0,
        "callers": [
            {"number": ACME_NUMBER, "account": "acme", "calls": 3, "per_minute": 3.0, "refused": 1},
            {"number": GLOBEX_NUMBER, "account": "globex", "calls": 1, "per_minute": 1.0, "refused": 0},
        ],
    }
    for name in ("a0", "a1", "g"):
        judge.end(name, now=140.0)
    assert memory.live_summary() == {"total": 0, "by_account": [], "top_numbers": []}
    assert not memory.live_by_account and not memory.live_by_number  # no zero entries left behind


def test_top_callers_say_how_much_a_full_memory_covers() -> None:
    judge = Judge({"caller_id": {}}, recent_calls=10)
    for index in range(30):
        judge.invite(f"c{index}", ACME_NUMBER, now=float(index))  # one a second
    top = judge.engine.decisions.top_callers(now=30.0)
    assert top["window_seconds"] == 10.0  # the 10 remembered: 20..29, seen at 30
    assert (top["callers"][0]["calls"], top["callers"][0]["per_minute"]) == (10, 60.0)


class FloodOnlyGuard:
    """The proxy as a reload touches it: only its flood section is handed over."""

    def reconfigure_flood(self, section: FloodSection) -> None:
        self.flood = section


def test_a_reload_says_a_restart_is_needed_until_the_running_sections_are_back(tmp_path: Path) -> None:
    """proxy:, state: and admin: are what the process started with. A second reload used to
    compare with the first reloaded file instead, and said no restart was needed while
    sipguard still sent to the old upstream."""
    path = tmp_path / "policy.yaml"
    path.write_text("proxy: {upstream: udp:127.0.0.1:5070}\n", encoding="utf-8")
    reloader = Reloader(PolicyEngine(load_policy(path)), FloodOnlyGuard(), str(path))  # type: ignore[arg-type]
    path.write_text("proxy: {upstream: udp:127.0.0.1:5080}\n", encoding="utf-8")
    assert asyncio.run(reloader.reload()).restart_needed
    path.write_text("proxy: {upstream: udp:127.0.0.1:5080}\nrules: {caller_id: }\n", encoding="utf-8")
    assert asyncio.run(reloader.reload()).restart_needed  # still running with 5070
    path.write_text("proxy: {upstream: udp:127.0.0.1:5070}\nrules: {caller_id: }\n", encoding="utf-8")
    assert not asyncio.run(reloader.reload()).restart_needed  # the file says what runs again


ACME_OWNS = "accounts:\n  acme:\n    sources: [192.0.2.0/24]\n    numbers: ['{}']\nrules:\n  caller_id:\n"


def judged(engine: PolicyEngine, name: str, caller: str) -> Verdict | None:
    request = parse_message(invite(from_=f"<sip:{caller}@customer.example>", call_id=name))
    assert isinstance(request, Request)
    return engine.decide_now(CallAttempt(attempt_id=name, request=request, source=ACME_SOURCE, now=1.0))


def test_calls_are_judged_while_a_reload_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload of 20,000 accounts compiled on the event loop for ~12 s, and every call
    through the proxy waited. The compile runs in a worker thread now: here it cannot
    finish until the loop has judged a call meanwhile (by the policy still in force)."""
    path = tmp_path / "policy.yaml"
    path.write_text(ACME_OWNS.format(ACME_NUMBER), encoding="utf-8")
    engine = PolicyEngine(load_policy(path))
    reloader = Reloader(engine, FloodOnlyGuard(), str(path))  # type: ignore[arg-type]
    path.write_text(ACME_OWNS.format(ACME_OTHER), encoding="utf-8")  # ACME_NUMBER is acme's no more
    compiling, judged_meanwhile = threading.Event(), threading.Event()

    def load_after_a_call_is_judged(name: str) -> CompiledPolicy:
        compiling.set()
        # a guard against hanging forever, not the synchronisation: the loop sets the event
        if not judged_meanwhile.wait(timeout=20):
            raise AssertionError("no call was judged while the policy compiled: the loop was held")
        return load_policy(name)

    monkeypatch.setattr("proxy.reload.load_policy", load_after_a_call_is_judged)

    async def reload_and_judge() -> tuple[Verdict | None, ReloadResult]:
        reload = asyncio.create_task(reloader.reload())
        await asyncio.to_thread(compiling.wait)
        meanwhile = judged(engine, "meanwhile", ACME_NUMBER)
        judged_meanwhile.set()
        return meanwhile, await reload

    meanwhile, result = asyncio.run(reload_and_judge())
    assert isinstance(meanwhile, Accept)  # judged during the compile, by the running policy
    assert result.ok
    assert isinstance(judged(engine, "after", ACME_NUMBER), Reject)  # the reloaded policy


def test_a_reload_gives_the_files_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file cut short before its rules: SIGHUP applied it and said nothing, while every
    call went through unjudged. The warnings sipguard check gives are logged, answered to
    POST /reload, and printed by sipguard reload."""
    path = tmp_path / "policy.yaml"
    path.write_text(ACME_OWNS.format(ACME_NUMBER), encoding="utf-8")
    reloader = Reloader(PolicyEngine(load_policy(path)), FloodOnlyGuard(), str(path))  # type: ignore[arg-type]
    path.write_text(ACME_OWNS.format(ACME_NUMBER).partition("rules:")[0], encoding="utf-8")
    with capture_logs() as logs:
        result = asyncio.run(reloader.reload())
    cut_short = f"{path}:1: rules: no rules: every call is forwarded unjudged"
    assert (result.ok, result.warnings, result.as_json()["warnings"]) == (True, [cut_short], [cut_short])
    assert [line["detail"] for line in logs if line["event"] == "policy.warning"] == [cut_short]
    asked: list[tuple[Any, ...]] = []

    def answer(*args: Any, timeout: float) -> tuple[int, Any]:  # POST /reload
        asked.append((*args, timeout))
        return 200, result.as_json()

    monkeypatch.setattr("proxy.admin_client._ask", answer)
    assert cli(capsys, "reload") == (
        0,
        f"{path}: reloaded; new calls are judged by it, calls up keep their slots\n"
        f"warnings (1):\n  {cut_short}\n",
        "",
    )
    # a reload answers once compiled (seconds for a big file): its own, longer wait
    assert [(method, path, timeout) for _, _, method, path, timeout in asked] == [
        ("POST", "/reload", RELOAD_TIMEOUT)
    ]


class SlowExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, as if every compile took long: a job runs when it is
    handed over (the file is read then), its result is handed back when the test says."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.held: list[tuple[concurrent.futures.Future[Any], Any]] = []

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.held.append((future, fn(*args, **kwargs)))
        return future

    def finish_newest(self) -> None:
        future, result = self.held.pop()
        future.set_result(result)


def test_a_reload_asked_while_one_compiles_is_applied_after_it(tmp_path: Path) -> None:
    """Two SIGHUPs, the file edited in between, and the first compile slower than the
    second: had both compiled at once, the first, older file would be swapped in last and
    stay in force. The second reload waits for the first, then reads the file again."""
    path = tmp_path / "policy.yaml"
    path.write_text(ACME_OWNS.format("+14155550199"), encoding="utf-8")
    engine = PolicyEngine(load_policy(path))
    reloader = Reloader(engine, FloodOnlyGuard(), str(path))  # type: ignore[arg-type]

    async def two_reloads() -> list[ReloadResult]:
        executor = SlowExecutor()
        asyncio.get_running_loop().set_default_executor(executor)
        path.write_text(ACME_OWNS.format(ACME_NUMBER), encoding="utf-8")
        first = asyncio.create_task(reloader.reload())
        await asyncio.sleep(0)  # the first reload runs until it waits for its compile
        assert len(executor.held) == 1
        path.write_text(ACME_OWNS.format(ACME_OTHER), encoding="utf-8")
        second = asyncio.create_task(reloader.reload())
        await asyncio.sleep(0)  # the second runs until it waits: for the first, or for its own compile
        while not (first.done() and second.done()):
            if executor.held:
                executor.finish_newest()  # the worst order: the latest compile first
            await asyncio.sleep(0)
        return [first.result(), second.result()]

    assert [result.ok for result in asyncio.run(two_reloads())] == [True, True]
    numbers = engine.policy.accounts["acme"].numbers
    assert (ACME_OTHER in numbers, ACME_NUMBER in numbers) == (True, False)  # the file as edited last


@pytest.fixture
def production_logging() -> Iterator[None]:
    """Accepted calls' decision lines are debug: not built, as in production."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    yield
    structlog.reset_defaults()


@pytest.mark.usefixtures("production_logging")
def test_a_remembered_decision_costs_under_two_kilobytes() -> None:
    """What the memory keeps per decision, as the engine keeps it (its counters included):
    the same calls through an engine remembering them and one remembering none."""
    rules = {"caller_id": {}, "concurrency": {"per_number": 5000, "per_account": 5000}}
    calls = 2000

    def kept_bytes(recent_calls: int) -> int:
        judge = Judge(rules, recent_calls=recent_calls)
        for index in range(200):  # warm: caches and the store's keys exist before measuring
            judge.invite(f"warm{index}", f"+141555501{index % 100:02d}", now=index * 0.01)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for index in range(calls):
            name = f"{index}-8473@127.0.0.2"
            assert isinstance(
                judge.invite(name, f"+141555501{index % 100:02d}", now=10 + index * 0.01), Accept
            )
            judge.end(name, now=10.005 + index * 0.01)
        judge.calls.clear()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        assert len(judge.engine.decisions.recent) == recent_calls
        return sum(stat.size_diff for stat in after.compare_to(before, "filename"))

    per_decision = (kept_bytes(calls) - kept_bytes(0)) / calls
    print(f"{per_decision:.0f} bytes per decision")
    assert 200 < per_decision < 2048, per_decision


def test_status_text_reads_as_a_report() -> None:
    boxed = {"subject": f"num:{ACME_NUMBER}", "kind": "number", "name": ACME_NUMBER, "rule": "dialer"}
    answer = {
        "started_at": "2026-09-21T14:13:20+00:00",
        "uptime_seconds": 7530.0,
        "policy": {
            "path": "/etc/sipguard/policy.yaml",
            "loaded_at": "2026-09-21T14:13:20+00:00",
            "loaded_seconds_ago": 725.0,
            "accounts": 2,
            "rules": [
                {"rule": "caller_id", "mode": "enforce", "reply": "403 Caller ID not permitted"},
                {"rule": "dialer", "mode": "monitor", "reply": "403 Automated dialing not permitted"},
            ],
            "account_modes": {"acme": {"dialer": "enforce"}},
            "reloads": {"succeeded": 1, "failed": 2},
        },
        "live_calls": {
            "total": 3,
            "by_account": [{"account": "acme", "calls": 2}, {"account": None, "calls": 1}],
            "top_numbers": [{"number": ACME_NUMBER, "calls": 2}],
        },
        "top_callers": {
            "window_seconds": 60.0,
            "callers": [
                {"number": ACME_NUMBER, "account": "acme", "calls": 12, "per_minute": 12.0, "refused": 4}
            ],
        },
        "penalty_box": [
            {**boxed, "reason": "sequential", "until": "2026-09-21T16:23:20+00:00", "seconds_left": 598.0}
        ],
        "bans": [],
        "decisions": {"since_start": {"accept": 40, "reject": 4}, "remembered": 44, "capacity": 10000},
    }
    lines = status_lines(answer)
    assert lines[:4] == [
        "sipguard up 2h05m (since 2026-09-21T14:13:20+00:00)",
        "policy /etc/sipguard/policy.yaml, loaded 2026-09-21T14:13:20+00:00 (12m05s ago); 2 accounts; "
        "reloads 1 applied, 2 refused",
        "rules: caller_id enforce, dialer monitor",
        "  acme: dialer enforce",
    ]
    text = "\n".join(lines)
    assert "live calls: 3\nACCOUNT  LIVE\nacme        2\n(none)      1\n" in text
    assert (
        f"CALLER        ACCOUNT  CALLS  PER MIN  REFUSED\n{ACME_NUMBER}  acme        12     12.0        4"
        in text
    )
    assert "penalty box: 1\nKIND    NAME          RULE    LEFT   UNTIL" in text
    assert f"number  {ACME_NUMBER}  dialer  9m58s  2026-09-21T16:23:20+00:00  sequential" in text
    assert "flood bans: none" in text
    assert lines[-1] == (
        "decisions since start: 44 (40 forwarded, 4 refused, 0 emergency); "
        "44 remembered for explain (capacity 10000)"
    )


def test_unban_without_a_target_and_an_address_with_an_account_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["unban", "--admin", "127.0.0.1:9"]) == 2
    assert "unban what?" in capsys.readouterr().err
    assert main(["unban", "192.0.2.7", "--account", "acme", "--admin", "127.0.0.1:9"]) == 2
    assert "--account goes with a number" in capsys.readouterr().err


def test_a_listener_that_is_not_there_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    (port,) = free_ports(1)
    for argv in (["status"], ["explain", "x@y"], ["unban", "+14155550100"], ["reload"]):
        assert main([*argv, "--admin", f"{LOOPBACK}:{port}"]) == 2
        assert f"cannot ask the admin listener at {LOOPBACK}:{port}" in capsys.readouterr().err


NOT_ADMIN_ANSWERS = (
    b"SIP/2.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n",  # --admin pointed at a SIP port
    b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"a"',  # an answer cut short
)


def test_a_listener_that_answers_something_else_than_http_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """http.client's own errors (a status line that is not HTTP, a body shorter than its
    Content-Length) used to escape as a traceback instead of one line and exit 2."""
    server = socket.create_server((LOOPBACK, 0))
    server.settimeout(10)
    port = server.getsockname()[1]

    def answer() -> None:
        for reply in NOT_ADMIN_ANSWERS:
            connection, _ = server.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(reply)

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        for _ in NOT_ADMIN_ANSWERS:
            assert main(["status", "--admin", f"{LOOPBACK}:{port}"]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"sipguard: cannot ask the admin listener at {LOOPBACK}:{port}: ")
            assert err.count("\n") == 1
    finally:
        thread.join(timeout=10)
        server.close()


class _OtherJsonService(http.server.BaseHTTPRequestHandler):
    """Another HTTP service answering JSON to everything: not sipguard's shapes."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b'{"status": "ok", "path": ["not", "a", "string"]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer  # noqa: N815 - the names http.server calls

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_json_answer_that_is_not_sipguards_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """--admin pointed at another HTTP service answering JSON (or a sipguard of another
    version): each command says so in one line and exits 2, where it printed a traceback
    (a KeyError from laying the answer out as text)."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _OtherJsonService)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        for argv, path in (
            (["status"], "/status"),
            (["explain", "x@y"], "/explain?call_id=x%40y"),
            (["unban", "192.0.2.7"], "/unban"),
            (["reload"], "/reload"),
        ):
            assert main([*argv, "--admin", f"{LOOPBACK}:{port}"]) == 2
            captured = capsys.readouterr()
            assert captured.out == ""
            assert captured.err.startswith(
                f"sipguard: the answer of {LOOPBACK}:{port} to {path} is not sipguard's ("
            )
            assert captured.err.count("\n") == 1
        assert main(["status", "--admin", f"{LOOPBACK}:{port}", "--json"]) == 0  # shown as it came
        assert json.loads(capsys.readouterr().out)["status"] == "ok"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


# -- against a live sipguard ------------------------------------------------------------------------
HOLD_MS = 5000  # long enough to ask status while the calls are up
ACCOUNTS = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["+14155550100-+14155550199"]
  globex:
    sources: [{GLOBEX}/32]
    numbers: ["+14155550200-+14155550299"]
"""


def status_when(
    capsys: pytest.CaptureFixture[str], ask: tuple[str, ...], condition: Any, what: str
) -> dict[str, Any]:
    """``sipguard status --json``, asked until ``condition(status)`` holds (10 s at most)."""
    seen: list[dict[str, Any]] = []

    def holds() -> bool:
        code, out, err = cli(capsys, "status", *ask, "--json")
        assert (code, err) == (0, ""), err
        seen[:] = [json.loads(out)]
        return bool(condition(seen[0]))

    wait_until(holds, 10, what)
    return seen[0]


def explained(capsys: pytest.CaptureFixture[str], ask: tuple[str, ...], call_id: str) -> dict[str, Any]:
    """The one attempt ``sipguard explain CALL-ID --json`` shows."""
    code, out, err = cli(capsys, "explain", call_id, *ask, "--json")
    assert (code, err) == (0, ""), err
    answer = json.loads(out)
    assert answer["call_id"] == call_id and len(answer["attempts"]) == 1, answer
    return dict(answer["attempts"][0])


def finish_clean(policy_lab: PolicyLab) -> None:
    log, pbx = policy_lab.finish()
    assert log.returncode == 0 and log.garbage == [], log.summary()
    assert log.named("admin.internal_error") == [] and log.named("admin.handler_error") == [], log.summary()
    assert pbx.stats["FailedCall(C)"] == "0", pbx.summary()


def test_status_and_explain_while_calls_are_up_and_after_they_end(
    policy_lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two calls from acme's number and one from globex's, held 5 s: status counts them by
    account and number; a third call from acme's number is refused 486 and explain names
    concurrency, the code and the counter over its limit; once the calls end, status
    counts none and explain tells how an accepted call went. Every command wants the token."""
    guard = policy_lab.start(
        f"admin: {{listen: '{LOOPBACK}:0', token: {TOKEN}}}\n{ACCOUNTS}"
        "rules:\n  caller_id: {}\n  concurrency: {per_number: 2}\n"
    )
    ask = ("--admin", admin_address(guard), "--token", TOKEN)
    acme = policy_lab.call("uac_caller.xml", ACME_NUMBER, calls=2, hold_ms=HOLD_MS)
    globex = policy_lab.call("uac_caller.xml", GLOBEX_NUMBER, source=GLOBEX, hold_ms=HOLD_MS)
    up = status_when(capsys, ask, lambda status: status["live_calls"]["total"] == 3, "3 live calls")
    assert up["live_calls"] == {
        "total": 3,
        "by_account": [{"account": "acme", "calls": 2}, {"account": "globex", "calls": 1}],
        "top_numbers": [{"number": ACME_NUMBER, "calls": 2}, {"number": GLOBEX_NUMBER, "calls": 1}],
    }
    refused = policy_lab.run("uac_trunking.xml", ACME_NUMBER)
    refused_id = only_call_id(refused)
    assert final_statuses(refused) == {refused_id: 486}

    code, out, _ = cli(capsys, "status", *ask)
    assert code == 0 and "\nlive calls: 3\nACCOUNT  LIVE\nacme        2\nglobex      1\n" in out, out
    assert f"\n{ACME_NUMBER}  acme         3      3.0        1\n" in out, (
        out
    )  # top callers: 3 calls, 1 refused
    assert "rules: caller_id enforce, concurrency enforce\n" in out and "penalty box: empty\n" in out

    why = explained(capsys, ask, refused_id)
    assert (why["verdict"], why["rule"], why["code"], why["account"], why["source"]) == (
        "reject", "concurrency", 486, "acme", ACME,
    )  # fmt: skip
    assert why["detail"] == f"calls from {ACME_NUMBER}: 3 > 2" and why["outcome"] is None
    assert {"rule": "concurrency", "what": f"calls from {ACME_NUMBER}", "count": 3, "limit": 2} in why[
        "counters"
    ]
    code, out, _ = cli(capsys, "explain", refused_id, *ask)
    assert code == 0 and f"  verdict   refused 486 by concurrency: calls from {ACME_NUMBER}: 3 > 2\n" in out
    assert f"concurrency  calls from {ACME_NUMBER}      3      2  over\n" in out, out

    acme_calls, globex_calls = acme.wait(), globex.wait()
    assert_calls(acme_calls, [200, 200])
    assert_calls(globex_calls, [200])
    after = status_when(capsys, ask, lambda status: status["live_calls"]["total"] == 0, "no live call")
    assert after["live_calls"] == {"total": 0, "by_account": [], "top_numbers": []}
    assert after["decisions"]["since_start"] == {"accept": 3, "reject": 1}

    accepted_id = only_call_id(globex_calls)
    went = explained(capsys, ask, accepted_id)["outcome"]
    assert (went["state"], went["reason"], went["by_caller"]) == ("ended", "bye", True)
    assert HOLD_MS / 1000 - 0.5 < went["talk_seconds"] < HOLD_MS / 1000 + 3, went
    # the installed console script, as an operator runs it (the token from the environment)
    script = subprocess.run(
        [installed_sipguard(), "explain", accepted_id, "--admin", ask[1]],
        env={**checkout_env(), "SIPGUARD_ADMIN_TOKEN": TOKEN}, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip
    assert (script.returncode, script.stderr) == (0, ""), script.stderr
    assert (
        "  verdict   forwarded to the PBX\n" in script.stdout
        and "(bye from the caller), talked" in script.stdout
    )

    code, out, err = cli(capsys, "explain", "never@seen", *ask)
    assert (code, err) == (1, "") and out.startswith("call 'never@seen' is not among the last 4 decisions")
    for argv in (["status"], ["explain", accepted_id], ["unban", ACME_NUMBER], ["reload"]):
        code, out, err = cli(capsys, *argv, "--admin", ask[1])
        assert (code, out, err) == (
            2,
            "",
            "sipguard: the admin listener answered 401: a valid bearer token is required\n",
        )
    finish_clean(policy_lab)


def test_unban_takes_a_boxed_number_out_of_the_penalty_box_and_its_next_call_connects(
    policy_lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sequential dialer is refused at its third adjacent callee and its number boxed: a
    call elsewhere is refused too, status lists the number; ``sipguard unban`` with the
    number in national form releases it, and its next call connects."""
    guard = policy_lab.start(
        f"admin: {{listen: '{LOOPBACK}:0'}}\n{ACCOUNTS}"
        "rules:\n  dialer:\n    sequential: {warning: 2, critical: 3}\n    penalty_seconds: 600\n"
    )
    ask = ("--admin", admin_address(guard))
    dialer = policy_lab.run(
        "uac_sequential.xml", ACME_NUMBER, dialled="+1212555010", calls=3, rate=5, hold_ms=100
    )
    assert_calls(dialer, [200, 200, 403])
    boxed = guard.wait_for("penalty.boxed")
    assert_calls(policy_lab.run("uac_sequential.xml", ACME_NUMBER, dialled="+4420794600"), [403])

    (entry,) = status_when(capsys, ask, lambda status: status["penalty_box"], "the penalty box")[
        "penalty_box"
    ]
    assert (entry["subject"], entry["kind"], entry["name"], entry["rule"], entry["reason"]) == (
        f"num:{ACME_NUMBER}", "number", ACME_NUMBER, "dialer", boxed["reason"],
    )  # fmt: skip
    assert 590 < entry["seconds_left"] <= 600
    code, out, _ = cli(capsys, "status", *ask)
    assert code == 0 and "penalty box: 1\nKIND    NAME          RULE    LEFT " in out, out
    assert f"\nnumber  {ACME_NUMBER}  dialer  9m" in out, out

    mark = guard.mark()
    code, out, err = cli(capsys, "unban", "(415) 555-0100", *ask)  # national form: the policy's region, US
    assert (code, err) == (0, "")
    assert out.startswith(
        f"number {ACME_NUMBER} released from the penalty box (dialer: {boxed['reason']}; 9m"
    )
    released = guard.wait_for("penalty.released", since=mark)
    assert (released["subject"], released["rule"], released["by"]) == (
        f"num:{ACME_NUMBER}",
        "dialer",
        "operator",
    )
    assert cli(capsys, "unban", ACME_NUMBER, *ask) == (1, f"{ACME_NUMBER}: not in the penalty box\n", "")
    assert cli(capsys, "unban", "--account", "acme", *ask) == (1, "acme: not in the penalty box\n", "")
    code, out, err = cli(capsys, "unban", "555-not-a-number", *ask)
    assert (code, out) == (2, "") and "'555-not-a-number' is not a telephone number in region US" in err

    assert_calls(policy_lab.run("uac_sequential.xml", ACME_NUMBER, dialled="+4420794600"), [200])
    assert status_when(capsys, ask, lambda status: True, "status")["penalty_box"] == []
    # what the CLI never sends, from other clients: a clear 400, never a traceback
    for body in ({"colour": "red"}, {"address": "192.0.2.7", "number": ACME_NUMBER}, {"account": 7}, {}):
        assert admin_call(ask[1], None, "POST", "/unban", body) == (400, {"error": UNBAN_USAGE})
    for query in ("", "?call_id=", "?call_id=a&call_id=b"):
        assert admin_call(ask[1], None, "GET", "/explain" + query) == (
            400, {"error": "expected /explain?call_id=CALL-ID (URL-encoded)"}
        )  # fmt: skip
    finish_clean(policy_lab)


def test_reload_applies_a_good_file_and_refuses_a_broken_one_keeping_the_policy_in_force(
    policy_lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sipguard reload`` with a call_rate added: the new limit bites at once. With a typo
    in the file: exit 1, the error with file:line, and the policy in force keeps working."""
    base = f"admin: {{listen: '{LOOPBACK}:0'}}\n{ACCOUNTS}rules:\n  caller_id: {{}}\n"
    guard = policy_lab.start(base)
    ask = ("--admin", admin_address(guard))
    assert_calls(policy_lab.run("uac_dialer.xml", ACME_NUMBER, calls=2), [200, 200])

    path = policy_lab.write_policy(
        base + "  call_rate: {per_number: {per_minute: 1, burst: 1}, per_account: null}\n"
    )
    mark = guard.mark()
    assert cli(capsys, "reload", *ask) == (
        0, f"{path}: reloaded; new calls are judged by it, calls up keep their slots\n", ""
    )  # fmt: skip
    assert guard.wait_for("policy.reloaded", since=mark)["by"] == "operator"
    assert_calls(policy_lab.run("uac_dialer.xml", ACME_NUMBER, calls=2), [200, 503])

    policy_lab.write_policy(base + "  call_rate: {per_numbr: {per_minute: 1}}\n")
    with pytest.raises(PolicyFileError) as refused:
        load_policy(path)
    (error,) = refused.value.errors
    assert error.startswith(f"{path}:") and "per_numbr" in error  # file:line: where, what
    assert cli(capsys, "reload", *ask) == (
        1, "", f"sipguard: {path} refused; {path} stays in force:\n  {error}\n"
    )  # fmt: skip
    code, out, _ = cli(capsys, "reload", *ask, "--json")
    assert code == 1 and json.loads(out) == {
        "reloaded": False,
        "path": str(path),
        "running": str(path),
        "errors": [error],
        "restart_needed": False,
        "warnings": [],
    }
    assert_calls(policy_lab.run("uac_dialer.xml", ACME_NUMBER), [503])  # the reloaded limit still bites
    assert_calls(policy_lab.run("uac_dialer.xml", ACME_OTHER), [200])
    status = status_when(capsys, ask, lambda status: True, "status")
    assert status["policy"]["reloads"] == {"succeeded": 1, "failed": 2}
    assert [(rule["rule"], rule["mode"]) for rule in status["policy"]["rules"]] == [
        ("caller_id", "enforce"), ("call_rate", "enforce"),
    ]  # fmt: skip
    finish_clean(policy_lab)
