"""End to end: the flood defence against a real scanner (SIPVicious), and the admin
listener with the ``sipguard bans`` / ``unban`` commands, against a live sipguard.

Everything is on loopback. In the scanner test the stand-in PBX sits on 127.0.0.3, so
that the upstream's exemption (a PBX is never banned) does not cover the scanners on
127.0.0.1 and 127.0.0.4; the legitimate customer calls from 127.0.0.2 (account acme).
Every scanner run is bounded: one target, 900 extensions at most, ``--maximumtime``,
and a subprocess timeout.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from policy_e2e import (
    ACME,
    CALLEE,
    GLOBEX,
    PolicyLab,
    admin_address,
    assert_calls,
    cli,
    decisions,
    only_call_id,
)
from sipp import LOOPBACK, GuardLog, Lab, checkout_env, installed_sipguard, wait_until

from proxy.admin import UNBAN_USAGE
from proxy.app import FLOOD_LINES_PER_TICK

pytestmark = [pytest.mark.sipp]

ACME_NUMBER = "+14155550100"
PBX_HOST = GLOBEX  # 127.0.0.3: the PBX, away from the scanners' addresses
SVMAP_SOURCE = "127.0.0.4"  # svmap binds here; svwar cannot be told to, so it sends from 127.0.0.1
SVWAR_EXTENSIONS = (100, 999)
LEGIT_CALLS = 20
TOKEN = "test-token-0123456789"


def scanner(name: str) -> str:
    found = Path(sys.executable).parent / f"sipvicious_{name}"
    if not found.exists():
        pytest.fail(f"{found.name} is not installed: pip install -e '.[test]' (installs sipvicious)")
    return str(found)


def assert_guard_clean(log: GuardLog) -> None:
    assert log.returncode == 0, log.summary()
    assert log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0, log.summary()
    assert log.named("admin.internal_error") == [] and log.named("admin.handler_error") == [], log.summary()


@pytest.fixture
def scanned_lab(tmp_path: Path) -> Iterator[PolicyLab]:
    lab = Lab(tmp_path)
    yield PolicyLab(lab, pbx_host=PBX_HOST, pbx_calls=100_000)
    lab.close()


def test_svmap_and_svwar_are_banned_while_customer_calls_keep_connecting(
    scanned_lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """svmap (its User-Agent says friendly-scanner) is banned at its first message; svwar in
    compact mode (no User-Agent) enumerating 900 extensions as fast as it can is banned by
    its rate, long before it is through. Meanwhile acme's calls all connect, before, during
    and after the bans, and the PBX, which answers the scan, is not banned."""
    guard = scanned_lab.start(
        f"""
        flood:
          # scaled down from the defaults (500/s, burst 2000), which a 900-extension svwar
          # run never reaches; acme's calls send about 15 messages a second
          messages_per_second: 50
          burst: 100
        admin:
          listen: "{LOOPBACK}:0"
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["{ACME_NUMBER}"]
        rules:
          caller_id: {{}}
        """,
        pbx_scenario="uas_pbx_registrar.xml",
    )
    admin = admin_address(guard)
    mark = guard.mark()
    calls = scanned_lab.call(
        "uac_caller.xml", ACME_NUMBER, calls=LEGIT_CALLS, rate=5, hold_ms=200, timeout=30
    )
    guard.wait_for("call.decision", since=mark, verdict="accept")

    target = ["-p", str(scanned_lab.proxy), LOOPBACK]
    workdir = scanned_lab.lab.workdir
    first, last = SVWAR_EXTENSIONS
    scans = [
        subprocess.Popen(
            [scanner("svmap"), "-b", SVMAP_SOURCE, "-P", "0", *target],
            cwd=workdir, stdout=(workdir / "svmap.out").open("wb"), stderr=subprocess.STDOUT,
        ),
        subprocess.Popen(
            [
                scanner("svwar"), "-c", "-t", "0", "-e", f"{first}-{last}", "--maximumtime", "1",
                "-P", "0", *target,
            ],
            cwd=workdir, stdout=(workdir / "svwar.out").open("wb"), stderr=subprocess.STDOUT,
        ),
    ]  # fmt: skip
    try:
        for scan in scans:
            scan.wait(timeout=30)
    finally:
        for scan in scans:
            scan.kill()
    by_agent = guard.wait_for("flood.banned", host=SVMAP_SOURCE)
    by_rate = guard.wait_for("flood.banned", host=LOOPBACK)
    status, out, err = cli(capsys, "bans", "--admin", admin, "--json")
    result = calls.wait()

    log, pbx = scanned_lab.finish()
    assert (status, err) == (0, ""), err
    # svmap: its User-Agent gave it away at once
    assert (by_agent["reason"], by_agent["detail"]) == ("user-agent", "friendly-scanner")
    assert by_agent["messages"] == 1 and by_agent["offences"] == 1
    # svwar: no User-Agent, banned by its rate after the burst
    assert by_rate["reason"] == "rate" and by_rate["detail"] == "over 50/s, burst 100"
    assert by_rate["rate"] > 50 and by_rate["messages"] > 100, by_rate
    # one line per ban, and no one else banned: not acme, not the PBX
    assert sorted(entry["host"] for entry in log.named("flood.banned")) == [LOOPBACK, SVMAP_SOURCE]
    # the admin listener lists both, with the messages dropped since
    bans = {ban["address"]: ban for ban in json.loads(out)}
    assert sorted(bans) == [LOOPBACK, SVMAP_SOURCE]
    assert (bans[LOOPBACK]["reason"], bans[SVMAP_SOURCE]["reason"]) == ("rate", "user-agent")
    assert bans[LOOPBACK]["dropped"] > 1 and bans[LOOPBACK]["seconds_left"] > 200
    # the scan was cut short: the PBX saw a fraction of the 900 extensions
    registers = len(pbx.requests("received", "REGISTER"))
    assert 0 < registers < (last - first + 1) // 2, registers
    assert log.counter("flood_dropped") == bans[LOOPBACK]["dropped"] + bans[SVMAP_SOURCE]["dropped"]
    # acme's calls: every one connected, some of them after both bans
    assert_calls(result, [200] * LEGIT_CALLS)
    accepted = [log.events.index(entry) for entry in decisions(log, verdict="accept")]
    banned_at = max(log.events.index(by_agent), log.events.index(by_rate))
    assert len(accepted) == LEGIT_CALLS and accepted[0] < banned_at < accepted[-1]
    assert len(pbx.requests("received", "INVITE")) == LEGIT_CALLS
    assert_guard_clean(log)


# -- the admin listener and the bans / unban commands --------------------------------------------------
BANNED = "127.0.0.5"


class SipClient:
    """A UDP socket on ``host`` sending OPTIONS to sipguard itself (which answers 200)."""

    def __init__(self, host: str, proxy: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(5)
        self.host, self.port = self.sock.getsockname()
        self.proxy = proxy
        self.sent = 0

    def options(self, user_agent: str | None = None) -> str:
        """Send one; returns its Call-ID."""
        return self.send("OPTIONS", f"sip:{LOOPBACK}:{self.proxy}", user_agent)

    def send(self, method: str, uri: str, user_agent: str | None = None) -> str:
        """Send a request with no body (an INVITE offering no SDP); returns its Call-ID."""
        self.sent += 1
        call_id = f"{self.sent}@{self.host}"
        lines = [
            f"{method} {uri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.host}:{self.port};branch=z9hG4bK-{self.sent};rport",
            "Max-Forwards: 70",
            f"From: <sip:probe@{self.host}>;tag={self.sent}",
            f"To: <sip:{LOOPBACK}:{self.proxy}>",
            f"Call-ID: {call_id}",
            f"CSeq: 1 {method}",
            *([f"User-Agent: {user_agent}"] if user_agent else []),
            "Content-Length: 0",
        ]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), (LOOPBACK, self.proxy))
        return call_id

    def next_reply(self) -> str:
        return self.sock.recv(65535).decode()

    def close(self) -> None:
        self.sock.close()


def http(port: int, raw: bytes) -> tuple[int, dict[str, str], Any]:
    """Send ``raw`` to the admin listener; its status, headers and JSON body."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as connection:
        connection.sendall(raw)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)
    }
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
    return int(status_line.split()[1]), headers, json.loads(body)


