"""End to end: real SIPp callers and a SIPp stand-in PBX, with sipguard between them.

Each test picks free loopback ports, starts sipguard as a subprocess (``python -m
proxy.cli run``, or the installed ``sipguard`` script for the must-show case) and waits
for its ``proxy.started`` log line, starts a SIPp UAS on the upstream port and waits for
its socket, runs a SIPp UAC with bounded ``-m`` and ``-timeout`` to the end, then sends
sipguard SIGTERM and reads its JSON log: the ``proxy.stopped`` counters, every
``call.ended`` line, and nothing on stderr that is not a JSON log line.

Every test asserts both sides: what SIPp counts (successful and failed calls, and in
its message trace, that in-dialog requests came through sipguard's port with its Via
on top and the Route to it consumed), and what sipguard counts (calls answered, ended
and why, live calls left).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sipp import (
    LOOPBACK,
    LOOPBACK6,
    GuardLog,
    GuardProcess,
    Lab,
    Sipp,
    SippResult,
    TracedMessage,
    free_ports,
    guard_command,
    installed_sipguard,
)

pytestmark = pytest.mark.sipp

CORPUS = Path(__file__).resolve().parent / "corpus" / "rfc4475"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def udp(port: int) -> str:
    return f"udp:{LOOPBACK}:{port}"


def at(port: int, host: str = LOOPBACK) -> str:
    """HOST:PORT as SIP and SIPp write it: an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- shared checks ------------------------------------------------------------------------------
def assert_sipp_passed(result: SippResult, calls: int) -> None:
    assert result.returncode == 0, result.summary()
    assert (result.successful, result.failed) == (calls, 0), result.summary()


def assert_guard_clean(log: GuardLog, *, per_call_lines: bool = True) -> None:
    """A clean stop: exit 0, nothing but JSON on stderr, no internal error, no call left,
    the drain finished in time, and (at --log-level debug) each ended call logged once."""
    assert log.returncode == 0, log.summary()
    assert log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0, log.summary()
    assert log.named("proxy.drain_timeout") == [], log.summary()
    assert log.stopped["live_calls"] == 0, log.summary()
    if per_call_lines:
        ended = [entry["call_id"] for entry in log.named("call.ended")]
        assert len(ended) == len(set(ended)) == log.counter("calls_ended"), log.summary()


def finish_pair(uac: SippResult, uas: Sipp, guard: GuardProcess, calls: int) -> tuple[SippResult, GuardLog]:
    """A scenario pair played out: the PBX side's SIPp ends, sipguard stops; both SIPps
    passed every call and sipguard stopped clean. Returns the PBX side's result and the log."""
    pbx_side = uas.wait()
    log = guard.stop()
    assert_sipp_passed(uac, calls)
    assert_sipp_passed(pbx_side, calls)
    assert_guard_clean(log)
    return pbx_side, log


def via_sipguard(message: TracedMessage, port: int, transport: str = "UDP", host: str = LOOPBACK) -> bool:
    """The message came from sipguard: its top Via is sipguard's, with sipguard's branch."""
    ours = rf"SIP/2\.0/{transport} {re.escape(at(port, host))};branch=z9hG4bK-sg"
    return re.match(ours, message.top_via) is not None


def record_route(port: int, transport: str = "udp", host: str = LOOPBACK) -> str:
    suffix = "" if transport == "udp" else f";transport={transport}"
    return f"<sip:{at(port, host)}{suffix};lr>"


def branch(via: str) -> str:
    match = re.search(r";branch=([^;,\s]+)", via)
    assert match, via
    return match.group(1)


def assert_came_through_sipguard(
    received: list[TracedMessage], count: int, port: int, transport: str = "UDP", host: str = LOOPBACK
) -> None:
    assert len(received) == count, [m.first_line for m in received]
    for message in received:
        assert via_sipguard(message, port, transport, host), message.text
        assert message.headers("route") == [], f"sipguard left its own Route in:\n{message.text}"


