"""Typed header values: Via, name-addr headers, CSeq and the numeric scalars.

Strategy: the message keeps headers as byte spans (message.py); these functions turn
one header value, already unfolded and decoded, into a frozen value object, or raise
ParseError(400). Lists (Via, Contact, Route, Record-Route, the identity headers) are
split on commas outside quoted strings and angle brackets first (RFC 3261 §7.3.1).
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from . import abnf
from .errors import ParseError
from .memo import Memo
from .uri import Uri, check_ipv6_address, parse_port, parse_uri

MAX_UINT32 = 2**32 - 1
_IRREGULAR_SPELLINGS = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "p-asserted-identity": "P-Asserted-Identity",
    "p-preferred-identity": "P-Preferred-Identity",
    "remote-party-id": "Remote-Party-ID",
    "mime-version": "MIME-Version",
    "min-se": "Min-SE",
}
_SPELLING_CACHE: dict[str, bytes] = {}


def header_name_bytes(name: str) -> bytes:
    """The conventional spelling of a lower-case header name, for lines sipguard writes."""
    spelled = _SPELLING_CACHE.get(name)
    if spelled is None:
        text = _IRREGULAR_SPELLINGS.get(name) or "-".join(part.capitalize() for part in name.split("-"))
        spelled = text.encode("ascii")
        if len(_SPELLING_CACHE) < 256:  # names come from our code, but stay bounded anyway
            _SPELLING_CACHE[name] = spelled
    return spelled


Params = dict[str, str | None]
"""Header parameters: lower-case names in message order; a flag parameter maps to None."""


class Via(NamedTuple):
    """One Via value (RFC 3261 §20.42, RFC 3581 rport)."""

    transport: str
    host: str
    is_ipv6: bool
    port: int | None
    params: Params

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        value = self.params.get("received")
        # RFC 5118 §4.5: tolerate a bracketed IPv6 received value.
        return value[1:-1] if value and value.startswith("[") else value

    @property
    def rport(self) -> int | None:
        """The rport value filled in by a server; None when absent or still empty."""
        value = self.params.get("rport")
        return int(value) if value else None

    @property
    def wants_rport(self) -> bool:
        return "rport" in self.params

    @property
    def maddr(self) -> str | None:
        return self.params.get("maddr")

    @property
    def ttl(self) -> int | None:
        value = self.params.get("ttl")
        return None if value is None else int(value)

    @property
    def sent_by(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return host if self.port is None else f"{host}:{self.port}"


class NameAddr(NamedTuple):
    """From, To, Contact, Route, Record-Route and the identity headers (RFC 3261 §20.10)."""

    display_name: str | None
    uri: Uri
    params: Params

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")


class CSeq(NamedTuple):
    seq: int
    method: str


def split_values(value: str) -> list[str]:
    """Split a header value on commas outside quoted strings and <...>."""
    if '"' not in value and "<" not in value:
        return [part.strip() for part in value.split(",")]
    parts: list[str] = []
    start = 0
    quoted = angled = False
    i = 0
    length = len(value)
    while i < length:
        char = value[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == "<":
            angled = True
        elif char == ">":
            angled = False
        elif char == "," and not angled:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    if quoted:
        raise ParseError(400, "Unterminated quoted string")
    parts.append(value[start:].strip())
    return parts


def parse_params(text: str) -> Params:
    """Parse ``;name[=value]`` pairs after a header value, allowing LWS around ; and =."""
    if not text or text.isspace():
        return {}
    if not text.lstrip().startswith(";"):
        raise ParseError(400, f"Unexpected text {text[:40]!r} before parameters")
    params: Params = {}
    for piece in split_outside_quotes(text.lstrip()[1:], ";"):
        name, eq, value = piece.partition("=")
        name = name.strip()
        if not abnf.TOKEN_RE.fullmatch(name):
            raise ParseError(400, f"Empty or malformed parameter {piece[:40]!r}")
        if eq:
            value = value.strip()
            if not value:
                raise ParseError(400, f"Parameter {name!r} has an empty value")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def split_outside_quotes(text: str, separator: str) -> list[str]:
    if '"' not in text:
        return text.split(separator)
    parts: list[str] = []
    start = 0
    quoted = False
    i = 0
    while i < len(text):
        char = text[i]
        if quoted and char == "\\":
            i += 1
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quoted:
        raise ParseError(400, "Unterminated quoted string")
    parts.append(text[start:])
    return parts


def _parse_via(value: str) -> Via:
    match = abnf.VIA.fullmatch(value)
    if match is None:
        raise ParseError(400, f"Malformed Via {value[:80]!r}")
    protocol, version, transport, host, port, params = match.group(
        "protocol", "version", "transport", "host", "port", "params"
    )
    if protocol.upper() != "SIP" or version != "2.0":
        raise ParseError(505, "Version Not Supported")
    is_ipv6 = host.startswith("[")
    if is_ipv6:
        host = host[1:-1]
        check_ipv6_address(host)
    parsed_params = parse_params(params or "")
    # RFC 3581 rport = port; RFC 3261 §20.42 ttl = 0 to 255. ASCII digits only: str.isdigit
    # also accepts "²", which int() then refuses.
    for name, maximum in (("rport", 65535), ("ttl", 255)):
        number = parsed_params.get(name)
        if number is not None and bounded_int(number, maximum) is None:
            raise ParseError(400, f"Via {name} is not a number from 0 to {maximum}")
    # Responses are routed by these (§18.2.2): an address, and a host, nothing else.
    received = parsed_params.get("received")
    if received is not None and not _is_via_received(received):
        raise ParseError(400, "Via received is not an IP address")
    maddr = parsed_params.get("maddr")
    if maddr is not None and not _is_host(maddr):
        raise ParseError(400, "Via maddr is not a host")
    return Via(transport.upper(), host, is_ipv6, None if port is None else parse_port(port), parsed_params)


def _is_via_received(value: str) -> bool:
    """§20.42: received = IPv4address / IPv6address; RFC 5118 §4.5 tolerates [brackets].
    No IPv6 zone (``%eth0``): it means nothing to another host and sockets refuse it."""
    address = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if "%" in address:
        return False
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


def _is_host(value: str) -> bool:
    """§25.1: host = hostname / IPv4address / IPv6reference."""
    if not abnf.HOST_RE.fullmatch(value):
        return False
    if value.startswith("["):
        try:
            ipaddress.IPv6Address(value[1:-1])
        except ValueError:
            return False
    return True


def _parse_name_addr(value: str) -> NameAddr:
    """``[display-name] <URI> *(;param)`` or ``URI *(;param)`` (RFC 3261 §20.10)."""
    text = value.strip()
    display_name: str | None = None
    if text.startswith('"'):
        display_name, text = _quoted_string(text)
        text = text.lstrip()
        if not text.startswith("<"):
            raise ParseError(400, "Display name without <URI>")
    if text.startswith("<") or "<" in text:
        open_at = text.find("<")
        if display_name is None:
            token_name = text[:open_at].strip()
            if not abnf.TOKEN_DISPLAY_NAME.fullmatch(token_name):
                raise ParseError(400, f"Unquoted display name {token_name[:40]!r} is not tokens")
            display_name = " ".join(token_name.split()) or None
        close_at = text.find(">", open_at)
        if close_at < 0:
            raise ParseError(400, "Missing '>'")
        uri_text = text[open_at + 1 : close_at]
        params_text = text[close_at + 1 :]
    else:
        # addr-spec form: parameters belong to the header, and the URI may not hold
        # ',', '?' or ';' (RFC 3261 §20: those force the <> form).
        uri_text, _, rest = text.partition(";")
        uri_text = uri_text.rstrip(" \t")  # SEMI = SWS ";" SWS (RFC 3261 §25.1; RFC 4475 §3.1.1.1)
        params_text = ";" + rest if _ else ""
        if "?" in uri_text:
            raise ParseError(400, "URI with headers must be enclosed in <>")
    if not uri_text or uri_text != uri_text.strip() or " " in uri_text:
        raise ParseError(400, f"Malformed URI {uri_text[:80]!r}")
    return NameAddr(display_name, parse_uri(uri_text), parse_params(params_text))


# Parsed values are shared between messages (proxy/sip/memo.py): never modify one.
parse_via = Memo(_parse_via)
parse_name_addr = Memo(_parse_name_addr)


def _quoted_string(text: str) -> tuple[str, str]:
    """Decode a leading quoted-string; return (its content, the text after it)."""
    end = text.find('"', 1)
    if end > 0 and text.find("\\", 1, end) < 0:  # no quoted-pair: the common case, two slices
        return text[1:end], text[end + 1 :]
    chars: list[str] = []
    i = 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            chars.append(text[i + 1])
            i += 2
            continue
        if char == '"':
            return "".join(chars), text[i + 1 :]
        chars.append(char)
        i += 1
    raise ParseError(400, "Unterminated quoted string")


def credential_params(value: str) -> list[tuple[str, str]]:
    """The auth-params of one Authorization or Proxy-Authorization value (RFC 3261 §25.1
    credentials, RFC 7616): (lower-case name, value unquoted), every one in message order,
    a repeated name as often as it was sent. Each name is read whole, so ``xusername=``
    is not ``username=``, and a text inside a quoted value is no parameter of its own."""
    scheme_and_params = value.split(None, 1)  # LWS after the scheme may be a tab, or a fold
    found: list[tuple[str, str]] = []
    if len(scheme_and_params) < 2:
        return found
    for piece in split_values(scheme_and_params[1]):
        name, _, text = piece.partition("=")
        words = name.split()  # "Digest username" when a second credentials hides in the list
        text = text.strip()
        if text.startswith('"'):
            text = _quoted_string(text)[0]
        found.append((words[-1].lower() if words else "", text))
    return found


def parse_cseq(value: str) -> CSeq:
    match = abnf.CSEQ.fullmatch(value)
    if match is None:
        raise ParseError(400, f"Malformed CSeq {value[:40]!r}")
    seq = bounded_int(match.group(1), MAX_UINT32)
    if seq is None:
        raise ParseError(400, "CSeq number too large")
    return CSeq(seq, match.group(2))


def parse_uint(value: str, name: str, maximum: int = MAX_UINT32) -> int:
    match = abnf.DIGITS.fullmatch(value)
    if match is None:
        raise ParseError(400, f"Malformed {name} {value[:40]!r}")
    number = bounded_int(match.group(1), maximum)
    if number is None:
        raise ParseError(400, f"{name} out of range")
    return number


def bounded_int(digits: str, maximum: int) -> int | None:
    """ASCII ``digits`` as an int, or None when they are not all 0-9 or exceed ``maximum``.

    The length is checked before converting: int() of a long digit string takes quadratic
    time, and past 4300 digits raises ValueError (CPython's int_max_str_digits).
    """
    if not (digits.isascii() and digits.isdigit()):
        return None
    significant = digits.lstrip("0")
    if len(significant) > len(str(maximum)):
        return None
    number = int(significant or "0")
    return number if number <= maximum else None
