"""Parsed SIP messages: a start line, an index of header spans, lazy typed accessors.

Strategy (after Kamailio's msg_parser.c): ``parse_message`` reads the start line,
indexes every header line as (name, line start, value start, line end) spans into the
original bytes, and checks only what every proxy decision depends on: the mandatory
headers appear exactly once, CSeq matches the method, Content-Length frames the body,
the version is 2.0 and the Request-URI is a scheme we route. Everything else is parsed
when first asked for and cached; a malformed value raises ParseError(400) then.

Invariants:
- ``raw`` is never modified; ``raw[:end]`` is the message and ``end`` excludes any
  trailing bytes a datagram carried after the body (RFC 3261 §18.3).
- Header names are stored lower-case, compact forms folded to their full names.
- Bare CR or LF in the header section is rejected: forwarded verbatim, it would let a
  lenient parser downstream see headers that sipguard did not check.
"""

from __future__ import annotations

from typing import NamedTuple

from . import abnf
from .errors import ParseError
from .headers import (
    CSeq,
    NameAddr,
    Via,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
    split_values,
)
from .uri import SUPPORTED_SCHEMES, OpaqueUri, SipUri, Uri, parse_uri

DEFAULT_MAX_MESSAGE_SIZE = 65535
# Header values are bytes on the wire; text fields are UTF-8 (RFC 3261 §7.3.1).
# surrogateescape keeps undecodable bytes distinct instead of failing or merging them.
HEADER_CODEC = "utf-8"
HEADER_ERRORS = "surrogateescape"

# RFC 3261 §7.3.3 plus the compact forms registered since (IANA "Header Fields").
COMPACT_FORMS = {
    "a": "accept-contact", "b": "referred-by", "c": "content-type", "d": "request-disposition",
    "e": "content-encoding", "f": "from", "i": "call-id", "j": "reject-contact",
    "k": "supported", "l": "content-length", "m": "contact", "n": "identity-info",
    "o": "event", "r": "refer-to", "s": "subject", "t": "to", "u": "allow-events",
    "v": "via", "x": "session-expires", "y": "identity",
}  # fmt: skip
_COMMON_NAMES = (
    "Via", "From", "To", "Call-ID", "CSeq", "Contact", "Max-Forwards", "Content-Length",
    "Content-Type", "Route", "Record-Route", "User-Agent", "Server", "Allow", "Supported",
    "Expires", "Session-Expires", "Min-SE", "Require", "Proxy-Require", "Authorization",
    "Proxy-Authorization", "P-Asserted-Identity", "P-Preferred-Identity", "Remote-Party-ID",
    "Date", "Subject", "Accept", "Event", "Privacy", "Reason", "Retry-After",
)  # fmt: skip
# Spellings seen on the wire → canonical lower-case name; a dict hit skips validation.
_KNOWN_SPELLINGS: dict[bytes, str] = {}
for _name in _COMMON_NAMES:
    for _spelling in (_name, _name.lower(), _name.upper(), _name.title()):
        _KNOWN_SPELLINGS[_spelling.encode()] = _name.lower()
for _short, _full in COMPACT_FORMS.items():
    _KNOWN_SPELLINGS[_short.encode()] = _full
    _KNOWN_SPELLINGS[_short.upper().encode()] = _full

# Headers that must appear exactly once in every request and response (RFC 3261 §8.1.1).
_SINGLE_MANDATORY = ("from", "to", "call-id", "cseq")
# Headers that may be absent but never repeated: a second copy makes framing or loop
# protection ambiguous (RFC 4475 §3.3.8, §3.3.9).
_AT_MOST_ONCE = ("max-forwards", "content-length")


class HeaderField(NamedTuple):
    """One header line: byte offsets into ``Message.raw``; ``line_end`` is its CRLF."""

    name: str
    line_start: int
    value_start: int
    line_end: int