# -- the basic call ---------------------------------------------------------------------------------
def test_must_show_plain_sipguard_run_proxies_a_sipp_call(lab: Lab) -> None:
    """Literally ``sipguard run --listen udp:127.0.0.1:P --upstream udp:127.0.0.1:Q``, no
    config, no other option: a SIPp call through it connects and hangs up."""
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard_argv(
        [installed_sipguard(), "run", "--listen", udp(proxy), "--upstream", udp(pbx)]
    )  # stderr is not a terminal, so the log is JSON lines by default
    uas = lab.uas("uas", pbx, calls=1)

    uac = lab.uac("uac", caller, at(proxy), calls=1)

    log = guard.stop()
    uas.stop()
    assert_sipp_passed(uac, 1)
    assert_guard_clean(log, per_call_lines=False)  # default info level: no per-call lines
    assert (log.counter("calls_answered"), log.counter("calls_ended_bye")) == (1, 1)


def test_a_dual_stack_listener_carries_ipv4_calls(lab: Lab, tmp_path: Path) -> None:
    """``listen: [udp:[::]:P]`` with ``advertise``, IPv4 caller and PBX: every call got
    503 No Route To Destination (no IPv4 listener to send to the PBX from). Now the calls
    connect and end, the ACK and BYE coming back to the advertised address."""
    if Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() != "0":
        pytest.fail("[::] sockets are IPv6-only here (net.ipv6.bindv6only=1): no dual stack to test")
    calls = 3
    proxy, pbx, caller = free_ports(3)
    policy = tmp_path / "dual.yaml"
    policy.write_text(f"proxy:\n  advertise: {LOOPBACK}\n")
    guard = lab.guard_argv([*guard_command([f"udp:[::]:{proxy}"], udp(pbx)), "--config", str(policy)])
    uas = lab.uas("uas", pbx, calls=calls)
    uac = lab.uac("uac", caller, at(proxy), calls=calls, rate=20)
    log = guard.stop()
    uas.stop()
    assert_sipp_passed(uac, calls)
    assert_guard_clean(log)
    assert log.counter("calls_answered") == log.counter("calls_ended_bye") == calls


def test_basic_calls_record_route_and_bye_through_sipguard(lab: Lab) -> None:
    calls = 5
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard([udp(proxy)], udp(pbx))
    uas = lab.uas("uas", pbx, calls=calls)

    uac = lab.uac("uac", caller, at(proxy), calls=calls, rate=20)

    log = guard.stop()
    pbx_side = uas.stop()
    assert_sipp_passed(uac, calls)
    assert_guard_clean(log)
    assert log.counter("calls_answered") == calls
    assert log.counter("calls_ended") == log.counter("calls_ended_bye") == calls
    assert {entry["reason"] for entry in log.named("call.ended")} == {"bye"}
    # the PBX saw every INVITE Record-Routed by sipguard, and every ACK and BYE came through it
    invites = pbx_side.requests("received", "INVITE")
    assert_came_through_sipguard(invites, calls, proxy)
    assert all(invite.headers("record-route") == [record_route(proxy)] for invite in invites)
    assert_came_through_sipguard(pbx_side.requests("received", "ACK"), calls, proxy)
    assert_came_through_sipguard(pbx_side.requests("received", "BYE"), calls, proxy)
    # (SIPp's built-in uas echoes no Record-Route in its 200, so the built-in uac learns no
    # route set; the scenarios in sipp-scenarios/ do, see test_callee_hangs_up)


LEGS = {"tcp": "t1", "udp": "u1"}  # sipguard's transport name -> SIPp's -t


def guard_faces(proxy: int, caller_leg: str, pbx_leg: str) -> list[str]:
    """sipguard's listeners: one per transport the two legs use, on the same port."""
    return [f"{leg}:{at(proxy)}" for leg in dict.fromkeys((caller_leg, pbx_leg))]


