"""SIP messages out of a packet capture (pcap or pcapng), for ``sipguard replay``.

Strategy: ``CaptureReader`` is the only part that reads a file: dpkt's pcap or pcapng
reader (chosen by the file's magic number; gzip-compressed files are opened through
gzip) yields (timestamp, frame) pairs. ``PacketDecoder`` is sans-I/O: frames in, parsed
``SipPacket``s out. It strips the link layer (Ethernet with VLAN tags, Linux cooked
SLL and SLL2, raw IP, BSD loopback), reads IPv4 and IPv6 headers itself (reassembling
fragments, which dpkt does not), and then:
- UDP: a datagram whose first line is a SIP request or status line is one message;
- TCP: each direction of a connection is a stream whose segments are put back in
  sequence order (out-of-order ones wait, retransmitted and overlapping bytes are
  trimmed) and cut into messages by the proxy's own ``StreamFramer``, as the TCP
  transport does. A stream whose start was not captured (no SYN) is picked up at the
  first segment that begins with a SIP start line; one whose framing breaks is picked
  up again the same way.
Messages go through ``parse_message``; those it refuses are counted as malformed and
skipped. Every table (streams, out-of-order bytes, fragments) is bounded.

Invariants: ``CaptureReader`` raises ``CaptureError`` (one line, for the operator) and
nothing else for a file that is not a readable capture; a capture cut short mid-record
yields what came before it and says so in ``truncated``.
"""

from __future__ import annotations

import gzip
import ipaddress
import struct
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

import dpkt  # type: ignore[import-untyped]

from .sip import KeepAlivePing, ParseError, Request, Response, StreamFramer, parse_message
from .sip.abnf import REQUEST_LINE, STATUS_LINE
from .sip.events import Address

# Link types (tcpdump.org/linktypes.html). Cooked: (header size, where its EtherType is).
_COOKED = {113: (16, 14), 276: (20, 0)}  # LINUX_SLL, LINUX_SLL2
# Bare: header size, the IP version nibble telling v4 from v6. NULL, LOOP, RAW (and the
# DLT numbers some writers store for it), IPV4, IPV6.
_BARE = {0: 4, 108: 4, 101: 0, 12: 0, 14: 0, 228: 0, 229: 0}  # fmt: skip
ETHERNET = 1
LINK_TYPE_NAMES = {
    1: "Ethernet", 113: "Linux cooked (SLL)", 276: "Linux cooked v2 (SLL2)", 0: "BSD loopback",
    108: "OpenBSD loopback", 101: "raw IP", 12: "raw IP", 14: "raw IP", 228: "raw IPv4", 229: "raw IPv6",
}  # fmt: skip
_ETHERTYPE_IPV4, _ETHERTYPE_IPV6 = 0x0800, 0x86DD
_VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
_UDP, _TCP = 17, 6
_IPV6_SKIPPABLE = (0, 43, 60)  # hop-by-hop, routing, destination options: (length + 1) * 8 bytes
_IPV6_FRAGMENT, _IPV6_AH = 44, 51
_TCP_SYN, _TCP_FIN, _TCP_RST = 0x02, 0x01, 0x04

MAX_STREAMS = 65_536  # TCP directions followed at once; the oldest is forgotten past this
MAX_OUT_OF_ORDER = 256 * 1024  # bytes waiting for a missing segment before the gap is given up
GAP_PATIENCE = 2.0  # seconds, likewise: past any TCP retransmission, so the capture missed it
MAX_FRAGMENTED = 4096  # IP datagrams being reassembled at once
_START_LINE_SCAN = 1024  # a start line longer than this is not looked for

