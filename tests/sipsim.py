"""Builders and a fake-clock harness for the ProxyCore tests (test_core*.py).

Messages are written out as bytes, the way a customer's phone or the PBX would send
them; responses are built from the request they answer, echoing its Via lines, so a
response to a forwarded request carries sipguard's Via exactly as the PBX would.
``Sim`` owns a core and the only clock: ``run_until`` fires due timers in order, each
at its own time, as the adapter would.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.sip import Request, Response, parse_message
from proxy.sip.core import CoreConfig, Listener, ProxyCore
from proxy.sip.events import Accept, Action, Address, Decide, Send, Verdict

LOCAL_UDP = Address("udp", "127.0.0.1", 5060)
LOCAL_TCP = Address("tcp", "127.0.0.1", 5060)
UPSTREAM = Address("udp", "127.0.0.1", 5070)
CUSTOMER = Address("udp", "192.0.2.10", 5060)
CUSTOMER_TCP = Address("tcp", "192.0.2.10", 40000)
OUR_RR = "<sip:127.0.0.1:5060;lr>"

CUSTOMER_VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcust1"
PBX_VIA = "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKpbx1"
CALLER = "<sip:+4930111@customer.example>"
CALLEE = "<sip:+4930123456@pbx.example.com>"
CALLEE_URI = "sip:+4930123456@pbx.example.com"
CALLER_CONTACT = "sip:alice@192.0.2.10:5060"
CALLEE_CONTACT = "sip:bob@127.0.0.1:5070"
CALL_ID = "call-1@192.0.2.10"
CALLER_TAG = "caller1"
CALLEE_TAG = "callee1"

SDP = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.10\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 0\r\n"
)

A = TypeVar("A")


def config(**overrides: Any) -> CoreConfig:
    """One UDP and one TCP listener on 127.0.0.1:5060, the PBX at udp:127.0.0.1:5070."""
    values: dict[str, Any] = {
        "listeners": (Listener(address=LOCAL_UDP), Listener(address=LOCAL_TCP)),
        "upstream": UPSTREAM,
        "branch_secret": b"k",
    }
    values.update(overrides)
    return CoreConfig(**values)


def request(
    method: str,
    uri: str = CALLEE_URI,
    *,
    vias: Iterable[str] = (CUSTOMER_VIA,),
    from_: str = CALLER,
    from_tag: str | None = CALLER_TAG,
    to: str = CALLEE,
    to_tag: str | None = None,
    call_id: str = CALL_ID,
    cseq: int = 1,
    cseq_method: str | None = None,
    max_forwards: int | None = 70,
    contact: str | None = CALLER_CONTACT,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {uri} SIP/2.0"]
    lines += [f"Via: {via}" for via in vias]
    if max_forwards is not None:
        lines.append(f"Max-Forwards: {max_forwards}")
    lines.append(f"From: {from_}" + (f";tag={from_tag}" if from_tag else ""))
    lines.append(f"To: {to}" + (f";tag={to_tag}" if to_tag else ""))
    lines.append(f"Call-ID: {call_id}")
    lines.append(f"CSeq: {cseq} {cseq_method or method}")
    if contact is not None:
        lines.append(f"Contact: <{contact}>")
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def invite(**kwargs: Any) -> bytes:
    kwargs.setdefault("body", SDP)
    return request("INVITE", **kwargs)


def response(
    to_request: bytes,
    status: int,
    reason: str = "",
    *,
    to_tag: str | None = CALLEE_TAG,
    contact: str | None = None,
    record_route: bool = True,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """The response a UA would send to ``to_request``: Via, From, To, Call-ID, CSeq echoed."""
    message = parse_message(to_request)
    raw = message.raw
    lines = [f"SIP/2.0 {status} {reason or REASONS.get(status, 'Whatever')}".encode()]
    for header in message.fields:
        line = raw[header.line_start : header.line_end]
        if header.name == "to" and status > 100 and to_tag and b"tag=" not in line:
            line += f";tag={to_tag}".encode()
        if header.name in ("via", "from", "to", "call-id", "cseq") or (
            header.name == "record-route" and record_route and 100 < status < 300
        ):
            lines.append(line)
    if contact is not None:
        lines.append(f"Contact: <{contact}>".encode())
    lines += [f"{name}: {value}".encode() for name, value in headers]
    if body:
        lines.append(b"Content-Type: application/sdp")
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


REASONS = {
    100: "Trying",
    180: "Ringing",
    183: "Session Progress",
    200: "OK",
    408: "Request Timeout",
    481: "Call/Transaction Does Not Exist",
    486: "Busy Here",
    487: "Request Terminated",
}


def parse_request(data: bytes) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def parse_response(data: bytes) -> Response:
    message = parse_message(data)
    assert isinstance(message, Response)
    return message


def header_lines(data: bytes) -> list[bytes]:
    """The start line and header lines of a message, as bytes."""
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


def of_type(actions: Iterable[Action], kind: type[A]) -> list[A]:
    return [action for action in actions if isinstance(action, kind)]


def kinds(actions: Iterable[Action]) -> list[str]:
    return [type(action).__name__ for action in actions]


def only_send(actions: list[Action]) -> Send:
    assert kinds(actions) == ["Send"], actions
    send = actions[0]
    assert isinstance(send, Send)
    return send


@dataclass
class Sim:
    """A ProxyCore, a fake clock, and the few steps every call scenario repeats."""

    core: ProxyCore
    now: float = 0.0
    log: list[Action] = field(default_factory=list)

    @classmethod
    def make(cls, **overrides: Any) -> Sim:
        return cls(ProxyCore(config(**overrides)))

    def _record(self, actions: list[Action]) -> list[Action]:
        self.log.extend(actions)
        return actions

    def customer(
        self, data: bytes, *, source: Address = CUSTOMER, local: Address | None = None
    ) -> list[Action]:
        if local is None:
            local = LOCAL_TCP if source.is_reliable else LOCAL_UDP
        return self._record(self.core.receive(data, source, local, self.now))

    def pbx(self, data: bytes, *, source: Address = UPSTREAM) -> list[Action]:
        return self._record(self.core.receive(data, source, LOCAL_UDP, self.now))

    def decide(self, attempt_id: str, verdict: Verdict) -> list[Action]:
        return self._record(self.core.decided(attempt_id, verdict, self.now))

    def run_until(self, when: float) -> list[Action]:
        """Fire every timer due by ``when``, each at its own time, then set the clock."""
        actions: list[Action] = []
        while (due := self.core.get_timer()) is not None and due <= when:
            self.now = max(self.now, due)
            actions += self.core.handle_timer(self.now)
        self.now = max(self.now, when)
        return self._record(actions)

    # -- common steps ---------------------------------------------------------------------
    def offer(self, data: bytes | None = None, **kwargs: Any) -> Decide:
        """The customer sends an initial INVITE; the core asks for a verdict and sends nothing."""
        actions = self.customer(data if data is not None else invite(), **kwargs)
        assert kinds(actions) == ["Decide"], actions
        decide = actions[0]
        assert isinstance(decide, Decide)
        return decide

    def forward(self, data: bytes | None = None, verdict: Accept | None = None, **kwargs: Any) -> Send:
        """An initial INVITE, accepted: returns the INVITE as sent to the PBX."""
        decide = self.offer(data, **kwargs)
        return only_send(self.decide(decide.attempt.attempt_id, verdict or Accept()))

    def answer(self, forwarded: bytes, **kwargs: Any) -> Send:
        """The PBX answers 200 OK; returns the 200 as relayed to the customer."""
        kwargs.setdefault("contact", CALLEE_CONTACT)
        actions = self.pbx(response(forwarded, 200, **kwargs))
        assert kinds(actions) == ["CallAnswered", "Send"], actions
        send = actions[1]
        assert isinstance(send, Send)
        return send

    def hang_up(self, bye: bytes | None = None, status: int = 200) -> list[Action]:
        """The caller sends BYE (by default ``in_dialog_from_customer("BYE")``) and the PBX
        answers ``status``: the actions of both. A customer's BYE ends the call at the PBX's
        answer, not as it passes."""
        sent = self.customer(bye if bye is not None else in_dialog_from_customer("BYE"))
        forwarded = [send for send in of_type(sent, Send) if send.destination == UPSTREAM]
        assert len(forwarded) == 1, sent
        return sent + self.pbx(response(forwarded[0].data, status))


def in_dialog_from_customer(
    method: str, *, cseq: int = 2, branch: str = "z9hG4bKcust2", **kwargs: Any
) -> bytes:
    """A request the caller sends inside the answered call (loose-routed through us)."""
    kwargs.setdefault("headers", (("Route", OUR_RR),))
    kwargs.setdefault("to_tag", CALLEE_TAG)
    return request(
        method,
        CALLEE_CONTACT,
        vias=(f"SIP/2.0/UDP 192.0.2.10:5060;branch={branch}",),
        cseq=cseq,
        **kwargs,
    )


def in_dialog_from_pbx(method: str, *, cseq: int = 1, branch: str = "z9hG4bKpbx2", **kwargs: Any) -> bytes:
    """A request the callee (behind the PBX) sends inside the answered call."""
    kwargs.setdefault("headers", (("Route", OUR_RR),))
    kwargs.setdefault("contact", CALLEE_CONTACT)
    kwargs.setdefault("from_tag", CALLEE_TAG)
    return request(
        method,
        CALLER_CONTACT,
        vias=(f"SIP/2.0/UDP 127.0.0.1:5070;branch={branch}",),
        from_=CALLEE,
        to=CALLER,
        to_tag=CALLER_TAG,
        cseq=cseq,
        **kwargs,
    )