@pytest.mark.parametrize(
    ("caller_leg", "pbx_leg"),
    [("tcp", "tcp"), ("udp", "tcp"), ("tcp", "udp")],
    ids=["tcp-both-legs", "udp-in-tcp-out", "tcp-in-udp-out"],
)
def test_basic_calls_over_tcp(lab: Lab, caller_leg: str, pbx_leg: str) -> None:
    """The basic call with TCP on one leg or both. Where the legs differ, sipguard
    Record-Routes both of its faces: on top the one the PBX reaches, below it the one the
    caller reaches (RFC 3261 §16.6 step 4, as two proxies would)."""
    calls = 3
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard(guard_faces(proxy, caller_leg, pbx_leg), f"{pbx_leg}:{at(pbx)}")
    uas = lab.uas("uas", pbx, calls=calls, transport=LEGS[pbx_leg])

    uac = lab.uac("uac", caller, at(proxy), calls=calls, transport=LEGS[caller_leg])

    log = guard.stop()
    pbx_side = uas.stop()
    assert_sipp_passed(uac, calls)
    assert_guard_clean(log)
    assert log.counter("calls_answered") == log.counter("calls_ended_bye") == calls
    assert {m.transport for m in uac.messages} == {caller_leg.upper()}
    assert {m.transport for m in pbx_side.messages} == {pbx_leg.upper()}
    invites = pbx_side.requests("received", "INVITE")
    assert_came_through_sipguard(invites, calls, proxy, pbx_leg.upper())
    faces = [record_route(proxy, leg) for leg in dict.fromkeys((pbx_leg, caller_leg))]
    assert all(invite.headers("record-route") == faces for invite in invites)
    assert_came_through_sipguard(pbx_side.requests("received", "ACK"), calls, proxy, pbx_leg.upper())
    assert_came_through_sipguard(pbx_side.requests("received", "BYE"), calls, proxy, pbx_leg.upper())


@pytest.mark.parametrize(
    ("caller_host", "pbx_host", "leg"),
    [(LOOPBACK6, LOOPBACK6, "udp"), (LOOPBACK6, LOOPBACK6, "tcp"), (LOOPBACK, LOOPBACK6, "udp"),
     (LOOPBACK6, LOOPBACK, "tcp")],
    ids=["ipv6-udp", "ipv6-tcp", "ipv4-caller-ipv6-pbx", "ipv6-caller-ipv4-pbx-tcp"],
)  # fmt: skip
def test_calls_over_ipv6_and_across_address_families(
    lab: Lab, caller_host: str, pbx_host: str, leg: str
) -> None:
    """Whole calls with IPv6 on one leg or both, sipguard listening on each family a leg
    uses: the PBX hangs up, its BYE following the Record-Route back through sipguard.
    Where the families differ sipguard Record-Routes both faces, each in brackets when
    IPv6, the one the PBX reaches on top."""
    calls = 3
    proxy, pbx, caller = free_ports(3)
    faces = [at(proxy, host) for host in dict.fromkeys((pbx_host, caller_host))]
    guard = lab.guard([f"{leg}:{face}" for face in faces], f"{leg}:{at(pbx, pbx_host)}")
    uas = lab.uas("uas_callee_bye.xml", pbx, calls=calls, transport=LEGS[leg], host=pbx_host)

    remote = at(proxy, caller_host)
    uac = lab.uac("uac_callee_bye.xml", caller, remote, calls=calls, transport=LEGS[leg], host=caller_host)

    pbx_side, log = finish_pair(uac, uas, guard, calls)
    assert log.counter("calls_answered") == log.counter("calls_ended_bye") == calls
    invites = pbx_side.requests("received", "INVITE")
    assert_came_through_sipguard(invites, calls, proxy, leg.upper(), pbx_host)
    record_routes = [record_route(proxy, leg, host) for host in dict.fromkeys((pbx_host, caller_host))]
    assert all(invite.headers("record-route") == record_routes for invite in invites)
    assert_came_through_sipguard(pbx_side.requests("received", "ACK"), calls, proxy, leg.upper(), pbx_host)
    assert_came_through_sipguard(uac.requests("received", "BYE"), calls, proxy, leg.upper(), caller_host)