LAST_TIMESTAMP = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last one a report can print as a date
_PCAP_MAGICS = {b"\xa1\xb2\xc3\xd4", b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\x3c\x4d", b"\x4d\x3c\xb2\xa1"}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_GZIP_MAGIC = b"\x1f\x8b"


# what reading a damaged file raises: dpkt's and struct's errors, gzip's (OSError, EOFError)
# and zlib's, for a .gz whose compressed data is damaged
_UNREADABLE = (dpkt.UnpackError, ValueError, struct.error, EOFError, OSError, zlib.error)


class CaptureError(Exception):
    """The file cannot be read as a capture; the message is one line for the operator."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SipPacket:
    """One SIP message as the capture shows it: when, over what, from whom to whom."""

    at: float  # the capture's timestamp (epoch seconds)
    source: Address
    destination: Address
    message: Request | Response


@dataclass(slots=True)
class DecodeCounts:
    packets: int = 0  # frames read
    messages: int = 0  # SIP messages parsed
    udp_messages: int = 0
    tcp_messages: int = 0
    malformed: int = 0  # SIP (by its start line) that parse_message refused, or a broken TCP framing
    not_sip: int = 0  # frames that carried no SIP bytes: other protocols, TCP control, keep-alives
    snapped: int = 0  # IP packets cut short by the capture's snap length
    tcp_gaps: int = 0  # TCP bytes never captured, skipped over

    def as_json(self) -> dict[str, int]:
        return asdict(self)


# -- reading the file ----------------------------------------------------------------------------
class _WatchedFile:
    """A file whose reads are watched for the file ending inside a record: dpkt's pcap
    reader hands a cut-short last packet over as if it were whole."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.name = getattr(file, "name", "capture")
        self.cut_short = False
        self._empty_reads = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:  # only a corrupt pcapng block length asks for "the rest"
            raise ValueError("a block length is corrupt")
        data = self.file.read(size)
        if size and len(data) < size:
            self._empty_reads += not data
            # a record may only end the file cleanly at its very start: one empty read, last
            self.cut_short |= bool(data) or self._empty_reads > 1
        return data


class CaptureReader:
    """(timestamp, frame) pairs from a pcap or pcapng file, whichever it is."""

    def __init__(self, file: IO[bytes], name: str = "capture") -> None:
        self.name = name
        try:
            magic = _peek(file, 4)
            if magic[:2] == _GZIP_MAGIC:
                file = gzip.GzipFile(fileobj=file)  # type: ignore[assignment]
                magic = _peek(file, 4)
            self._file = _WatchedFile(file)
            if magic in _PCAP_MAGICS:
                self.format = "pcap"
                self._reader: Any = dpkt.pcap.Reader(self._file)
            elif magic == _PCAPNG_MAGIC:
                self.format = "pcapng"
                self._reader = dpkt.pcapng.Reader(self._file)
            elif not magic:
                raise CaptureError(f"{name} is empty")
            else:
                raise CaptureError(f"{name} is not a pcap or pcapng capture (it starts with {magic.hex()})")
        except _UNREADABLE as error:
            raise CaptureError(f"{name}: the capture's header is unreadable ({_said(error)})") from None
        self.link_type: int = self._reader.datalink()
        if self.link_type not in LINK_TYPE_NAMES:
            raise CaptureError(
                f"{name}: link type {self.link_type} is not supported (supported: Ethernet, "
                "Linux cooked SLL and SLL2, raw IP, BSD loopback)"
            )
        self.truncated: str | None = None  # why reading stopped early, if it did

    def __iter__(self) -> Iterator[tuple[float, bytes]]:
        count = 0
        try:
            for timestamp, frame in self._reader:
                if self._file.cut_short:
                    break  # this record is the one cut short: what it has is not the packet
                if not 0 <= timestamp <= LAST_TIMESTAMP:  # (a pcapng's 64 bits reach year 300,000)
                    self.truncated = (
                        f"record {count + 1} is unreadable (its timestamp {timestamp:.0f} is not a date)"
                    )
                    return
                count += 1
                yield float(timestamp), bytes(frame)
        except _UNREADABLE as error:
            self.truncated = f"record {count + 1} is unreadable ({_said(error)})"
            return
        if self._file.cut_short:
            self.truncated = f"the file ends inside record {count + 1}"


def _peek(file: IO[bytes], size: int) -> bytes:
    data = file.read(size)
    file.seek(-len(data), 1)
    return data


def _said(error: BaseException) -> str:
    return str(error) or type(error).__name__


# -- decoding frames -----------------------------------------------------------------------------
class PacketDecoder:
    """Frames of one link type in, SIP messages out (sans-I/O)."""

    def __init__(self, link_type: int) -> None:
        self.link_type = link_type
        self.counts = DecodeCounts()
        self._streams: dict[tuple[Address, Address], _TcpStream] = {}
        self._fragments: dict[tuple[Any, ...], _Fragments] = {}
        self._hosts: dict[bytes, str] = {}

    def decode(self, at: float, frame: bytes) -> list[SipPacket]:
        """The SIP messages this frame completes (none, one, or several over TCP)."""
        self.counts.packets += 1
        packets: list[SipPacket] = []
        try:
            carried_sip = self._network(at, _network_layer(self.link_type, frame), packets)
        except (IndexError, struct.error):  # a header shorter than it says
            carried_sip = False
        if not carried_sip:
            self.counts.not_sip += 1
        return packets

    def finish(self, at: float) -> list[SipPacket]:
        """The capture is over at ``at``: messages still waiting behind bytes it missed are
        let out (stamped ``at``); one still half-received is counted malformed."""
        packets: list[SipPacket] = []
        for key, stream in self._streams.items():
            stream.flush(at)
            self._collect(at, key, stream, packets)
            if stream.framer.buffered:
                self.counts.malformed += 1
        self._streams.clear()
        return packets

    # -- IP ------------------------------------------------------------------------------------
    def _network(self, at: float, data: bytes | None, packets: list[SipPacket]) -> bool:
        if not data:
            return False
        version = data[0] >> 4
        if version == 4 and len(data) >= 20:
            header = (data[0] & 0x0F) * 4
            total = int.from_bytes(data[2:4]) or len(data)  # 0: segmentation offload
            if total > len(data):
                self.counts.snapped += 1
                return False
            protocol, source, destination = data[9], data[12:16], data[16:20]
            payload = data[header:total]
            flags_offset = int.from_bytes(data[6:8])
            offset, more = (flags_offset & 0x1FFF) * 8, bool(flags_offset & 0x2000)
            if offset or more:
                key = (4, source, destination, data[4:6], protocol)
                reassembled = self._reassemble(key, offset, more, payload)
                if reassembled is None:
                    return True  # a fragment, kept for the rest
                payload = reassembled
        elif version == 6 and len(data) >= 40:
            length = int.from_bytes(data[4:6])
            if 40 + length > len(data):
                self.counts.snapped += 1
                return False
            protocol, source, destination = data[6], data[8:24], data[24:40]
            payload = data[40 : 40 + length] if length else data[40:]  # 0: a jumbogram
            while protocol in _IPV6_SKIPPABLE or protocol == _IPV6_AH:
                size = (payload[1] + 2) * 4 if protocol == _IPV6_AH else (payload[1] + 1) * 8
                protocol, payload = payload[0], payload[size:]
            if protocol == _IPV6_FRAGMENT:
                flags_offset = int.from_bytes(payload[2:4])
                key = (6, source, destination, payload[4:8], payload[0])
                reassembled = self._reassemble(
                    key, flags_offset & 0xFFF8, bool(flags_offset & 1), payload[8:]
                )
                if reassembled is None:
                    return True
                protocol, payload = payload[0], reassembled
        else:
            return False
        if protocol == _UDP:
            return self._udp(at, source, destination, payload, packets)
        if protocol == _TCP:
            return self._tcp(at, source, destination, payload, packets)
        return False

    def _reassemble(self, key: tuple[Any, ...], offset: int, more: bool, piece: bytes) -> bytes | None:
        fragments = self._fragments.get(key)
        if fragments is None:
            if len(self._fragments) >= MAX_FRAGMENTED:
                del self._fragments[next(iter(self._fragments))]  # the oldest never completed
            fragments = self._fragments[key] = _Fragments()
        whole = fragments.add(offset, more, piece)
        if whole is not None:
            del self._fragments[key]
        return whole

    def _address(self, transport: str, host: bytes, port: int) -> Address:
        text = self._hosts.get(host)
        if text is None:
            if len(self._hosts) > 100_000:
                self._hosts.clear()
            text = self._hosts[host] = str(ipaddress.ip_address(host))
        return Address(transport, text, port)

    # -- UDP and TCP -----------------------------------------------------------------------------
    def _udp(
        self, at: float, source: bytes, destination: bytes, segment: bytes, packets: list[SipPacket]
    ) -> bool:
        payload = segment[8 : max(8, int.from_bytes(segment[4:6]))]
        if not starts_with_sip(payload):
            return False
        try:
            message = parse_message(payload)
        except ParseError:
            self.counts.malformed += 1
            return True
        self.counts.udp_messages += 1
        from_port, to_port = int.from_bytes(segment[0:2]), int.from_bytes(segment[2:4])
        key = (self._address("udp", source, from_port), self._address("udp", destination, to_port))
        self._emit(at, key, message, packets)
        return True

    def _tcp(
        self, at: float, source: bytes, destination: bytes, segment: bytes, packets: list[SipPacket]
    ) -> bool:
        from_port, to_port = int.from_bytes(segment[0:2]), int.from_bytes(segment[2:4])
        sequence = int.from_bytes(segment[4:8])
        flags = segment[13]
        payload = segment[(segment[12] >> 4) * 4 :]
        key = (self._address("tcp", source, from_port), self._address("tcp", destination, to_port))
        stream = self._streams.get(key)
        if flags & _TCP_SYN:  # a new connection: its data starts one past the SYN's number
            stream = self._new_stream(key)
            sequence = stream.next_sequence = (sequence + 1) % 2**32
        if stream is None:
            if not starts_with_sip(payload):
                return False
            stream = self._new_stream(key)
        carried = stream.receive(at, sequence, payload)
        self._collect(at, key, stream, packets)
        if flags & (_TCP_FIN | _TCP_RST) and not stream.waiting:
            self._streams.pop(key, None)
        return carried

    def _collect(
        self, at: float, key: tuple[Address, Address], stream: _TcpStream, packets: list[SipPacket]
    ) -> None:
        """The messages a stream has cut since last asked."""
        self.counts.tcp_gaps += stream.take_gaps()
        for frame in stream.take_frames():
            if frame is None:
                self.counts.malformed += 1  # the framing broke: the stream waits for a start line
                continue
            try:
                message = parse_message(frame, stream=True)
            except ParseError:
                self.counts.malformed += 1
                continue
            self.counts.tcp_messages += 1
            self._emit(at, key, message, packets)

    def _new_stream(self, key: tuple[Address, Address]) -> _TcpStream:
        self._streams.pop(key, None)
        if len(self._streams) >= MAX_STREAMS:
            del self._streams[next(iter(self._streams))]
        stream = self._streams[key] = _TcpStream()
        return stream

    def _emit(
        self, at: float, key: tuple[Address, Address], message: Request | Response, packets: list[SipPacket]
    ) -> None:
        self.counts.messages += 1
        packets.append(SipPacket(at=at, source=key[0], destination=key[1], message=message))


def _network_layer(link_type: int, frame: bytes) -> bytes | None:
    """The IP packet inside a frame, or None when it carries something else."""
    if link_type == ETHERNET:
        offset, ethertype = 14, int.from_bytes(frame[12:14])
        while ethertype in _VLAN_TAGS:
            ethertype = int.from_bytes(frame[offset + 2 : offset + 4])
            offset += 4
        return frame[offset:] if ethertype in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6) else None
    if link_type in _COOKED:
        size, protocol_at = _COOKED[link_type]
        protocol = int.from_bytes(frame[protocol_at : protocol_at + 2])
        return frame[size:] if protocol in (_ETHERTYPE_IPV4, _ETHERTYPE_IPV6) else None
    return frame[_BARE[link_type] :]


