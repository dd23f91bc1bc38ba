"""What-if replay (proxy/capture.py, proxy/replay.py, ``sipguard replay``).

Captures are written here with dpkt's own writers (pcap, nanosecond pcap, pcapng) in
each supported link type, from SIP messages built with sipsim, the way a capture on
sipguard's host shows a call: the customer's INVITE, the copy sipguard forwards to the
PBX, the PBX's answers and sipguard's copies of them. The decoder is also fed TCP
segments cut anywhere, out of order, retransmitted and overlapping (and, by Hypothesis,
any of those), IP fragments and garbage. The command is run as a process, as an
operator runs it. The end-to-end test records a live SIPp run through a real sipguard
with tcpdump, replays the file and compares every call's verdict with sipguard's own
decision log, then replays it against changed policies.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_e2e import ACME, GLOBEX, PolicyLab, decisions
from sipp import REPO, Lab, checkout_env, wait_until
from sipsim import invite, request, response

from proxy.capture import (
    GAP_PATIENCE,
    MAX_OUT_OF_ORDER,
    CaptureError,
    CaptureReader,
    PacketDecoder,
    SipPacket,
    starts_with_sip,
)
from proxy.policyfile import CompiledPolicy, compile_policy
from proxy.replay import ReplayReport, replay_capture

ETHERNET, RAW, SLL, SLL2 = 1, 101, 113, 276
T0 = datetime(2026, 1, 12, 17, 0, tzinfo=UTC).timestamp()  # noon in New York
SIPGUARD = ("127.0.0.1", 5060)
SIPGUARD_V6 = ("::1", 5060)
PBX = ("127.0.0.1", 5070)
CUSTOMER_V4 = ("192.0.2.10", 5060)
CUSTOMER_V6 = ("2001:db8::10", 5060)
OWNED = "+14155550100"
OWNED_TOO = "+14155550101"
NOT_OWNED = "+16505550100"
ACK_PSH, SYN = 0x18, 0x02

POLICY: dict[str, Any] = {
    "proxy": {"upstream": "udp:127.0.0.1:5070", "ringing_timeout": 30},
    "accounts": {
        "acme": {"sources": ["192.0.2.0/24", "2001:db8::/32"], "numbers": ["+14155550100-+14155550199"]},
    },
    "rules": {"caller_id": {}, "concurrency": {"per_number": 1, "per_account": None}},
}


def policy(rules: dict[str, Any] | None = None, **top: Any) -> CompiledPolicy:
    data = {**POLICY, **top}
    if rules is not None:
        data["rules"] = rules
    return compile_policy(data, {}, "test.yaml")


# -- writing captures ----------------------------------------------------------------------------
def ip_packet(source: str, destination: str, protocol: int, segment: bytes) -> bytes:
    if ":" in source:
        addresses = {"src": socket.inet_pton(socket.AF_INET6, source),
                     "dst": socket.inet_pton(socket.AF_INET6, destination)}  # fmt: skip
        return bytes(dpkt.ip6.IP6(nxt=protocol, hlim=64, plen=len(segment), data=segment, **addresses))
    addresses = {"src": socket.inet_aton(source), "dst": socket.inet_aton(destination)}
    return bytes(dpkt.ip.IP(p=protocol, data=segment, **addresses))


def udp_segment(source_port: int, destination_port: int, payload: bytes) -> bytes:
    return bytes(dpkt.udp.UDP(sport=source_port, dport=destination_port, ulen=8 + len(payload), data=payload))


def tcp_segment(source_port: int, destination_port: int, sequence: int, payload: bytes, flags: int) -> bytes:
    segment = dpkt.tcp.TCP(sport=source_port, dport=destination_port, seq=sequence, ack=1, flags=flags)
    segment.data = payload
    return bytes(segment)


def frame(link: int, packet: bytes) -> bytes:
    ethertype = 0x86DD if packet[0] >> 4 == 6 else 0x0800
    if link == ETHERNET:
        return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=ethertype, data=packet))
    if link == SLL:
        return bytes(dpkt.sll.SLL(ethtype=ethertype, data=packet))
    if link == SLL2:
        return bytes(dpkt.sll2.SLL2(ethtype=ethertype, data=packet))
    return packet


class Capture:
    """Frames of one link type, written out as pcap, nanosecond pcap or pcapng."""

    def __init__(self, link: int = ETHERNET) -> None:
        self.link = link
        self.frames: list[tuple[float, bytes]] = []

    def udp(self, at: float, source: tuple[str, int], destination: tuple[str, int], data: bytes) -> None:
        segment = udp_segment(source[1], destination[1], data)
        self.frames.append((at, frame(self.link, ip_packet(source[0], destination[0], 17, segment))))

    def tcp(self, at: float, source: tuple[str, int], destination: tuple[str, int], sequence: int,
            data: bytes = b"", flags: int = ACK_PSH) -> None:  # fmt: skip
        segment = tcp_segment(source[1], destination[1], sequence, data, flags)
        self.frames.append((at, frame(self.link, ip_packet(source[0], destination[0], 6, segment))))

    # a call as sipguard's host sees it: both legs of each message (IPv6 customers reach
    # sipguard's IPv6 listener; the PBX is on IPv4)
    def to_pbx(self, at: float, data: bytes, customer: tuple[str, int] = CUSTOMER_V4) -> None:
        self.udp(at, customer, facing(customer), data)
        self.udp(at + 0.0005, SIPGUARD, PBX, data)

    def to_customer(self, at: float, data: bytes, customer: tuple[str, int] = CUSTOMER_V4) -> None:
        self.udp(at, PBX, SIPGUARD, data)
        self.udp(at + 0.0005, facing(customer), customer, data)

    def from_customer(self, at: float, data: bytes, customer: tuple[str, int] = CUSTOMER_V4) -> None:
        """Only the customer's leg: sipguard did not forward it."""
        self.udp(at, customer, facing(customer), data)

    def refused_by_sipguard(self, at: float, data: bytes, customer: tuple[str, int] = CUSTOMER_V4) -> None:
        self.udp(at, facing(customer), customer, data)

    def write(self, path: Path, kind: str = "pcap") -> Path:
        with path.open("wb") as file:
            self.write_to(file, kind)
        return path

    def write_to(self, file: IO[bytes], kind: str) -> None:
        if kind == "pcapng":
            writer: Any = dpkt.pcapng.Writer(file, snaplen=65535, linktype=self.link)
        else:
            writer = dpkt.pcap.Writer(file, snaplen=65535, linktype=self.link, nano=kind == "pcap-nano")
        for at, data in self.frames:
            writer.writepkt(data, ts=at)