# -- other ways a call goes -------------------------------------------------------------------------
def test_busy_callee_ends_rejected(lab: Lab) -> None:
    calls = 3
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard([udp(proxy)], udp(pbx))
    uas = lab.uas("uas_busy.xml", pbx, calls=calls)

    uac = lab.uac("uac_busy.xml", caller, at(proxy), calls=calls)

    pbx_side, log = finish_pair(uac, uas, guard, calls)
    assert log.counter("calls_answered") == 0
    assert log.counter("calls_ended") == log.counter("calls_ended_rejected") == calls
    assert {(e["reason"], e["status"]) for e in log.named("call.ended")} == {("rejected", 486)}
    # the ACK for the 486 reached the PBX hop by hop, on the branch of the INVITE it acknowledges
    invites = pbx_side.requests("received", "INVITE")
    acks = pbx_side.requests("received", "ACK")
    assert_came_through_sipguard(acks, calls, proxy)
    assert [branch(m.top_via) for m in acks] == [branch(m.top_via) for m in invites]


@pytest.mark.parametrize("pbx_leg", ["udp", "tcp"], ids=["udp", "udp-in-tcp-out"])
def test_cancel_while_ringing_ends_cancelled(lab: Lab, pbx_leg: str) -> None:
    calls = 3
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard(guard_faces(proxy, "udp", pbx_leg), f"{pbx_leg}:{at(pbx)}")
    uas = lab.uas("uas_cancel.xml", pbx, calls=calls, transport=LEGS[pbx_leg])

    uac = lab.uac("uac_cancel.xml", caller, at(proxy), calls=calls)

    pbx_side, log = finish_pair(uac, uas, guard, calls)
    assert log.counter("calls_answered") == 0
    assert log.counter("calls_ended") == log.counter("calls_ended_cancelled") == calls
    assert {(e["reason"], e["status"]) for e in log.named("call.ended")} == {("cancelled", 487)}
    invites = pbx_side.requests("received", "INVITE")
    cancels = pbx_side.requests("received", "CANCEL")
    acks = pbx_side.requests("received", "ACK")
    assert_came_through_sipguard(cancels, calls, proxy, pbx_leg.upper())
    assert_came_through_sipguard(acks, calls, proxy, pbx_leg.upper())
    # RFC 3261 §9.1 / §17.1.1.3: CANCEL and the 487's ACK carry the INVITE's branch downstream too
    invite_branches = [branch(m.top_via) for m in invites]
    assert [branch(m.top_via) for m in cancels] == invite_branches
    assert [branch(m.top_via) for m in acks] == invite_branches


@pytest.mark.parametrize("pbx_leg", ["udp", "tcp"], ids=["udp", "udp-in-tcp-out"])
def test_callee_hangs_up(lab: Lab, pbx_leg: str) -> None:
    """The PBX side sends the BYE along the Record-Route set; it reaches the caller
    through sipguard, and sipguard ends the call by BYE."""
    calls = 3
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard(guard_faces(proxy, "udp", pbx_leg), f"{pbx_leg}:{at(pbx)}")
    uas = lab.uas("uas_callee_bye.xml", pbx, calls=calls, transport=LEGS[pbx_leg])

    uac = lab.uac("uac_callee_bye.xml", caller, at(proxy), calls=calls)

    pbx_side, log = finish_pair(uac, uas, guard, calls)
    assert log.counter("calls_answered") == log.counter("calls_ended_bye") == calls
    assert log.counter("calls_ended") == calls
    # the PBX addressed its BYE to the caller's Contact, routed through sipguard's PBX-side face
    pbx_face = record_route(proxy, pbx_leg)
    sent_byes = pbx_side.requests("sent", "BYE")
    assert len(sent_byes) == calls
    for bye in sent_byes:
        assert bye.first_line.startswith(f"BYE sip:sipp@{at(caller)}"), bye.text
        assert bye.headers("route")[0].startswith(pbx_face), bye.text
    # ... and the caller got it from sipguard, the Route consumed
    assert_came_through_sipguard(uac.requests("received", "BYE"), calls, proxy)
    # the caller's ACK followed the route set too
    for ack in uac.requests("sent", "ACK"):
        assert ack.headers("route")[0].startswith(record_route(proxy)), ack.text
    assert_came_through_sipguard(pbx_side.requests("received", "ACK"), calls, proxy, pbx_leg.upper())


