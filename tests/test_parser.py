"""Strict parsing rules beyond the RFC 4475/5118 corpus (tests/test_corpus.py has that).

Each test builds a small message around one rule: the rules a policy check relies on
(one From, one To, compact forms folded, CSeq matching the method, bounded numbers)
must not be slipped past by spelling, case, whitespace or framing tricks.
"""

from __future__ import annotations

import pytest

from proxy.sip import (
    CSeq,
    NameAddr,
    OpaqueUri,
    ParseError,
    Request,
    Response,
    SipUri,
    TelUri,
    parse_message,
    parse_uri,
)

REQUEST_LINE = b"INVITE sip:+15551230001@example.com SIP/2.0"
MANDATORY = {
    "via": b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKnashds8",
    "from": b"From: Alice <sip:+15551230000@example.com>;tag=1928301774",
    "to": b"To: <sip:+15551230001@example.com>",
    "call-id": b"Call-ID: a84b4c76e66710@pc33.example.com",
    "cseq": b"CSeq: 314159 INVITE",
}


def build(
    *extra: bytes,
    start: bytes = REQUEST_LINE,
    drop: tuple[str, ...] = (),
    replace: dict[str, bytes] | None = None,
    body: bytes = b"",
) -> bytes:
    """A message from the mandatory headers (minus ``drop``, with ``replace``), then ``extra``."""
    lines = [start]
    for name, line in MANDATORY.items():
        if name in drop:
            continue
        lines.append((replace or {}).get(name, line))
    lines.extend(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def request(data: bytes, **kwargs: bool | int) -> Request:
    message = parse_message(data, **kwargs)  # type: ignore[arg-type]
    assert isinstance(message, Request)
    return message


def rejected(data: bytes, *, stream: bool = False, max_size: int = 65535) -> ParseError:
    with pytest.raises(ParseError) as caught:
        parse_message(data, stream=stream, max_size=max_size)
    return caught.value


def test_the_baseline_message_parses() -> None:
    message = request(build())
    assert message.method == "INVITE"
    assert message.from_.tag == "1928301774"
    assert message.call_id == "a84b4c76e66710@pc33.example.com"
    assert message.cseq == CSeq(314159, "INVITE")
    assert message.max_forwards is None
    assert message.content_length is None
    assert message.body == b""


# -- compact forms and header-name case -------------------------------------------------
@pytest.mark.parametrize(
    ("compact", "full"),
    [
        (b"i", "call-id"), (b"m", "contact"), (b"e", "content-encoding"), (b"l", "content-length"),
        (b"c", "content-type"), (b"f", "from"), (b"s", "subject"), (b"k", "supported"), (b"t", "to"),
        (b"v", "via"), (b"o", "event"), (b"r", "refer-to"), (b"u", "allow-events"),
        (b"x", "session-expires"), (b"b", "referred-by"), (b"a", "accept-contact"),
        (b"j", "reject-contact"), (b"d", "request-disposition"), (b"n", "identity-info"),
        (b"y", "identity"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("case", [bytes.lower, bytes.upper], ids=["lower", "upper"])
def test_compact_forms_fold_to_full_names(compact: bytes, full: str, case: object) -> None:
    header = {
        "call-id": b"other@host",
        "content-length": b"0",
        "from": b"<sip:x@example.com>;tag=9",
        "to": b"<sip:y@example.com>",
        "via": b"SIP/2.0/TCP 198.51.100.1",
    }.get(full, b"value")
    name = case(compact)  # type: ignore[operator]
    data = build(name + b": " + header, drop=(full,))
    message = request(data)
    assert message.has(full)
    assert not message.has(compact.decode())
    assert message.values(full) == [header.decode()]


@pytest.mark.parametrize(
    ("name", "short_line", "full_line"),
    [
        ("from", b"f: <sip:mallory@example.com>;tag=2", b"From: <sip:alice@example.com>;tag=1"),
        ("from", b"F: <sip:mallory@example.com>;tag=2", b"from: <sip:alice@example.com>;tag=1"),
        ("to", b"t: <sip:mallory@example.com>", b"To: <sip:bob@example.com>"),
        ("to", b"T: <sip:mallory@example.com>", b"TO: <sip:bob@example.com>"),
        ("call-id", b"i: second-call-id", b"Call-ID: first-call-id"),
        ("content-length", b"l: 0", b"Content-Length: 0"),
    ],
)
@pytest.mark.parametrize("compact_first", [True, False])
def test_compact_and_full_forms_together_are_a_duplicate(
    name: str, short_line: bytes, full_line: bytes, compact_first: bool
) -> None:
    lines = (short_line, full_line) if compact_first else (full_line, short_line)
    error = rejected(build(*lines, drop=(name,)))
    assert error.status == 400
    assert error.reason.lower().startswith(f"multiple {name} header")


@pytest.mark.parametrize(
    "spelling",
    [b"From", b"FROM", b"from", b"fRoM", b"f", b"F", b"From ", b"From\t", b"fROM  \t"],
)
def test_header_names_are_case_insensitive_and_allow_wsp_before_the_colon(spelling: bytes) -> None:
    message = request(build(spelling + b": <sip:carol@example.com>;tag=5", drop=("from",)))
    assert message.from_.uri == parse_uri("sip:carol@example.com")
    assert [field.name for field in message.fields].count("from") == 1


@pytest.mark.parametrize("spelling", [b"CALL-ID", b"call-id", b"Call-Id", b"cAlL-iD"])
def test_odd_spellings_still_count_against_the_single_header_rule(spelling: bytes) -> None:
    error = rejected(build(spelling + b": another"))
    assert (error.status, error.reason) == (400, "Multiple call-id header")


def test_unknown_header_names_are_indexed_lower_case() -> None:
    message = request(build(b"X-Custom-Thing: one", b"x-CUSTOM-thing: two"))
    assert message.values("x-custom-thing") == ["one", "two"]


@pytest.mark.parametrize("name", [b"Bad Name", b"Bad@Name", b"", b" Lead", b"N\xc3\xa4me"])
def test_malformed_header_names_are_rejected(name: bytes) -> None:
    assert rejected(build(name + b": value")).status == 400


def test_header_line_without_colon_is_rejected() -> None:
    assert rejected(build(b"NoColonHere")).status == 400


# -- mandatory headers -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["via", "from", "to", "call-id", "cseq"])
def test_missing_mandatory_header_is_400(name: str) -> None:
    error = rejected(build(drop=(name,)))
    assert (error.status, error.reason) == (400, f"Missing {name} header")


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("from", b"From: <sip:eve@example.com>;tag=2"),
        ("to", b"To: <sip:eve@example.com>"),
        ("call-id", b"Call-ID: second"),
        ("cseq", b"CSeq: 314160 INVITE"),
        ("max-forwards", b"Max-Forwards: 70"),
        ("content-length", b"Content-Length: 0"),
    ],
)
def test_repeated_single_header_is_400(name: str, line: bytes) -> None:
    first: tuple[bytes, ...] = () if name in MANDATORY else (line,)
    error = rejected(build(*first, line))
    assert error.status == 400
    assert error.reason.lower().startswith(f"multiple {name} header")


def test_identical_duplicate_from_is_still_rejected() -> None:
    assert rejected(build(MANDATORY["from"])).status == 400


def test_several_via_and_contact_lines_are_fine() -> None:
    message = request(
        build(
            b"Via: SIP/2.0/TCP 198.51.100.7;branch=z9hG4bK2, SIP/2.0/UDP 203.0.113.9",
            b"v: SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bK3",
            b"Contact: <sip:alice@192.0.2.10>",
            b"m: <sip:alice@192.0.2.11>",
        )
    )
    assert [via.transport for via in message.vias] == ["UDP", "TCP", "UDP", "TLS"]
    assert message.top_via.branch == "z9hG4bKnashds8"
    assert [contact.uri.host for contact in message.contacts] == ["192.0.2.10", "192.0.2.11"]  # type: ignore[union-attr]


def test_empty_call_id_is_400() -> None:
    assert rejected(build(replace={"call-id": b"Call-ID:   "})).status == 400


# -- CSeq ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cseq", [b"CSeq: 1 BYE", b"CSeq: 1 invite", b"CSeq: 1 INVITEX", b"CSeq: 1 INV"])
def test_cseq_method_must_match_the_request_line(cseq: bytes) -> None:
    error = rejected(build(replace={"cseq": cseq}))
    assert (error.status, error.reason) == (400, "CSeq method does not match the Request-Line")


@pytest.mark.parametrize(
    "cseq",
    [
        b"CSeq: INVITE",
        b"CSeq: 1",
        b"CSeq: -1 INVITE",
        b"CSeq: 1INVITE",
        b"CSeq: 4294967296 INVITE",
        b"CSeq: 1\xc2\xa0INVITE",  # NBSP is not LWS
        b"CSeq: \xd9\xa1 INVITE",  # an Arabic-Indic digit is not a DIGIT
        b"CSeq: " + b"1" * 5000 + b" INVITE",
    ],
)
def test_malformed_cseq_is_400(cseq: bytes) -> None:
    assert rejected(build(replace={"cseq": cseq})).status == 400


@pytest.mark.parametrize(
    ("cseq", "expected"),
    [
        (b"CSeq: 4294967295 INVITE", CSeq(4294967295, "INVITE")),
        (b"CSeq:0 INVITE", CSeq(0, "INVITE")),
        (b"CSeq:  0007 \t INVITE  ", CSeq(7, "INVITE")),
        (b"CSeq: 1\r\n  INVITE", CSeq(1, "INVITE")),
    ],
)
def test_cseq_values(cseq: bytes, expected: CSeq) -> None:
    assert request(build(replace={"cseq": cseq})).cseq == expected


def test_responses_carry_any_cseq_method() -> None:
    data = build(start=b"SIP/2.0 200 OK", replace={"cseq": b"CSeq: 2 BYE"})
    response = parse_message(data)
    assert isinstance(response, Response)
    assert (response.status_code, response.reason, response.cseq) == (200, "OK", CSeq(2, "BYE"))


# -- Content-Length -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value", [b"-1", b"-0", b"+5", b"five", b"5 5", b"0x10", b"", b"\xd9\xa1", b"5\xc2\xa0", b"1e3"]
)
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_content_length_is_400(value: bytes, stream: bool) -> None:
    error = rejected(build(b"Content-Length: " + value, body=b"hello"), stream=stream)
    assert (error.status, error.reason) == (400, "Malformed Content-Length")


def test_content_length_larger_than_the_datagram_is_400() -> None:
    error = rejected(build(b"Content-Length: 6", body=b"hello"))
    assert (error.status, error.reason) == (400, "Content-Length larger than the message body")


@pytest.mark.parametrize(
    "value", [b"70000", b"99999999999999999999999999", b"9" * 5000, b"0" * 4999 + b"70000"]
)
@pytest.mark.parametrize("stream", [False, True])
def test_content_length_over_the_size_cap_is_513(value: bytes, stream: bool) -> None:
    error = rejected(build(b"Content-Length: " + value, body=b"hello"), stream=stream)
    assert error.status == 513


def test_the_size_cap_counts_the_whole_message() -> None:
    data = build(b"Content-Length: 5", body=b"hello")
    assert request(data, max_size=len(data)).body == b"hello"
    assert rejected(data + b"!", max_size=len(data)).status == 513
    assert rejected(data[:-1] + b"\r\n\r\n", max_size=len(data)).status == 513


def test_content_length_frames_the_body_and_trailing_datagram_bytes_are_ignored() -> None:
    data = build(b"Content-Length: 00005", body=b"hello, trailing junk")
    message = request(data)
    assert (message.content_length, message.body) == (5, b"hello")
    assert message.bytes == data[: -len(b", trailing junk")]


def test_missing_content_length_datagram_body_runs_to_the_end_stream_body_is_empty() -> None:
    data = build(body=b"v=0\r\n")
    assert request(data).body == b"v=0\r\n"
    streamed = request(data, stream=True)
    assert (streamed.body, streamed.bytes) == (b"", data[: -len(b"v=0\r\n")])


def test_body_may_hold_bare_cr_lf_and_nul() -> None:
    body = b"\x00\r\rbin\n\r\n\r\n"
    assert request(build(b"l: %d" % len(body), body=body)).body == body


# -- start line -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", [b"SIP/3.0", b"SIP/2.1", b"SIP/1.0", b"SIP/20.0"])
def test_unknown_sip_version_is_505(version: bytes) -> None:
    error = rejected(build(start=b"INVITE sip:bob@example.com " + version))
    assert (error.status, error.reason) == (505, "Version Not Supported")
    assert isinstance(error.partial, Request)


def test_unknown_version_in_a_response_is_505_and_has_no_partial() -> None:
    error = rejected(build(start=b"SIP/3.0 200 OK"))
    assert (error.status, error.partial) == (505, None)


def test_version_is_case_insensitive() -> None:
    assert request(build(start=b"INVITE sip:bob@example.com sip/2.0")).method == "INVITE"


@pytest.mark.parametrize(
    "uri", [b"http://example.com/", b"mailto:bob@example.com", b"urn:isbn:0451450523", b"im:bob@example.com"]
)
def test_unsupported_request_uri_scheme_is_416(uri: bytes) -> None:
    error = rejected(build(start=b"INVITE " + uri + b" SIP/2.0"))
    assert (error.status, error.reason) == (416, "Unsupported URI Scheme")
    assert isinstance(error.partial, Request)
    assert isinstance(error.partial.uri, OpaqueUri)


@pytest.mark.parametrize("uri", [b"urn:service:sos", b"urn:service:sos.police", b"URN:Service:SOS"])
def test_emergency_service_urns_are_accepted(uri: bytes) -> None:
    """RFC 5031: an emergency call addressed to urn:service:sos must reach the policy layer
    (which lets it through), never be answered 416."""
    parsed = request(build(start=b"INVITE " + uri + b" SIP/2.0"))
    assert isinstance(parsed.uri, OpaqueUri) and parsed.uri.scheme == "urn"


@pytest.mark.parametrize(
    "start",
    [
        b"INVITE  sip:bob@example.com SIP/2.0",
        b"INVITE sip:bob@example.com SIP/2.0 ",
        b"INVITE sip:bob@example.com",
        b"INVITE\tsip:bob@example.com\tSIP/2.0",
        b"INVITE sip:bob@exa mple.com SIP/2.0",
        b"INVITE sip:bob@example.com?Route=%3Csip:evil%3E SIP/2.0",
        b"INVITE <sip:bob@example.com> SIP/2.0",
        b"INVITE sip:bob@example.com:70000 SIP/2.0",
    ],
)
def test_malformed_request_line_is_400(start: bytes) -> None:
    error = rejected(build(start=start))
    assert error.status == 400
    assert isinstance(error.partial, Request)


@pytest.mark.parametrize(
    "start", [b"SIP/2.0 200", b"SIP/2.0 1000 Big", b"SIP/2.0 099 Low", b"SIP/2.0  200 OK", b"SIP/2.0 20x OK"]
)
def test_malformed_status_line_is_400(start: bytes) -> None:
    assert rejected(build(start=start)).status == 400


def test_empty_reason_phrase_is_allowed() -> None:
    response = parse_message(build(start=b"SIP/2.0 100 "))
    assert isinstance(response, Response)
    assert (response.status_code, response.reason) == (100, "")


def test_leading_crlfs_before_the_start_line_are_ignored() -> None:
    data = b"\r\n\r\n\r\n" + build()
    message = request(data)
    assert message.method == "INVITE"
    assert message.raw[message.uri_span[0] : message.uri_span[1]] == b"sip:+15551230001@example.com"
    assert message.bytes == data


@pytest.mark.parametrize(
    "data", [b"", b"\r\n", b"\r\n\r\n", b"\r\n\r\n\r\n\r\n", b"INVITE sip:a@b SIP/2.0\r\n"]
)
def test_no_header_section_is_400(data: bytes) -> None:
    error = rejected(data)
    assert (error.status, error.partial) == (400, None)


@pytest.mark.parametrize(
    "data",
    [
        build(b"Subject: a\rb"),
        build(b"Subject: a\nb"),
        build(b"Subject: trailing bare CR\r"),
        build(b"X\n-Injected: 1"),
        build(start=REQUEST_LINE + b"\n"),
        build(b"Subject: x\nVia: SIP/2.0/UDP evil.example"),
        build(b"\r"),
    ],
    ids=[
        "cr-in-value",
        "lf-in-value",
        "cr-before-crlf",
        "lf-in-name",
        "lf-after-start",
        "lf-smuggle",
        "lone-cr",
    ],
)
def test_bare_cr_or_lf_in_the_header_section_is_400(data: bytes) -> None:
    error = rejected(data)
    assert error.status == 400


def test_folded_lines_are_unfolded() -> None:
    message = request(build(b"Subject: first\r\n  second\r\n\tthird", b"Max-Forwards:\r\n 70"))
    assert message.get("subject") == "first second third"
    assert message.max_forwards == 70


def test_fold_before_any_header_is_400() -> None:
    assert rejected(REQUEST_LINE + b"\r\n folded: x\r\n\r\n").status == 400


# -- Max-Forwards and other scalars ------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [(b"0", 0), (b"70", 70), (b"255", 255), (b"0070", 70)])
def test_max_forwards_values(value: bytes, expected: int) -> None:
    assert request(build(b"Max-Forwards: " + value)).max_forwards == expected


@pytest.mark.parametrize(
    "value", [b"256", b"300", b"99999999999", b"-1", b"7 0", b"seventy", b"", b"9" * 5000]
)
def test_bad_max_forwards_parses_but_raises_400_on_access(value: bytes) -> None:
    message = request(build(b"Max-Forwards: " + value))
    with pytest.raises(ParseError) as caught:
        _ = message.max_forwards
    assert caught.value.status == 400


@pytest.mark.parametrize("value", [b"4294967296", b"1" * 5000, b"3600s"])
def test_bad_expires_raises_400_on_access(value: bytes) -> None:
    message = request(build(b"Expires: " + value))
    with pytest.raises(ParseError):
        _ = message.expires


@pytest.mark.parametrize(
    "via",
    [
        b"Via: SIP/2.0/UDP h;rport=99999",
        b"Via: SIP/2.0/UDP h;rport=\xc2\xb2",
        b"Via: SIP/2.0/UDP h;rport=" + b"1" * 5000,
        b"Via: SIP/2.0/UDP h;ttl=256",
        b"Via: SIP/2.0/UDP h;ttl=x",
        b"Via: SIP/2.0/UDP h:65536",
        b"Via: SIP/2.0/UDP\xc2\xa0h",
        b"Via: SIP/2.0/UDP [2001:db8:::1]",
        # routing fields: received an address, maddr a host (RFC 3261 §20.42)
        b"Via: SIP/2.0/UDP h;received=a..b",
        b"Via: SIP/2.0/UDP h;received=example.com",
        b"Via: SIP/2.0/UDP h;received=192.0.2.300",
        b"Via: SIP/2.0/UDP h;received=fe80::1%eth0",
        b"Via: SIP/2.0/UDP h;received=[192.0.2.1",
        b"Via: SIP/2.0/UDP h;maddr=a b",
        b"Via: SIP/2.0/UDP h;maddr=[::1",
        b"Via: SIP/2.0/UDP h;maddr=x\xc2\xa0y",
    ],
)
def test_bad_via_values_raise_400_on_access(via: bytes) -> None:
    message = request(build(replace={"via": via}))
    with pytest.raises(ParseError):
        _ = message.vias


def test_via_details() -> None:
    message = request(
        build(
            replace={
                "via": b"Via: SIP / 2.0 / tcp [2001:db8::9:1]:6050 ;branch=z9hG4bK1;rport=5061 ;ttl=16;"
                b"received=[2001:db8::9:255];maddr=239.255.255.1",
            }
        )
    )
    via = message.top_via
    assert (via.transport, via.host, via.is_ipv6, via.port) == ("TCP", "2001:db8::9:1", True, 6050)
    assert (via.branch, via.rport, via.ttl, via.received) == ("z9hG4bK1", 5061, 16, "2001:db8::9:255")
    assert (via.maddr, via.sent_by, via.wants_rport) == ("239.255.255.1", "[2001:db8::9:1]:6050", True)


# -- URIs --------------------------------------------------------------------------------------
def test_tel_uri_global_number() -> None:
    uri = parse_uri("tel:+1-201-555-0123")
    assert uri == TelUri("+1-201-555-0123", {}, "tel:+1-201-555-0123")
    assert isinstance(uri, TelUri)
    assert uri.is_global


def test_tel_uri_local_number_with_phone_context_and_params() -> None:
    uri = parse_uri("tel:7042;phone-context=example.com;EXT=22;isub=%41b")
    assert isinstance(uri, TelUri)
    assert not uri.is_global
    assert uri.number == "7042"
    assert uri.params == {"phone-context": "example.com", "ext": "22", "isub": "Ab"}


@pytest.mark.parametrize("text", ["tel:", "tel:+1 555", "tel:+1555;", "tel:+1555;;a=b", "tel:abc@x"])
def test_malformed_tel_uris(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


def test_tel_request_uri() -> None:
    message = request(
        build(
            start=b"INVITE tel:+15551230001;phone-context=+1 SIP/2.0",
            replace={"to": b"To: <tel:+15551230001>"},
        )
    )
    assert message.uri == TelUri("+15551230001", {"phone-context": "+1"}, "tel:+15551230001;phone-context=+1")
    assert message.to.uri == TelUri("+15551230001", {}, "tel:+15551230001")


def test_sips_uri() -> None:
    uri = parse_uri("SIPS:alice:secret@Example.COM:5061;transport=tcp;lr?subject=hi&priority=urgent")
    assert uri == SipUri(
        scheme="sips",
        user="alice",
        password="secret",
        host="Example.COM",
        is_ipv6=False,
        port=5061,
        params={"transport": "tcp", "lr": None},
        headers={"subject": "hi", "priority": "urgent"},
        text="SIPS:alice:secret@Example.COM:5061;transport=tcp;lr?subject=hi&priority=urgent",
    )


@pytest.mark.parametrize(
    ("text", "host", "port", "host_port"),
    [
        ("sip:[2001:db8::10]:5070", "2001:db8::10", 5070, "[2001:db8::10]:5070"),
        ("sip:bob@[2001:db8::10]", "2001:db8::10", None, "[2001:db8::10]"),
        ("sip:[2001:db8::10:5070]", "2001:db8::10:5070", None, "[2001:db8::10:5070]"),
        (
            "sips:[::ffff:192.0.2.10]:19823;transport=tls",
            "::ffff:192.0.2.10",
            19823,
            "[::ffff:192.0.2.10]:19823",
        ),
        ("sip:[::1]:0", "::1", 0, "[::1]:0"),
    ],
)
def test_ipv6_hosts_with_ports(text: str, host: str, port: int | None, host_port: str) -> None:
    uri = parse_uri(text)
    assert isinstance(uri, SipUri)
    assert (uri.host, uri.is_ipv6, uri.port, uri.host_port) == (host, True, port, host_port)


@pytest.mark.parametrize(
    "text",
    [
        "sip:2001:db8::10",
        "sip:[2001:db8:::192.0.2.1]",
        "sip:[2001:db8::10]:65536",
        "sip:[2001:db8::10",
        "sip:[]",
        "sip:[g::1]",
        "sip:host:123456",
        "sip:",
        "sip:@host",
        "sip:us er@host",
        "sip:user@host;=x",
    ],
)
def test_malformed_sip_uris(text: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_uri(text)
    assert caught.value.status == 400


def test_escapes_are_decoded_exactly_once() -> None:
    uri = parse_uri("sip:v%61lue%25%34%31:p%40ss@example.com;na%6De=v%2541;flag?h%20x=a%2520b")
    assert isinstance(uri, SipUri)
    assert uri.user == "value%41"
    assert uri.password == "p@ss"
    assert uri.params == {"name": "v%41", "flag": None}
    assert uri.headers == {"h x": "a%20b"}
    assert uri.text == "sip:v%61lue%25%34%31:p%40ss@example.com;na%6De=v%2541;flag?h%20x=a%2520b"


def test_escaped_nul_users_stay_distinct() -> None:
    one, two = parse_uri("sip:%00@example.com"), parse_uri("sip:%00%00@example.com")
    assert isinstance(one, SipUri) and isinstance(two, SipUri)
    assert (one.user, two.user) == ("\x00", "\x00\x00")


def test_user_phone_param() -> None:
    uri = parse_uri("sip:+15551230001@example.com;user=Phone")
    assert isinstance(uri, SipUri)
    assert uri.user_is_phone


@pytest.mark.parametrize("text", ["sip%3Aa@b", ":opaque", "1sip:a@b", "no-colon", ""])
def test_malformed_schemes(text: str) -> None:
    with pytest.raises(ParseError):
        parse_uri(text)


# -- name-addr headers -------------------------------------------------------------------------
def test_p_asserted_identity_with_two_values() -> None:
    message = request(
        build(
            b'P-Asserted-Identity: "Alice, Sales" <sip:+15551230000@example.com;user=phone>,'
            b"  <tel:+15551230000>"
        )
    )
    first, second = message.p_asserted_identities
    assert first.display_name == "Alice, Sales"
    assert isinstance(first.uri, SipUri)
    assert (first.uri.user, first.uri.user_is_phone) == ("+15551230000", True)
    assert second == NameAddr(None, TelUri("+15551230000", {}, "tel:+15551230000"), {})


def test_identity_headers_across_lines_and_absent() -> None:
    message = request(
        build(
            b"P-Preferred-Identity: <sip:alice@example.com>",
            b"Remote-Party-ID: <sip:+1555@example.com>;party=calling;privacy=off",
            b"Remote-Party-ID: Alice <sip:alice@example.com>;screen=yes",
        )
    )
    assert message.p_asserted_identities == ()
    assert [identity.uri.text for identity in message.p_preferred_identities] == ["sip:alice@example.com"]
    assert [rpid.params for rpid in message.remote_party_ids] == [
        {"party": "calling", "privacy": "off"},
        {"screen": "yes"},
    ]


@pytest.mark.parametrize(
    "value",
    [
        b"P-Asserted-Identity: <sip:a@example.com>,",
        b"P-Asserted-Identity: <sip:a@example.com>,,<tel:+1>",
        b"P-Asserted-Identity: ",
        b'P-Asserted-Identity: "unterminated <sip:a@example.com>',
        b"P-Asserted-Identity: <sip:a@example.com",
        b"P-Asserted-Identity: Bell, Alexander <sip:a@example.com>",
        b"P-Asserted-Identity: < sip:a@example.com >",
    ],
)
def test_malformed_identity_lists_raise_400_on_access(value: bytes) -> None:
    message = request(build(value))
    with pytest.raises(ParseError) as caught:
        _ = message.p_asserted_identities
    assert caught.value.status == 400


def test_name_addr_forms() -> None:
    message = request(
        build(
            replace={
                "from": b'From: "A \\"quoted\\" name" <sip:alice@example.com;transport=udp>;tag=abc;X=1',
                "to": b"To: sip:bob@example.com ; tag = 99",
            }
        )
    )
    assert message.from_.display_name == 'A "quoted" name'
    assert message.from_.uri.params == {"transport": "udp"}  # type: ignore[union-attr]
    assert message.from_.params == {"tag": "abc", "x": "1"}
    assert (message.to.display_name, message.to.uri.text, message.to.tag) == (
        None,
        "sip:bob@example.com",
        "99",
    )


def test_unknown_schemes_in_headers_are_kept_opaque() -> None:
    message = request(build(replace={"to": b"To: isbn:2983792873"}))
    assert message.to.uri == OpaqueUri("isbn", "2983792873", "isbn:2983792873")


def test_wildcard_contact() -> None:
    message = request(build(b"Contact: *"))
    assert message.contact_is_wildcard
    assert message.contacts == ()


# -- partial messages in errors -------------------------------------------------------------------
def test_partial_is_set_for_requests_and_can_be_answered() -> None:
    error = rejected(build(replace={"cseq": b"CSeq: 314159 BYE"}))
    partial = error.partial
    assert isinstance(partial, Request)
    assert partial.method == "INVITE"
    assert partial.call_id == "a84b4c76e66710@pc33.example.com"
    assert partial.top_via.branch == "z9hG4bKnashds8"
    assert partial.from_.tag == "1928301774"
    assert partial.cseq == CSeq(314159, "BYE")


def test_partial_without_via_or_request_uri_still_answers_parse_errors_only() -> None:
    error = rejected(build(start=b"INVITE  sip:bob@example.com SIP/2.0", drop=("via",)))
    partial = error.partial
    assert isinstance(partial, Request)
    assert partial.vias == ()
    with pytest.raises(ParseError):
        _ = partial.top_via
    assert repr(partial) == "<Request INVITE ?>"


def test_partial_refused_before_the_header_checks_still_reads_call_id_and_cseq() -> None:
    # 505 is raised on the Request-Line, before parse_message reads Call-ID and CSeq: the
    # partial request must still give its own, for the answer's log line
    partial = rejected(build(start=b"INVITE sip:bob@example.com SIP/3.0")).partial
    assert partial is not None
    assert partial.call_id == "a84b4c76e66710@pc33.example.com"
    assert partial.cseq == CSeq(314159, "INVITE")


@pytest.mark.parametrize(
    "data",
    [
        build(start=b"SIP/2.0 200 OK", drop=("from",)),
        build(start=b"SIP/2.0 200 OK", replace={"cseq": b"CSeq: x"}),
        build(b"Content-Length: 9", start=b"SIP/2.0 200 OK"),
    ],
)
def test_partial_is_none_for_responses(data: bytes) -> None:
    error = rejected(data)
    assert (error.status, error.partial) == (400, None)


def test_partial_is_none_when_nothing_could_be_indexed() -> None:
    assert rejected(b"\x00\x01 not sip\r\n\r\n").partial is None
