"""The flood guard (proxy/flood.py) with a fake clock, and the policy file's flood: and
admin: sections.

Times are multiples of 1/8 s and rates powers of two, so the GCRA arithmetic is exact
and "at the threshold" means exactly that, not "within a float's rounding".
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_policyfile import errors, load, write

from proxy.cli import main
from proxy.flood import (
    DEFAULT_SCANNER_USER_AGENTS,
    EMERGENCY_CALL_MESSAGES,
    MAX_EMERGENCY_CALLS_PER_BAN,
    BanListFull,
    Banned,
    EmergencyPassed,
    FloodEvent,
    FloodGuard,
    FloodSettings,
    Unbanned,
)

RATE = 8.0  # messages per second: one every 0.125 s
BURST = 4
SCANNER = "192.0.2.66"
OFFICE = "198.51.100.7"


def request(user_agent: str | None = None, *, header: str = "User-Agent", body: str = "") -> bytes:
    lines = [
        "REGISTER sip:example.net SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bK-1;rport",
        "From: <sip:100@example.net>;tag=1",
        "To: <sip:100@example.net>",
        "Call-ID: 1@192.0.2.66",
        "CSeq: 1 REGISTER",
    ]
    if user_agent is not None:
        lines.append(f"{header}: {user_agent}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


PLAIN = request("Yealink SIP-T46S 66.86.0.15")


def guard(**settings: object) -> FloodGuard:
    values: dict[str, object] = {"messages_per_second": RATE, "burst": BURST, "ban_seconds": 10.0}
    values.update(settings)
    return FloodGuard(FloodSettings(**values))  # type: ignore[arg-type]


def send(
    flood: FloodGuard, count: int, *, host: str = SCANNER, at: float = 0.0, every: float = 0.0
) -> list[bool]:
    return [flood.admit(host, PLAIN, at + index * every) for index in range(count)]


def only_event(flood: FloodGuard) -> FloodEvent:
    (event,) = flood.take_events()
    return event


# -- rate --------------------------------------------------------------------------------------------
def test_a_burst_is_admitted_and_one_more_message_bans() -> None:
    flood = guard()
    assert send(flood, BURST) == [True] * BURST
    assert flood.take_events() == []
    assert flood.admit(SCANNER, PLAIN, 0.0) is False
    event = only_event(flood)
    assert isinstance(event, Banned)
    assert (event.host, event.reason, event.messages, event.seconds, event.until) == (
        SCANNER,
        "rate",
        5,
        10.0,
        10.0,
    )
    assert event.detail == "over 8/s, burst 4"
    assert [ban.host for ban in flood.bans] == [SCANNER]


def test_a_source_at_exactly_the_rate_is_never_banned() -> None:
    flood = guard()
    assert all(send(flood, BURST))  # a full burst first, then exactly the rate for 10 minutes
    assert all(send(flood, 4800, at=0.125, every=0.125))
    assert flood.take_events() == [] and flood.bans == []


def test_a_source_just_over_the_rate_is_banned_once_its_burst_is_spent() -> None:
    flood = guard()
    admitted = send(flood, 100, every=1 / 16)  # twice the rate: 1/16 s of debt per message
    # message k (from 1) arrives at (k-1)/16 and owes k/8: banned when k/8 - (k-1)/16 > 4/8, at k = 8
    assert admitted[:7] == [True] * 7
    assert admitted[7:] == [False] * 93
    event = only_event(flood)
    assert isinstance(event, Banned) and event.messages == 8
    assert event.rate == pytest.approx(8 / (7 / 16))  # messages seen over the time they took
    assert flood.bans[0].dropped == 93  # the banning message and every later one


def test_sources_are_counted_apart() -> None:
    flood = guard()
    assert all(send(flood, BURST, host=SCANNER))
    assert all(send(flood, BURST, host=OFFICE))
    assert flood.take_events() == []


# -- bans end ----------------------------------------------------------------------------------------
def test_a_ban_drops_everything_until_it_ends_then_admits_again() -> None:
    flood = guard()
    send(flood, BURST + 1)
    flood.take_events()
    assert send(flood, 10, at=1.0, every=0.875) == [False] * 10  # up to 8.875 s
    assert flood.admit(SCANNER, PLAIN, 9.875) is False
    assert flood.admit(SCANNER, PLAIN, 10.0) is True  # the ban ends at 10 s exactly
    event = only_event(flood)
    assert event == Unbanned(host=SCANNER, by="expiry", reason="rate", dropped=12)
    assert flood.bans == []


def test_expire_ends_bans_without_waiting_for_a_message() -> None:
    flood = guard()
    send(flood, BURST + 1)
    send(flood, BURST + 1, host=OFFICE, at=5.0)
    flood.take_events()
    flood.expire(9.875)
    assert flood.take_events() == [] and len(flood.bans) == 2
    flood.expire(10.0)
    assert flood.take_events() == [Unbanned(host=SCANNER, by="expiry", reason="rate", dropped=1)]
    assert [ban.host for ban in flood.bans] == [OFFICE]


def banned_for(flood: FloodGuard, at: float) -> float:
    """Ban SCANNER by a burst at ``at``; how long the ban is."""
    assert send(flood, BURST, at=at) == [True] * BURST, "banned already"
    assert flood.admit(SCANNER, PLAIN, at) is False
    events = [event for event in flood.take_events() if isinstance(event, Banned)]
    assert len(events) == 1
    return events[0].seconds


def test_repeat_offenders_get_doubling_bans_up_to_the_cap_then_are_forgiven() -> None:
    flood = guard(ban_seconds=10.0, max_ban_seconds=30.0)
    assert banned_for(flood, 0.0) == 10.0
    assert banned_for(flood, 11.0) == 20.0  # back 1 s after its ban ended: twice as long
    assert banned_for(flood, 32.0) == 30.0  # 40 s would be past the cap
    assert banned_for(flood, 63.0) == 30.0
    # quiet for max_ban_seconds after its last ban ended (at 93 s): a first offence again
    assert banned_for(flood, 93.0 + 30.0) == 10.0


def test_a_source_banned_again_and_again_stays_at_the_cap() -> None:
    flood = guard(ban_seconds=1.0, max_ban_seconds=8.0)
    lengths, at = [], 0.0
    for _ in range(1100):  # each time 1 s after the previous ban ended
        lengths.append(banned_for(flood, at))
        at += lengths[-1] + 1.0
    assert lengths[:5] == [1.0, 2.0, 4.0, 8.0, 8.0] and set(lengths[3:]) == {8.0}
    assert flood.bans[0].offences == 1100


# -- User-Agent --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("message", "signature"),
    [
        (request("friendly-scanner"), "friendly-scanner"),
        (request("sipvicious 0.3.8", header="user-agent"), "sipvicious"),
        (request("SIPCLI/v1.8", header="USER-AGENT"), "sipcli"),
        (request("vaxsipuseragent/3.1", header="User-Agent \t"), "vaxsipuseragent"),  # space before the colon
        (request("Mozilla iWar"), "iwar"),
    ],
)
def test_a_scanner_user_agent_bans_at_the_first_message(message: bytes, signature: str) -> None:
    flood = guard()
    assert flood.admit(SCANNER, message, 0.0) is False
    event = only_event(flood)
    assert isinstance(event, Banned)
    assert (event.reason, event.detail, event.messages) == ("user-agent", signature, 1)


@pytest.mark.parametrize(
    "message",
    [
        request("Yealink SIP-T46S 66.86.0.15"),
        request("Asterisk PBX 20.5.0"),
        request("sipsak 0.9.8"),  # admins' monitoring: not on the default list
        request(None),
        request("friendly-scanner", header="Server"),  # not User-Agent
        request(None, body="User-Agent: friendly-scanner\r\n"),  # in a body, not a header
        request("Acme Phone", header="X-User-Agent"),
    ],
)
def test_real_phones_and_other_headers_are_not_scanners(message: bytes) -> None:
    flood = guard()
    assert flood.admit(SCANNER, message, 0.0) is True
    assert flood.take_events() == []


def test_the_user_agent_list_is_configurable_and_case_blind() -> None:
    flood = guard(user_agents=("EvilDialer",))
    assert flood.admit(OFFICE, request("friendly-scanner"), 0.0) is True
    assert flood.admit(SCANNER, request("evildialer/2.0"), 0.0) is False
    assert "friendly-scanner" in DEFAULT_SCANNER_USER_AGENTS
    # a reload with another list: what each User-Agent was found to be is looked at again
    flood.configure(FloodSettings(user_agents=("friendly-scanner",)), now=1.0)
    assert flood.admit(OFFICE, request("friendly-scanner"), 1.0) is False
    assert flood.admit("192.0.2.1", request("evildialer/2.0"), 1.0) is True
    flood.configure(FloodSettings(user_agents=()), now=2.0)
    assert flood.admit("192.0.2.2", request("friendly-scanner"), 2.0) is True


# -- emergency calls pass a ban -------------------------------------------------------------------------
def sip_request(method: str, uri: str, call_id: str, *, to_tag: str | None = None) -> bytes:
    lines = [
        f"{method} {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.66:5060;branch=z9hG4bK-e1;rport",
        "From: <sip:+14155550100@example.net>;tag=1",
        "To: <sip:911@example.net>" + (f";tag={to_tag}" if to_tag else ""),
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class EmergencyCheck:
    """Stands in for the policy's check (the app's parses and asks the engine): a
    request line to 911 or urn:service:sos is an emergency call. Records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[bytes, str]] = []

    def __call__(self, data: bytes, host: str) -> bool:
        self.asked.append((data, host))
        return data.startswith((b"INVITE sip:911@", b"INVITE tel:911", b"INVITE urn:service:sos"))