def test_reinvite_mid_call(lab: Lab) -> None:
    calls = 3
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard([udp(proxy)], udp(pbx))
    uas = lab.uas("uas_reinvite.xml", pbx, calls=calls)

    uac = lab.uac("uac_reinvite.xml", caller, at(proxy), calls=calls)

    pbx_side, log = finish_pair(uac, uas, guard, calls)
    # a re-INVITE is not a new call: one answered and one ended by BYE per call
    assert log.counter("calls_answered") == log.counter("calls_ended_bye") == calls
    assert log.counter("calls_ended") == calls
    reinvites = [m for m in uac.requests("sent", "INVITE") if m.headers("cseq") == ["2 INVITE"]]
    assert len(reinvites) == calls
    for reinvite in reinvites:  # sent to the callee's Contact, along the Record-Route
        assert reinvite.first_line.startswith(f"INVITE sip:{at(pbx)}"), reinvite.text
        assert reinvite.headers("route") == [record_route(proxy)], reinvite.text
    received = pbx_side.requests("received", "INVITE")
    assert_came_through_sipguard(received, 2 * calls, proxy)
    assert sum(m.headers("cseq") == ["2 INVITE"] for m in received) == calls
    assert_came_through_sipguard(pbx_side.requests("received", "ACK"), 2 * calls, proxy)
    assert_came_through_sipguard(pbx_side.requests("received", "BYE"), calls, proxy)


# -- packet loss --------------------------------------------------------------------------------------
# -- next hops that fail, connections that idle ----------------------------------------------------
def test_a_pbx_that_refuses_tcp_gets_callers_503_at_once(lab: Lab) -> None:
    """The PBX's TCP port is closed: each INVITE's connect is refused, and the caller gets
    503 Next Hop Unreachable now (RFC 3261 §16.9), not 408 after Timer B's 32 s, which is
    longer than SIPp's timeout here."""
    calls = 3
    proxy, pbx, caller = free_ports(3)  # nothing listens on pbx
    guard = lab.guard([udp(proxy), f"tcp:{at(proxy)}"], f"tcp:{at(pbx)}")

    uac = lab.uac(
        "uac_refused.xml", caller, at(proxy), calls=calls, timeout=10,
        extra=["-key", "caller", "+14155550100", "-s", "+12125551234"],
    )  # fmt: skip

    log = guard.stop()
    assert_sipp_passed(uac, calls)
    refusals = [m for m in uac.messages if m.direction == "received" and m.method is None]
    assert [m.first_line for m in refusals if "100 " not in m.first_line] == [
        "SIP/2.0 503 Next Hop Unreachable"
    ] * calls, uac.summary()
    assert all(m.headers("retry-after") == ["5"] for m in refusals if " 503 " in m.first_line)
    assert_guard_clean(log)
    assert log.counter("calls_ended") == log.counter("calls_ended_rejected") == calls
    assert {(e["reason"], e["status"]) for e in log.named("call.ended")} == {("rejected", 503)}
    assert len(log.named("tcp.connect_failed")) >= 1


