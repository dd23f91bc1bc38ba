"""Responses that sipguard writes itself (RFC 3261 §8.2.6, §16.2), and the requests:
CANCEL for an INVITE it gave up on, and in-dialog requests it sends on its own.

The headers a response must echo (Via, From, To, Call-ID, CSeq) are copied as the raw
lines the request carried, so a request whose other headers are malformed can still
be answered, and the client recognises every byte it sent. A To tag is added to every
reply but 100 Trying; the tag is derived from the transaction so a retransmitted
request gets the identical reply.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import ParseError
from .headers import header_name_bytes
from .message import HEADER_CODEC, HEADER_ERRORS, Message

_ECHOED = ("via", "from", "call-id", "cseq")


def build_reply(
    request: Message,
    status: int,
    reason: str,
    *,
    to_tag: str,
    server: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes | None:
    """The bytes of a reply to ``request``, or None when it has no Via to answer along."""
    raw = request.raw
    fields = request.fields
    if not request.fields_named("via"):
        return None
    lines = [b"SIP/2.0 %d %s\r\n" % (status, reason.encode("utf-8"))]
    try:
        has_to_tag = request.to.tag is not None
    except ParseError:  # answering a malformed request: add no tag to a To we cannot read
        has_to_tag = True
    for field in fields:
        if field.name in _ECHOED:
            lines.append(raw[field.line_start : field.line_end + 2])
        elif field.name == "to":
            line = raw[field.line_start : field.line_end]
            if status > 100 and not has_to_tag:
                line += b";tag=" + to_tag.encode("ascii")
            lines.append(line + b"\r\n")
    for name, value in headers:
        # values may be text the request carried: undecodable bytes go back as they came
        value_bytes = value.encode(HEADER_CODEC, HEADER_ERRORS)
        lines.append(header_name_bytes(name.lower()) + b": " + value_bytes + b"\r\n")
    if server:
        lines.append(b"Server: " + server.encode("utf-8") + b"\r\n")
    lines.append(b"Content-Length: 0\r\n\r\n")
    return b"".join(lines)


def build_cancel(invite: Message) -> bytes:
    """A CANCEL for an INVITE sipguard forwarded (RFC 3261 §9.1): same Request-URI, Call-ID,
    From, To, CSeq number, top Via and Route set, with the method changed."""
    raw = invite.raw
    request_line_end = raw.find(b"\r\n")
    method_end = raw.find(b" ")
    lines = [b"CANCEL" + raw[method_end:request_line_end] + b"\r\n"]
    vias = invite.fields_named("via")
    lines.append(raw[vias[0].line_start : vias[0].line_end + 2])
    for field in invite.fields:
        if field.name in ("from", "to", "call-id", "route", "max-forwards"):
            lines.append(raw[field.line_start : field.line_end + 2])
    lines.append(b"CSeq: %d CANCEL\r\n" % invite.cseq.seq)
    lines.append(b"Content-Length: 0\r\n\r\n")
    return b"".join(lines)


def build_request(
    method: str,
    request_uri: str,
    *,
    via: str,
    from_: str,
    to: str,
    call_id: str,
    cseq: int,
    routes: Sequence[str] = (),
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """A bodiless request inside a dialog, as one of its parties would send it (RFC 3261
    §12.2.1.1): ``from_`` and ``to`` are whole header values, tags included, and
    ``routes`` the route set toward the other party (loose routing). Header values are
    text as the parser decoded it; undecodable bytes go back out as they came in."""
    lines = [
        f"{method} {request_uri} SIP/2.0",
        f"Via: {via}",
        "Max-Forwards: 70",
        f"From: {from_}",
        f"To: {to}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
    ]
    if routes:
        lines.append("Route: " + ", ".join(routes))
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Content-Length: 0")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(HEADER_CODEC, HEADER_ERRORS)
