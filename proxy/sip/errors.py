"""The message layer's one error type.

Every malformed input the parser sees becomes a ``ParseError`` carrying the SIP
status a server should answer with. Nothing else escapes the parser: the fuzz
tests hold it to that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .message import Message


class SipError(Exception):
    """Root of sipguard's SIP-layer exceptions."""


class ParseError(SipError):
    """Bytes that are not an acceptable SIP message.

    ``status`` and ``reason`` are what to answer a request with (400, 416, 505,
    513 ...). ``partial`` is the message as far as it could be indexed, when the
    start line and headers were readable: a reply needs its Via, From, To,
    Call-ID and CSeq. A response, or bytes without a readable header section,
    cannot be answered and is dropped.
    """

    def __init__(self, status: int, reason: str, *, partial: Message | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.partial = partial