def test_an_idle_tcp_connection_is_closed(lab: Lab) -> None:
    """A peer that connects and sends half a message, never the rest, is disconnected after
    proxy.tcp_idle_timeout: such connections must not pile up to the connection limit."""
    proxy, pbx = free_ports(2)
    policy = lab.workdir / "policy.yaml"
    policy.write_text(
        f"proxy:\n  listen: [tcp:{at(proxy)}]\n  upstream: udp:{at(pbx)}\n  tcp_idle_timeout: 1\n"
    )
    guard = lab.guard_argv([*guard_command([], f"udp:{at(pbx)}"), "--config", str(policy)])

    with socket.create_connection((LOOPBACK, proxy), timeout=15) as peer:
        peer.sendall(b"OPTIONS sip:" + at(proxy).encode() + b" SIP/2.0\r\nVia: SIP/2.0/TCP")
        closed_by_sipguard = peer.recv(100)  # blocks until sipguard closes it (or 15 s)

    log = guard.stop()
    assert closed_by_sipguard == b""
    assert [(e["connections"], e["idle_timeout"]) for e in log.named("tcp.idle_closed")] == [(1, 1.0)]
    assert_guard_clean(log)


LOSS_CALLS = 300


def test_packet_loss_every_call_counted_once(lab: Lab) -> None:
    """SIPp drops 10 % of the messages it sends and of those it receives, on both sides,
    over a few hundred calls at 100 calls/s. SIPp fails some of those calls itself (a
    request it "lost" on receipt is then ignored when retransmitted, and the UAS forgets
    the call), so what is asserted is what sipguard must do whatever the peers do:

    - every INVITE it forwarded started a call, and every such call ended exactly once:
      the call ids ended are the call ids the PBX received an INVITE for, none twice, and
      no call is left live at the end;
    - a call ends by BYE exactly when it was answered; one the PBX never answered ends
      "no-answer" at Timer B (or "cancelled", should SIPp give up on it with a CANCEL);
    - every call SIPp counts as a success was ended by BYE in sipguard, and SIPp resolved
      every call it placed (successful + failed == placed).

    Takes ~45 s: a call SIPp breaks runs its retransmissions out (~32 s), and sipguard's
    drain then waits (up to its 10 s grace) for the BYEs the broken UAS never answers.
    """
    proxy, pbx, caller = free_ports(3)
    guard = lab.guard([udp(proxy)], udp(pbx))
    uas = lab.uas("uas", pbx, calls=LOSS_CALLS, timeout=90, extra=["-lost", "10"])

    uac = lab.uac(
        "uac_loss.xml", caller, at(proxy), calls=LOSS_CALLS, rate=100, timeout=90, extra=["-lost", "10"]
    )

    log = guard.stop()
    pbx_side = uas.stop()
    assert uac.returncode in (0, 1), uac.summary()  # 1: some calls failed; not a timeout
    assert uac.successful + uac.failed == LOSS_CALLS, uac.summary()
    # sipguard stopped cleanly; its drain may time out on BYEs the broken UAS ignores
    assert log.returncode == 0, log.summary()
    assert log.garbage == [], log.summary()
    assert log.counter("internal_errors") == 0, log.summary()
    assert log.stopped["live_calls"] == 0, log.summary()
    started = {m.headers("call-id")[0] for m in pbx_side.requests("received", "INVITE")}
    ended = [entry["call_id"] for entry in log.named("call.ended")]
    assert len(ended) == len(set(ended)) == log.counter("calls_ended"), log.summary()
    assert set(ended) == started
    assert log.counter("calls_ended") == len(started) <= LOSS_CALLS
    reasons = {entry["reason"] for entry in log.named("call.ended")}
    assert reasons <= {"bye", "no-answer", "cancelled"}, reasons  # cancelled: SIPp aborting a call
    assert log.counter("calls_ended_bye") == log.counter("calls_answered") >= uac.successful
    unanswered = log.counter("calls_ended_no-answer") + log.counter("calls_ended_cancelled")
    assert unanswered == log.counter("calls_ended") - log.counter("calls_answered") <= uac.failed


# -- malformed input -------------------------------------------------------------------------------------
def invalid_corpus_files() -> list[str]:
    """The RFC 4475 files INDEX.md calls INVALID."""
    rows = re.findall(
        r"^\| `([a-z0-9]+\.dat)` \| [^|]+ \| [^|]+ \| (INVALID|VALID[^|]*|n/a) \|",
        (CORPUS / "INDEX.md").read_text(),
        re.MULTILINE,
    )
    return [name for name, verdict in rows if verdict == "INVALID"]