def facing(customer: tuple[str, int]) -> tuple[str, int]:
    """sipguard's listener in the customer's address family."""
    return SIPGUARD_V6 if ":" in customer[0] else SIPGUARD


def call_invite(call_id: str, caller: str, customer: tuple[str, int] = CUSTOMER_V4, **kwargs: Any) -> bytes:
    host = f"[{customer[0]}]" if ":" in customer[0] else customer[0]
    vias = (f"SIP/2.0/UDP {host}:{customer[1]};branch=z9hG4bK{call_id}",)
    return invite(from_=f"<sip:{caller}@{host};user=phone>", call_id=call_id, vias=vias, **kwargs)


def bye(call_id: str, *, cseq: int = 2) -> bytes:
    return request("BYE", call_id=call_id, to_tag="callee1", cseq=cseq)


def verdicts(report: ReplayReport) -> dict[str, tuple[str, str | None]]:
    assert report.calls is not None
    return {call.call_id: (call.verdict, call.rule) for call in report.calls}


def captured(report: ReplayReport) -> dict[str, str]:
    assert report.calls is not None
    return {call.call_id: call.captured for call in report.calls}


def replayed(
    capture: Capture, tmp_path: Path, rules: CompiledPolicy | None = None, kind: str = "pcap"
) -> ReplayReport:
    path = capture.write(tmp_path / f"capture.{kind}", kind)
    return replay_capture(rules or policy(), str(path), keep_calls=True)


# -- calls through sipguard, in every format and link type -----------------------------------------
def four_calls(capture: Capture, customer: tuple[str, int]) -> None:
    """A answered then hung up; B (same number, while A is up) answered in the capture too;
    C presenting a number acme does not own, refused by sipguard then; D after A's BYE,
    busy at the PBX; E placed by the PBX towards the customer."""
    a = call_invite("A", OWNED, customer)
    capture.to_pbx(T0, a, customer)
    capture.from_customer(T0 + 0.5, a, customer)  # a retransmission
    capture.to_customer(T0 + 0.6, response(a, 180), customer)
    capture.to_customer(T0 + 1, response(a, 200), customer)
    b = call_invite("B", OWNED, customer)
    capture.to_pbx(T0 + 2, b, customer)
    capture.to_customer(T0 + 2.5, response(b, 200), customer)
    c = call_invite("C", NOT_OWNED, customer)
    capture.from_customer(T0 + 3, c, customer)
    capture.refused_by_sipguard(T0 + 3.001, response(c, 403, "Caller ID not permitted"), customer)
    capture.to_pbx(T0 + 5, bye("A"), customer)
    capture.to_customer(T0 + 5.1, response(bye("A"), 200), customer)  # which ends A
    d = call_invite("D", OWNED, customer)
    capture.to_pbx(T0 + 6, d, customer)
    capture.to_customer(T0 + 6.2, response(d, 486), customer)
    capture.udp(
        T0 + 7, PBX, SIPGUARD, invite(call_id="E", vias=("SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKE",))
    )  # placed by the PBX
    capture.to_pbx(T0 + 9, bye("B"), customer)


@pytest.mark.parametrize(
    ("kind", "link", "customer"),
    [
        ("pcap", ETHERNET, CUSTOMER_V4),
        ("pcapng", SLL, CUSTOMER_V6),
        ("pcap-nano", SLL2, CUSTOMER_V4),
        ("pcapng", RAW, CUSTOMER_V6),
    ],
)
def test_calls_are_judged_once_on_the_capture_clock(
    tmp_path: Path, kind: str, link: int, customer: tuple[str, int]
) -> None:
    """Each INVITE is judged once (its retransmission and sipguard's forwarded copy are the
    same attempt); B is refused because A is up at B's capture time; B never happened, so
    its answer does not hold a slot and D, after A's BYE, is accepted; the PBX's own call
    is not judged."""
    capture = Capture(link)
    four_calls(capture, customer)

    report = replayed(capture, tmp_path, kind=kind)

    assert verdicts(report) == {
        "A": ("accept", None),
        "B": ("reject", "concurrency"),
        "C": ("reject", "caller_id"),
        "D": ("accept", None),
    }
    assert captured(report) == {"A": "answered", "B": "answered", "C": "refused 403", "D": "failed 486"}
    assert (report.judged, report.accepted, report.refused, report.from_pbx_side) == (4, 2, 2, 1)
    assert [(c.call_id, c.detail) for c in report.examples] == [
        ("B", f"calls from {OWNED}: 2 > 1"),
        ("C", f"from {NOT_OWNED} not owned by acme"),
    ]
    assert report.examples[0].at == pytest.approx(T0 + 2, abs=1e-6)  # the capture's time
    assert report.examples[0].source == customer[0]
    assert {name: (c.judged, c.refused, c.monitor, c.tagged) for name, c in report.rules.items()} == {
        "caller_id": (4, 1, 0, 0),
        "concurrency": (4, 1, 0, 0),
    }
    acme = report.accounts["acme"]
    assert (acme.judged, acme.accepted, acme.refused) == (4, 2, 2)
    assert report.seen("reject", "answered") == 1 and report.seen("reject", "refused") == 1
    assert report.counts.messages == len(capture.frames) and report.counts.malformed == 0
    assert report.counts.not_sip == 0 and report.warnings == []
    assert (report.first_at, report.last_at) == (pytest.approx(T0), pytest.approx(T0 + 9.0005))