def banned_guard() -> tuple[FloodGuard, EmergencyCheck]:
    check = EmergencyCheck()
    flood = FloodGuard(FloodSettings(messages_per_second=RATE, burst=BURST, ban_seconds=10.0), check)
    send(flood, BURST + 1)
    assert [type(event) for event in flood.take_events()] == [Banned]
    return flood, check


def test_a_banned_source_still_places_an_emergency_call_and_carries_it_through() -> None:
    """Its INVITE, the INVITE's retransmission, the ACK and the BYE (same Call-ID) pass;
    everything else it sends is still dropped."""
    flood, check = banned_guard()
    invite = sip_request("INVITE", "sip:911@example.net", "sos-1@192.0.2.66")
    assert flood.admit(SCANNER, invite, 1.0) is True
    assert flood.take_events() == [EmergencyPassed(host=SCANNER, call_id="sos-1@192.0.2.66", calls=1)]
    assert flood.admit(SCANNER, invite, 1.5) is True  # its retransmission
    for method in ("ACK", "BYE"):
        assert flood.admit(SCANNER, sip_request(method, "sip:911@pbx", "sos-1@192.0.2.66", to_tag="t"), 2.0)
    assert flood.admit(SCANNER, sip_request("INVITE", "sip:100@example.net", "scan-1@x"), 2.0) is False
    assert flood.admit(SCANNER, sip_request("BYE", "sip:911@pbx", "other@x", to_tag="t"), 2.0) is False
    assert flood.admit(SCANNER, PLAIN, 2.0) is False
    assert len(check.asked) == 2  # the first INVITE to 911, and the INVITE to 100: nothing else
    assert flood.bans[0].dropped == 1 + 3  # the banning message, then the three above
    assert flood.take_events() == []