def barrier(proxy: int, tag: str) -> bytes:
    """An OPTIONS to sipguard itself, which it answers 200: UDP on loopback keeps order and
    sipguard handles datagrams one at a time, so once its 200 is back, whatever sipguard
    was going to do with the datagram sent before it is done."""
    return (
        f"OPTIONS sip:{at(proxy)} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {LOOPBACK}:9;branch=z9hG4bK-barrier-{tag}\r\n"
        f"From: <sip:probe@{LOOPBACK}>;tag=probe\r\n"
        f"To: <sip:{at(proxy)}>\r\n"
        f"Call-ID: barrier-{tag}\r\n"
        "CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
    ).encode()


def exchange(client: socket.socket, proxy: int, data: bytes | None, tag: str) -> list[bytes]:
    """Send ``data`` (if any) to sipguard, then a barrier; return what came back before the
    barrier's 200."""
    if data is not None:
        client.sendto(data, (LOOPBACK, proxy))
    client.sendto(barrier(proxy, tag), (LOOPBACK, proxy))
    answers: list[bytes] = []
    while True:
        answer = client.recv(65535)  # the socket's timeout bounds the wait
        if f"Call-ID: barrier-{tag}\r\n".encode() in answer:
            assert answer.startswith(b"SIP/2.0 200 "), answer
            return answers
        answers.append(answer)


