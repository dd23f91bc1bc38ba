"""Flood and scanner defence, run on every message before any SIP parsing. Sans-I/O:
no clock, no socket, no logging; ``now`` is passed in and what happened (a ban, an
unban) is queued in ``events`` for the adapter to log.

Strategy
- Rate: a GCRA (generic cell rate algorithm) per source address: one theoretical
  arrival time per source, moved on by ``1 / messages_per_second`` per message; a
  message that would put it more than ``burst`` messages ahead of now bans the source.
  Chosen over a per-second bucket because it costs one dict lookup and a few float
  operations, has no window edges (a fixed one-second window lets twice the rate
  through across an edge, and needs a reset), and a source's state becomes worthless
  the moment its arrival time is in the past, which makes eviction trivial. It is
  also what the call_rate policy uses, so "rate + burst" reads the same everywhere.
  Every message counts, requests and responses alike: forged responses cost the parser
  as much as requests.
- User-Agent: a case-insensitive search of the first User-Agent header value for known
  scanner signatures (substrings); a hit bans at once, whatever the rate.
- Bans: a banned source's messages are dropped without a word (a reply would help the
  scanner and amplify a flood), until the ban ends or an operator lifts it. A source
  banned again less than ``max_ban_seconds`` after its previous ban ended gets twice
  that ban, up to ``max_ban_seconds``: a scanner that comes back every five minutes
  soon stays out for the day, while a one-off offender is back after ``ban_seconds``.
- Exempt: trusted peers, the upstream PBX and the ``exempt`` networks are never
  counted, checked or banned (a PBX's OPTIONS storm, a NATed office after an outage).
- Emergency calls pass a ban: emergency numbers are never blocked, and a ban falls on
  every phone behind the flooder's address (an office's NAT). A banned source's INVITE
  whose request line may dial one (a short number, ``urn:service:sos``) is handed to
  ``emergency_call``, the policy's full check; if it says yes, that call's messages (by
  Call-ID: retransmissions, ACK, BYE) pass too, as do those of an emergency call already
  up when the ban began (``live_emergency_calls``: its re-INVITEs and BYE). Bounded,
  because a flooder may dial 911 too: ``MAX_EMERGENCY_CALLS_PER_BAN`` calls a ban,
  ``EMERGENCY_CALL_MESSAGES`` each.

Invariants: every table is bounded by ``max_sources`` (a flood of spoofed sources
cannot grow memory: sources gone quiet are evicted first, then those owing least);
``admit`` does not raise on any bytes; bans survive ``configure`` (a policy reload),
except those of sources that have become exempt, and so do the messages each source
has sent (at a new rate, as many messages, not as many seconds).
"""

from __future__ import annotations

import heapq
import ipaddress
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from .sip.hosts import in_networks, normal_host, unmapped

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MESSAGES_PER_SECOND = 500.0
DEFAULT_BURST = 2000
DEFAULT_BAN_SECONDS = 300.0
DEFAULT_MAX_BAN_SECONDS = 86400.0
DEFAULT_MAX_SOURCES = 100_000
# The User-Agent strings of classic SIP scanners and brute-forcers. Only tools: no real
# phone, softphone or SBC sends these. Left out on purpose: sipsak (admins' monitoring
# probes), smap (too short a substring), and UAs scanners fake (eyeBeam, Asterisk PBX).
DEFAULT_SCANNER_USER_AGENTS = (
    "friendly-scanner",  # SIPVicious svmap/svwar/svcrack
    "sipvicious",
    "sipcli",  # SIPCLI brute-forcer
    "VaxSIPUserAgent",  # VaxVoIP SDK, as used by brute-forcers
    "sip-scan",
    "sundayddr",
    "iWar",  # war dialer
    "SIVuS",  # VoIP vulnerability scanner
    "pplsip",  # brute-forcer
)
MAX_REMEMBERED_AGENTS = 4096  # distinct User-Agent values whose verdict is remembered
# A header line "User-Agent :" in any case (SIP defines no compact form for it). Spelt
# with classes: re.IGNORECASE makes the same search twice as slow.
_USER_AGENT_LINE = re.compile(rb"\n[Uu][Ss][Ee][Rr]-[Aa][Gg][Ee][Nn][Tt][ \t]*:([^\r\n]*)")
# A request line that may dial an emergency number: an INVITE to a URI whose user part
# is a short number (up to 7 digits, with separators, + and phone-context allowed: 911,
# +1-911, 112;phone-context=+49), or to urn:service:sos (RFC 5031). A cheap screen: only
# what passes it is parsed and checked against the policy's emergency numbers, so that a
# banned source flooding INVITEs still costs little.
_MAYBE_EMERGENCY = re.compile(
    rb"INVITE (?:(?:[Ss][Ii][Pp][Ss]?|[Tt][Ee][Ll]):\+?(?:[-.()]*[0-9]){1,7}[-.()]*[@;? ]"
    rb"|[Uu][Rr][Nn]:[Ss][Ee][Rr][Vv][Ii][Cc][Ee]:[Ss][Oo][Ss])"
)
# The Call-ID header (or its compact form i) and its value, in the header section
_CALL_ID_LINE = re.compile(rb"\n(?:[Cc][Aa][Ll][Ll]-[Ii][Dd]|[Ii])[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r?\n")
MAX_EMERGENCY_CALLS_PER_BAN = 16  # emergency calls a banned source may place during one ban
EMERGENCY_CALL_MESSAGES = 200  # messages of each let through: retransmissions, ACK, BYE, refreshes
# Does this message, from this banned host, place an emergency call? (the policy's check)
EmergencyCheck = Callable[[bytes, str], bool]


