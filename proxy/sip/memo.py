"""A bounded memo for the parsers of header values.

The same header text recurs: a call's From, To and Route repeat in every request of the
dialog and are echoed in every response, and under load the same Request-URIs and Vias
recur from call to call. Parsing one of them costs microseconds (regexes, a URI, a
params dict); finding it in a dict costs a hash of a short string. What the parsers
return is never modified (sipguard edits messages as bytes, proxy/sip/editor.py), so one
parsed value can serve every message that carries the same text.

Bounded twice, so that no input can grow it: values longer than ``MAX_TEXT`` are parsed
each time (long ones are rare, and would make entries large), and a full memo is
emptied and refilled by the traffic that follows. Text that fails to parse raises each
time and is never stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

MAX_ENTRIES = 4096
MAX_TEXT = 256

_Parsed = TypeVar("_Parsed")


class Memo(Generic[_Parsed]):
    def __init__(self, parse: Callable[[str], _Parsed]) -> None:
        self._parse = parse
        self._known: dict[str, _Parsed] = {}

    def __call__(self, text: str) -> _Parsed:
        parsed = self._known.get(text)
        if parsed is None:
            parsed = self._parse(text)
            if len(text) <= MAX_TEXT:
                if len(self._known) >= MAX_ENTRIES:
                    self._known.clear()
                self._known[text] = parsed
        return parsed