def request(method: str, path: str, body: bytes = b"", *, token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = f"{method} {path} HTTP/1.1\r\nHost: sipguard\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_a_banned_office_still_reaches_emergency_services(policy_lab: PolicyLab) -> None:
    """A scanner behind acme's address (its User-Agent gives it away) gets that address
    banned while one of acme's phones is on a call to 911: acme's next normal INVITE is
    dropped unread, but a new call to 911 from the same address connects and hangs up
    through sipguard (INVITE, ACK, BYE all let through), and so does the call that was up
    when the ban began (its BYE passes)."""
    guard = policy_lab.start(f"""
        accounts:
          acme:
            sources: [{ACME}/32]
            numbers: ["{ACME_NUMBER}"]
        rules:
          caller_id: {{}}
        """)
    mark = guard.mark()
    already_up = policy_lab.call("uac_caller.xml", ACME_NUMBER, dialled="911", hold_ms=3000)
    guard.wait_for("call.emergency", since=mark)
    scanner_behind_nat = SipClient(ACME, policy_lab.proxy)
    try:
        scanner_behind_nat.options("friendly-scanner")
        guard.wait_for("flood.banned", host=ACME)
        dropped_call = scanner_behind_nat.send("INVITE", f"sip:{CALLEE}@{LOOPBACK}:{policy_lab.proxy}")
        emergency = policy_lab.run("uac_caller.xml", ACME_NUMBER, dialled="911", hold_ms=200)
    finally:
        scanner_behind_nat.close()
    already_up_result = already_up.wait()

    log, pbx = policy_lab.finish()
    assert_calls(emergency, [200])  # answered, and its BYE answered too
    assert_calls(already_up_result, [200])
    emergency_id, already_up_id = only_call_id(emergency), only_call_id(already_up_result)
    passed = log.named("flood.emergency_passed")
    assert {entry["call_id"] for entry in passed} == {emergency_id, already_up_id}
    assert [(entry["host"], entry["calls"]) for entry in passed] == [(ACME, 1), (ACME, 2)]
    assert [entry["call_id"] for entry in log.named("call.emergency")] == [already_up_id, emergency_id]
    assert log.counter("flood_emergency_passed") == 2
    assert log.counter("flood_dropped") == 2  # the banning OPTIONS and the normal INVITE
    assert {m.headers("call-id")[0] for m in pbx.requests("received", "INVITE")} == {
        emergency_id,
        already_up_id,
    }
    assert dropped_call not in (emergency_id, already_up_id)
    assert {m.headers("call-id")[0] for m in pbx.requests("received", "BYE")} == {emergency_id, already_up_id}
    assert_guard_clean(log)


def test_admin_lists_bans_and_unbans_through_the_cli(
    policy_lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """A source banned for its User-Agent gets no answer while banned (not to the banning
    message, not to three plain ones after it); ``sipguard bans`` lists it with those 4
    drops; ``sipguard unban`` lifts it, and its next OPTIONS is answered, the first reply
    its socket ever receives."""
    guard = policy_lab.start(f"""
        admin:
          listen: "{LOOPBACK}:0"
          token: {TOKEN}
        """)
    admin = admin_address(guard)
    client = SipClient(BANNED, policy_lab.proxy)
    try:
        client.options("friendly-scanner")
        banned = guard.wait_for("flood.banned", host=BANNED)
        for _ in range(3):
            client.options()
        listed: list[dict[str, Any]] = []

        def dropped_all() -> bool:
            status, out, _ = cli(capsys, "bans", "--admin", admin, "--token", TOKEN, "--json")
            assert status == 0
            listed[:] = json.loads(out)
            return listed[0]["dropped"] == 4

        wait_until(dropped_all, 10, "the ban to count 4 dropped messages")
        (ban,) = listed
        assert (ban["address"], ban["reason"], ban["detail"], ban["offences"]) == (
            BANNED, "user-agent", "friendly-scanner", 1,
        )  # fmt: skip
        assert 290 < ban["seconds_left"] <= 300 and ban["until"] == banned["until"]

        status, out, _ = cli(capsys, "bans", "--admin", admin, "--token", TOKEN)
        assert status == 0
        header, row, total = out.splitlines()
        assert header.split() == ["ADDRESS", "REASON", "LEFT", "DROPPED", "OFFENCES", "UNTIL", "DETAIL"]
        assert row.split()[:2] == [BANNED, "user-agent"] and row.split()[3:5] == ["4", "1"]
        assert row.endswith("friendly-scanner") and total == "1 source banned"

        assert cli(capsys, "bans", "--admin", admin) == (
            2, "", "sipguard: the admin listener answered 401: a valid bearer token is required\n"
        )  # fmt: skip
        assert cli(capsys, "unban", "127.0.0.9", "--admin", admin, "--token", TOKEN) == (
            1, "127.0.0.9 was not banned\n", ""
        )  # fmt: skip
        mark = guard.mark()
        assert cli(capsys, "unban", BANNED, "--admin", admin, "--token", TOKEN) == (
            0, f"{BANNED} unbanned (user-agent: friendly-scanner; 4 messages dropped while banned)\n", ""
        )  # fmt: skip
        unbanned = guard.wait_for("flood.unbanned", since=mark)
        assert (unbanned["host"], unbanned["by"], unbanned["dropped"]) == (BANNED, "operator", 4)

        call_id = client.options()
        reply = client.next_reply()  # nothing was ever answered before this one
        assert reply.startswith("SIP/2.0 200 OK\r\n") and f"Call-ID: {call_id}\r\n" in reply, reply
        assert cli(capsys, "bans", "--admin", admin, "--token", TOKEN) == (0, "no source is banned\n", "")
        # the installed console script, as an operator runs it (the token from the environment)
        script = subprocess.run(
            [installed_sipguard(), "bans", "--admin", admin, "--json"],
            env={**checkout_env(), "SIPGUARD_ADMIN_TOKEN": TOKEN},
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        assert (script.returncode, json.loads(script.stdout), script.stderr) == (0, [], b"")
    finally:
        client.close()

    log, _ = policy_lab.finish()
    assert log.counter("flood_dropped") == 4 and log.counter("flood_bans") == 1
    assert_guard_clean(log)


def test_a_reload_applies_new_flood_settings_and_keeps_the_bans(
    policy_lab: PolicyLab, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGHUP with a new User-Agent list and an exempt address: the ban in force stays
    (listed, still dropping), the new signature bans, the old one no longer does, and
    the exempt address is answered whatever it sends."""
    admin_section = f"admin: {{listen: '{LOOPBACK}:0'}}\n"
    guard = policy_lab.start(admin_section)
    admin = admin_address(guard)
    hosts = ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8")
    clients = {host: SipClient(host, policy_lab.proxy) for host in hosts}
    try:
        clients["127.0.0.5"].options("friendly-scanner")
        guard.wait_for("flood.banned", host="127.0.0.5")
        policy_lab.write_policy(
            admin_section + "flood: {user_agents: [EvilDialer], exempt: [127.0.0.6/32]}\n"
        )
        mark = guard.mark()
        guard.send_signal(signal.SIGHUP)
        guard.wait_for("policy.reloaded", since=mark)

        clients["127.0.0.5"].options()  # still banned: dropped
        clients["127.0.0.7"].options("evildialer/1.0")
        guard.wait_for("flood.banned", host="127.0.0.7")
        # exempt now; and a signature no longer
        for host, user_agent in (("127.0.0.6", "EvilDialer"), ("127.0.0.8", "friendly-scanner")):
            call_id = clients[host].options(user_agent)
            assert f"Call-ID: {call_id}\r\n" in clients[host].next_reply()
        status, out, _ = cli(capsys, "bans", "--admin", admin, "--json")
    finally:
        for client in clients.values():
            client.close()

    log, _ = policy_lab.finish()
    assert status == 0
    bans = {ban["address"]: ban for ban in json.loads(out)}
    assert sorted(bans) == ["127.0.0.5", "127.0.0.7"]
    assert (bans["127.0.0.5"]["detail"], bans["127.0.0.5"]["dropped"]) == ("friendly-scanner", 2)
    assert bans["127.0.0.7"]["detail"] == "evildialer"
    assert log.named("policy.restart_needed") == [] and log.named("flood.unbanned") == []
    assert_guard_clean(log)


def test_many_bans_at_once_log_a_bounded_number_of_lines(policy_lab: PolicyLab) -> None:
    """50 scanners (127.0.0.10-59) within a few milliseconds: each is banned and counted,
    but at most 20 flood.banned lines are written a second, and a line says how many were
    left out."""
    guard = policy_lab.start("admin: {listen: null}\n")
    clients = [SipClient(f"127.0.0.{10 + index}", policy_lab.proxy) for index in range(50)]
    try:
        for client in clients:
            client.options("friendly-scanner")
        guard.wait_for("flood.lines_suppressed")
    finally:
        for client in clients:
            client.close()

    log, _ = policy_lab.finish()
    assert log.counter("flood_bans") == 50 and log.counter("flood_dropped") == 50
    banned = log.named("flood.banned")
    left_out = sum(entry["count"] for entry in log.named("flood.lines_suppressed"))
    assert len(banned) + left_out == 50
    # 50 bans in a few ms fall in one or (rarely) two seconds of 20 lines each
    assert FLOOD_LINES_PER_TICK <= len(banned) <= 2 * FLOOD_LINES_PER_TICK
    assert log.named("admin.started") == []  # admin: {listen: null}
    assert_guard_clean(log)


ADMIN_MISTAKES: list[tuple[bytes, int, str]] = [
    (
        request("GET", "/nope"),
        404,
        "no such endpoint: /nope "
        "(try /bans, /explain, /healthz, /metrics, /readyz, /reload, /status, /unban)",
    ),
    (request("POST", "/bans"), 405, "/bans takes GET"),
    (request("GET", "/bans", token=None), 401, "a valid bearer token is required"),
    (request("GET", "/bans", token="wrong-token-0123456789"), 401, "a valid bearer token is required"),
    (
        request("POST", "/unban", b"not json"),
        400, "the body is not JSON: Expecting value: line 1 column 1 (char 0)",
    ),
    (request("POST", "/unban", b'{"address": "nonsense"}'), 400, "'nonsense' is not an IP address"),
    (request("POST", "/unban", b'["127.0.0.1"]'), 400, UNBAN_USAGE),
    (request("POST", "/unban", b'{"address": "127.0.0.9"}'), 404, "127.0.0.9 is not banned"),
    (b"HELLO\r\n\r\n", 400, "expected a request line: METHOD /path HTTP/1.1"),
    (b"GET /bans HTTP/2.0\r\n\r\n", 505, "'HTTP/2.0': only HTTP/1.1 and 1.0"),
    (b"GET /bans HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n", 413, "the body is over 65536 bytes"),
    (b"GET /bans HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length '-1' is not a number"),
    (
        b"POST /unban HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501, "chunked bodies are not supported: send Content-Length",
    ),
    (
        b"GET /bans HTTP/1.1\r\nX-Pad: " + b"a" * 9000 + b"\r\n\r\n",
        431, "the request head is over 8192 bytes",
    ),
    (b"GET /bans HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header line 'no colon here'"),
]  # fmt: skip


def test_the_admin_listener_answers_every_mistake_and_keeps_serving(policy_lab: PolicyLab) -> None:
    """Wrong paths, methods, tokens, bodies and malformed or oversized requests each get
    their 4xx/5xx with a JSON error; a client that opened a connection and went quiet
    does not hold up another; and afterwards the listener and the proxy both still serve."""
    guard = policy_lab.start(f"""
        admin:
          listen: "{LOOPBACK}:0"
          token: {TOKEN}
        """)
    port = int(admin_address(guard).rpartition(":")[2])
    quiet = socket.create_connection((LOOPBACK, port), timeout=10)
    try:
        quiet.sendall(b"GET /bans HTTP/1.1\r\n")  # and nothing more, for now
        for raw, status, error in ADMIN_MISTAKES:
            answer = http(port, raw)
            assert (answer[0], answer[2]) == (status, {"error": error}), raw[:60]
            if status == 405:
                assert answer[1]["allow"] == "GET"
            if status == 401:
                assert answer[1]["www-authenticate"] == "Bearer"
        assert http(port, request("GET", "/bans?verbose=1"))[::2] == (200, [])
    finally:
        quiet.close()
    client = SipClient(BANNED, policy_lab.proxy)
    try:
        call_id = client.options()
        assert f"Call-ID: {call_id}\r\n" in client.next_reply()
    finally:
        client.close()

    log, _ = policy_lab.finish()
    statuses = sorted(entry["status"] for entry in log.named("admin.request"))
    assert statuses == sorted([status for _, status, _ in ADMIN_MISTAKES] + [200])
    assert_guard_clean(log)
