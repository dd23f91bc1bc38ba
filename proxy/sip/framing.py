"""Cutting SIP messages out of a TCP/TLS byte stream (RFC 3261 §18.3).

Strategy: buffer bytes; skip CRLF keep-alives between messages (two CRLFs are a
RFC 5626 §4.4.1 ping, which the transport answers with one CRLF); find the empty
line; read Content-Length from the header section with the same rules as the message
parser; wait for the body; emit the frame. A frame is cut the same way whether its
bytes arrive at once or one at a time.

A stream whose framing is lost (bad Content-Length, header section or message over
the size cap) raises FramingLostError, a ParseError that carries the frames cut before it
in the same feed (still to be delivered) and the header section that broke it, when
complete (to be answered); the transport then closes the connection, since no later
byte can be trusted to start a message.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParseError
from .message import DEFAULT_MAX_MESSAGE_SIZE, Message, _index_headers, content_length_of


@dataclass(frozen=True, slots=True)
class KeepAlivePing:
    """A CRLFCRLF ping seen between messages; answer with a single CRLF."""


class FramingLostError(ParseError):
    """The stream cannot be cut into messages any more. ``frames``: what ``feed`` had cut
    before the bad bytes, in order. ``head``: the header section of the message whose
    Content-Length broke the framing, or None (no complete header section)."""

    def __init__(self, error: ParseError, frames: list[bytes | KeepAlivePing], head: bytes | None) -> None:
        super().__init__(error.status, error.reason)
        self.frames = frames
        self.head = head


class StreamFramer:
    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._scan_from = 0  # where to resume looking for the empty line
        self._frame_length: int | None = None  # known once the header section is complete
        self._crlfs = 0  # keep-alive CRLFs seen since the last message or ping
        self._head: bytes | None = None  # the header section being framed, for FramingLostError

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes | KeepAlivePing]:
        """Add received bytes; return the complete messages and pings, in order. Raises
        FramingLostError, with the messages cut before it, when the framing is lost."""
        frames: list[bytes | KeepAlivePing] = []
        try:
            self._cut(data, frames)
        except ParseError as error:
            # (no ``self._head = None`` in this method: mypy would narrow the attribute to
            # None across the call, and mypyc's compiled read would then refuse the bytes)
            raise FramingLostError(error, frames, self._head) from None
        return frames

    def _cut(self, data: bytes, frames: list[bytes | KeepAlivePing]) -> None:
        self._head = None
        self._buffer += data
        buffer = self._buffer
        while buffer:
            if self._frame_length is None:
                if buffer[0] == 13:  # CR: a keep-alive CRLF, or the start of one
                    if len(buffer) < 2:
                        break
                    if buffer[1] != 10:
                        raise ParseError(400, "Stray CR between messages")
                    del buffer[:2]
                    self._crlfs += 1
                    if self._crlfs == 2:
                        frames.append(KeepAlivePing())
                        self._crlfs = 0
                    continue
                self._crlfs = 0
                head_end = buffer.find(b"\r\n\r\n", self._scan_from)
                if head_end < 0:
                    if len(buffer) > self.max_message_size:
                        raise ParseError(513, "Message Too Large")
                    self._scan_from = max(0, len(buffer) - 3)
                    break
                if head_end + 4 > self.max_message_size:
                    # checked before Content-Length, as a byte-at-a-time feed would see it
                    raise ParseError(513, "Message Too Large")
                head = self._head = bytes(buffer[: head_end + 4])
                self._frame_length = head_end + 4 + self._content_length(head, head_end)
                if self._frame_length > self.max_message_size:
                    raise ParseError(513, "Message Too Large")
            if len(buffer) < self._frame_length:
                break
            frames.append(bytes(buffer[: self._frame_length]))
            del buffer[: self._frame_length]
            self._frame_length = None
            self._scan_from = 0
            self._head = None

    @staticmethod
    def _content_length(head: bytes, head_end: int) -> int:
        line_end = head.find(b"\r\n")
        fields, index = _index_headers(head, line_end + 2, head_end)
        header_only = Message(head, fields, index, head_end, len(head))
        # RFC 3261 §18.3 requires Content-Length on streams; absent, we take it as 0.
        return content_length_of(header_only) or 0