def drain_and_refuse(fake_pbx: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    """What sipguard forwarded to the fake PBX so far; each request is refused with a 403,
    so no transaction or call it opened is left behind."""
    received = []
    fake_pbx.setblocking(False)
    try:
        while True:
            received.append(fake_pbx.recvfrom(65535))
    except BlockingIOError:
        pass
    finally:
        fake_pbx.setblocking(True)
    for request, source in received:
        if not request.startswith((b"ACK ", b"SIP/2.0 ")):
            fake_pbx.sendto(refuse(request), source)
    return received


def refuse(request: bytes) -> bytes:
    """A stand-in PBX's final answer to a request sipguard forwarded: 403, echoing its
    Via, From, To (with a tag), Call-ID and CSeq lines."""
    lines = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    named = [(line.split(b":", 1)[0].strip().lower(), line) for line in lines]
    echoed = [
        line for name, line in named if name in (b"via", b"v", b"from", b"f", b"call-id", b"i", b"cseq")
    ]
    to = [line + b";tag=pbx" for name, line in named if name in (b"to", b"t")]
    return b"\r\n".join([b"SIP/2.0 403 Forbidden", *echoed, *to, b"Content-Length: 0", b"", b""])


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@dataclass(frozen=True)
class Expect:
    """What an INVALID message may get, from INDEX.md's "Expected handling" column."""

    statuses: frozenset[int] = frozenset()  # sipguard's own answer, one of these
    may_forward: bool = False  # a liberal element may pass it on to the PBX ...
    never_forward: tuple[bytes, ...] = ()  # ... but never with these bytes
    may_drop: bool = False  # no answer at all (a response; or no request to answer)


def answer(*statuses: int) -> Expect:
    return Expect(statuses=frozenset(statuses))


def answer_or_accept(*never_forward: bytes) -> Expect:
    return Expect(statuses=frozenset({400}), may_forward=True, never_forward=never_forward)


EXPECTED: dict[str, Expect] = {
    "badinv01.dat": answer(400),
    "clerr.dat": answer(400),  # UDP: 400
    "ncl.dat": answer(400),
    "scalar02.dat": answer(400),
    "scalarlg.dat": Expect(may_drop=True),  # a response: discard
    # a liberal element may infer the closing quote, but must not forward it unclosed
    "quotbal.dat": answer_or_accept(b'To: "Mr. J. User <sip:'),
    "ltgtruri.dat": answer_or_accept(b"INVITE <sip:"),
    "lwsruri.dat": answer_or_accept(b"INVITE sip:user@example.com; lr SIP/2.0"),
    "lwsstart.dat": answer_or_accept(b"INVITE  sip:", b"sip:user@example.com  SIP/2.0"),
    "trws.dat": answer_or_accept(b"SIP/2.0  \r\n"),
    "escruri.dat": answer_or_accept(b"\r\nRoute: <sip:example.com>"),
    "baddate.dat": answer_or_accept(),
    "regbadct.dat": answer_or_accept(),
    "badaspec.dat": answer_or_accept(),
    # the file has no empty line after its headers, so there is no request to answer (see
    # tests/test_corpus.py); with the empty line it must be a 400 (baddn+crlf below)
    "baddn.dat": Expect(statuses=frozenset({400}), may_drop=True),
    "badvers.dat": answer(505),
    "mismatch01.dat": answer(400),
    "mismatch02.dat": answer(400, 501),
    "bigcode.dat": Expect(may_drop=True),  # a response: drop
    "insuf.dat": answer(400),
    "multi01.dat": answer(400),
    "mcl01.dat": answer(400),
}
# Besides the INVALID ones: baddn as some copies have it (with the empty line), the two
# well-formed requests whose Request-URI scheme a proxy must refuse with 416 (RFC 3261
# §16.3, RFC 4475 §3.3.2-3), and the unreferenced, broken test.dat (no crash is enough).
EXTRA: dict[str, tuple[str, bytes, Expect]] = {
    "baddn+crlf": ("baddn.dat", b"\r\n", answer(400)),
    "unkscm": ("unkscm.dat", b"", answer(416)),
    "novelsc": ("novelsc.dat", b"", answer(416)),
    "test": ("test.dat", b"", Expect(statuses=frozenset({400}), may_drop=True)),
}


def test_malformed_rfc4475_input_then_a_call_still_connects(lab: Lab) -> None:
    """Every RFC 4475 message INDEX.md calls INVALID, by UDP through the running proxy:
    each gets the answer the RFC asks for (or, where the RFC allows a liberal element to
    accept it, is forwarded without the bytes it must not forward), responses are dropped,
    and sipguard keeps answering. Then a normal SIPp call connects through the same proxy."""
    files = invalid_corpus_files()
    assert sorted(files) == sorted(EXPECTED), "INDEX.md and this table disagree"
    cases = {name: ((CORPUS / name).read_bytes(), EXPECTED[name]) for name in files}
    for name, (source, suffix, expect) in EXTRA.items():
        cases[name] = ((CORPUS / source).read_bytes() + suffix, expect)
    proxy, pbx, caller = free_ports(3)
    problems = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fake_pbx:
        fake_pbx.bind((LOOPBACK, pbx))
        guard = lab.guard([udp(proxy)], udp(pbx))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind((LOOPBACK, 0))
            client.settimeout(5.0)
            for name, (data, expect) in cases.items():
                answers = exchange(client, proxy, data, name)
                forwarded = [request for request, _ in drain_and_refuse(fake_pbx)]
                relayed: list[bytes] = []
                if forwarded:  # the fake PBX refused it: sipguard relays that refusal back
                    relayed = exchange(client, proxy, None, name + "-relayed")
                statuses = [status_of(a) for a in answers]
                answered = len(statuses) == 1 and statuses[0] in expect.statuses and not forwarded
                passed_on = (
                    expect.may_forward
                    and len(forwarded) == 1
                    and not statuses
                    and [status_of(r) for r in relayed] == [403]
                    and not any(bad in forwarded[0] for bad in expect.never_forward)
                )
                dropped = expect.may_drop and not statuses and not forwarded
                if not (answered or passed_on or dropped):
                    problems.append(f"{name}: answered {statuses}, forwarded {forwarded}")
    assert problems == [], "\n".join(problems)

    uas = lab.uas("uas", pbx, calls=1)
    uac = lab.uac("uac", caller, at(proxy), calls=1)
    log = guard.stop()
    uas.stop()
    assert_sipp_passed(uac, 1)
    assert_guard_clean(log)
    assert log.counter("calls_ended_bye") == log.counter("calls_answered") == 1