class Message:
    """Common part of requests and responses. Build with ``parse_message``."""

    def __init__(
        self,
        raw: bytes,
        fields: list[HeaderField],
        index: dict[str, list[int]],
        head_end: int,
        end: int,
    ) -> None:
        self.raw = raw
        self.fields = fields
        self._index = index
        self.head_end = head_end  # offset of the empty line's CRLF
        self.end = end
        self._call_id: str | None = None  # both read by parse_message, unless it failed first
        self._cseq: CSeq | None = None
        self._vias: tuple[Via, ...] | None = None
        self._top_via: Via | None = None
        self._from: NameAddr | None = None
        self._to: NameAddr | None = None
        self._contacts: tuple[NameAddr, ...] | None = None
        self._routes: tuple[NameAddr, ...] | None = None
        self._record_routes: tuple[NameAddr, ...] | None = None
        self._max_forwards: int | None = None
        self._max_forwards_read = False

    # -- raw header access -------------------------------------------------------
    def fields_named(self, name: str) -> list[HeaderField]:
        """The header lines called ``name`` (lower-case, full form), in message order."""
        return [self.fields[i] for i in self._index.get(name, ())]

    def has(self, name: str) -> bool:
        return name in self._index

    def value_of(self, field: HeaderField) -> str:
        """A header line's value: unfolded, trimmed, decoded."""
        value = self.raw[field.value_start : field.line_end]
        if b"\r\n" in value:  # RFC 3261 §7.3.1: a folded line break counts as one SP
            value = b" ".join(part.strip(b" \t") for part in value.split(b"\r\n"))
        return value.strip(b" \t").decode(HEADER_CODEC, HEADER_ERRORS)

    def values(self, name: str) -> list[str]:
        """Every value of a header, one per line (no comma splitting)."""
        return [self.value_of(field) for field in self.fields_named(name)]

    def get(self, name: str) -> str | None:
        """The first value of a header, or None."""
        positions = self._index.get(name)
        return self.value_of(self.fields[positions[0]]) if positions else None

    def list_values(self, name: str) -> list[str]:
        """Values of a comma-list header, split across lines and commas (RFC 3261 §7.3.1)."""
        result: list[str] = []
        for value in self.values(name):
            result.extend(split_values(value))
        if "" in result:
            raise ParseError(400, f"Empty element in {name} list")
        return result

    # -- typed accessors (lazy, cached) --------------------------------------------
    # Each is parsed on first access and kept in its own attribute (None: not parsed yet).
    @property
    def vias(self) -> tuple[Via, ...]:
        if self._vias is None:
            self._vias = tuple(parse_via(value) for value in self.list_values("via"))
        return self._vias

    @property
    def top_via(self) -> Via:
        """The topmost Via alone: what a proxy reads on every message, without parsing
        the rest of the list (``vias`` parses and checks them all)."""
        if self._top_via is None:
            self._top_via = self._parse_top_via()
        return self._top_via

    def _parse_top_via(self) -> Via:
        fields = self.fields_named("via")
        if not fields:  # only a ParseError.partial can lack a Via
            raise ParseError(400, "Missing via header")
        if self._vias is not None:
            return self._vias[0]
        first = self.value_of(fields[0])
        value = split_values(first)[0] if "," in first else first
        if not value:
            raise ParseError(400, "Empty element in via list")
        return parse_via(value)

    @property
    def from_(self) -> NameAddr:
        if self._from is None:
            self._from = parse_name_addr(self._single("from"))
        return self._from

    @property
    def to(self) -> NameAddr:
        if self._to is None:
            self._to = parse_name_addr(self._single("to"))
        return self._to

    @property
    def contacts(self) -> tuple[NameAddr, ...]:
        """Contact values; the REGISTER wildcard ``*`` is reported by ``contact_is_wildcard``."""
        if self._contacts is None:
            self._contacts = tuple(parse_name_addr(v) for v in self.list_values("contact") if v != "*")
        return self._contacts

    @property
    def contact_is_wildcard(self) -> bool:
        return self.values("contact") == ["*"]

    @property
    def routes(self) -> tuple[NameAddr, ...]:
        if self._routes is None:
            self._routes = self._name_addr_list("route")
        return self._routes

    @property
    def record_routes(self) -> tuple[NameAddr, ...]:
        if self._record_routes is None:
            self._record_routes = self._name_addr_list("record-route")
        return self._record_routes

    # Identity headers are read once per judged INVITE: not worth a cache.
    @property
    def p_asserted_identities(self) -> tuple[NameAddr, ...]:
        return self._name_addr_list("p-asserted-identity")

    @property
    def p_preferred_identities(self) -> tuple[NameAddr, ...]:
        return self._name_addr_list("p-preferred-identity")

    @property
    def remote_party_ids(self) -> tuple[NameAddr, ...]:
        return self._name_addr_list("remote-party-id")

    @property
    def call_id(self) -> str:
        if self._call_id is None:  # a ParseError.partial, refused before the check read it
            self._call_id = self._single("call-id")
        return self._call_id

    @property
    def cseq(self) -> CSeq:
        if self._cseq is None:
            self._cseq = parse_cseq(self._single("cseq"))
        return self._cseq

    @property
    def max_forwards(self) -> int | None:
        if not self._max_forwards_read:
            value = self.get("max-forwards")
            self._max_forwards = None if value is None else parse_uint(value, "Max-Forwards", 255)
            self._max_forwards_read = True
        return self._max_forwards

    @property
    def content_length(self) -> int | None:
        value = self.get("content-length")
        return None if value is None else parse_uint(value, "Content-Length")

    @property
    def expires(self) -> int | None:
        value = self.get("expires")
        return None if value is None else parse_uint(value, "Expires")

    @property
    def user_agent(self) -> str | None:
        return self.get("user-agent")

    @property
    def body(self) -> bytes:
        return self.raw[self.head_end + 4 : self.end]

    @property
    def bytes(self) -> bytes:
        """The message as received, without trailing datagram bytes."""
        return self.raw if self.end == len(self.raw) else self.raw[: self.end]

    def _single(self, name: str) -> str:
        values = self.values(name)
        if len(values) != 1:
            raise ParseError(400, f"Expected one {name} header, found {len(values)}")
        return values[0]

    def _name_addr_list(self, name: str) -> tuple[NameAddr, ...]:
        return tuple(parse_name_addr(value) for value in self.list_values(name))


