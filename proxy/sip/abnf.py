"""SIP grammar as named regular-expression fragments (RFC 3261 §25.1 unless noted).

Deliberate leniencies, each tested in tests/test_corpus.py:
- header names may be followed by whitespace before the colon (RFC 3261 §7.3.1 allows
  LWS there: ``HCOLON = *( SP / HTAB ) ":" SWS``);
- the SIP version is compared case-insensitively (§7.1);
- a Via ``received`` value may be a bracketed IPv6 reference (RFC 5118 §4.5);
- hostnames are letters, digits, ``-`` and ``.`` without label-by-label checks.
"""

from __future__ import annotations

import re

# §25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
# §25.1 / RFC 3986: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
SCHEME = r"[A-Za-z][A-Za-z0-9+\-.]*"
# Runs of plain characters use possessive quantifiers (++, Python 3.11): matching a run
# in one piece is faster than char by char, and a possessive run cannot backtrack into
# exponentially many splits on hostile input.
# §25.1: escaped = "%" HEXDIG HEXDIG
ESCAPED = r"%[0-9A-Fa-f]{2}"
# §25.1: unreserved = alphanum / mark; mark = "-" / "_" / "." / "!" / "~" / "*" / "'" / "(" / ")"
UNRESERVED = r"A-Za-z0-9\-_.!~*'()"
# §25.1: user = 1*( unreserved / escaped / user-unreserved ); user-unreserved = & = + $ , ; ? /
USER = rf"(?:[{UNRESERVED}&=+$,;?/]++|{ESCAPED})+"
# §25.1: password = *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
PASSWORD = rf"(?:[{UNRESERVED}&=+$,]++|{ESCAPED})*"
# §25.1: IPv6reference = "[" IPv6address "]" (the address itself is checked by ipaddress)
IPV6_REFERENCE = r"\[[0-9A-Fa-f:.]+\]"
HOSTNAME_OR_IPV4 = r"[A-Za-z0-9\-.]+"
HOST = rf"(?:{IPV6_REFERENCE}|{HOSTNAME_OR_IPV4})"
# §25.1: uri-parameters = *( ";" uri-parameter ); paramchar = param-unreserved / unreserved / escaped
PARAMCHARS = rf"(?:[{UNRESERVED}\[\]/:&+$]++|{ESCAPED})+"
URI_PARAMETERS = rf"(?:;{PARAMCHARS}(?:=(?:{PARAMCHARS})?)?)*"
# §25.1: headers = "?" header *( "&" header ); hnv-unreserved = [ ] / ? : + $
HNVCHARS = rf"(?:[{UNRESERVED}\[\]/?:+$]++|{ESCAPED})*"
URI_HEADERS = rf"{HNVCHARS}={HNVCHARS}(?:&{HNVCHARS}={HNVCHARS})*"

# §19.1.1: SIP-URI = "sip:" [ userinfo ] hostport uri-parameters [ headers ] (after the scheme)
SIP_URI_REST = re.compile(
    rf"(?:(?P<user>{USER})(?::(?P<password>{PASSWORD}))?@)?"
    rf"(?P<host>{HOST})(?::(?P<port>[0-9]{{1,5}}))?"
    rf"(?P<params>{URI_PARAMETERS})"
    rf"(?:\?(?P<headers>{URI_HEADERS}))?"
)
# RFC 3966 §3: telephone-subscriber = global-number / local-number, then ;par
TEL_URI_REST = re.compile(r"(?P<number>[0-9A-Fa-f*#+\-.()]+)(?P<params>(?:;[^;]+)*)")

# §7.1: Request-Line = Method SP Request-URI SP SIP-Version CRLF (exactly one SP each)
REQUEST_LINE = re.compile(rb"(" + TOKEN.encode() + rb") ([\x21-\x7e]+) ([Ss][Ii][Pp]/[0-9]+\.[0-9]+)")
# §7.2: Status-Line = SIP-Version SP Status-Code SP Reason-Phrase CRLF (reason may be empty)
STATUS_LINE = re.compile(rb"([Ss][Ii][Pp]/[0-9]+\.[0-9]+) ([1-6][0-9][0-9]) ([^\x00-\x08\x0a-\x1f\x7f]*)")
SIP_VERSION_2_0 = b"SIP/2.0"

HEADER_NAME = re.compile(rb"[A-Za-z0-9\-.!%*_+`'~]+")

# §25.1: WSP = SP / HTAB. Values reach these patterns unfolded (a line fold becomes one SP),
# so SP and HTAB are the only whitespace left. A str-pattern \s would also take U+00A0 and
# the like, letting "CSeq: 1<NBSP>INVITE" pass as a CSeq a downstream parser reads otherwise.
WSP = r"[ \t]"

TOKEN_RE = re.compile(TOKEN)
HOST_RE = re.compile(HOST)
SCHEME_RE = re.compile(SCHEME)
# §20.16: CSeq = "CSeq" HCOLON 1*DIGIT LWS Method
CSEQ = re.compile(rf"{WSP}*([0-9]+){WSP}+({TOKEN}){WSP}*")
DIGITS = re.compile(rf"{WSP}*([0-9]+){WSP}*")
# §20.42: via-parm = sent-protocol LWS sent-by *( SEMI via-params ); SLASH = SWS "/" SWS
VIA = re.compile(
    rf"{WSP}*(?P<protocol>{TOKEN}){WSP}*/{WSP}*(?P<version>{TOKEN}){WSP}*/{WSP}*(?P<transport>{TOKEN})"
    rf"{WSP}+(?P<host>{HOST})(?:{WSP}*:{WSP}*(?P<port>[0-9]{{1,5}}))?{WSP}*(?P<params>;.*)?",
    re.DOTALL,
)
# §25.1: display-name = *(token LWS) / quoted-string
TOKEN_DISPLAY_NAME = re.compile(rf"(?:{TOKEN}(?:{WSP}+{TOKEN})*)?")