def test_text_and_json_from_the_command(tmp_path: Path) -> None:
    capture = Capture()
    four_calls(capture, CUSTOMER_V4)
    path = capture.write(tmp_path / "calls.pcap")
    policy_file = write_policy(tmp_path, POLICY)

    text = run_replay(policy_file, path)
    as_json = run_replay(policy_file, path, "--json", "--calls")

    assert text.returncode == 0 and text.stderr == "", text.stderr
    lines = text.stdout.splitlines()
    assert (
        "calls judged: 4: 2 accepted, 2 would be refused, 0 emergency (and 1 from the PBX side, not judged)"
        in lines
    )
    concurrency = ["concurrency", "4", "1", "0", "0", "0", "486", "Too", "many", "simultaneous", "calls"]
    assert concurrency in [line.split() for line in lines]
    assert any(line.split()[:2] == ["acme", "4"] for line in lines)
    assert "refused calls, the first 2 of 2:" in lines
    assert any(
        line.startswith("2026-01-12T17:00:03.000Z  C ") and "not owned by acme" in line for line in lines
    )
    report = json.loads(as_json.stdout)
    assert {c["call_id"]: c["verdict"] for c in report["calls"]} == {
        "A": "accept", "B": "reject", "C": "reject", "D": "accept",
    }  # fmt: skip
    assert report["rules"]["caller_id"] == {
        "judged": 4, "refused": 1, "monitor": 0, "tagged": 0, "warnings": 0,
        "reply": "403 Caller ID not permitted",
    }  # fmt: skip
    assert report["capture"]["format"] == "pcap" and report["capture"]["link_type"] == "Ethernet"
    assert report["examples"][0]["time"] == "2026-01-12T17:00:02.000Z"
    assert report["against_capture"] == {
        "accept": {"answered": 1, "failed": 1},
        "reject": {"answered": 1, "refused": 1},
    }


# -- the capture's clock -------------------------------------------------------------------------------
def test_rate_buckets_refill_on_the_capture_clock(tmp_path: Path) -> None:
    """One call a minute: a call 30 s after the first is refused, one 61 s after it is not,
    although the replay itself takes milliseconds."""
    capture = Capture()
    for name, offset in (("first", 0.0), ("too-soon", 30.0), ("a-minute-on", 61.0)):
        capture.to_pbx(T0 + offset, call_invite(name, OWNED))
    rules = {"call_rate": {"per_number": {"per_minute": 1, "burst": 1}, "per_account": None}}

    report = replayed(capture, tmp_path, policy(rules))

    assert verdicts(report) == {
        "first": ("accept", None), "too-soon": ("reject", "call_rate"), "a-minute-on": ("accept", None),
    }  # fmt: skip


def test_calendar_rules_see_the_captures_wall_time(tmp_path: Path) -> None:
    """A telemarketing account's call to New York at 08:00 UTC (03:00 there) is outside the
    calling hours; the same call at 17:00 UTC (noon) is not."""
    capture = Capture()
    night = datetime(2026, 1, 12, 8, 0, tzinfo=UTC).timestamp()
    capture.to_pbx(night, call_invite("night", OWNED, uri="sip:+12125551234@pbx.example.com"))
    capture.to_pbx(T0, call_invite("noon", OWNED, uri="sip:+12125551234@pbx.example.com"))
    accounts = {"acme": {**POLICY["accounts"]["acme"], "telemarketing": True}}

    report = replayed(capture, tmp_path, policy({"calling_hours": {}}, accounts=accounts))

    assert verdicts(report) == {"night": ("reject", "calling_hours"), "noon": ("accept", None)}


def test_a_call_left_ringing_ends_at_the_ringing_timeout(tmp_path: Path) -> None:
    """ringing_timeout 30: a call still ringing 31 s on has ended (as the live proxy's Timer C
    would end it), so another from the number is accepted; one a second later is not."""
    capture = Capture()
    ringing = call_invite("ringing", OWNED)
    capture.to_pbx(T0, ringing)
    capture.to_customer(T0 + 0.1, response(ringing, 180))
    capture.to_pbx(T0 + 31, call_invite("after-timeout", OWNED))
    capture.to_pbx(T0 + 32, call_invite("while-that-rings", OWNED))

    report = replayed(capture, tmp_path)

    assert verdicts(report) == {
        "ringing": ("accept", None), "after-timeout": ("accept", None),
        "while-that-rings": ("reject", "concurrency"),
    }  # fmt: skip
    assert captured(report)["ringing"] == "unanswered"


def test_an_answered_call_ends_at_the_rules_maximum_duration(tmp_path: Path) -> None:
    """usage.max_call_duration 60: the call answered at 1 s is over at 61 s (live, sipguard
    would have sent the BYEs), so a call at 62 s is accepted although the capture's BYE
    only comes at 200 s."""
    capture = Capture()
    long_call = call_invite("long", OWNED)
    capture.to_pbx(T0, long_call)
    capture.to_customer(T0 + 1, response(long_call, 200))
    capture.to_pbx(T0 + 60, call_invite("at-60-s", OWNED))
    capture.to_pbx(T0 + 62, call_invite("at-62-s", OWNED))
    capture.to_pbx(T0 + 200, bye("long"))
    rules = {"concurrency": {"per_number": 1, "per_account": None}, "usage": {"max_call_duration": 60}}

    report = replayed(capture, tmp_path, policy(rules))

    assert verdicts(report) == {
        "long": ("accept", None), "at-60-s": ("reject", "concurrency"), "at-62-s": ("accept", None),
    }  # fmt: skip


def test_a_customers_bye_ends_the_call_when_the_pbx_accepts_it_or_leaves_it_unanswered(
    tmp_path: Path,
) -> None:
    """As live: a BYE refused 500 (a stale CSeq) leaves the call up, so a call placed
    meanwhile is refused; the next BYE, answered 200, ends it; a BYE never answered ends
    the call TIMER_B (32 s) after it was sent."""
    capture = Capture()
    first = call_invite("first", OWNED)
    capture.to_pbx(T0, first)
    capture.to_customer(T0 + 1, response(first, 200))
    capture.to_pbx(T0 + 10, bye("first", cseq=1))
    capture.to_customer(T0 + 10.1, response(bye("first", cseq=1), 500))
    capture.to_pbx(T0 + 11, call_invite("while-up", OWNED))
    capture.to_pbx(T0 + 12, bye("first", cseq=3))
    capture.to_customer(T0 + 12.1, response(bye("first", cseq=3), 200))
    second = call_invite("second", OWNED)
    capture.to_pbx(T0 + 13, second)
    capture.to_customer(T0 + 14, response(second, 200))
    capture.to_pbx(T0 + 20, bye("second"))  # never answered: over at 52 s
    capture.to_pbx(T0 + 51, call_invite("at-51-s", OWNED))
    capture.to_pbx(T0 + 53, call_invite("at-53-s", OWNED))
    rules = {"concurrency": {"per_number": 1, "per_account": None}}

    report = replayed(capture, tmp_path, policy(rules))

    assert verdicts(report) == {
        "first": ("accept", None), "while-up": ("reject", "concurrency"), "second": ("accept", None),
        "at-51-s": ("reject", "concurrency"), "at-53-s": ("accept", None),
    }  # fmt: skip


