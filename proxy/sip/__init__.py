"""sipguard's sans-I/O SIP message layer: bytes in, parsed messages and edited bytes out.

Nothing in this package reads a clock, opens a socket or touches asyncio; tests check
its imports. Installed, it is compiled to C by mypyc (setup.py); ``COMPILED`` says
whether this process runs those extension modules or the .py sources.
"""

from .editor import MessageEditor
from .errors import ParseError, SipError
from .framing import FramingLostError, KeepAlivePing, StreamFramer
from .headers import CSeq, NameAddr, Params, Via
from .message import HeaderField, Message, Request, Response, parse_message
from .uri import OpaqueUri, SipUri, TelUri, Uri, parse_uri

COMPILED = not __file__.endswith(".py")

__all__ = [
    "COMPILED", "CSeq", "FramingLostError", "HeaderField", "KeepAlivePing", "Message", "MessageEditor",
    "NameAddr",
    "OpaqueUri", "Params", "ParseError", "Request", "Response", "SipError", "SipUri",
    "StreamFramer", "TelUri", "Uri", "Via", "parse_message", "parse_uri",
]  # fmt: skip