@pytest.mark.parametrize(
    "uri", ["tel:911", "sip:911@example.net;user=phone", "urn:service:sos", "sip:+1-911@example.net"]
)
def test_the_screen_hands_every_short_number_and_the_sos_urn_to_the_check(uri: str) -> None:
    flood, check = banned_guard()
    flood.admit(SCANNER, sip_request("INVITE", uri, "sos@x"), 1.0)
    assert len(check.asked) == 1 and check.asked[0][1] == SCANNER


@pytest.mark.parametrize(
    "data",
    [
        sip_request("INVITE", "sip:+14155550142@example.net", "long@x"),  # a full number: never emergency
        sip_request("INVITE", "sip:alice@example.net", "name@x"),
        sip_request("OPTIONS", "sip:911@example.net", "options@x"),
        b"INVITE sip:911@example.net",  # no Call-ID: its later messages could not be told apart
    ],
)
def test_what_cannot_be_an_emergency_call_is_dropped_unparsed(data: bytes) -> None:
    flood, check = banned_guard()
    assert flood.admit(SCANNER, data, 1.0) is False
    assert check.asked == []


def test_the_message_that_earns_the_ban_passes_if_it_is_an_emergency_call() -> None:
    check = EmergencyCheck()
    flood = FloodGuard(FloodSettings(messages_per_second=RATE, burst=BURST), check)
    assert all(send(flood, BURST))
    assert flood.admit(SCANNER, sip_request("INVITE", "tel:911", "sos@x"), 0.0) is True
    assert [type(event) for event in flood.take_events()] == [Banned, EmergencyPassed]
    assert flood.bans[0].dropped == 0