def test_a_cancelled_call_ends_with_its_487(tmp_path: Path) -> None:
    capture = Capture()
    cancelled = call_invite("cancelled", OWNED)
    capture.to_pbx(T0, cancelled)
    capture.to_customer(T0 + 0.1, response(cancelled, 180))
    capture.to_pbx(
        T0 + 2,
        request("CANCEL", call_id="cancelled", vias=("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcancelled",)),
    )
    capture.to_pbx(T0 + 2.5, call_invite("while-cancelling", OWNED))  # the 487 has not passed yet
    capture.to_customer(T0 + 3, response(cancelled, 487))
    capture.to_pbx(T0 + 4, call_invite("after", OWNED))

    report = replayed(capture, tmp_path)

    assert verdicts(report) == {
        "cancelled": ("accept", None),
        "while-cancelling": ("reject", "concurrency"),
        "after": ("accept", None),
    }
    assert captured(report)["cancelled"] == "cancelled"


def test_a_call_refused_in_the_capture_but_accepted_now_rings_until_that_refusal(tmp_path: Path) -> None:
    """caller_id in monitor mode lets the spoofed call through; the capture shows sipguard
    refusing it (403, never forwarded), so it is taken as ringing until then: a call from
    the same number a second later finds no call up."""
    capture = Capture()
    spoofed = call_invite("spoofed", NOT_OWNED)
    capture.udp(T0, CUSTOMER_V4, SIPGUARD, spoofed)
    capture.refused_by_sipguard(T0 + 0.01, response(spoofed, 403, "Caller ID not permitted"))
    capture.udp(T0 + 1, CUSTOMER_V4, SIPGUARD, call_invite("again", NOT_OWNED))
    rules = {"caller_id": {"mode": "monitor"}, "concurrency": {"per_number": 1, "per_account": None}}

    report = replayed(capture, tmp_path, policy(rules))

    assert verdicts(report) == {"spoofed": ("accept", None), "again": ("accept", None)}
    assert captured(report) == {"spoofed": "refused 403", "again": "unanswered"}
    assert report.calls is not None and report.calls[0].monitor == ("caller_id",)
    assert report.rules["caller_id"].monitor == 2 and report.rules["caller_id"].refused == 0
    assert report.accounts["acme"].monitor == 2
    assert report.seen("accept", "refused") == 1


def test_a_redis_store_is_not_used_and_the_report_says_so(tmp_path: Path) -> None:
    capture = Capture()
    capture.to_pbx(T0, call_invite("A", OWNED))

    report = replayed(capture, tmp_path, policy(state="redis://192.0.2.99:6379/0"))

    assert verdicts(report) == {"A": ("accept", None)}  # judged at once: no Redis was asked
    assert any("shared Redis" in warning and "did not touch it" in warning for warning in report.warnings)


# -- TCP streams ---------------------------------------------------------------------------------------
def decode_all(
    frames: list[tuple[float, bytes]], link: int = ETHERNET
) -> tuple[list[SipPacket], PacketDecoder]:
    decoder = PacketDecoder(link)
    packets = [packet for at, data in frames for packet in decoder.decode(at, data)]
    packets += decoder.finish(max(at for at, _ in frames))
    return packets, decoder


def tcp_frames(stream: bytes, cuts: list[int], order: list[int], *, isn: int = 1000, syn: bool = True,
               source: tuple[str, int] = CUSTOMER_V4) -> list[tuple[float, bytes]]:  # fmt: skip
    """The stream cut at ``cuts``, its segments sent in ``order`` (indices may repeat: a
    retransmission), one millisecond apart, after a SYN."""
    bounds = [0, *cuts, len(stream)]
    segments = [(isn + 1 + bounds[i], stream[bounds[i] : bounds[i + 1]]) for i in range(len(bounds) - 1)]
    capture = Capture()
    if syn:
        capture.tcp(T0, source, SIPGUARD, isn, flags=SYN)
    for step, index in enumerate(order, start=1):
        sequence, data = segments[index]
        capture.tcp(T0 + step / 1000, source, SIPGUARD, sequence % 2**32, data)
    return capture.frames


INVITE_A = call_invite("tcp-a", OWNED)
BYE_A = bye("tcp-a")
INVITE_B = call_invite("tcp-b", OWNED_TOO)


def test_tcp_message_split_mid_headers_and_mid_body_out_of_order_with_retransmissions() -> None:
    stream = INVITE_A + BYE_A
    cuts = [40, len(INVITE_A) - 20, len(INVITE_A) + 30]  # in the headers, in the SDP, in the BYE
    # segment 1 arrives before 0; 0 is retransmitted; 3 arrives before 2
    packets, decoder = decode_all(tcp_frames(stream, cuts, order=[1, 0, 0, 3, 2]))

    assert [p.message.raw for p in packets] == [INVITE_A, BYE_A]
    assert [p.at for p in packets] == [pytest.approx(T0 + 0.002), pytest.approx(T0 + 0.005)]  # when completed
    assert packets[0].source.transport == "tcp" and packets[0].source.host == CUSTOMER_V4[0]
    assert (decoder.counts.tcp_messages, decoder.counts.malformed, decoder.counts.tcp_gaps) == (2, 0, 0)


def test_tcp_overlapping_retransmission_and_two_messages_in_one_segment() -> None:
    stream = INVITE_A + b"\r\n\r\n" + BYE_A + INVITE_B  # with a keep-alive ping between
    middle = len(INVITE_A) // 2
    capture = Capture()
    capture.tcp(T0, CUSTOMER_V4, SIPGUARD, 0, flags=SYN)
    capture.tcp(T0 + 0.001, CUSTOMER_V4, SIPGUARD, 1, stream[:middle])
    capture.tcp(
        T0 + 0.002, CUSTOMER_V4, SIPGUARD, 1 + middle - 10, stream[middle - 10 : middle + 50]
    )  # overlaps
    capture.tcp(T0 + 0.003, CUSTOMER_V4, SIPGUARD, 1 + middle + 50, stream[middle + 50 :])  # the rest at once

    packets, decoder = decode_all(capture.frames)

    assert [p.message.raw for p in packets] == [INVITE_A, BYE_A, INVITE_B]
    assert decoder.counts.malformed == 0


