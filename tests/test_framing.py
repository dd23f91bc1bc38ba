"""StreamFramer: cutting messages out of a TCP/TLS byte stream (RFC 3261 §18.3, RFC 5626 §4.4.1).

Every stream is fed whole, one byte at a time and in uneven chunks, and must give the
same frames each way (``feed_all``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from proxy.sip import (
    FramingLostError,
    KeepAlivePing,
    ParseError,
    Request,
    Response,
    StreamFramer,
    parse_message,
)

PING = KeepAlivePing()


def message(body: bytes = b"", *, content_length: bytes | None = None, method: bytes = b"MESSAGE") -> bytes:
    """A request whose Content-Length is the body's length unless given (b"" leaves it out)."""
    length = b"%d" % len(body) if content_length is None else content_length
    lines = [
        method + b" sip:bob@example.com SIP/2.0",
        b"Via: SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bK" + method.lower(),
        b"Max-Forwards: 70",
        b"From: <sip:alice@example.com>;tag=1",
        b"To: <sip:bob@example.com>",
        b"Call-ID: framing-test",
        b"CSeq: 1 " + method,
    ]
    if length:
        lines.append(b"Content-Length: " + length)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bKmessage\r\n"
    b"From: <sip:alice@example.com>;tag=1\r\n"
    b"To: <sip:bob@example.com>;tag=2\r\n"
    b"Call-ID: framing-test\r\n"
    b"CSeq: 1 MESSAGE\r\n"
    b"l: 0\r\n"
    b"\r\n"
)


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for size in (2, 3, 7, 64):
        yield [data[i : i + size] for i in range(0, len(data), size)]
    yield [data[:5], b"", data[5:]]


def feed_all(data: bytes, max_message_size: int = 65535) -> list[bytes | KeepAlivePing]:
    """The frames of ``data``, checked to be the same however the bytes arrive."""
    results = []
    for chunks in chunkings(data):
        framer = StreamFramer(max_message_size)
        frames: list[bytes | KeepAlivePing] = []
        for chunk in chunks:
            frames.extend(framer.feed(chunk))
        results.append((frames, framer.buffered))
    assert all(result == results[0] for result in results)
    return results[0][0]


def error_of(data: bytes, max_message_size: int = 65535) -> ParseError:
    """The ParseError ``data`` raises, checked to be the same however the bytes arrive."""
    errors = []
    for chunks in chunkings(data):
        framer = StreamFramer(max_message_size)
        with pytest.raises(ParseError) as caught:
            for chunk in chunks:
                framer.feed(chunk)
        errors.append((caught.value.status, caught.value.reason))
    assert all(error == errors[0] for error in errors)
    with pytest.raises(ParseError) as caught:
        StreamFramer(max_message_size).feed(data)
    return caught.value


# -- keep-alives -------------------------------------------------------------------------------
def test_double_crlf_is_one_ping() -> None:
    assert feed_all(b"\r\n\r\n") == [PING]


def test_single_crlf_between_messages_is_not_a_ping() -> None:
    first, second = message(b"one"), message(b"two")
    assert feed_all(first + b"\r\n" + second) == [first, second]


@pytest.mark.parametrize(("crlfs", "pings"), [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)])
def test_pings_between_messages(crlfs: int, pings: int) -> None:
    first, second = message(b"one"), message(b"two")
    assert feed_all(first + b"\r\n" * crlfs + second) == [first, *[PING] * pings, second]


def test_a_lone_crlf_waits_and_does_not_count_across_a_message() -> None:
    first = message(b"one")
    assert feed_all(b"\r\n" + first + b"\r\n") == [first]
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(first) == [first]
    assert framer.feed(b"\r\n") == []  # the CRLF before the message does not pair with this one
    assert framer.feed(b"\r\n") == [PING]


def test_a_half_ping_is_buffered() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r") == []
    assert framer.buffered == 1
    assert framer.feed(b"\n") == [PING]
    assert framer.buffered == 0


@pytest.mark.parametrize("data", [b"\rX", b"\r\r\n", b"\r\n\r\r\n", message(b"a") + b"\r "])
def test_stray_cr_between_messages_is_400(data: bytes) -> None:
    error = error_of(data)
    assert (error.status, error.reason) == (400, "Stray CR between messages")


# -- Content-Length framing ---------------------------------------------------------------------
def test_content_length_frames_the_body() -> None:
    body = b"hello\r\n\r\nwith an empty line, CR\r and NUL \x00 inside"
    data = message(body)
    assert feed_all(data) == [data]


