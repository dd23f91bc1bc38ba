"""The parse memo (proxy/sip/memo.py): one parse per text, bounded whatever the input."""

import pytest

from proxy.sip import ParseError, parse_message
from proxy.sip.memo import MAX_ENTRIES, MAX_TEXT, Memo


def counting_memo() -> tuple[Memo[str], list[str]]:
    parsed: list[str] = []

    def parse(text: str) -> str:
        if text == "bad":
            raise ParseError(400, "bad")
        parsed.append(text)
        return text.upper()

    return Memo(parse), parsed


def test_the_same_text_is_parsed_once() -> None:
    memo, parsed = counting_memo()
    assert [memo("a"), memo("b"), memo("a")] == ["A", "B", "A"]
    assert parsed == ["a", "b"]


def test_text_that_fails_raises_every_time_and_is_not_kept() -> None:
    memo, _ = counting_memo()
    for _ in range(2):
        with pytest.raises(ParseError):
            memo("bad")
    assert memo("ok") == "OK"


def test_long_text_is_parsed_every_time() -> None:
    memo, parsed = counting_memo()
    long_text = "x" * (MAX_TEXT + 1)
    memo(long_text)
    memo(long_text)
    assert parsed == [long_text, long_text]


def test_a_full_memo_starts_again_instead_of_growing() -> None:
    memo, parsed = counting_memo()
    for n in range(MAX_ENTRIES):
        memo(str(n))
    memo("one more")  # the memo is full: emptied, then this one kept
    memo("0")  # parsed again
    assert parsed[-2:] == ["one more", "0"]
    memo("one more")
    assert parsed.count("one more") == 1


def test_messages_of_a_call_share_their_parsed_from() -> None:
    def request(method: str, cseq: int) -> bytes:
        return (
            f"{method} sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK{cseq}\r\n"
            "From: <sip:+14155550100@example.com;user=phone>;tag=memo-test\r\nTo: <sip:bob@example.com>\r\n"
            f"Call-ID: memo-test\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    invite, bye = parse_message(request("INVITE", 1)), parse_message(request("BYE", 2))
    assert invite.from_ is bye.from_
    assert invite.top_via is not bye.top_via  # another branch: another text