def test_tcp_sequence_numbers_wrapping_round() -> None:
    packets, _ = decode_all(tcp_frames(INVITE_A, [100, 200], order=[0, 2, 1], isn=2**32 - 150))
    assert [p.message.raw for p in packets] == [INVITE_A]


def test_tcp_stream_joined_midway_starts_at_the_first_message_start() -> None:
    """No SYN captured: the tail of a message is skipped, the next message is read."""
    stream = INVITE_A + INVITE_B
    frames = tcp_frames(stream, [len(INVITE_A) - 100, len(INVITE_A)], order=[1, 2], syn=False)
    packets, decoder = decode_all(frames)
    assert [p.message.raw for p in packets] == [INVITE_B]
    assert decoder.counts.not_sip == 1  # the tail


def test_tcp_framing_lost_then_found_again() -> None:
    broken = INVITE_A.replace(b"Content-Length: ", b"Content-Length: x")
    frames = tcp_frames(broken + INVITE_B, [len(broken)], order=[0, 1])
    packets, decoder = decode_all(frames)
    assert [p.message.raw for p in packets] == [INVITE_B]
    assert decoder.counts.malformed == 1


def missed_segment(late: float) -> Capture:
    """INVITE A cut after 40 bytes; the rest of A never captured; a BYE, then INVITE B
    ``late`` seconds on."""
    capture = Capture()
    capture.tcp(T0, CUSTOMER_V4, SIPGUARD, 0, flags=SYN)
    capture.tcp(T0 + 0.001, CUSTOMER_V4, SIPGUARD, 1, INVITE_A[:40])
    capture.tcp(T0 + 0.002, CUSTOMER_V4, SIPGUARD, 1 + len(INVITE_A), BYE_A)
    capture.tcp(T0 + late, CUSTOMER_V4, SIPGUARD, 1 + len(INVITE_A) + len(BYE_A), INVITE_B)
    return capture


def test_tcp_bytes_the_capture_missed_are_given_up_after_a_while() -> None:
    """What follows a segment the capture lost waits for it (a retransmission may come),
    and is read once GAP_PATIENCE has passed; the message the gap cut through is malformed."""
    packets, decoder = decode_all(missed_segment(late=GAP_PATIENCE + 1).frames)
    late = T0 + GAP_PATIENCE + 1
    assert [(p.message.call_id, p.at) for p in packets] == [("tcp-a", late), ("tcp-b", late)]
    assert packets[0].message.raw == BYE_A
    assert (decoder.counts.tcp_gaps, decoder.counts.malformed) == (len(INVITE_A) - 40, 1)


def test_tcp_bytes_the_capture_missed_are_given_up_at_its_end() -> None:
    packets, decoder = decode_all(missed_segment(late=0.003).frames)
    assert [p.message.raw for p in packets] == [BYE_A, INVITE_B]
    assert [p.at for p in packets] == [T0 + 0.003, T0 + 0.003]  # the capture's end
    assert (decoder.counts.tcp_gaps, decoder.counts.malformed) == (len(INVITE_A) - 40, 1)


def test_tcp_bytes_the_capture_missed_are_given_up_when_too_much_waits() -> None:
    capture = Capture()
    capture.tcp(T0, CUSTOMER_V4, SIPGUARD, 0, flags=SYN)
    capture.tcp(T0, CUSTOMER_V4, SIPGUARD, 1, INVITE_A[:40])
    sequence, count = 1 + len(INVITE_A), MAX_OUT_OF_ORDER // len(INVITE_B) + 1
    for n in range(count):  # a millisecond apart: never GAP_PATIENCE
        capture.tcp(T0 + n / 1000, CUSTOMER_V4, SIPGUARD, sequence + n * len(INVITE_B), INVITE_B)
    capture.tcp(T0 + 1, CUSTOMER_V4, SIPGUARD, sequence + count * len(INVITE_B), BYE_A)
    decoder = PacketDecoder(ETHERNET)
    packets = [packet for at, data in capture.frames for packet in decoder.decode(at, data)]
    assert [p.message.raw for p in packets] == [INVITE_B] * count + [BYE_A]  # before the end
    assert decoder.counts.tcp_gaps == len(INVITE_A) - 40


def test_tcp_many_holes_between_small_segments_are_given_up_in_one_pass() -> None:
    """Start lines alone (never a whole message), each after a byte the capture missed,
    filling MAX_OUT_OF_ORDER, then a segment 30 KB long: giving up the first hole used to
    re-feed what waited, which gave up the next hole from inside that, and so on, about
    one level per small segment the big one outweighs: RecursionError, and a traceback
    from ``sipguard replay``. Now one pass, and each hole counts as a gap."""
    start_line = b"OPTIONS sip:a SIP/2.0\r\n"
    capture = Capture()
    capture.tcp(T0, CUSTOMER_V4, SIPGUARD, 0, flags=SYN)
    sequence, count = 1 + 10, MAX_OUT_OF_ORDER // len(start_line)  # bytes 1 to 10 never captured
    for _ in range(count):
        capture.tcp(T0, CUSTOMER_V4, SIPGUARD, sequence, start_line)
        sequence += len(start_line) + 1
    capture.tcp(T0, CUSTOMER_V4, SIPGUARD, sequence, INVITE_B + b"\r\n" * 15_000)  # keep-alives after it
    packets, decoder = decode_all(capture.frames)
    assert [p.message.raw for p in packets] == [INVITE_B]
    assert (decoder.counts.tcp_gaps, decoder.counts.malformed) == (10 + count, count)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_tcp_any_segmentation_and_order_gives_the_messages_in_order(data: st.DataObject) -> None:
    stream = INVITE_A + BYE_A + INVITE_B
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=12)))
    count = len(cuts) + 1
    order = data.draw(st.permutations(range(count)))
    repeats = data.draw(st.lists(st.integers(0, count - 1), max_size=4))  # retransmissions, anywhere
    isn = data.draw(st.integers(0, 2**32 - 1))
    packets, decoder = decode_all(tcp_frames(stream, cuts, [*order, *repeats], isn=isn))
    assert [p.message.raw for p in packets] == [INVITE_A, BYE_A, INVITE_B]
    assert decoder.counts.malformed == 0


def test_a_call_over_tcp_is_judged(tmp_path: Path) -> None:
    capture = Capture()
    capture.frames = tcp_frames(INVITE_A + BYE_A, [300], order=[1, 0])
    report = replayed(capture, tmp_path)
    assert verdicts(report) == {"tcp-a": ("accept", None)}
    assert report.counts.tcp_messages == 2