@dataclass(frozen=True, slots=True, kw_only=True)
class FloodSettings:
    enabled: bool = True
    messages_per_second: float = DEFAULT_MESSAGES_PER_SECOND
    burst: int = DEFAULT_BURST
    ban_seconds: float = DEFAULT_BAN_SECONDS
    max_ban_seconds: float = DEFAULT_MAX_BAN_SECONDS
    user_agents: tuple[str, ...] = DEFAULT_SCANNER_USER_AGENTS
    exempt: tuple[Network, ...] = ()  # trusted peers, the upstream and flood.exempt together
    max_sources: int = DEFAULT_MAX_SOURCES


# -- what happened, for the adapter to log ------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Banned:
    host: str
    reason: str  # "rate" or "user-agent"
    detail: str  # the signature matched, or the rate against the limit
    rate: float  # messages per second seen from the source since it last went quiet
    messages: int  # ... and how many
    seconds: float  # how long the ban lasts
    until: float  # when it ends (the ``now`` clock)
    offences: int  # 1 for a first ban, 2 for a ban soon after the previous one ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Unbanned:
    host: str
    by: str  # "expiry", "operator", or "exempt" (a reload made the source exempt)
    reason: str  # what it had been banned for
    dropped: int  # messages dropped while banned


@dataclass(frozen=True, slots=True, kw_only=True)
class BanListFull:
    """A source should have been banned but the ban list holds ``max_sources`` already:
    its messages over the rate are still dropped, one by one (but for emergency calls, as
    if banned)."""

    host: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EmergencyPassed:
    """A banned source's emergency call was let through: one placed during the ban, or
    one up when the ban began. Once per call and ban. (Also for a source over its rate
    that could not be banned, the ban list being full.)"""

    host: str
    call_id: str
    calls: int  # emergency calls this source has placed during this ban, this one included


FloodEvent = Banned | Unbanned | BanListFull | EmergencyPassed


