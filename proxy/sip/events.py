"""What goes into and comes out of the sans-I/O proxy core.

Addresses name a peer as the transports see it. Actions are what the core asks its
adapter to do; verdicts are what the policy layer answers to a ``Decide``. All are
frozen, slotted, keyword-only values, so they can be logged, compared and queued.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .message import Request


@dataclass(frozen=True, slots=True)
class Address:
    """A transport endpoint: ``udp:192.0.2.1:5060``, ``tcp:[2001:db8::1]:5060``."""

    transport: str  # "udp" or "tcp"
    host: str
    port: int

    @property
    def is_reliable(self) -> bool:
        return self.transport != "udp"

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def host_port(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.transport}:{self.host_port}"


def parse_address(text: str, default_port: int = 5060) -> Address:
    """``udp:HOST:PORT`` / ``tcp:[::1]:PORT`` (transport defaults to udp, port to 5060)."""
    transport, _, rest = text.partition(":")
    if transport.lower() not in ("udp", "tcp") or not rest:
        transport, rest = "udp", text
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = rest.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"not an address: {text!r} (expected udp:HOST:PORT or tcp:[IPv6]:PORT)")
    number = int(port) if port else default_port
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return Address(transport.lower(), host, number)


class EndReason(enum.Enum):
    """Why a tracked call ended; policies release what they hold on every one of them."""

    BYE = "bye"
    CANCELLED = "cancelled"
    REJECTED = "rejected"  # a final response >= 300 from downstream
    SESSION_EXPIRED = "session-expired"  # RFC 4028 refresh missed
    MAX_LIFETIME = "max-lifetime"
    NO_ANSWER = "no-answer"  # still ringing when the early-dialog timeout ran out
    MAX_DURATION = "max-duration"  # sipguard ended it (BYE to both sides): a policy's limit
    KEEPALIVE_FAILED = "keepalive-failed"  # sipguard ended it (BYE to both sides): a party stopped answering
    DECISION_TIMEOUT = "decision-timeout"  # never forwarded: sipguard answered 503 before a late Accept


@dataclass(frozen=True, slots=True, kw_only=True)
class CallInfo:
    """The identity of a tracked call, as handed to the policy layer."""

    call_id: str
    from_tag: str
    attempt_id: str  # stable id of the initial INVITE transaction: keys policy state
    source: Address
    from_customer: bool
    started_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CallAttempt:
    """An initial INVITE waiting for the policy layer's verdict."""

    attempt_id: str
    request: Request
    source: Address
    now: float


# -- actions -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Send:
    """Send bytes to ``destination``; ``local`` is the listener to send from, when it matters."""

    data: bytes
    destination: Address
    local: Address | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Decide:
    """Ask the policy layer about a call; answer with ``ProxyCore.decided``."""

    attempt: CallAttempt


@dataclass(frozen=True, slots=True, kw_only=True)
class CallAnswered:
    call: CallInfo
    now: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CallEnded:
    call: CallInfo
    reason: EndReason
    now: float
    # the final response, for REJECTED; for KEEPALIVE_FAILED the last probe's (408: unanswered)
    status: int | None = None
    answered_at: float | None = None
    by_caller: bool | None = None  # for BYE: whether the calling side hung up


@dataclass(frozen=True, slots=True, kw_only=True)
class Discarded:
    """A message the core did not pass on, with why: for logs and counters."""

    reason: str
    source: Address
    status: int | None = None  # the reply sent instead, if any
    call_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ByeRefused:
    """The PBX refused a customer's BYE (neither 2xx nor 481/408): the call goes on, and
    stays counted, until a BYE the PBX accepts or another end. For logs and counters."""

    call: CallInfo
    status: int
    now: float
    by_caller: bool


Action = Send | Decide | CallAnswered | CallEnded | Discarded | ByeRefused


# -- verdicts -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Keepalive:
    """In-dialog OPTIONS probes of both parties of an answered call (dialogs.py ``Probe``):
    every ``interval`` seconds from the answer, each party is asked; a probe that gets no
    final response within ``timeout`` seconds, or a 408 or 481, is a miss, any other final
    response (even an error) proves the party alive. ``failed_limit`` misses in a row from
    one party end the call with a BYE to both sides."""

    interval: float
    failed_limit: int
    timeout: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """Forward the call, adding these headers (e.g. a tag for the PBX) and removing those
    (e.g. identity headers a customer may not assert, RFC 3325); the caller's in-dialog
    requests lose the same headers."""

    add_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    # seconds the call may last once answered; then sipguard sends BYE to both sides
    max_duration: float | None = None
    # probe both parties once answered, and end the call when one of them has vanished
    keepalive: Keepalive | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...] = field(default=())


Verdict = Accept | Reject
