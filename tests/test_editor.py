"""MessageEditor: each edit's exact output bytes, untouched bytes left as received.

Expected outputs are written as the input with one named line swapped (``swap``), so a
test fails if an edit touches any byte it should not.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.sip import MessageEditor, ParseError, Request, Response, parse_message, parse_uri

SDP = (
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.10\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 0\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
)
INVITE = (
    b"INVITE sip:+15551230001@example.com;user=phone SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"Max-Forwards:  70\r\n"
    b"Route: <sip:edge.example.net;lr>, <sip:core.example.net;lr>\r\n"
    b"To: Bob <sip:+15551230001@example.com;user=phone>\r\n"
    b"From: Alice <sip:+15551230000@example.com;user=phone>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"m: <sip:alice@192.0.2.10:5060>\r\n"
    b"P-Asserted-Identity: <tel:+15551230000>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n"
    b"%s"
) % (len(SDP), SDP)
OK_200 = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport=5060;received=198.51.100.7\r\n"
    b"Record-Route: <sip:proxy.example.net;lr>\r\n"
    b"Record-Route: <sip:edge.example.net;lr>\r\n"
    b"To: Bob <sip:+15551230001@example.com;user=phone>;tag=a6c85cf\r\n"
    b"From: Alice <sip:+15551230000@example.com;user=phone>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:bob@192.0.2.4>\r\n"
    b"l: 0\r\n"
    b"\r\n"
)
CONTENT_LENGTH = b"Content-Length: %d\r\n" % len(SDP)
NEW_VIA = b"SIP/2.0/UDP 203.0.113.1:5060;branch=z9hG4bKsg1"
OUR_RR = b"<sip:203.0.113.1;lr>"


def swap(data: bytes, old: bytes, new: bytes) -> bytes:
    """``data`` with its one occurrence of ``old`` replaced by ``new``."""
    assert data.count(old) == 1, old
    return data.replace(old, new)


def invite(data: bytes = INVITE) -> Request:
    message = parse_message(data)
    assert isinstance(message, Request)
    return message


def response(data: bytes = OK_200) -> Response:
    message = parse_message(data)
    assert isinstance(message, Response)
    return message


def edited(message: Request | Response, *edits: Callable[[MessageEditor], None]) -> bytes:
    """Apply ``edits`` in order to a fresh editor and render."""
    editor = MessageEditor(message)
    for edit in edits:
        edit(editor)
    return editor.render()


# -- no edits --------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [INVITE, OK_200], ids=["invite", "200"])
def test_render_without_edits_is_the_input(data: bytes) -> None:
    assert MessageEditor(parse_message(data)).render() == data


def test_render_drops_trailing_datagram_bytes_with_or_without_edits() -> None:
    message = invite(INVITE + b"\r\ntrailing noise")
    assert MessageEditor(message).render() == INVITE
    editor = MessageEditor(message)
    editor.set_max_forwards(69)
    assert editor.render() == swap(INVITE, b"Max-Forwards:  70\r\n", b"Max-Forwards: 69\r\n")


# -- Via -------------------------------------------------------------------------------------
def test_push_via_goes_above_the_top_via() -> None:
    rendered = edited(invite(), lambda e: e.push_via(NEW_VIA))
    assert rendered == swap(
        INVITE, b"Via: SIP/2.0/UDP 192.0.2.10", b"Via: " + NEW_VIA + b"\r\nVia: SIP/2.0/UDP 192.0.2.10"
    )
    vias = invite(rendered).vias
    assert [(via.host, via.branch) for via in vias] == [
        ("203.0.113.1", "z9hG4bKsg1"),
        ("192.0.2.10", "z9hG4bK776asdhds"),
    ]


def test_push_via_above_a_comma_list_and_a_compact_via() -> None:
    data = swap(
        INVITE,
        b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport",
        b"v: SIP/2.0/TCP a.example, SIP/2.0/UDP b.example",
    )
    rendered = edited(invite(data), lambda e: e.push_via(NEW_VIA.decode()))
    assert rendered == swap(data, b"v: SIP/2.0/TCP", b"Via: " + NEW_VIA + b"\r\nv: SIP/2.0/TCP")
    assert [via.host for via in invite(rendered).vias] == ["203.0.113.1", "a.example", "b.example"]


def test_pop_via_removes_the_top_line_when_it_holds_one_value() -> None:
    rendered = edited(response(), lambda e: e.pop_via())
    assert rendered == swap(OK_200, b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1\r\n", b"")
    reparsed = response(rendered)
    assert [via.received for via in reparsed.vias] == ["198.51.100.7"]
    assert reparsed.top_via.rport == 5060


def test_pop_via_from_a_comma_list_keeps_the_rest_of_the_line() -> None:
    data = swap(
        OK_200,
        b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1\r\n",
        b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1 ,"
        b"SIP/2.0/TCP mid.example;branch=z9hG4bKm,  SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKv6\r\n",
    )
    rendered = edited(response(data), lambda e: e.pop_via())
    assert rendered == swap(
        OK_200,
        b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1\r\n",
        b"Via: SIP/2.0/TCP mid.example;branch=z9hG4bKm, SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bKv6\r\n",
    )
    assert [via.branch for via in response(rendered).vias] == ["z9hG4bKm", "z9hG4bKv6", "z9hG4bK776asdhds"]


def test_pop_via_with_a_quoted_comma_in_a_parameter() -> None:
    data = swap(
        OK_200,
        b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1\r\n",
        b'Via: SIP/2.0/UDP proxy.example.net;branch=z9hG4bKp;x="a,b", SIP/2.0/UDP second.example\r\n',
    )
    rendered = edited(response(data), lambda e: e.pop_via())
    assert [via.host for via in response(rendered).vias] == ["second.example", "192.0.2.10"]


# -- Max-Forwards ------------------------------------------------------------------------------
def test_decrement_max_forwards_replaces_only_the_value() -> None:
    message = invite()
    assert message.max_forwards == 70
    hops = message.max_forwards - 1
    rendered = edited(message, lambda e: e.set_max_forwards(hops))
    assert rendered == swap(INVITE, b"Max-Forwards:  70\r\n", b"Max-Forwards: 69\r\n")
    assert invite(rendered).max_forwards == 69


def test_set_max_forwards_on_a_folded_line_replaces_the_whole_value() -> None:
    data = swap(INVITE, b"Max-Forwards:  70\r\n", b"Max-Forwards:\r\n 70\r\n")
    rendered = edited(invite(data), lambda e: e.set_max_forwards(0))
    assert rendered == swap(INVITE, b"Max-Forwards:  70\r\n", b"Max-Forwards: 0\r\n")


def test_set_max_forwards_adds_the_header_when_absent() -> None:
    data = swap(INVITE, b"Max-Forwards:  70\r\n", b"")
    rendered = edited(invite(data), lambda e: e.set_max_forwards(70))
    assert rendered == swap(data, CONTENT_LENGTH + b"\r\n", CONTENT_LENGTH + b"Max-Forwards: 70\r\n\r\n")
    assert invite(rendered).max_forwards == 70


# -- Record-Route and Route ------------------------------------------------------------------------
def test_insert_record_route_goes_above_the_existing_ones() -> None:
    data = swap(INVITE, b"Route: <sip:edge", b"Record-Route: <sip:upstream.example;lr>\r\nRoute: <sip:edge")
    rendered = edited(invite(data), lambda e: e.insert_record_route(OUR_RR))
    assert rendered == swap(
        data, b"Record-Route: <sip:up", b"Record-Route: " + OUR_RR + b"\r\nRecord-Route: <sip:up"
    )
    assert [rr.uri.text for rr in invite(rendered).record_routes] == [
        "sip:203.0.113.1;lr",
        "sip:upstream.example;lr",
    ]


def test_insert_record_route_goes_below_the_vias_when_there_are_none() -> None:
    data = swap(INVITE, b"Max-Forwards:  70\r\n", b"Max-Forwards:  70\r\nv: SIP/2.0/TCP second.example\r\n")
    rendered = edited(invite(data), lambda e: e.insert_record_route(OUR_RR.decode()))
    assert rendered == swap(
        data,
        b"v: SIP/2.0/TCP second.example\r\n",
        b"v: SIP/2.0/TCP second.example\r\nRecord-Route: " + OUR_RR + b"\r\n",
    )
    assert invite(rendered).record_routes[0].uri == parse_uri("sip:203.0.113.1;lr")


def test_pop_route_from_a_comma_list() -> None:
    rendered = edited(invite(), lambda e: e.pop_route())
    assert rendered == swap(
        INVITE,
        b"Route: <sip:edge.example.net;lr>, <sip:core.example.net;lr>\r\n",
        b"Route: <sip:core.example.net;lr>\r\n",
    )
    assert [route.uri.text for route in invite(rendered).routes] == ["sip:core.example.net;lr"]


def test_pop_route_removes_a_single_value_line() -> None:
    data = swap(
        INVITE,
        b"Route: <sip:edge.example.net;lr>, <sip:core.example.net;lr>\r\n",
        b"Route: <sip:edge.example.net;lr>\r\nRoute: <sip:core.example.net;lr>\r\n",
    )
    rendered = edited(invite(data), lambda e: e.pop_route())
    assert rendered == swap(data, b"Route: <sip:edge.example.net;lr>\r\n", b"")
    assert invite(edited(invite(rendered), lambda e: e.pop_route())).routes == ()


def test_pop_route_without_routes_changes_nothing() -> None:
    data = swap(INVITE, b"Route: <sip:edge.example.net;lr>, <sip:core.example.net;lr>\r\n", b"")
    assert edited(invite(data), lambda e: e.pop_route()) == data


def test_pop_route_then_record_route_at_the_same_line() -> None:
    """The Route line right below the Vias is where a first Record-Route goes."""
    data = swap(
        INVITE,
        b"Route: <sip:edge.example.net;lr>, <sip:core.example.net;lr>\r\n",
        b"Route: <sip:edge.example.net;lr>\r\n",
    )
    data = swap(data, b"Max-Forwards:  70\r\n", b"")
    data = swap(data, b"Call-ID: a84", b"Max-Forwards:  70\r\nCall-ID: a84")
    pop: Callable[[MessageEditor], None] = lambda e: e.pop_route()  # noqa: E731
    record: Callable[[MessageEditor], None] = lambda e: e.insert_record_route(OUR_RR)  # noqa: E731
    for order in ((pop, record), (record, pop)):
        rendered = edited(invite(data), *order)
        assert rendered == swap(
            data, b"Route: <sip:edge.example.net;lr>\r\n", b"Record-Route: " + OUR_RR + b"\r\n"
        )


# -- generic header edits ---------------------------------------------------------------------------
def test_add_header_goes_after_the_last_header_by_default() -> None:
    editor = MessageEditor(response())
    editor.add_header("server", "sipguard")
    editor.add_header("x-sipguard-verdict", b"accept")
    rendered = editor.render()
    assert rendered == swap(
        OK_200, b"l: 0\r\n\r\n", b"l: 0\r\nServer: sipguard\r\nX-Sipguard-Verdict: accept\r\n\r\n"
    )
    assert response(rendered).get("x-sipguard-verdict") == "accept"


def test_add_header_at_a_line_start() -> None:
    message = invite()
    editor = MessageEditor(message)
    editor.add_header(
        "p-asserted-identity", "<sip:alice@example.com>", at=message.fields_named("call-id")[0].line_start
    )
    rendered = editor.render()
    assert rendered == swap(INVITE, b"Call-ID:", b"P-Asserted-Identity: <sip:alice@example.com>\r\nCall-ID:")
    assert [identity.uri.text for identity in invite(rendered).p_asserted_identities] == [
        "sip:alice@example.com",
        "tel:+15551230000",
    ]


def test_remove_header_removes_every_line_and_spelling() -> None:
    data = swap(INVITE, b"Content-Type:", b"Contact: <sip:alice@198.51.100.1>\r\nContent-Type:")
    rendered = edited(invite(data), lambda e: e.remove_header("contact"))
    assert rendered == swap(INVITE, b"m: <sip:alice@192.0.2.10:5060>\r\n", b"")
    assert invite(rendered).contacts == ()


def test_remove_absent_header_changes_nothing() -> None:
    assert edited(invite(), lambda e: e.remove_header("subject")) == INVITE


def test_replace_header_keeps_the_first_position_and_drops_the_rest() -> None:
    data = swap(
        INVITE,
        b"CSeq: 314159 INVITE\r\n",
        b"CSeq: 314159 INVITE\r\nP-Asserted-Identity: <sip:x@evil.example>\r\n",
    )
    rendered = edited(
        invite(data), lambda e: e.replace_header("p-asserted-identity", "<sip:+15551230000@example.com>")
    )
    expected = swap(
        INVITE,
        b"CSeq: 314159 INVITE\r\n",
        b"CSeq: 314159 INVITE\r\nP-Asserted-Identity: <sip:+15551230000@example.com>\r\n",
    )
    assert rendered == swap(expected, b"P-Asserted-Identity: <tel:+15551230000>\r\n", b"")
    (identity,) = invite(rendered).p_asserted_identities
    assert identity.uri.text == "sip:+15551230000@example.com"


def test_replace_absent_header_adds_it() -> None:
    editor = MessageEditor(invite())
    editor.replace_header("privacy", "id")
    assert editor.render() == swap(INVITE, b"\r\n\r\n", b"\r\nPrivacy: id\r\n\r\n")


# -- start line and body framing ---------------------------------------------------------------------
def test_set_request_uri_touches_only_the_uri() -> None:
    rendered = edited(invite(), lambda e: e.set_request_uri("sip:+15551230001@[2001:db8::7]:5070"))
    assert rendered == swap(
        INVITE,
        b"INVITE sip:+15551230001@example.com;user=phone SIP/2.0",
        b"INVITE sip:+15551230001@[2001:db8::7]:5070 SIP/2.0",
    )
    reparsed = invite(rendered)
    assert reparsed.uri == parse_uri("sip:+15551230001@[2001:db8::7]:5070")
    assert reparsed.to == invite().to


def test_set_request_uri_after_leading_crlfs() -> None:
    rendered = edited(invite(b"\r\n" + INVITE), lambda e: e.set_request_uri(b"tel:+15551230001"))
    assert rendered == b"\r\n" + swap(
        INVITE, b"sip:+15551230001@example.com;user=phone SIP", b"tel:+15551230001 SIP"
    )


def test_set_content_length_with_a_new_body() -> None:
    message = invite()
    editor = MessageEditor(message)
    editor.set_content_length(0)
    head = editor.render()[: -len(SDP)]
    assert head == swap(INVITE, CONTENT_LENGTH, b"Content-Length: 0\r\n")[: -len(SDP)]
    assert invite(head).content_length == 0


def test_set_content_length_on_a_compact_line() -> None:
    rendered = edited(response(), lambda e: e.set_content_length(0))
    assert rendered == swap(OK_200, b"l: 0\r\n", b"Content-Length: 0\r\n")


# -- several edits at once ------------------------------------------------------------------------------
def test_proxy_request_edits_together() -> None:
    message = invite()
    editor = MessageEditor(message)
    editor.push_via(NEW_VIA)
    assert message.max_forwards is not None
    editor.set_max_forwards(message.max_forwards - 1)
    editor.pop_route()
    editor.insert_record_route(OUR_RR)
    rendered = editor.render()
    expected = swap(INVITE, b"Via: SIP/2.0/UDP 192", b"Via: " + NEW_VIA + b"\r\nVia: SIP/2.0/UDP 192")
    expected = swap(
        expected, b"Max-Forwards:  70\r\n", b"Record-Route: " + OUR_RR + b"\r\nMax-Forwards: 69\r\n"
    )
    expected = swap(expected, b"<sip:edge.example.net;lr>, <sip:core", b"<sip:core")
    assert rendered == expected
    reparsed = invite(rendered)
    assert reparsed.top_via.branch == "z9hG4bKsg1"
    assert reparsed.max_forwards == 69
    assert [route.uri.text for route in reparsed.routes] == ["sip:core.example.net;lr"]
    assert [rr.uri.text for rr in reparsed.record_routes] == ["sip:203.0.113.1;lr"]
    assert (reparsed.call_id, reparsed.cseq, reparsed.from_, reparsed.body) == (
        message.call_id,
        message.cseq,
        message.from_,
        SDP,
    )


def test_insertions_at_one_offset_keep_their_order() -> None:
    editor = MessageEditor(invite())
    editor.push_via("SIP/2.0/UDP first.example")
    editor.push_via("SIP/2.0/UDP second.example")
    assert [via.host for via in invite(editor.render()).vias] == [
        "first.example",
        "second.example",
        "192.0.2.10",
    ]


@pytest.mark.parametrize(
    "edits",
    [
        ("set_max_forwards", "set_max_forwards"),
        ("pop_via", "pop_via"),
        ("pop_route", "remove_route"),
        ("set_request_uri", "set_request_uri"),
        ("replace_via", "pop_via"),
    ],
)
def test_overlapping_edits_raise_value_error(edits: tuple[str, str]) -> None:
    editor = MessageEditor(invite())
    actions: dict[str, Callable[[], None]] = {
        "set_max_forwards": lambda: editor.set_max_forwards(10),
        "pop_via": editor.pop_via,
        "pop_route": editor.pop_route,
        "remove_route": lambda: editor.remove_header("route"),
        "set_request_uri": lambda: editor.set_request_uri("sip:x@example.com"),
        "replace_via": lambda: editor.replace_header("via", NEW_VIA),
    }
    for edit in edits:
        actions[edit]()
    with pytest.raises(ValueError, match="overlapping edits"):
        editor.render()


def test_popping_the_only_via_leaves_a_response_that_does_not_parse() -> None:
    data = swap(OK_200, b"Via: SIP/2.0/UDP proxy.example.net:5060;branch=z9hG4bKproxy1\r\n", b"")
    rendered = edited(response(data), lambda e: e.pop_via())
    with pytest.raises(ParseError, match="Missing via"):
        parse_message(rendered)