def test_body_is_waited_for() -> None:
    data = message(b"0123456789")
    framer = StreamFramer()
    assert framer.feed(data[:-1]) == []
    assert framer.buffered == len(data) - 1
    assert framer.feed(data[-1:] + b"INVITE") == [data]
    assert framer.buffered == len(b"INVITE")


def test_pipelined_messages_in_one_chunk() -> None:
    messages = [message(b"first"), RESPONSE, message(b""), message(b"x" * 300, method=b"INFO")]
    data = b"".join(messages)
    assert StreamFramer().feed(data) == messages
    assert feed_all(data) == messages


def test_partial_headers_across_chunks() -> None:
    data = message(b"body")
    head_end = data.index(b"\r\n\r\n")
    framer = StreamFramer()
    assert framer.feed(data[:10]) == []
    assert framer.feed(data[10 : head_end + 2]) == []
    assert framer.feed(data[head_end + 2 : head_end + 3]) == []  # "\r\n\r" is not yet the end
    assert framer.feed(data[head_end + 3 : head_end + 4]) == []  # head complete, body missing
    assert framer.feed(data[head_end + 4 :]) == [data]
    assert framer.buffered == 0


def test_empty_line_split_at_every_position() -> None:
    data = message(b"abc")
    for cut in range(len(data) + 1):
        framer = StreamFramer()
        assert framer.feed(data[:cut]) + framer.feed(data[cut:]) == [data]


def test_missing_content_length_on_a_stream_means_no_body() -> None:
    bodiless = message(content_length=b"")
    following = message(b"next")
    assert feed_all(bodiless + following) == [bodiless, following]
    parsed = parse_message(bodiless, stream=True)
    assert (parsed.content_length, parsed.body) == (None, b"")


def test_missing_content_length_turns_a_body_into_the_next_frame() -> None:
    bodiless = message(content_length=b"")
    assert feed_all(bodiless + b"v=0\r\n\r\n") == [bodiless, b"v=0\r\n\r\n"]


@pytest.mark.parametrize(
    "line",
    [b"Content-Length: 0", b"content-length:0", b"l:   0  ", b"CONTENT-LENGTH:\t0", b"Content-Length : 000"],
)
def test_content_length_spellings(line: bytes) -> None:
    data = message(content_length=b"").replace(b"\r\n\r\n", b"\r\n" + line + b"\r\n\r\n")
    assert feed_all(data + RESPONSE) == [data, RESPONSE]


@pytest.mark.parametrize(
    "value", [b"-1", b"-999", b"five", b"1 2", b"+3", b"0x10", b"", b"\xd9\xa1", b"3\r\n 4"]
)
def test_bad_content_length_is_400(value: bytes) -> None:
    error = error_of(
        message(b"abc", content_length=b"3").replace(b"Content-Length: 3", b"Content-Length: " + value)
    )
    assert (error.status, error.reason) == (400, "Malformed Content-Length")


@pytest.mark.parametrize(
    "extra",
    [b"Content-Length: 3", b"l: 3", b"content-length: 4", b"L: 3"],
    ids=["same", "compact", "other", "upper"],
)
def test_duplicate_content_length_is_400(extra: bytes) -> None:
    data = message(b"abc").replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n\r\n")
    error = error_of(data)
    assert (error.status, error.reason) == (400, "Multiple Content-Length headers")


@pytest.mark.parametrize("bad", [b"-1", b"1" * 30], ids=["malformed", "huge"])
def test_a_bad_message_in_the_same_chunk_loses_neither_the_one_before_nor_its_own_headers(bad: bytes) -> None:
    """Pipelined in one segment, a good message and one whose Content-Length breaks the
    framing: the exception used to discard the good one (cut already, never returned).
    Now it carries it, and the bad one's header section so that it can be answered."""
    first = message(b"ok")
    broken = message(b"x", content_length=b"3").replace(b"Content-Length: 3", b"Content-Length: " + bad)
    with pytest.raises(FramingLostError) as caught:
        StreamFramer().feed(first + RESPONSE + b"\r\n\r\n" + broken)
    assert caught.value.frames == [first, RESPONSE, KeepAlivePing()]
    assert caught.value.head == broken[: broken.index(b"\r\n\r\n") + 4]
    # the header section alone gets the same error from the parser, with a request to answer
    with pytest.raises(ParseError) as parsed:
        parse_message(caught.value.head, stream=True)
    assert (parsed.value.status, parsed.value.reason) == (caught.value.status, caught.value.reason)
    assert isinstance(parsed.value.partial, Request)


