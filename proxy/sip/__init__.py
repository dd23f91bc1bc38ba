"""sipguard's sans-I/O SIP message layer: bytes in, parsed messages and edited bytes out.

Nothing in this package reads a clock, opens a socket or touches asyncio; tests check
its imports.
"""

from .editor import MessageEditor
from .errors import ParseError, SipError
from .framing import KeepAlivePing, StreamFramer
from .headers import CSeq, NameAddr, Params, Via
from .message import HeaderField, Message, Request, Response, parse_message
from .uri import OpaqueUri, SipUri, TelUri, Uri, parse_uri

__all__ = [
    "CSeq", "HeaderField", "KeepAlivePing", "Message", "MessageEditor", "NameAddr",
    "OpaqueUri", "Params", "ParseError", "Request", "Response", "SipError", "SipUri",
    "StreamFramer", "TelUri", "Uri", "Via", "parse_message", "parse_uri",
]  # fmt: skip