class Request(Message):
    method: str
    uri: Uri
    uri_span: tuple[int, int]  # offsets of the Request-URI in raw, for strict-routing rewrites

    def __repr__(self) -> str:
        span = getattr(self, "uri_span", None)  # a ParseError.partial may have no Request-URI
        uri = "?" if span is None else repr(self.raw[span[0] : span[1]])
        return f"<Request {self.method} {uri}>"


class Response(Message):
    status_code: int
    reason: str

    def __repr__(self) -> str:
        return f"<Response {self.status_code} {self.reason}>"


def parse_message(
    data: bytes, *, stream: bool = False, max_size: int = DEFAULT_MAX_MESSAGE_SIZE
) -> Request | Response:
    """Parse one datagram, or one frame cut from a stream by ``StreamFramer``.

    Over a datagram a missing Content-Length means the body runs to the end, and bytes
    after the body are ignored; over a stream a missing Content-Length means no body.
    Raises ParseError, and nothing else, for any input that is not a usable message;
    for a request whose headers could be indexed, the error carries it as ``partial``
    so that the caller can answer it.
    """
    if len(data) > max_size:
        raise ParseError(513, "Message Too Large")
    start = 0
    while data.startswith(b"\r\n", start):  # RFC 3261 §7.5: ignore CRLFs before the start line
        start += 2
    head_end = data.find(b"\r\n\r\n", start)
    if head_end < 0:
        raise ParseError(400, "No empty line after the headers")
    line_end = data.find(b"\r\n", start)
    fields, index = _index_headers(data, line_end + 2, head_end)
    crlfs = data.count(b"\r\n", start, head_end)
    if data.count(b"\r", start, head_end) != crlfs or data.count(b"\n", start, head_end) != crlfs:
        raise ParseError(400, "Bare CR or LF in the header section")
    start_line = data[start:line_end]
    if start_line[:4].upper() == b"SIP/":
        response = Response(data, fields, index, head_end, len(data))
        # a response that fails these checks cannot be answered, only dropped
        _read_status_line(response, start_line)
        response.end = _body_end(response, stream, max_size)
        _check_mandatory_headers(response)
        return response
    if not abnf.HEADER_NAME.match(start_line):
        raise ParseError(400, "Not a SIP message")
    request = Request(data, fields, index, head_end, len(data))
    try:
        _read_request_line(request, start_line, start)
        request.end = _body_end(request, stream, max_size)
        _check_mandatory_headers(request)
        _check_request(request)
    except ParseError as error:
        error.partial = request
        raise
    return request


def _read_request_line(request: Request, line: bytes, offset: int) -> None:
    match = abnf.REQUEST_LINE.fullmatch(line)
    request.method = line.partition(b" ")[0].decode(HEADER_CODEC, HEADER_ERRORS)
    if match is None:
        raise ParseError(400, "Malformed Request-Line")
    _, uri, version = match.groups()
    if version.upper() != abnf.SIP_VERSION_2_0:
        raise ParseError(505, "Version Not Supported")
    request.uri_span = (offset + match.start(2), offset + match.end(2))
    request.uri = parse_uri(uri.decode("ascii"))


def _read_status_line(response: Response, line: bytes) -> None:
    match = abnf.STATUS_LINE.fullmatch(line)
    if match is None:
        raise ParseError(400, "Malformed Status-Line")
    version, code, reason = match.groups()
    if version.upper() != abnf.SIP_VERSION_2_0:
        raise ParseError(505, "Version Not Supported")
    response.status_code = int(code)
    response.reason = reason.decode(HEADER_CODEC, HEADER_ERRORS)