def test_framing_lost_without_a_header_section_has_no_head() -> None:
    with pytest.raises(FramingLostError) as caught:
        StreamFramer().feed(message(b"ok") + b"\r\rINVITE")
    assert caught.value.frames == [message(b"ok")] and caught.value.head is None


def test_a_bad_second_message_does_not_lose_the_first() -> None:
    first = message(b"ok")
    framer = StreamFramer()
    assert framer.feed(first) == [first]
    with pytest.raises(ParseError) as caught:
        framer.feed(message(b"x", content_length=b"-1"))
    assert caught.value.status == 400


# -- size limits ------------------------------------------------------------------------------------
def test_oversize_header_section_is_513_without_unbounded_buffering() -> None:
    limit = 1024
    framer = StreamFramer(limit)
    endless = b"INVITE sip:bob@example.com SIP/2.0\r\n" + b"X-Padding: " + b"p" * 10_000
    fed = 0
    with pytest.raises(ParseError) as caught:
        for byte in endless:
            framer.feed(bytes([byte]))
            fed += 1
    assert (caught.value.status, caught.value.reason) == (513, "Message Too Large")
    assert fed == limit  # the byte that took the buffer past the limit raised
    assert framer.buffered == limit + 1


def test_oversize_header_section_in_large_chunks() -> None:
    framer = StreamFramer(1024)
    framer.feed(b"OPTIONS sip:a@b SIP/2.0\r\n")
    with pytest.raises(ParseError) as caught:
        for _ in range(100):
            framer.feed(b"X: " + b"y" * 497 + b"\r\n")
    assert caught.value.status == 513
    assert framer.buffered <= 1024 + 502


def test_oversize_message_is_513_as_soon_as_the_header_section_ends() -> None:
    head = message(content_length=b"5000")
    framer = StreamFramer(4096)
    with pytest.raises(ParseError) as caught:
        framer.feed(head)  # no body sent: the declared length alone is too large
    assert caught.value.status == 513


@pytest.mark.parametrize("value", [b"99999999999999999999999999999", b"9" * 5000])
def test_huge_content_length_is_513(value: bytes) -> None:
    assert error_of(message(b"x", content_length=value)).status == 513


def test_content_length_with_many_leading_zeros() -> None:
    data = message(b"x", content_length=b"0" * 5000 + b"1")
    assert feed_all(data) == [data]


def test_message_exactly_at_the_limit_fits() -> None:
    data = message(b"z" * 100)
    assert feed_all(data, max_message_size=len(data)) == [data]
    assert error_of(data, max_message_size=len(data) - 1).status == 513


def test_header_section_over_the_limit_wins_over_a_bad_content_length() -> None:
    """Whole or byte by byte, a stream too long before its empty line is 513, not 400."""
    data = message(b"", content_length=b"bad")
    head_length = data.index(b"\r\n\r\n") + 4
    for limit in (head_length - 1, head_length - 2, head_length - 3):
        error = error_of(data, max_message_size=limit)
        assert error.status == 513


# -- agreement with parse_message ------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        message(b"hello"),
        message(b""),
        message(content_length=b""),
        RESPONSE,
        message(b"\r\n\r\n" * 10),
        b"\r\n\r\n" + message(b"x"),
    ],
)
def test_parse_message_in_stream_mode_agrees_with_the_framer(data: bytes) -> None:
    frames = [frame for frame in feed_all(data + RESPONSE) if isinstance(frame, bytes)]
    first = parse_message(frames[0], stream=True)
    assert isinstance(first, Request | Response)
    assert first.bytes == frames[0]
    assert frames[0].endswith(first.body)
    assert first.content_length in (None, len(first.body))
    assert frames[1] == RESPONSE


def test_parse_message_on_a_truncated_frame_is_400() -> None:
    data = message(b"hello")
    with pytest.raises(ParseError) as caught:
        parse_message(data[:-1], stream=True)
    error = caught.value
    assert (error.status, error.reason) == (400, "Content-Length larger than the message body")


@pytest.mark.parametrize("value", [b"-1", b"x", b"70000"])
def test_parse_message_and_framer_reject_the_same_content_length(value: bytes) -> None:
    data = message(b"abc", content_length=value)
    with pytest.raises(ParseError) as caught:
        parse_message(data, stream=True)
    assert caught.value.status == error_of(data).status