# -- IP --------------------------------------------------------------------------------------------------
def test_ipv4_and_ipv6_fragments_are_reassembled() -> None:
    big = call_invite("fragmented", OWNED, headers=[("X-Padding", "p" * 3000)])
    datagram = udp_segment(5060, 5060, big)
    frames: list[tuple[float, bytes]] = []
    pieces = [(0, datagram[:1480]), (1480, datagram[1480:2960]), (2960, datagram[2960:])]
    for position, (offset, piece) in enumerate([pieces[2], pieces[0], pieces[1]]):  # out of order
        more = offset != 2960
        fragment = dpkt.ip.IP(src=socket.inet_aton("192.0.2.10"), dst=socket.inet_aton("127.0.0.1"), p=17,
                              id=7, rf=0, df=0, mf=int(more), offset=offset // 8, data=piece)  # fmt: skip
        frames.append((T0 + position / 1000, frame(ETHERNET, bytes(fragment))))
    for position, (offset, piece) in enumerate(pieces):
        header = bytes([17, 0]) + (offset | (offset != 2960)).to_bytes(2) + (9).to_bytes(4)
        packet = ip_packet(CUSTOMER_V6[0], "::1", 44, header + piece)
        frames.append((T0 + 1 + position / 1000, frame(ETHERNET, packet)))

    packets, decoder = decode_all(frames)

    assert [p.message.raw for p in packets] == [big, big]
    assert [p.source.host for p in packets] == ["192.0.2.10", CUSTOMER_V6[0]]
    assert decoder.counts.not_sip == 0


def test_garbage_packets_are_counted_not_fatal(tmp_path: Path) -> None:
    capture = Capture()
    rng = random.Random(7)
    capture.frames.append((T0, bytes(rng.getrandbits(8) for _ in range(60))))  # random bytes
    capture.frames.append((T0, bytes(dpkt.ethernet.Ethernet(type=0x0806, data=b"\x00" * 28))))  # ARP
    capture.udp(T0, CUSTOMER_V4, ("192.0.2.20", 40000), b"\x80\x00" + bytes(170))  # RTP
    capture.udp(T0, CUSTOMER_V4, SIPGUARD, b"\r\n\r\n")  # a keep-alive
    capture.udp(T0, CUSTOMER_V4, SIPGUARD, b"INVITE sip:x@y SIP/2.0\r\nVia: nonsense\r\n")  # no empty line
    capture.udp(T0, CUSTOMER_V4, SIPGUARD, INVITE_A.replace(b"Call-ID: tcp-a\r\n", b""))  # no Call-ID
    snapped = frame(ETHERNET, ip_packet("192.0.2.10", "127.0.0.1", 17, udp_segment(5060, 5060, INVITE_B)))
    capture.frames.append((T0, snapped[:200]))  # cut short by a small snap length
    capture.to_pbx(T0 + 1, call_invite("real", OWNED))

    report = replayed(capture, tmp_path)

    assert verdicts(report) == {"real": ("accept", None)}
    counts = report.counts
    assert (counts.packets, counts.messages, counts.malformed, counts.snapped) == (9, 2, 2, 1)
    assert counts.not_sip == 5  # random, ARP, RTP, keep-alive, the snapped one
    assert any("snap length" in warning for warning in report.warnings)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([ETHERNET, RAW, SLL, SLL2, 0]), st.binary(max_size=200))
def test_any_frame_decodes_to_messages_or_nothing(link: int, data: bytes) -> None:
    decoder = PacketDecoder(link)
    decoder.decode(T0, data)
    decoder.decode(T0, frame(link, ip_packet("192.0.2.1", "192.0.2.2", 6, data)))
    decoder.decode(T0, frame(link, ip_packet("2001:db8::1", "2001:db8::2", 17, data)))
    assert decoder.counts.packets == 3


def test_start_line_detection() -> None:
    assert starts_with_sip(b"\r\nSIP/2.0 200 OK\r\n")
    assert starts_with_sip(b"OPTIONS sip:a@b SIP/2.0\r\nVia: x\r\n")
    assert not starts_with_sip(b"GET / HTTP/1.1\r\n")
    assert not starts_with_sip(b"SIP/2.0 200 OK")  # no line end yet
    assert not starts_with_sip(b"\x80\x00" * 100)