def starts_with_sip(payload: bytes) -> bool:
    """Whether bytes begin (after keep-alive CRLFs) with a SIP request or status line."""
    start = 0
    while payload.startswith(b"\r\n", start):
        start += 2
    end = payload.find(b"\r\n", start, start + _START_LINE_SCAN)
    if end <= start:
        return False
    line = payload[start:end]
    match = STATUS_LINE.fullmatch(line) if line[:4].upper() == b"SIP/" else REQUEST_LINE.fullmatch(line)
    return match is not None


class _Fragments:
    """The pieces of one fragmented IP datagram."""

    __slots__ = ("pieces", "total")

    def __init__(self) -> None:
        self.pieces: dict[int, bytes] = {}
        self.total: int | None = None  # known from the last fragment

    def add(self, offset: int, more: bool, piece: bytes) -> bytes | None:
        self.pieces[offset] = piece
        if not more:
            self.total = offset + len(piece)
        if self.total is None:
            return None
        whole = bytearray()
        for start in sorted(self.pieces):
            if start > len(whole):
                return None  # a hole: still missing a fragment
            whole[start:] = self.pieces[start]  # (a duplicate or overlap rewrites the same bytes)
        return bytes(whole[: self.total]) if len(whole) >= self.total else None


class _TcpStream:
    """One direction of a TCP connection: its bytes in sequence order, cut into messages.

    ``next_sequence`` is the sequence number of the next byte the framer wants; None
    until the stream is synchronised (a SYN seen, or a segment that starts a message).
    """

    def __init__(self) -> None:
        self.next_sequence: int | None = None
        self.framer = StreamFramer()
        self.waiting: dict[int, bytes] = {}  # out-of-order segments by sequence number
        self._waiting_bytes = 0
        self._frames: list[bytes | None] = []  # None marks where the framing broke
        self._gaps = 0
        self._gap_since: float | None = None  # when the first segment past a missing one came

    def receive(self, at: float, sequence: int, payload: bytes) -> bool:
        """Add one segment captured at ``at``; whether it carried bytes of this SIP stream."""
        if not payload:
            return False
        if self.next_sequence is None:
            if not starts_with_sip(payload):
                return False
            self.next_sequence = sequence
        ahead = _sequence_distance(self.next_sequence, sequence)
        if ahead > 0:
            if len(payload) > len(self.waiting.get(sequence, b"")):
                self._waiting_bytes += len(payload) - len(self.waiting.get(sequence, b""))
                self.waiting[sequence] = payload
        else:
            self._deliver(payload[-ahead:])
            self._drain_waiting()
        if not self.waiting:
            self._gap_since = None
        elif self._gap_since is None:
            self._gap_since = at
        elif self._waiting_bytes > MAX_OUT_OF_ORDER or at - self._gap_since > GAP_PATIENCE:
            self._skip_gap(at)
        return True

    def flush(self, at: float) -> None:
        """The capture is over: no missing segment will come now."""
        if self.waiting:
            self._skip_gap(at, every=True)

    def take_frames(self) -> list[bytes | None]:
        frames, self._frames = self._frames, []
        return frames

    def take_gaps(self) -> int:
        gaps, self._gaps = self._gaps, 0
        return gaps

    def _deliver(self, data: bytes) -> None:
        if not data or self.next_sequence is None:
            return  # all of it seen before: a retransmission
        self.next_sequence = (self.next_sequence + len(data)) % 2**32
        try:
            frames = self.framer.feed(data)
        except ParseError:
            self._frames.append(None)
            self._resynchronise()
            return
        self._frames += [frame for frame in frames if not isinstance(frame, KeepAlivePing)]

    def _drain_waiting(self) -> None:
        while self.waiting and self.next_sequence is not None:
            ready = [seq for seq in self.waiting if _sequence_distance(self.next_sequence, seq) <= 0]
            if not ready:
                return
            for sequence in ready:
                payload = self.waiting.pop(sequence)
                self._waiting_bytes -= len(payload)
                if self.next_sequence is not None:
                    self._deliver(payload[-_sequence_distance(self.next_sequence, sequence) :])

    def _skip_gap(self, at: float, *, every: bool = False) -> None:
        """Bytes the capture missed: give them up, and go on from the next message start.
        The segments that waited are taken in sequence order, in one pass (no re-entry:
        a capture of many small segments between holes once recursed, and took quadratic
        time): past the first hole, a later one is given up too while more than
        MAX_OUT_OF_ORDER bytes would still wait behind it (or ``every``: the capture is
        over), else what is left waits again."""
        assert self.next_sequence is not None
        base = self.next_sequence
        pending = sorted(self.waiting.items(), key=lambda item: _sequence_distance(base, item[0]))
        behind = self._waiting_bytes  # bytes of this segment and the ones after it
        self.waiting.clear()
        self._waiting_bytes = 0
        self._gap_since = None
        first = True
        for sequence, payload in pending:
            hole = self.next_sequence is not None and _sequence_distance(self.next_sequence, sequence) > 0
            if hole and not self.waiting and (first or every or behind > MAX_OUT_OF_ORDER):
                assert self.next_sequence is not None
                self._gaps += _sequence_distance(self.next_sequence, sequence)
                if self.framer.buffered:
                    self._frames.append(None)  # the message the gap cut through
                self._resynchronise()
            first = False
            behind -= len(payload)
            if self.next_sequence is None:
                if not starts_with_sip(payload):
                    continue  # not where a message starts: given up as well
                self.next_sequence = sequence
            ahead = _sequence_distance(self.next_sequence, sequence)
            if ahead > 0:
                self.waiting[sequence] = payload
                self._waiting_bytes += len(payload)
            else:
                self._deliver(payload[-ahead:])
        if self.waiting:
            self._gap_since = at

    def _resynchronise(self) -> None:
        self.framer = StreamFramer()
        self.next_sequence = None


def _sequence_distance(base: int, sequence: int) -> int:
    """How far ``sequence`` is past ``base`` (negative: before it), modulo 2**32."""
    return (sequence - base + 2**31) % 2**32 - 2**31
