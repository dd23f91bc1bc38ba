"""Outgoing messages as the received bytes plus an edit list (Kamailio's "lumps").

Strategy: every edit is (start, end, replacement) against ``message.raw``; ``render``
sorts them and joins the untouched slices with the replacements, so headers nobody
edited leave byte for byte as they arrived. Insertions at the same offset keep the order
they were made in, and come before an edit that starts there. Two edits that overlap
are a programming error (ValueError). With no edits, ``render`` returns the received
message itself.
"""

from __future__ import annotations

from .headers import header_name_bytes, split_values
from .message import HeaderField, Message, Request

CRLF = b"\r\n"


class MessageEditor:
    """Collects edits to one parsed message and renders the bytes to send."""

    def __init__(self, message: Message) -> None:
        self.message = message
        self._edits: list[tuple[int, int, bytes]] = []

    # -- generic header edits ---------------------------------------------------------
    def add_header(self, name: str, value: str | bytes, *, at: int | None = None) -> None:
        """Add a header line at offset ``at`` (a line start), by default after the last header."""
        position = self.message.head_end + 2 if at is None else at
        self._insert(position, _header_line(name, value))

    def remove_header(self, name: str) -> None:
        for field in self.message.fields_named(name):
            self._remove_field(field)

    def replace_header(self, name: str, value: str | bytes) -> None:
        """Replace every line of a header with one line, where the first one stood."""
        fields = self.message.fields_named(name)
        if not fields:
            self.add_header(name, value)
            return
        self._edits.append((fields[0].line_start, fields[0].line_end + 2, _header_line(name, value)))
        for field in fields[1:]:
            self._remove_field(field)

    # -- proxy edits (RFC 3261 §16.6) -----------------------------------------------------
    def push_via(self, value: str | bytes) -> None:
        """Insert a Via above the topmost one."""
        vias = self.message.fields_named("via")
        self.add_header("via", value, at=vias[0].line_start if vias else None)

    def pop_via(self) -> None:
        """Remove the topmost Via value (a response passing back through the proxy)."""
        self._pop_first_value("via")

    def pop_route(self) -> None:
        """Remove the topmost Route value (our own, under loose routing)."""
        self._pop_first_value("route")

    def set_max_forwards(self, hops: int) -> None:
        fields = self.message.fields_named("max-forwards")
        if fields:
            self._replace_value(fields[0], str(hops).encode())
        else:
            self.add_header("max-forwards", str(hops))

    def insert_record_route(self, value: str | bytes) -> None:
        """Insert a Record-Route above the existing ones, or below the Vias when there are none."""
        record_routes = self.message.fields_named("record-route")
        if record_routes:
            self.add_header("record-route", value, at=record_routes[0].line_start)
        else:
            vias = self.message.fields_named("via")
            self.add_header("record-route", value, at=vias[-1].line_end + 2 if vias else None)

    def set_request_uri(self, uri: str | bytes) -> None:
        assert isinstance(self.message, Request)
        start, end = self.message.uri_span
        self._edits.append((start, end, _as_bytes(uri)))

    def set_content_length(self, length: int) -> None:
        self.replace_header("content-length", str(length))

    def render(self) -> bytes:
        raw = self.message.raw
        if not self._edits:
            return self.message.bytes
        parts: list[bytes] = []
        position = 0
        # An insertion at a line start sorts before a removal of that line, whichever came
        # first: pop_route() then insert_record_route() may touch the same offset.
        for start, end, replacement in sorted(self._edits, key=lambda edit: (edit[0], edit[1])):
            if start < position:
                raise ValueError(f"overlapping edits at offset {start}")
            parts.append(raw[position:start])
            parts.append(replacement)
            position = end
        parts.append(raw[position : self.message.end])
        return b"".join(parts)

    # -- helpers -------------------------------------------------------------------------
    def _insert(self, position: int, data: bytes) -> None:
        self._edits.append((position, position, data))

    def _remove_field(self, field: HeaderField) -> None:
        self._edits.append((field.line_start, field.line_end + 2, b""))

    def _replace_value(self, field: HeaderField, value: bytes) -> None:
        self._edits.append((field.value_start, field.line_end, b" " + value))

    def _pop_first_value(self, name: str) -> None:
        fields = self.message.fields_named(name)
        if not fields:
            return
        first = fields[0]
        values = split_values(self.message.value_of(first))
        if len(values) == 1:
            self._remove_field(first)
        else:
            rest = ", ".join(values[1:]).encode("utf-8", "surrogateescape")
            self._replace_value(first, rest)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _header_line(name: str, value: str | bytes) -> bytes:
    return header_name_bytes(name) + b": " + _as_bytes(value) + CRLF