# -- unreadable and cut-short files: one line, exit 2; a cut-short end still reports ----------------
def write_policy(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def run_replay(policy_file: Path, capture: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "proxy.cli", "replay", str(policy_file), str(capture), *flags]
    return subprocess.run(argv, cwd=REPO, env=checkout_env(), capture_output=True, text=True, timeout=60)


def assert_refused_in_one_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    return write_policy(tmp_path, POLICY)


def test_not_a_capture(tmp_path: Path, policy_file: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a capture\n")
    assert_refused_in_one_line(run_replay(policy_file, path), "is not a pcap or pcapng capture")


def test_empty_missing_and_headless_files(tmp_path: Path, policy_file: Path) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    assert_refused_in_one_line(run_replay(policy_file, empty), "is empty")
    assert_refused_in_one_line(run_replay(policy_file, tmp_path / "nowhere.pcap"), "cannot read")
    capture = Capture()
    capture.to_pbx(T0, call_invite("A", OWNED))
    for kind in ("pcap", "pcapng"):
        whole = capture.write(tmp_path / f"whole.{kind}", kind).read_bytes()
        headless = tmp_path / f"headless.{kind}"
        headless.write_bytes(whole[:10])
        assert_refused_in_one_line(run_replay(policy_file, headless), "header is unreadable")


def test_unsupported_link_type(tmp_path: Path, policy_file: Path) -> None:
    path = Capture(link=105).write(tmp_path / "wifi.pcap")  # IEEE 802.11
    assert_refused_in_one_line(run_replay(policy_file, path), "link type 105 is not supported")


def test_bad_policy_file(tmp_path: Path) -> None:
    capture = Capture().write(tmp_path / "empty-capture.pcap")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  concurrency: {per_numbr: 2}\n")
    result = run_replay(bad, capture)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "bad.yaml:2: rules.concurrency.per_numbr: unknown key" in result.stderr


@pytest.mark.parametrize("kind", ["pcap", "pcapng"])
@pytest.mark.parametrize("cut", [1, 30, 90])  # inside the last packet's data, or its record header
def test_a_capture_cut_short_reports_what_came_before(
    tmp_path: Path, policy_file: Path, kind: str, cut: int
) -> None:
    capture = Capture()
    four_calls(capture, CUSTOMER_V4)
    capture.to_pbx(T0 + 20, call_invite("cut-off", OWNED))  # its second copy is the last record
    whole = capture.write(tmp_path / f"whole.{kind}", kind).read_bytes()
    last_record = len(capture.frames[-1][1]) + (16 if kind == "pcap" else 32)
    path = tmp_path / f"cut.{kind}"
    path.write_bytes(whole[: len(whole) - last_record + cut])

    result = run_replay(policy_file, path, "--json", "--calls")

    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert [c["call_id"] for c in report["calls"]] == ["A", "B", "C", "D", "cut-off"]
    assert report["capture"]["packets"] == len(capture.frames) - 1
    (warning,) = [w for w in report["warnings"] if "cut short" in w]
    assert f"record {len(capture.frames)}" in warning


def test_a_gzipped_capture_is_read(tmp_path: Path) -> None:
    capture = Capture()
    four_calls(capture, CUSTOMER_V4)
    path = tmp_path / "calls.pcap.gz"
    path.write_bytes(gzip.compress(capture.write(tmp_path / "calls.pcap").read_bytes()))
    report = replay_capture(policy(), str(path), keep_calls=True)
    assert len(verdicts(report)) == 4


def test_a_timestamp_that_is_not_a_date_ends_the_capture_there(tmp_path: Path) -> None:
    """pcapng's 64-bit timestamps reach far past year 9999: a damaged one used to be
    replayed, and the report then raised ValueError printing it as a date (a traceback
    from ``sipguard replay``). The record is unreadable: what came before is replayed."""
    capture = Capture()
    capture.to_pbx(T0, call_invite("before", OWNED))
    capture.to_pbx(1e13, call_invite("damaged", OWNED))
    capture.to_pbx(T0 + 1, call_invite("after", OWNED))
    report = replay_capture(
        policy(), str(capture.write(tmp_path / "damaged.pcapng", "pcapng")), keep_calls=True
    )
    answer = report.as_json()
    assert list(verdicts(report)) == ["before"]
    assert answer["capture"]["packets"] == 2 and answer["capture"]["last"] == answer["capture"]["first"]
    assert answer["warnings"][0] == (
        "the capture is cut short: record 3 is unreadable (its timestamp 10000000000000 is not a date); "
        "what came before it was replayed"
    )


def damaged_gzip(tmp_path: Path, at: float) -> Path:
    """A gzipped capture (a call, 30 KB of hex text in non-SIP packets, a call) whose
    deflate data is good up to ``at`` that fraction of the capture, then a block of the
    reserved type (0b11): zlib.error, "invalid block type"."""
    noise = random.Random(7)
    capture = Capture()
    capture.to_pbx(T0, call_invite("first", OWNED))
    for n in range(60):
        capture.udp(T0 + 0.01 * n, CUSTOMER_V4, ("192.0.2.99", 9), noise.randbytes(250).hex().encode())
    capture.to_pbx(T0 + 1, call_invite("last", OWNED_TOO))
    data = capture.write(tmp_path / "calls.pcap").read_bytes()
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # (31: a gzip header and trailer)
    good = compressor.compress(data[: int(len(data) * at)]) + compressor.flush(zlib.Z_SYNC_FLUSH)
    path = tmp_path / "damaged.pcap.gz"
    path.write_bytes(good + b"\xff" * 16)
    return path


def test_a_damaged_gzip_is_refused_or_read_up_to_the_damage(tmp_path: Path) -> None:
    """Damaged deflate data raises zlib.error, which used to escape CaptureReader as a
    traceback from ``sipguard replay``: in the header it is refused in one line, further
    on what came before it is replayed, with a warning."""
    with pytest.raises(
        CaptureError, match=r"damaged.pcap.gz: the capture's header is unreadable \(Error -3 "
    ):
        replay_capture(policy(), str(damaged_gzip(tmp_path, 0)))
    report = replay_capture(policy(), str(damaged_gzip(tmp_path, 0.7)), keep_calls=True)
    assert list(verdicts(report)) == ["first"]
    assert report.warnings[0].startswith("the capture is cut short: record ")
    assert "is unreadable (Error -3 while decompressing data: " in report.warnings[0]


def capture_file_starts() -> list[bytes]:
    """The first bytes of a pcap, a nanosecond pcap and a pcapng file with one call."""
    capture = Capture()
    capture.to_pbx(T0, call_invite("A", OWNED))
    starts = []
    for kind in ("pcap", "pcap-nano", "pcapng"):
        buffer = io.BytesIO()
        capture.write_to(buffer, kind)
        starts.append(buffer.getvalue()[:200])
    return starts


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(capture_file_starts()), st.integers(0, 200), st.binary(max_size=300))
def test_a_damaged_file_is_refused_or_read_up_to_the_damage(start: bytes, keep: int, tail: bytes) -> None:
    data = start[:keep] + tail
    try:
        reader = CaptureReader(io.BytesIO(data), "damaged.pcap")
        decoder = PacketDecoder(reader.link_type)
        for at, frame in reader:
            decoder.decode(at, frame)
    except CaptureError as error:
        assert "\n" not in str(error)


def test_reader_yields_timestamps_as_floats(tmp_path: Path) -> None:
    capture = Capture()
    capture.to_pbx(T0 + 0.123456789, call_invite("A", OWNED))
    with capture.write(tmp_path / "nano.pcap", "pcap-nano").open("rb") as file:
        stamps = [at for at, _ in CaptureReader(file)]
    assert all(type(at) is float for at in stamps) and stamps[0] == pytest.approx(T0 + 0.123456789)


# -- end to end: a live run through sipguard, recorded with tcpdump, replayed ------------------------
E2E_POLICY = f"""
accounts:
  acme:
    sources: [{ACME}/32]
    numbers: ["+14155550100-+14155550199"]
  globex:
    sources: [{GLOBEX}/32]
    numbers: ["+16505550100"]
rules:
  caller_id: {{}}
  concurrency: {{per_number: 2, per_account: null}}
  call_rate:
    per_number: {{per_minute: 6, burst: 3}}
    per_account: null
"""
TRUNKING_NUMBER = "+14155550110"
DIALER_NUMBER = "+14155550120"
SPOOFED_NUMBER = "+16505550199"  # nobody's (a rate bucket of its own: refused calls count against rates)


class Tcpdump:
    """``tcpdump -i lo -w FILE`` on one UDP port; ready once it says it is listening.

    Stopping: tcpdump leaves packets it has not read yet when SIGINT comes, so ``stop``
    first sends a marker datagram to the port and waits for it to be in the file: what
    came before it is then written too (immediate mode, a flush after every packet)."""

    MARKER = b"replay-test: the workload is over"

    def __init__(self, path: Path, port: int) -> None:
        self.path, self.port = path, port
        argv = ["tcpdump", "-i", "lo", "-w", str(path), "-U", "--immediate-mode", "-s", "0", "udp", "port",
                str(port)]  # fmt: skip
        if os.geteuid() != 0:
            argv = ["sudo", "-n", *argv]
        self.lines: list[str] = []
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

        def listening() -> bool:
            if self._process.poll() is not None:
                raise AssertionError("tcpdump exited:\n" + "\n".join(self.lines))
            return any("listening on" in line for line in self.lines)

        wait_until(listening, 10, "tcpdump to say it is listening")

    def _read(self) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> list[str]:
        """The marker, then SIGINT (tcpdump reports its counts), and wait for it to exit."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as marker:
            marker.sendto(self.MARKER, ("127.0.0.1", self.port))
        wait_until(lambda: self.MARKER in self.path.read_bytes(), 10, "the marker in tcpdump's file")
        self._process.send_signal(signal.SIGINT)
        assert self._process.wait(10) == 0, self.lines
        self._reader.join(10)
        return self.lines

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def live_verdicts(log: Any) -> dict[str, tuple[str, str | None]]:
    return {entry["call_id"]: (entry["verdict"], entry["rule"]) for entry in decisions(log)}


def replay_json(policy_file: Path, capture: Path) -> dict[str, Any]:
    result = run_replay(policy_file, capture, "--json", "--calls")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def replayed_verdicts(report: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    return {call["call_id"]: (call["verdict"], call["rule"]) for call in report["calls"]}


@pytest.mark.sipp
def test_replay_of_a_live_capture_matches_the_live_decisions(lab: Lab, tmp_path: Path) -> None:
    """Legitimate calls, a spoofed caller ID, a trunking burst (4 calls held 3 s on a cap of
    2) and a dialer burst (5 calls, 3 allowed) go through sipguard while tcpdump records
    its port. Replayed against the same policy, every call gets the verdict sipguard's
    decision log shows; against a cap of 1 the trunking number's second call is refused
    too (it was answered live); with caller_id in monitor mode the spoofed calls pass."""
    policy_lab = PolicyLab(lab)
    policy_lab.write_policy(E2E_POLICY)  # (start writes it again; the port is what tcpdump needs)
    capture_path = tmp_path / "live.pcap"
    tcpdump = Tcpdump(capture_path, policy_lab.proxy)
    try:
        policy_lab.start(E2E_POLICY)
        trunking = policy_lab.call("uac_trunking.xml", TRUNKING_NUMBER, calls=4, rate=20, hold_ms=3000)
        spoofed = policy_lab.run("uac_spoofed.xml", SPOOFED_NUMBER, source=ACME, calls=2)
        legit = policy_lab.run("uac_caller.xml", "+16505550100", source=GLOBEX, calls=2)
        owner = policy_lab.run("uac_caller.xml", "+14155550100", source=ACME)
        dialer = policy_lab.run("uac_dialer.xml", DIALER_NUMBER, calls=5, rate=5)
        trunked = trunking.wait()
        log, _ = policy_lab.finish()
        tcpdump_says = tcpdump.stop()
    finally:
        tcpdump.kill()
    for result in (trunked, spoofed, legit, owner, dialer):
        assert result.returncode == 0 and result.failed == 0, result.summary()
    assert "0 packets dropped by kernel" in tcpdump_says, tcpdump_says
    (captured,) = [int(line.split()[0]) for line in tcpdump_says if line.endswith(" packets captured")]

    live = live_verdicts(log)
    rules = sorted(rule for verdict, rule in live.values() if verdict == "reject")
    assert rules == ["call_rate", "call_rate", "caller_id", "caller_id", "concurrency", "concurrency"], live
    assert len(live) == 4 + 2 + 2 + 1 + 5

    report = replay_json(policy_lab.path, capture_path)
    assert replayed_verdicts(report) == live
    assert (report["calls_judged"], report["refused"], report["from_pbx_side"]) == (14, 6, 0)
    assert report["capture"]["packets"] == captured  # every packet tcpdump wrote was read
    assert report["capture"]["messages"] == captured - 1  # and all but the marker were SIP
    assert report["capture"]["malformed"] == 0 and report["warnings"] == []
    assert report["against_capture"]["reject"] == {"refused": 6}

    # the same capture against a lower cap: the trunking number's second call is refused too
    lower_cap = tmp_path / "lower-cap.yaml"
    lower_cap.write_text(policy_lab.path.read_text().replace("per_number: 2", "per_number: 1"))
    lowered = replay_json(lower_cap, capture_path)
    changed = {
        call_id: verdict
        for call_id, verdict in replayed_verdicts(lowered).items()
        if live[call_id] != verdict
    }
    trunking_ids = sorted((c for c in live if c in {m.headers("call-id")[0] for m in trunked.messages}),
                          key=lambda call_id: int(call_id.split("-", 1)[0]))  # fmt: skip
    assert changed == {trunking_ids[1]: ("reject", "concurrency")}
    assert lowered["against_capture"]["reject"] == {"refused": 6, "answered": 1}

    # caller_id only watching: the spoofed calls pass, counted as monitor hits
    watching = tmp_path / "monitor.yaml"
    watching.write_text(policy_lab.path.read_text().replace("caller_id: {}", "caller_id: {mode: monitor}"))
    monitored = replay_json(watching, capture_path)
    spoofed_ids = {m.headers("call-id")[0] for m in spoofed.messages}
    changed = {c: v for c, v in replayed_verdicts(monitored).items() if live[c] != v}
    assert changed == dict.fromkeys(spoofed_ids, ("accept", None))
    assert monitored["rules"]["caller_id"]["monitor"] == 2
    assert monitored["against_capture"]["accept"]["refused"] == 2  # no real outcome: see docs/replay.md