@dataclass(slots=True, kw_only=True)
class Ban:
    """A banned source, as listed to operators."""

    host: str
    reason: str
    detail: str
    since: float
    until: float
    offences: int
    dropped: int = 0
    # Call-ID -> messages still let through, for each emergency call let through this ban
    emergency_calls: dict[bytes, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Source:
    arrival: float  # GCRA theoretical arrival time: ahead of now by the messages not yet paid for
    since: float  # when the current episode began (the last time the source was quiet)
    messages: int  # messages in the current episode
    # emergency calls let through over the rate while the ban list was full (no ban to hold them)
    emergency_calls: dict[bytes, int] | None = None


@dataclass(slots=True)
class _Offences:
    count: int
    last_seconds: float  # how long the last ban was
    last_until: float  # and when it ended


class FloodGuard:
    """Per-source rate, scanner User-Agents and bans. Call ``admit`` for every message."""

    def __init__(
        self,
        settings: FloodSettings | None = None,
        emergency_call: EmergencyCheck | None = None,
        live_emergency_calls: Collection[str] = (),
    ) -> None:
        self.events: list[FloodEvent] = []
        self._emergency_call = emergency_call
        self._live_emergency_calls = live_emergency_calls  # Call-IDs, kept up to date by the policy
        self._bans: dict[str, Ban] = {}
        self._sources: dict[str, _Source] = {}
        self._offences: dict[str, _Offences] = {}
        self._exempt: dict[str, bool] = {}  # memo of the network check, by host
        self._ban_list_full = False
        self._interval = 0.0  # seconds a message costs at the rate in force (configure sets it)
        self.configure(settings or FloodSettings(), now=0.0)  # (no source yet: now is not read)

    def configure(self, settings: FloodSettings, *, now: float) -> None:
        """Apply new settings (a policy reload) at ``now``. Bans, counts and offences are
        kept; a banned source that the new settings exempt is let go."""
        interval = 1.0 / settings.messages_per_second
        if self._sources and interval != self._interval:
            # a source's backlog is messages: the same ones at the new rate (kept as seconds
            # of the old, a raised rate banned a source still within its burst at once)
            for source in self._sources.values():
                if source.arrival > now:
                    source.arrival = now + (source.arrival - now) * interval / self._interval
        self.settings = settings
        self._enabled = settings.enabled
        self._interval = interval
        self._tolerance = settings.burst * self._interval
        # one alternation over the lower-cased value: a loop of `in` tests costs 9 times more
        signatures = [re.escape(agent.lower().encode("ascii")) for agent in settings.user_agents]
        self._signatures = re.compile(b"|".join(signatures)) if signatures else None
        self._agents: dict[bytes, str | None] = {}  # User-Agent value -> the signature it has
        self._exempt.clear()
        for host in [host for host in self._bans if self._is_exempt(host)]:
            self._lift(host, "exempt")
        for table in (self._sources, self._offences):
            while len(table) > settings.max_sources:
                del table[next(iter(table))]

    # -- the hot path ---------------------------------------------------------------------------
    def admit(self, host: str, data: bytes, now: float) -> bool:
        """May this message from ``host`` be processed? False: drop it without a reply."""
        if not self._enabled:
            return True
        # An IPv4 peer is one source, counted and banned once, whether a [::] socket heard
        # it (as ::ffff:192.0.2.7: UDP) or a 0.0.0.0 one did (TCP beside it)
        host = unmapped(host)
        ban = self._bans.get(host)
        if ban is not None:
            if now < ban.until:
                return self._admit_banned(ban, data)
            self._lift(host, "expiry")
        source = self._sources.get(host)
        if source is None:
            if self._is_exempt(host):
                return True
            source = self._track(host, now)
        arrival = source.arrival
        if arrival < now:  # quiet since: a new episode
            arrival = source.since = now
            source.messages = 0
        arrival += self._interval
        source.messages += 1
        signature = self._scanner_signature(data)
        if signature is not None:
            return self._ban(host, source, now, "user-agent", signature, data)
        if arrival - now > self._tolerance:
            limit = f"over {self.settings.messages_per_second:g}/s, burst {self.settings.burst}"
            return self._ban(host, source, now, "rate", limit, data)
        source.arrival = arrival
        return True

    def _admit_banned(self, ban: Ban, data: bytes) -> bool:
        """Drop a banned source's message, unless it places or belongs to an emergency call."""
        admitted = self._emergency_passes(ban.host, ban.emergency_calls, data)
        if not admitted:
            ban.dropped += 1
        return admitted

    def _emergency_passes(self, host: str, calls: dict[bytes, int], data: bytes) -> bool:
        """Does this message, from a source whose messages are dropped, place or belong to
        an emergency call? ``calls``: those let through so far (Call-ID -> messages left),
        updated. The Call-ID is looked for only when an emergency call could be concerned,
        so that a banned flood costs an anchored match and a truth test or two a message."""
        live = self._live_emergency_calls
        maybe_new = self._emergency_call is not None and _MAYBE_EMERGENCY.match(data) is not None
        admitted = False
        if calls or live or maybe_new:
            line = _CALL_ID_LINE.search(data)
            call_id = line.group(1) if line is not None else b""
            left = calls.get(call_id)
            if left is not None:  # an emergency call let through already: its budget
                admitted = left > 0
                calls[call_id] = max(0, left - 1)
            elif call_id and len(calls) < MAX_EMERGENCY_CALLS_PER_BAN:
                admitted = call_id.decode("latin-1") in live or (
                    maybe_new and self._emergency_call is not None and self._emergency_call(data, host)
                )
                if admitted:
                    calls[call_id] = EMERGENCY_CALL_MESSAGES - 1
                    self.events.append(
                        EmergencyPassed(host=host, call_id=call_id.decode("latin-1"), calls=len(calls))
                    )
        return admitted

    def _scanner_signature(self, data: bytes) -> str | None:
        line = _USER_AGENT_LINE.search(data)
        if line is None:
            return None
        agent = line.group(1)
        if agent in self._agents:  # a phone sends the same one every time
            signature = self._agents[agent]
        else:
            hit = self._signatures.search(agent.lower()) if self._signatures else None
            signature = hit.group().decode("ascii") if hit else None
            if len(self._agents) >= MAX_REMEMBERED_AGENTS:
                self._agents.clear()
            self._agents[agent] = signature
        if signature is None or data.find(b"\r\n\r\n", 0, line.start() + 1) >= 0:
            return None  # no scanner, or that line is in a body, which may say anything
        return signature

    # -- operators ------------------------------------------------------------------------------
    @property
    def bans(self) -> list[Ban]:
        """Current bans, oldest first (some may have just ended: see ``expire``)."""
        return sorted(self._bans.values(), key=lambda ban: ban.since)

    def banned(self, now: float) -> int:
        """How many bans run at ``now`` (a count: ``bans`` sorts them all)."""
        return sum(1 for ban in self._bans.values() if ban.until > now)

    @property
    def tracked(self) -> int:
        """How many sources' rates are being tracked."""
        return len(self._sources)

    def unban(self, address: str) -> Ban | None:
        """Lift the ban on ``address`` (any spelling of the IP, an IPv4 address also as the
        IPv4-mapped one a socket bound to ``[::]`` saw); None if it was not banned. Its
        offences are forgotten and its rate starts afresh."""
        host = unmapped(normal_host(address))  # as admit keys it
        if host not in self._bans:
            return None
        self._offences.pop(host, None)
        self._sources.pop(host, None)
        return self._lift(host, "operator")

    def expire(self, now: float) -> None:
        """End the bans whose time is up (the adapter calls this every second or so, so
        that each end is logged when it happens rather than at the next message)."""
        for host in [host for host, ban in self._bans.items() if ban.until <= now]:
            self._lift(host, "expiry")

    def take_events(self) -> list[FloodEvent]:
        events, self.events = self.events, []
        return events

    # -- tables -----------------------------------------------------------------------------------
    def _is_exempt(self, host: str) -> bool:
        exempt = self._exempt.get(host)
        if exempt is None:
            exempt = in_networks(host, self.settings.exempt)
            if len(self._exempt) >= self.settings.max_sources:
                self._exempt.clear()
            self._exempt[host] = exempt
        return exempt

    def _track(self, host: str, now: float) -> _Source:
        if len(self._sources) >= self.settings.max_sources:
            self._evict(now)
        source = self._sources[host] = _Source(now, now, 0)
        return source

    def _evict(self, now: float) -> None:
        """Make room for a tenth of the table: drop the sources gone quiet (their state
        equals a new source's); if that is not enough, those that owe least, so that a
        flooder, owing most, keeps its count through a flood of spoofed sources."""
        sources = self._sources
        for host in [host for host, source in sources.items() if source.arrival <= now]:
            del sources[host]
        excess = len(sources) - (self.settings.max_sources - max(1, self.settings.max_sources // 10))
        if excess > 0:
            for host in heapq.nsmallest(excess, sources, key=lambda host: sources[host].arrival):
                del sources[host]

    def _ban(self, host: str, source: _Source, now: float, reason: str, detail: str, data: bytes) -> bool:
        """Ban ``host``; then its message is treated as a banned source's (dropped, unless
        an emergency call)."""
        if self._is_exempt(host):  # tracked before a reload made it exempt: from now on it is not
            del self._sources[host]
            return True
        settings = self.settings
        if len(self._bans) >= settings.max_sources:
            if not self._ban_list_full:
                self._ban_list_full = True
                self.events.append(BanListFull(host=host, size=len(self._bans)))
            if source.emergency_calls is None:
                source.emergency_calls = {}
            return self._emergency_passes(host, source.emergency_calls, data)
        offences, seconds = 1, settings.ban_seconds
        previous = self._offences.pop(host, None)
        if previous is not None and now - previous.last_until < settings.max_ban_seconds:
            offences = previous.count + 1
            seconds = min(2 * previous.last_seconds, settings.max_ban_seconds)
        until = now + seconds
        if len(self._offences) >= settings.max_sources:
            del self._offences[next(iter(self._offences))]
        self._offences[host] = _Offences(offences, seconds, until)  # (re)inserted last: evicted last
        ban = self._bans[host] = Ban(
            host=host, reason=reason, detail=detail, since=now, until=until, offences=offences
        )
        elapsed = max(now - source.since, self._interval)
        self.events.append(
            Banned(
                host=host, reason=reason, detail=detail, rate=source.messages / elapsed,
                messages=source.messages, seconds=seconds, until=until, offences=offences,
            )
        )  # fmt: skip
        del self._sources[host]  # after the ban it starts afresh
        return self._admit_banned(ban, data)

    def _lift(self, host: str, by: str) -> Ban:
        ban = self._bans.pop(host)
        self._ban_list_full = False
        self.events.append(Unbanned(host=host, by=by, reason=ban.reason, dropped=ban.dropped))
        return ban
