"""Property tests: the parser and the framer raise ParseError and nothing else.

Invariants held over any input:
- ``parse_message`` returns a Request or Response, or raises ParseError;
- on a returned message (or a ParseError's ``partial``), every accessor and every property
  of the values they return raises ParseError or nothing;
- a returned message re-parses from its own ``bytes`` to the same header index, and an
  editor with no edits renders exactly those bytes;
- proxy edits (push Via, Record-Route, Max-Forwards, pop Route / Via) keep a message
  parseable, with the accessors the edits did not touch unchanged;
- ``StreamFramer`` cuts the same frames however a stream is chunked, never buffers more
  than its limit between calls, and fails with the same status whole or byte by byte.

Example budget: the ``EXAMPLES`` counts sum to 10,500 per run (about 40 s on a slow
2-core machine); set SIPGUARD_FUZZ_SCALE=10 for a deeper local run. No test here reads
a clock or catches anything broader than ParseError: any other exception fails the test.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.sip import (
    KeepAlivePing,
    Message,
    MessageEditor,
    NameAddr,
    OpaqueUri,
    ParseError,
    Request,
    Response,
    SipUri,
    StreamFramer,
    TelUri,
    Via,
    parse_message,
    parse_uri,
)
from proxy.sip.headers import parse_name_addr, parse_via

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS_FILES = sorted(
    [
        *CORPUS_DIR.glob("rfc4475/*.dat"),
        *CORPUS_DIR.glob("rfc5118/*.dat"),
        *CORPUS_DIR.glob("rfc5118/crlf/*.dat"),
    ]
)
CORPUS = [path.read_bytes() for path in CORPUS_FILES]

SCALE = float(os.environ.get("SIPGUARD_FUZZ_SCALE", "1"))
EXAMPLES = {
    "arbitrary_bytes": 2000,
    "messy_messages": 2000,
    "mutated_corpus": 2500,
    "uri_text": 1000,
    "proxy_edits": 800,
    "stream_chunking": 1000,
    "framer_arbitrary": 1200,
}


def fuzz(name: str) -> settings:
    return settings(
        max_examples=max(1, round(EXAMPLES[name] * SCALE)),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


def _parses(data: bytes, *, stream: bool) -> bool:
    try:
        message = parse_message(data, stream=stream)
    except ParseError:
        return False
    return message.bytes == data


VALID_CORPUS = [data for data in CORPUS if _parses(data, stream=False)]
# Messages a stream frames as themselves: Content-Length matches, no leading CRLF.
STREAMABLE_CORPUS = [
    data for data in VALID_CORPUS if _parses(data, stream=True) and not data.startswith(b"\r\n")
]


# -- touching everything -----------------------------------------------------------------------
ACCESSORS = (
    "vias", "from_", "to", "contacts", "routes", "record_routes", "p_asserted_identities",
    "p_preferred_identities", "remote_party_ids", "call_id", "cseq", "max_forwards",
    "content_length", "expires", "user_agent", "body", "top_via", "contact_is_wildcard",
)  # fmt: skip


def touch_uri(uri: object) -> None:
    if isinstance(uri, SipUri):
        assert isinstance(uri.user_is_phone, bool)
        host = f"[{uri.host}]" if uri.is_ipv6 else uri.host
        assert uri.host_port == (host if uri.port is None else f"{host}:{uri.port}")
    elif isinstance(uri, TelUri):
        assert isinstance(uri.is_global, bool)
    else:
        assert isinstance(uri, OpaqueUri)
    assert str(uri) == uri.text


def touch_value(value: object) -> None:
    if isinstance(value, tuple) and not isinstance(value, Via | NameAddr):
        for item in value:
            touch_value(item)
    elif isinstance(value, Via):
        for prop in (value.branch, value.received, value.maddr, value.sent_by):
            assert prop is None or isinstance(prop, str)
        assert value.rport is None or 0 <= value.rport <= 65535
        assert value.ttl is None or 0 <= value.ttl <= 255
        assert isinstance(value.wants_rport, bool)
    elif isinstance(value, NameAddr):
        assert value.tag is None or isinstance(value.tag, str)
        touch_uri(value.uri)


def touch_everything(message: Message) -> None:
    """Read every accessor; each may raise ParseError and nothing else."""
    assert repr(message)
    for field in message.fields:
        assert isinstance(message.value_of(field), str)
    for name in ACCESSORS:
        try:
            value = getattr(message, name)
        except ParseError:
            continue
        assert getattr(message, name) == value  # cached, or recomputed identically
        touch_value(value)
    if isinstance(message, Request) and hasattr(message, "uri"):
        touch_uri(message.uri)


def check_message(message: Request | Response, data: bytes) -> None:
    """What must hold of any message parse_message returned for ``data``."""
    assert data.startswith(message.bytes)
    assert message.body == data[message.head_end + 4 : message.end]
    touch_everything(message)
    if message.content_length is not None:
        assert message.content_length == len(message.body)
    assert MessageEditor(message).render() == message.bytes
    again = parse_message(message.bytes)
    assert type(again) is type(message)
    assert (again.fields, again.bytes) == (message.fields, message.bytes)


def check_parse(data: bytes, *, stream: bool = False, max_size: int = 65535) -> None:
    try:
        message = parse_message(data, stream=stream, max_size=max_size)
    except ParseError as error:
        assert 400 <= error.status <= 599
        if error.partial is not None:
            assert isinstance(error.partial, Request)
            touch_everything(error.partial)
        return
    check_message(message, data)


# -- strategies ------------------------------------------------------------------------------------
FRAGMENTS = [
    b"INVITE sip:bob@example.com SIP/2.0\r\n", b"SIP/2.0 200 OK\r\n", b"ACK sip:a@b SIP/2.0\r\n",
    b"REGISTER sips:[2001:db8::1]:5061 SIP/2.0\r\n", b"OPTIONS tel:+1-555-0100;phone-context=x SIP/2.0\r\n",
    b"SIP/7.0 100 \r\n", b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n",
    b"v: SIP/2.0/TCP [::1];rport;received=[::2]\r\n", b"From: <sip:a@b>;tag=1\r\n", b"f: a <sip:a@b>\r\n",
    b"To: sip:b@c\r\n", b"t:\"x\"<tel:1>\r\n", b"Call-ID: x\r\n", b"i:y\r\n", b"CSeq: 1 INVITE\r\n",
    b"CSeq: 2 ACK\r\n", b"Max-Forwards: 70\r\n", b"Content-Length: 5\r\n", b"l: 0\r\n",
    b"Content-Length: -1\r\n", b"Contact: *\r\n", b"m: <sip:c@d>;expires=9\r\n",
    b"Route: <sip:p;lr>, <sip:q;lr>\r\n", b"Record-Route: <sip:r;lr>\r\n",
    b"P-Asserted-Identity: <tel:+1>, <sip:x@y>\r\n", b"Remote-Party-ID: \"A\" <sip:a@b>;party=calling\r\n",
    b"Expires: 3600\r\n", b"User-Agent: x\r\n", b"\r\n", b"\r\n\r\n", b"\r\n ", b"\r\n\t", b"\r", b"\n",
    b" ", b"\t", b":", b";", b",", b"=", b"<", b">", b"\"", b"\\", b"%", b"%00", b"%4", b"@", b"[", b"]",
    b"?", b"&", b"/", b"sip:", b"sips:", b"tel:", b"+1", b"[2001:db8::10]", b"[2001:db8:::1]", b":5060",
    b":99999", b"0" * 30, b"9" * 30, b"4294967296", b"256", b"z9hG4bK", b";tag=", b";branch=", b";rport=",
    b";ttl=", b";lr", b"\x00", b"\xc2\xa0", b"\xff", b"\xd9\xa1", b"SIP/2.0", b"INVITE", b"\xe2\x80\xa8",
    b"\xc2\xb2", b"1" * 4400,
]  # fmt: skip
fragment_soup = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=6), max_size=40).map(b"".join)

HEADER_SPELLINGS = {
    "via": [b"Via", b"v", b"V", b"VIA", b"vIa"],
    "from": [b"From", b"f", b"F", b"FROM"],
    "to": [b"To", b"t", b"T", b"tO"],
    "call-id": [b"Call-ID", b"i", b"call-id", b"CALL-Id"],
    "cseq": [b"CSeq", b"cseq", b"CSEQ"],
}
GOOD_VALUES = {
    "via": b"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK77",
    "from": b'"Alice" <sip:alice@example.com>;tag=88',
    "to": b"<sip:bob@example.com>",
    "call-id": b"call-1@example.com",
    "cseq": b"1 INVITE",
}
EXTRA_NAMES = [
    b"Contact", b"m", b"Route", b"Record-Route", b"P-Asserted-Identity", b"P-Preferred-Identity",
    b"Remote-Party-ID", b"Max-Forwards", b"Expires", b"User-Agent", b"Content-Length", b"l", b"X-Ext",
]  # fmt: skip
START_LINES = [
    b"INVITE sip:bob@example.com SIP/2.0", b"SIP/2.0 180 Ringing", b"BYE sips:bob@[2001:db8::1]:5061 SIP/2.0",
    b"OPTIONS tel:+15550100 SIP/2.0", b"INVITE http://x SIP/2.0", b"INVITE sip:bob@example.com SIP/3.0",
]  # fmt: skip
SEPARATORS = [b": ", b":", b" : ", b":\t", b":\r\n "]


@st.composite
def messy_messages(draw: st.DrawFn) -> bytes:
    """Messages with the right header names but values mixing good text and junk."""
    start = draw(st.sampled_from(START_LINES) | fragment_soup)
    lines: list[bytes] = []
    for name, spellings in HEADER_SPELLINGS.items():
        for _ in range(draw(st.sampled_from([1, 1, 1, 1, 0, 2]))):
            value = draw(st.just(GOOD_VALUES[name]) | fragment_soup | st.binary(max_size=20))
            lines.append(draw(st.sampled_from(spellings)) + draw(st.sampled_from(SEPARATORS)) + value)
    for _ in range(draw(st.integers(0, 5))):
        lines.append(
            draw(st.sampled_from(EXTRA_NAMES)) + draw(st.sampled_from(SEPARATORS)) + draw(fragment_soup)
        )
    lines = draw(st.permutations(lines))
    return (
        start + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + draw(st.binary(max_size=30))
    )


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


@st.composite
def mutated_corpus(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(
            st.sampled_from(
                ["flip", "insert", "delete", "truncate", "splice", "duplicate", "drop_line", "fragment"]
            )
        )
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            at = min(at, len(data) - 1)
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1 :]
        elif kind == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
        elif kind == "fragment":
            data = data[:at] + draw(st.sampled_from(FRAGMENTS)) + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)) :]
        elif kind == "truncate":
            data = data[:at]
        else:
            lines = _lines(data)
            target = draw(st.integers(0, len(lines)))
            if kind == "splice":
                lines.insert(target, draw(st.sampled_from(_lines(draw(st.sampled_from(CORPUS))))))
            elif kind == "duplicate":
                lines.insert(target, lines[draw(st.integers(0, len(lines) - 1))])
            elif len(lines) > 1:
                del lines[min(target, len(lines) - 1)]
            data = b"\r\n".join(lines)
    return data


URI_ALPHABET = string.ascii_letters + string.digits + "-_.!~*'()%;:=?&@[]+$,/ <>\"#\t\x00\u00a0\u00b2é"
uri_text = st.one_of(
    st.text(alphabet=URI_ALPHABET, max_size=60),
    st.tuples(
        st.sampled_from(["sip:", "sips:", "tel:", "SIP:", "x-y:", "", "sip:user@"]),
        st.text(alphabet=URI_ALPHABET, max_size=60),
    ).map("".join),
    st.text(max_size=40),
)

# Valid messages, varied the ways the wire varies them.
TOKEN = string.ascii_letters + string.digits + "-.!%*_+`'~"
tokens = st.text(alphabet=TOKEN, min_size=1, max_size=10)
hex_escape = st.sampled_from(["%20", "%41", "%2C", "%3B", "%00", "%e9"])
user_chars = st.text(alphabet=string.ascii_letters + string.digits + "-_.!~*'()&=+$", min_size=1)
users = st.lists(user_chars | hex_escape, min_size=1, max_size=4).map("".join)
hosts = st.sampled_from(
    ["example.com", "192.0.2.10", "[2001:db8::10]", "[::ffff:192.0.2.1]", "proxy-1.example.net", "h"]
)
ports = st.none() | st.integers(0, 65535)
uri_params = st.lists(
    st.sampled_from([";lr", ";transport=tcp", ";user=phone", ";maddr=239.0.0.1", ";x=%41", ";a-b=[1]:2/3"]),
    max_size=3,
).map("".join)


@st.composite
def sip_uris(draw: st.DrawFn) -> str:
    user = draw(st.none() | users)
    port = draw(ports)
    return (
        draw(st.sampled_from(["sip", "sips", "SIP"]))
        + ":"
        + ("" if user is None else user + "@")
        + draw(hosts)
        + ("" if port is None else f":{port}")
        + draw(uri_params)
    )


tel_uris = st.builds(
    lambda number, params: f"tel:{number}{params}",
    st.tuples(st.sampled_from(["+", ""]), st.text(alphabet="0123456789-.()", max_size=14)).map(
        lambda parts: parts[0] + "1" + parts[1]
    ),
    st.sampled_from(["", ";phone-context=example.com", ";ext=12;isub=3", ";phone-context=+1"]),
)
request_uris = sip_uris() | tel_uris
display_names = (
    st.none()
    | tokens
    | st.lists(tokens, min_size=1, max_size=3).map(" ".join)
    | st.text(
        alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "").replace("\x0c", ""),
        max_size=12,
    ).map(lambda text: '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
)


name_addr_params = st.lists(st.sampled_from([";x=1", ";expires=60", ";q=0.5", ";flag"]), max_size=2).map(
    "".join
)
name_addrs = st.builds(
    lambda name, uri, params: ("" if name is None else name + " ") + "<" + uri + ">" + params,
    display_names,
    request_uris,
    name_addr_params,
)
tagged_name_addrs = st.builds(lambda name_addr, tag: f"{name_addr};tag={tag}", name_addrs, tokens)
via_values = st.builds(
    lambda transport, host, port, branch, extra: (
        f"SIP/2.0/{transport} {host}"
        + ("" if port is None else f":{port}")
        + f";branch=z9hG4bK{branch}{extra}"
    ),
    st.sampled_from(["UDP", "TCP", "TLS", "SCTP", "ws"]),
    hosts,
    ports,
    tokens,
    st.sampled_from(["", ";rport", ";rport=5060", ";received=192.0.2.99", ";ttl=16"]),
)


def header(name: list[str], value: st.SearchStrategy[str], fold: bool = True) -> st.SearchStrategy[bytes]:
    """A header line in one of the spellings ``name`` lists, with varied separators."""
    separators = [": ", ":", " : ", ":\t", "  :  "] + ([":\r\n "] if fold else [])
    return st.builds(
        lambda n, s, v: (n + s + v).encode("utf-8"), st.sampled_from(name), st.sampled_from(separators), value
    )


def comma_list(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(values, min_size=1, max_size=2).map(", ".join)


methods = st.sampled_from(["INVITE", "ACK", "BYE", "CANCEL", "REGISTER", "OPTIONS", "MESSAGE"]) | tokens
reasons = st.text(
    alphabet=string.ascii_letters + string.digits + " \t!#$%&'()*+,-./:;<=>?@[]^_`{|}~\"\\éЖ€😀", max_size=20
)
via_lines = st.lists(header(["Via", "via", "VIA", "v"], comma_list(via_values)), min_size=1, max_size=3)
from_lines = header(["From", "from", "FROM", "f"], tagged_name_addrs)
to_lines = header(["To", "to", "TO", "t"], tagged_name_addrs | name_addrs)
call_id_lines = header(["Call-ID", "call-id", "CALL-ID", "i"], tokens.map(lambda t: t + "@example.com"))
cseq_numbers = st.integers(0, 2**32 - 1)
cseq_spellings = st.sampled_from(["CSeq: ", "cseq:", "CSEQ :\t"])
optional_lines = st.lists(
    st.one_of(
        header(["Contact", "m"], comma_list(name_addrs)),
        header(["Route", "ROUTE"], comma_list(name_addrs)),
        header(["Record-Route", "record-route"], comma_list(name_addrs)),
        header(["P-Asserted-Identity", "p-asserted-identity"], comma_list(name_addrs)),
        header(["Subject", "s"], reasons),
        header(["X-Extension"], reasons),
    ),
    max_size=5,
)
max_forwards_lines = st.none() | header(["Max-Forwards", "max-forwards"], st.integers(0, 255).map(str))
request_starts = st.builds(lambda method, uri: (method, f"{method} {uri} SIP/2.0"), methods, request_uris)
response_starts = st.builds(
    lambda method, code, reason: (method, f"SIP/2.0 {code} {reason}"), methods, st.integers(100, 699), reasons
)
content_length_spellings = st.sampled_from(["Content-Length: ", "l:", "content-length :", "L:\t"])


@st.composite
def valid_messages(draw: st.DrawFn) -> bytes:
    """A request or response that parses, with a Content-Length matching its body."""
    method, start = draw(request_starts | response_starts)
    body = draw(st.binary(max_size=120))
    lines = [
        *draw(via_lines),
        draw(from_lines),
        draw(to_lines),
        draw(call_id_lines),
        f"{draw(cseq_spellings)}{draw(cseq_numbers)} {method}".encode(),
        *draw(optional_lines),
        *filter(None, [draw(max_forwards_lines)]),
        f"{draw(content_length_spellings)}{len(body)}".encode(),
    ]
    lines = draw(st.permutations(lines))
    return start.encode("utf-8") + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body


streamable = st.sampled_from(STREAMABLE_CORPUS) | valid_messages()


# -- parser invariants ------------------------------------------------------------------------------
@fuzz("arbitrary_bytes")
@given(data=st.binary(max_size=1500) | fragment_soup, stream=st.booleans())
def test_arbitrary_bytes_parse_or_raise_parse_error(data: bytes, stream: bool) -> None:
    check_parse(data, stream=stream)


@fuzz("messy_messages")
@given(data=messy_messages(), stream=st.booleans())
def test_messy_messages_parse_or_raise_parse_error(data: bytes, stream: bool) -> None:
    check_parse(data, stream=stream)


@fuzz("mutated_corpus")
@given(data=mutated_corpus(), stream=st.booleans(), max_size=st.sampled_from([65535, 65535, 65535, 600]))
def test_mutated_corpus_parses_or_raises_parse_error(data: bytes, stream: bool, max_size: int) -> None:
    check_parse(data, stream=stream, max_size=max_size)


@fuzz("uri_text")
@given(text=uri_text)
def test_uri_text_parses_or_raises_parse_error(text: str) -> None:
    try:
        uri = parse_uri(text)
    except ParseError as error:
        assert error.status == 400
        return
    touch_uri(uri)


def test_the_corpus_supplies_valid_and_streamable_messages() -> None:
    assert len(VALID_CORPUS) >= 30
    assert len(STREAMABLE_CORPUS) >= 25


def outcome(message: Message, name: str) -> tuple[str, Any]:
    """An accessor's value, or the status of the ParseError it raises."""
    try:
        return ("value", getattr(message, name))
    except ParseError as error:
        return ("error", error.status)