def _index_headers(data: bytes, pos: int, head_end: int) -> tuple[list[HeaderField], dict[str, list[int]]]:
    """Index the header lines between ``pos`` and the empty line at ``head_end``."""
    fields: list[HeaderField] = []
    index: dict[str, list[int]] = {}
    if pos > head_end:  # no header lines at all
        return fields, index
    known = _KNOWN_SPELLINGS
    new_field = tuple.__new__
    for line in data[pos:head_end].split(b"\r\n"):
        end = pos + len(line)
        if line[:1] in (b" ", b"\t"):  # a folded continuation of the previous line
            if not fields:
                raise ParseError(400, "Folded line before any header")
            previous = fields[-1]
            fields[-1] = new_field(HeaderField, (previous[0], previous[1], previous[2], end))
            pos = end + 2
            continue
        colon = line.find(b":")
        if colon < 0:
            raise ParseError(400, "Header line without a colon")
        name = known.get(line[:colon])
        if name is None:
            name = _header_name(line[:colon])
        positions = index.get(name)
        if positions is None:
            index[name] = [len(fields)]
        else:
            positions.append(len(fields))
        fields.append(new_field(HeaderField, (name, pos, pos + colon + 1, end)))
        pos = end + 2
    return fields, index


def _header_name(raw_name: bytes) -> str:
    """Validate a header name (RFC 3261 §7.3.1: token, then optional WSP) and canonicalise it."""
    stripped = raw_name.rstrip(b" \t")
    name = _KNOWN_SPELLINGS.get(stripped)
    if name is not None:
        return name
    if not abnf.HEADER_NAME.fullmatch(stripped):
        raise ParseError(400, "Malformed header name")
    lowered = stripped.decode("ascii").lower()
    return COMPACT_FORMS.get(lowered, lowered)


def content_length_of(message: Message) -> int | None:
    """The framing Content-Length: exactly one, all digits, or ParseError."""
    positions = message._index.get("content-length")
    if positions is None:
        return None
    if len(positions) > 1:
        raise ParseError(400, "Multiple Content-Length headers")
    digits = message.raw[message.fields[positions[0]].value_start : message.fields[positions[0]].line_end]
    digits = digits.strip(b" \t")
    if not digits.isdigit():
        raise ParseError(400, "Malformed Content-Length")
    significant = digits.lstrip(b"0")
    if len(significant) > 18:  # int() of a long digit string is quadratic, then ValueError
        raise ParseError(513, "Message Too Large")
    return int(significant or b"0")


def _body_end(message: Message, stream: bool, max_size: int) -> int:
    body_start = message.head_end + 4
    length = content_length_of(message)
    if length is None:
        return body_start if stream else len(message.raw)
    end = body_start + length
    if end > max_size:  # as StreamFramer does: the message could never fit
        raise ParseError(513, "Message Too Large")
    if end > len(message.raw):
        raise ParseError(400, "Content-Length larger than the message body")
    return end


def _check_mandatory_headers(message: Message) -> None:
    index = message._index
    for name in _SINGLE_MANDATORY:
        count = len(index.get(name, ()))
        if count != 1:
            problem = "Missing" if count == 0 else "Multiple"
            raise ParseError(400, f"{problem} {name} header")
    if "via" not in index:
        raise ParseError(400, "Missing via header")
    for name in _AT_MOST_ONCE:
        if len(index.get(name, ())) > 1:
            raise ParseError(400, f"Multiple {name} headers")
    # Call-ID and CSeq key every transaction and dialog: parse them now, into the cache.
    call_id = message.value_of(message.fields[index["call-id"][0]])
    if not call_id:
        raise ParseError(400, "Empty call-id header")
    message._call_id = call_id
    message._cseq = parse_cseq(message.value_of(message.fields[index["cseq"][0]]))


def _check_request(request: Request) -> None:
    if request.cseq.method != request.method:
        raise ParseError(400, "CSeq method does not match the Request-Line")
    scheme = getattr(request.uri, "scheme", "")
    if scheme not in SUPPORTED_SCHEMES and not _is_service_urn(request.uri):
        raise ParseError(416, "Unsupported URI Scheme")
    if isinstance(request.uri, SipUri) and request.uri.headers:
        # RFC 3261 §19.1.1 table 1: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11)
        raise ParseError(400, "Headers not allowed in the Request-URI")


def _is_service_urn(uri: Uri) -> bool:
    """RFC 5031 service URNs (urn:service:sos...): emergency calls must never get a 416."""
    return isinstance(uri, OpaqueUri) and uri.scheme == "urn" and uri.opaque.lower().startswith("service:")