def test_a_ban_lets_through_a_bounded_number_of_emergency_calls_and_messages() -> None:
    """A flooder may dial 911 too: MAX_EMERGENCY_CALLS_PER_BAN calls a ban, each with
    EMERGENCY_CALL_MESSAGES messages at most."""
    flood, _ = banned_guard()
    calls = [sip_request("INVITE", "tel:911", f"sos-{n}@x") for n in range(MAX_EMERGENCY_CALLS_PER_BAN + 1)]
    admitted = [flood.admit(SCANNER, call, 1.0) for call in calls]
    assert admitted == [True] * MAX_EMERGENCY_CALLS_PER_BAN + [False]
    assert len(flood.take_events()) == MAX_EMERGENCY_CALLS_PER_BAN
    retransmissions = [flood.admit(SCANNER, calls[0], 2.0) for _ in range(EMERGENCY_CALL_MESSAGES)]
    assert retransmissions == [True] * (EMERGENCY_CALL_MESSAGES - 1) + [False]


def test_an_emergency_call_up_when_the_ban_began_keeps_going() -> None:
    """Its re-INVITEs and BYE pass (the policy lists the emergency calls up now), nothing
    else of the banned source's does."""
    live = {"up-already@x"}
    flood = FloodGuard(FloodSettings(messages_per_second=RATE, burst=BURST), EmergencyCheck(), live)
    send(flood, BURST + 1)
    flood.take_events()
    bye = sip_request("BYE", "sip:911@pbx", "up-already@x", to_tag="t")
    assert flood.admit(SCANNER, bye, 1.0) is True
    assert flood.take_events() == [EmergencyPassed(host=SCANNER, call_id="up-already@x", calls=1)]
    assert flood.admit(SCANNER, bye, 1.5) is True  # a retransmission
    assert flood.admit(SCANNER, sip_request("BYE", "sip:100@pbx", "other@x", to_tag="t"), 2.0) is False
    assert flood.take_events() == []


def test_without_an_emergency_check_a_ban_drops_every_emergency_call() -> None:
    flood = guard()
    send(flood, BURST + 1)
    assert flood.admit(SCANNER, sip_request("INVITE", "tel:911", "sos@x"), 1.0) is False


def test_the_next_ban_starts_with_no_emergency_calls_let_through() -> None:
    flood, _ = banned_guard()
    invite = sip_request("INVITE", "tel:911", "sos@x")
    assert flood.admit(SCANNER, invite, 1.0) is True
    flood.expire(10.0)
    send(flood, BURST + 1, at=10.0)
    assert flood.admit(SCANNER, sip_request("BYE", "sip:911@pbx", "sos@x", to_tag="t"), 11.0) is False