NEW_VIA = "SIP/2.0/TCP 203.0.113.1:5060;branch=z9hG4bKfuzz"
OUR_RECORD_ROUTE = "<sip:203.0.113.1;lr>"


@fuzz("proxy_edits")
@given(data=st.sampled_from(VALID_CORPUS) | valid_messages(), hops=st.integers(0, 255))
def test_proxy_edits_keep_messages_valid(data: bytes, hops: int) -> None:
    message = parse_message(data)
    editor = MessageEditor(message)
    expected = {
        name: outcome(message, name)
        for name in (
            "from_",
            "to",
            "call_id",
            "cseq",
            "contacts",
            "p_asserted_identities",
            "content_length",
            "body",
        )
    }
    vias = outcome(message, "vias")
    if isinstance(message, Request):
        record_routes, routes = outcome(message, "record_routes"), outcome(message, "routes")
        editor.push_via(NEW_VIA)
        editor.set_max_forwards(hops)
        editor.insert_record_route(OUR_RECORD_ROUTE)
        expected["max_forwards"] = ("value", hops)
        if vias[0] == "value":
            expected["vias"] = ("value", (parse_via(NEW_VIA), *vias[1]))
        if record_routes[0] == "value":
            expected["record_routes"] = ("value", (parse_name_addr(OUR_RECORD_ROUTE), *record_routes[1]))
        if routes[0] == "value" and routes[1]:
            editor.pop_route()
            expected["routes"] = ("value", routes[1][1:])
    elif vias[0] == "value" and len(vias[1]) >= 2:
        editor.pop_via()
        expected["vias"] = ("value", vias[1][1:])

    again = parse_message(editor.render())
    assert type(again) is type(message)
    assert {name: outcome(again, name) for name in expected} == expected