# -- exempt ------------------------------------------------------------------------------------------
def test_exempt_networks_are_never_banned() -> None:
    exempt = (ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8:1::/48"))
    flood = guard(exempt=exempt)
    scanner_message = request("friendly-scanner")
    for host in (OFFICE, "2001:db8:1::7"):
        assert all(flood.admit(host, scanner_message, 0.0) for _ in range(1000))
    assert flood.take_events() == [] and flood.bans == []
    assert flood.admit("2001:db8:2::7", scanner_message, 0.0) is False  # next door is not exempt


def test_an_exempt_ipv4_peer_seen_by_a_dual_stack_socket_is_never_banned() -> None:
    """A socket bound to [::] sees the PBX at 10.0.0.10 as ::ffff:10.0.0.10."""
    flood = guard(exempt=(ipaddress.ip_network("10.0.0.10/32"), ipaddress.ip_network("198.51.100.0/24")))
    for host in ("::ffff:10.0.0.10", "::ffff:198.51.100.7"):
        assert all(send(flood, 1000, host=host))
    assert flood.take_events() == [] and flood.bans == []
    assert send(flood, BURST + 1, host="::ffff:10.0.0.11")[-1] is False  # next door is not exempt


# -- bounded tables ------------------------------------------------------------------------------------
def test_a_spoofed_source_flood_cannot_grow_the_table_nor_hide_a_flooder() -> None:
    """3,000 one-message sources through a table of 100, while one real source floods at
    twice the rate: the table stays bounded, and the flooder is banned at the very message
    it would be banned at with no one else around."""
    flood = guard(max_sources=100)
    verdicts = []
    for index in range(100):
        now = index / 16
        verdicts.append(flood.admit(SCANNER, PLAIN, now))
        for spoofed in range(30):
            flood.admit(f"10.0.{index}.{spoofed}", PLAIN, now)
            assert flood.tracked <= 100
    assert verdicts[:7] == [True] * 7 and verdicts[7:] == [False] * 93
    banned = [event for event in flood.take_events() if isinstance(event, Banned)]
    assert [event.host for event in banned] == [SCANNER]


def test_when_no_source_has_gone_quiet_those_owing_least_are_evicted() -> None:
    flood = guard(max_sources=100)
    assert send(flood, BURST - 1) == [True] * (BURST - 1)
    for spoofed in range(500):  # all at once: none has gone quiet, each owes one message
        assert flood.admit(f"10.0.{spoofed // 256}.{spoofed % 256}", PLAIN, 0.0)
        assert flood.tracked <= 100
    assert send(flood, 2) == [True, False]  # the flooder's count survived: banned at BURST + 1


def test_a_full_ban_list_still_drops_what_is_over_the_rate() -> None:
    flood = guard(max_sources=100)
    for index in range(100):
        assert flood.admit(f"10.0.0.{index}", request("friendly-scanner"), 0.0) is False
    flood.take_events()
    assert send(flood, BURST + 3) == [True] * BURST + [False] * 3
    assert flood.take_events() == [BanListFull(host=SCANNER, size=100)]  # said once
    assert len(flood.bans) == 100
    assert flood.admit(SCANNER, PLAIN, 1.0) is True  # not banned: limited to the rate


def test_a_full_ban_list_still_lets_emergency_calls_through_as_a_ban_would() -> None:
    """A spray of spoofed scanner messages can fill the ban list; a source over its rate
    then cannot be banned and its messages are dropped one by one, but its emergency calls
    pass as a banned source's do: with their later messages, and bounded."""
    check = EmergencyCheck()
    flood = FloodGuard(FloodSettings(messages_per_second=RATE, burst=BURST, max_sources=100), check)
    for index in range(100):
        assert flood.admit(f"10.0.0.{index}", request("friendly-scanner"), 0.0) is False
    assert send(flood, BURST + 1, host=OFFICE) == [True] * BURST + [False]
    flood.take_events()
    invite = sip_request("INVITE", "sip:911@example.net", "sos-1@office")
    assert flood.admit(OFFICE, invite, 0.0) is True
    assert flood.take_events() == [EmergencyPassed(host=OFFICE, call_id="sos-1@office", calls=1)]
    assert flood.admit(OFFICE, sip_request("ACK", "sip:911@pbx", "sos-1@office", to_tag="t"), 0.0)
    assert flood.admit(OFFICE, PLAIN, 0.0) is False  # the rest is still over the rate
    more = [sip_request("INVITE", "tel:911", f"sos-{call}@office") for call in range(2, 20)]
    placed = [flood.admit(OFFICE, invite, 0.0) for invite in more]
    assert placed == [True] * (MAX_EMERGENCY_CALLS_PER_BAN - 1) + [False] * (19 - MAX_EMERGENCY_CALLS_PER_BAN)


# -- operators -----------------------------------------------------------------------------------------
def test_unban_lifts_the_ban_forgets_the_offence_and_admits_again() -> None:
    flood = guard()
    assert banned_for(flood, 0.0) == 10.0
    send(flood, 3, at=1.0)
    lifted = flood.unban(SCANNER)
    assert lifted is not None and (lifted.reason, lifted.dropped, lifted.offences) == ("rate", 4, 1)
    assert only_event(flood) == Unbanned(host=SCANNER, by="operator", reason="rate", dropped=4)
    assert flood.bans == [] and flood.unban(SCANNER) is None
    assert flood.admit(SCANNER, PLAIN, 2.0) is True  # its rate starts afresh
    assert banned_for(flood, 3.0) == 10.0  # and it counts as a first offence


def test_unban_takes_any_spelling_of_an_ipv6_address() -> None:
    flood = guard()
    assert flood.admit("2001:db8::1", request("friendly-scanner"), 0.0) is False
    assert flood.unban("2001:DB8:0:0::0001") is not None


@pytest.mark.parametrize(
    ("seen_as", "typed"),
    [
        ("::ffff:192.0.2.66", "192.0.2.66"),  # as a socket bound to [::] reports it
        ("::ffff:192.0.2.66", "::ffff:192.0.2.66"),  # copied from the ban list
        ("::ffff:192.0.2.66", "::FFFF:c000:0242"),
        ("192.0.2.66", "::ffff:192.0.2.66"),
    ],
)
def test_unban_takes_an_ipv4_address_in_either_form(seen_as: str, typed: str) -> None:
    flood = guard()
    assert flood.admit(seen_as, request("friendly-scanner"), 0.0) is False
    lifted = flood.unban(typed)
    assert lifted is not None and lifted.host == "192.0.2.66" and flood.bans == []


def test_an_ipv4_peer_is_one_source_whichever_listener_heard_it() -> None:
    """``listen: [udp:[::]:5060, tcp:0.0.0.0:5060]``: the UDP socket hears an IPv4 peer as
    ::ffff:192.0.2.66, the TCP one as 192.0.2.66. Those were two sources: each with its
    own burst, a ban on one leaving the other admitted, ``unban`` lifting only one of two
    bans. Now it is one source, listed (and logged) by its IPv4 address."""
    flood = guard()
    half = BURST // 2
    assert send(flood, half, host="::ffff:192.0.2.66") == [True] * half
    assert send(flood, half, host=SCANNER) == [True] * half
    assert flood.admit("::ffff:192.0.2.66", PLAIN, 0.0) is False  # one burst between them
    banned = only_event(flood)
    assert isinstance(banned, Banned) and (banned.host, banned.messages) == (SCANNER, BURST + 1)
    assert flood.admit(SCANNER, PLAIN, 1.0) is False  # banned over TCP too
    assert [ban.host for ban in flood.bans] == [SCANNER]
    assert flood.unban("::ffff:192.0.2.66") is not None
    assert flood.admit(SCANNER, PLAIN, 2.0) is True and flood.admit("::ffff:192.0.2.66", PLAIN, 2.0) is True


def test_reconfigure_keeps_bans_and_applies_new_settings_and_exemptions() -> None:
    flood = guard()
    send(flood, BURST + 1)
    send(flood, BURST + 1, host=OFFICE)
    flood.take_events()
    flood.configure(
        FloodSettings(messages_per_second=RATE, burst=1, exempt=(ipaddress.ip_network(f"{OFFICE}/32"),)),
        now=0.0,
    )
    assert only_event(flood) == Unbanned(host=OFFICE, by="exempt", reason="rate", dropped=1)
    assert [ban.host for ban in flood.bans] == [SCANNER]  # kept, with its end
    assert flood.admit(SCANNER, PLAIN, 9.0) is False
    third = "192.0.2.99"
    assert send(flood, 2, host=third, at=20.0) == [True, False]  # the new burst of 1


def test_a_source_tracked_before_a_reload_made_it_exempt_is_never_banned() -> None:
    """The operator exempts an office that is getting near its limit: its messages after
    the reload are not counted on from what it had sent before."""
    flood = guard()
    assert send(flood, BURST, host=OFFICE) == [True] * BURST
    flood.configure(
        FloodSettings(messages_per_second=RATE, burst=BURST, exempt=(ipaddress.ip_network(f"{OFFICE}/32"),)),
        now=0.0,
    )
    assert all(send(flood, 1000, host=OFFICE, at=0.5))
    assert flood.take_events() == [] and flood.bans == []
    assert flood.tracked == 0


def test_a_raised_rate_does_not_ban_a_source_within_its_burst() -> None:
    """An operator raises the rate 8 to 80 messages a second: an office that had just
    sent 3 messages of its burst of 4 sends a fourth. Its 3 messages used to be kept as
    0.375 s, ten times the new burst's 0.05 s: the raised limit banned it at once."""
    flood = guard()
    assert send(flood, BURST - 1, host=OFFICE) == [True] * (BURST - 1)
    flood.configure(FloodSettings(messages_per_second=RATE * 10, burst=BURST), now=0.0)
    assert send(flood, 2, host=OFFICE) == [True, False]  # the burst's last, then one too many
    assert isinstance(only_event(flood), Banned)


def test_a_lowered_rate_counts_the_messages_already_sent() -> None:
    """The rate lowered 80 to 8 a second just after a source sent 3 messages of its burst
    of 4: one more is admitted, not a whole new burst."""
    flood = guard(messages_per_second=RATE * 10)
    assert send(flood, BURST - 1) == [True] * (BURST - 1)
    flood.configure(FloodSettings(messages_per_second=RATE, burst=BURST, ban_seconds=10.0), now=0.0)
    assert send(flood, 2) == [True, False]


def test_disabled_admits_everything() -> None:
    flood = guard(enabled=False)
    assert all(flood.admit(SCANNER, request("friendly-scanner"), 0.0) for _ in range(100))
    assert flood.take_events() == []


@given(st.binary(max_size=2000))
def test_any_bytes_are_admitted_or_dropped_never_an_error(data: bytes) -> None:
    flood = guard()
    assert flood.admit(SCANNER, data, 0.0) in (True, False)


@given(st.sampled_from([b"INVITE tel:911 ", b"INVITE sip:112@h ", b"BYE sip:x "]), st.binary(max_size=500))
def test_a_banned_source_sending_any_bytes_is_never_an_error(start: bytes, rest: bytes) -> None:
    flood, _ = banned_guard()
    data = start + rest
    for _ in range(3):  # a new call, then the same call's messages
        assert flood.admit(SCANNER, data, 1.0) in (True, False)


# -- the policy file ---------------------------------------------------------------------------------
def test_flood_and_admin_sections_load(tmp_path: Path) -> None:
    policy = load(
        tmp_path,
        """\
        flood:
          messages_per_second: 50
          burst: 100
          ban_seconds: 60
          max_ban_seconds: 3600
          user_agents: [friendly-scanner, EvilDialer]
          exempt: [203.0.113.0/24, "2001:db8::/32"]
        admin:
          listen: "[::1]:6065"
          token: 0123456789abcdef0123
        """,
    )
    flood, admin = policy.flood, policy.admin
    assert (flood.enabled, flood.messages_per_second, flood.burst) == (True, 50.0, 100)
    assert (flood.ban_seconds, flood.max_ban_seconds, flood.max_sources) == (60.0, 3600.0, 100_000)
    assert flood.user_agents == ["friendly-scanner", "EvilDialer"]
    assert flood.exempt == ["203.0.113.0/24", "2001:db8::/32"]
    assert (admin.listen, admin.token) == ("[::1]:6065", "0123456789abcdef0123")


def test_defaults_fit_a_busy_office_and_listen_on_loopback(tmp_path: Path) -> None:
    policy = load(tmp_path, "{}\n")
    assert policy.flood.messages_per_second >= 300 and policy.flood.burst >= 1000
    assert policy.flood.user_agents == list(DEFAULT_SCANNER_USER_AGENTS)
    assert (policy.admin.listen, policy.admin.token) == ("127.0.0.1:5065", None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "flood:\n  messages_per_second: 0\n",
            "2: flood.messages_per_second: Input should be greater than 0; found 0",
        ),
        (
            "flood:\n  burst: many\n",
            "2: flood.burst: Input should be a valid integer, unable to parse string as an "
            "integer; found 'many'",
        ),
        ("flood:\n  bursts: 10\n", "2: flood.bursts: unknown key 'bursts' (did you mean 'burst'?)"),
        (
            "flood:\n  exempt: [10.0.0.0/33]\n",
            "2: flood.exempt: Value error, '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network; "
            "found ['10.0.0.0/33']",
        ),
        (
            "flood:\n  user_agents: [sip]\n",
            "2: flood.user_agents: Value error, 'sip': a signature is at least 4 printable ASCII characters; "
            "found ['sip']",
        ),
        (
            "flood:\n  ban_seconds: 600\n  max_ban_seconds: 60\n",
            "1: flood: Value error, max_ban_seconds 60 is less than ban_seconds 600; "
            "found {'ban_seconds': 600, 'max_ban_seconds': 60}",
        ),
        (
            "admin:\n  listen: 0.0.0.0:5065\n",
            "1: admin: Value error, listening on 0.0.0.0:5065 beyond loopback needs a token; "
            "found {'listen': '0.0.0.0:5065'}",
        ),
        (
            "admin:\n  listen: admin.example.net:5065\n",
            "2: admin.listen: Value error, 'admin.example.net' is not an IP address (or localhost); "
            "found 'admin.example.net:5065'",
        ),
        (
            "admin:\n  listen: 127.0.0.1\n",
            "2: admin.listen: Value error, not HOST:PORT: '127.0.0.1' (e.g. 127.0.0.1:5065, [::1]:5065); "
            "found '127.0.0.1'",
        ),
        (
            "admin:\n  lissen: 127.0.0.1:5065\n",
            "2: admin.lissen: unknown key 'lissen' (did you mean 'listen'?)",
        ),
        # a short token is refused without being echoed into a log
        ("admin:\n  token: secret\n", "2: admin.token: String should have at least 16 characters"),
        (
            "admin:\n  token: 'pass phrase with spaces'\n",
            "2: admin.token: Value error, a token is printable ASCII with no spaces "
            "(it goes in an HTTP header)",
        ),
    ],
)
def test_bad_flood_and_admin_values_say_where(tmp_path: Path, text: str, expected: str) -> None:
    assert errors(tmp_path, text) == [expected]


def test_beyond_loopback_with_a_token_and_no_admin_at_all_are_fine(tmp_path: Path) -> None:
    assert load(tmp_path, "admin: {listen: '0.0.0.0:5065', token: 0123456789abcdef}\n").admin.token
    assert load(tmp_path, "admin: {listen: null}\n").admin.listen is None


def test_check_describes_flood_and_admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "flood: {messages_per_second: 50, burst: 100, exempt: [203.0.113.0/24]}\n")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "flood: 50 messages/s per source, burst 100; ban 300 s, doubling for repeat offenders up to "
        "86400 s; 9 scanner user agents; exempt trusted peers, the upstream, 203.0.113.0/24\n"
    ) in out
    admin = (
        "admin: http://127.0.0.1:5065 (commands: status, explain, bans, unban, reload; GET /metrics; "
        "GET /healthz, GET /readyz need no token); token none; "
    )
    assert admin + "10000 decisions remembered\n" in out
    path = write(tmp_path, "flood: {enabled: false}\nadmin: {listen: null}\n")
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "flood: off (every message admitted)\n" in out and "admin: off\n" in out