# -- framer invariants -------------------------------------------------------------------------------
def feed_in_chunks(
    data: bytes, sizes: list[int], max_message_size: int
) -> tuple[list[bytes | KeepAlivePing], int | None]:
    """Feed ``data`` in chunks of the given sizes (cycled); return the frames and any error status."""
    framer = StreamFramer(max_message_size)
    frames: list[bytes | KeepAlivePing] = []
    position = 0
    turn = 0
    while position < len(data):
        size = sizes[turn % len(sizes)]
        turn += 1
        try:
            frames.extend(framer.feed(data[position : position + size]))
        except ParseError as error:
            assert error.status in (400, 513)
            return frames, error.status
        assert framer.buffered <= max_message_size
        position += size
    return frames, None


@fuzz("stream_chunking")
@given(
    stream=st.lists(st.tuples(st.integers(0, 5), streamable), min_size=1, max_size=4),
    trailing_crlfs=st.integers(0, 5),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=8),
)
def test_stream_frames_do_not_depend_on_chunking(
    stream: list[tuple[int, bytes]], trailing_crlfs: int, sizes: list[int]
) -> None:
    expected: list[bytes | KeepAlivePing] = []
    data = b""
    for crlfs, message in stream:
        data += b"\r\n" * crlfs + message
        expected += [KeepAlivePing()] * (crlfs // 2) + [message]
    data += b"\r\n" * trailing_crlfs
    expected += [KeepAlivePing()] * (trailing_crlfs // 2)

    for chunk_sizes in ([len(data)], [1], sizes):
        assert feed_in_chunks(data, chunk_sizes, 65535) == (expected, None)
    for frame in expected:
        if isinstance(frame, bytes):
            assert parse_message(frame, stream=True).bytes == frame


@fuzz("framer_arbitrary")
@given(
    data=st.binary(max_size=600)
    | fragment_soup
    | st.lists(streamable | fragment_soup, max_size=4).map(b"".join),
    sizes=st.lists(st.integers(1, 64), min_size=1, max_size=6),
    max_message_size=st.sampled_from([64, 256, 1024, 65535]),
)
def test_framer_on_arbitrary_bytes_raises_only_parse_error(
    data: bytes, sizes: list[int], max_message_size: int
) -> None:
    bytewise, status = feed_in_chunks(data, [1], max_message_size)
    whole, whole_status = feed_in_chunks(data, [max(1, len(data))], max_message_size)
    chunked, chunked_status = feed_in_chunks(data, sizes, max_message_size)
    assert status == whole_status == chunked_status
    for frames in (whole, chunked):
        assert frames == bytewise[: len(frames)]
    if status is None:
        assert whole == chunked == bytewise
    for frame in bytewise:
        if isinstance(frame, bytes):
            assert len(frame) <= max_message_size
            check_parse(frame, stream=True, max_size=max_message_size)
