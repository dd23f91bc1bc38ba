"""Telephone numbers: extracting them from URIs, E.164 normalisation, owned-number sets.

Strategy: phonenumbers does the normalisation (~30 µs a number), so results are cached
per (text, region) in a bounded LRU; a busy proxy sees the same few thousand callers
again and again. Owned numbers are compiled once at policy load into a set of exact
numbers, a set of prefixes and a sorted list of ranges, so a lookup is a few dict hits
and one bisect, whatever the size of the list.

A caller the cache has not seen yet is the costly case, and on a carrier it is the
usual one. ``NumberSet.lists`` answers it for the legitimate caller: text already
written in E.164 that equals an owned number, or falls in an owned range, is that
number. It needs no phonenumbers: the operator assigned it, which is stronger evidence
that it exists than the library's metadata, and the set's entries were normalised at
load, so the text cannot be a second spelling of another number (see ``lists``).
Prefixes do not count: ``+44*`` would also match ``+4402...``, which phonenumbers
spells ``+442...``, and the two spellings must share one per-number counter.
"""

from __future__ import annotations

import bisect
import heapq
import re
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers

from proxy.sip.uri import OpaqueUri, SipUri, TelUri, Uri

# RFC 3966 §5.1.1 visual separators; RFC 4904 ;tgrp= and ;trunk-context= ride in the user part
_VISUAL_SEPARATORS = re.compile(r"[\-.()\s]")
_DIALLABLE = re.compile(r"\+?[0-9]+")
_DIGIT = re.compile(r"[0-9]")
_WHITESPACE = re.compile(r"\s")  # in a URI only %-escaped, and no RFC 3966 separator
_GLOBAL_DIGITS = re.compile(r"\+[0-9]+")  # RFC 3966 global-number-digits, separators dropped
_RANGE = re.compile(r"(\+?[0-9]+)-(\+?[0-9]+)")
_E164_TEXT = re.compile(r"\+[1-9][0-9]{1,14}")  # ITU-T E.164: at most 15 digits, no leading 0
ANONYMOUS_USERS = frozenset({"anonymous", "restricted", "unavailable", "unknown", "private"})


@dataclass(frozen=True, slots=True)
class Normalised:
    """A presented number: ``e164`` when it is a real number, else ``problem`` says why not."""

    presented: str
    e164: str | None
    problem: str | None = None


def dialled_digits(uri: Uri) -> str | None:
    """The number a URI carries, without separators or parameters; None if it carries none.

    sip/sips: the user part when ``user=phone`` or when it is numeric; tel: the number.
    A local number in a global ``;phone-context=`` (RFC 3966 §5.1.5) dials that context's
    digits first: ``tel:555-0100;phone-context=+1-415`` is +14155550100, and
    ``tel:4155550100;phone-context=+49`` is a German number, not a US one.
    """
    written = _written_number(uri)
    if written is None:
        return None
    digits, context = written
    return digits if context is None else context + digits


def caller_digits(uri: Uri) -> str | None:
    """``dialled_digits`` for a caller ID, which must mean one number to every reader: None
    for a number written with whitespace in it. A PBX or carrier may end the number there,
    so ``sip:+4930123456%207@...`` is +4930123456 to it, and +49301234567 without the space.
    (A callee keeps the lenient reading: there, reading a number is the stricter choice.)"""
    if isinstance(uri, SipUri) and uri.user is not None and _WHITESPACE.search(uri.user):
        return None
    return dialled_digits(uri)


def digits_outside_context(uri: Uri) -> str | None:
    """A local number's digits without the global ``;phone-context=`` that ``dialled_digits``
    puts before them; None for any other URI. A PBX that ignores the context (Asterisk
    reads a tel: URI's number alone) takes them for a national number of its own region:
    ``tel:2079460142;phone-context=+44`` is London, or Maine."""
    written = _written_number(uri)
    return None if written is None or written[1] is None else written[0]


def _written_number(uri: Uri) -> tuple[str, str | None] | None:
    """The number as written, and the global phone-context of a local one (None for a
    global number, no context or a domain's)."""
    if isinstance(uri, TelUri):
        text, context = uri.number, uri.params.get("phone-context")
    elif isinstance(uri, SipUri) and uri.user is not None:
        # RFC 4904 and RFC 3966 parameters ride inside the user part
        text, _, user_params = uri.user.partition(";")
        context = _user_param(user_params, "phone-context") if user_params else None
    else:
        return None
    digits = _VISUAL_SEPARATORS.sub("", text)
    if not _DIALLABLE.fullmatch(digits):
        return None
    if not context or digits.startswith("+"):
        return digits, None
    context = _VISUAL_SEPARATORS.sub("", context)
    return digits, context if _GLOBAL_DIGITS.fullmatch(context) else None


def _user_text(uri: TelUri | SipUri) -> str | None:
    """A tel number or a sip user part, without its parameters."""
    return uri.number if isinstance(uri, TelUri) else uri.user and uri.user.partition(";")[0]


def _user_param(params: str, name: str) -> str | None:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.lower() == name:
            return value
    return None


def is_anonymous(uri: Uri, display_name: str | None) -> bool:
    """RFC 3323 anonymous identities: anonymous@anonymous.invalid and friends.

    A URI that carries a number is never anonymous, whatever its host or display name:
    the number is what a PBX would present, so it is checked like any other. Nor is one
    with junk around its digits (``+1415...%00``, ``415...x``): a PBX may drop the junk.
    """
    if isinstance(uri, TelUri | SipUri) and _DIGIT.search(_user_text(uri) or ""):
        return False
    if isinstance(uri, SipUri):
        if uri.host.lower() == "anonymous.invalid":
            return True
        if uri.user is not None and uri.user.lower() in ANONYMOUS_USERS:
            return True
    if isinstance(uri, OpaqueUri):
        return False
    return (display_name or "").strip().lower() in ANONYMOUS_USERS


def normalise(digits: str, region: str) -> Normalised:
    """``digits`` as E.164, using ``region`` for national forms. Cached."""
    return _normalise(digits, region.upper())


@lru_cache(maxsize=65536)
def _normalise(digits: str, region: str) -> Normalised:
    try:
        number = phonenumbers.parse(digits, None if digits.startswith("+") else region)
    except phonenumbers.NumberParseException:
        return Normalised(digits, None, "not a telephone number")
    if not phonenumbers.is_valid_number(number):
        return Normalised(digits, None, "number cannot exist")
    return Normalised(digits, phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def dialled_e164(uri: Uri, region: str | None) -> str | None:
    """The number a URI dials, in E.164 form whether phonenumbers calls it valid or not
    (an unallocated range, or one newer than its metadata); national and international
    forms are read in ``region``. None when the URI carries no number that can be read."""
    digits = dialled_digits(uri)
    return None if digits is None else _as_e164(digits, region)


@lru_cache(maxsize=16384)
def _as_e164(digits: str, region: str | None) -> str | None:
    try:
        number = phonenumbers.parse(digits, None if digits.startswith("+") else region)
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


class NumberSet:
    """Numbers an account owns: exact ``+14155559999``, prefix ``+1415555123*``,
    range ``+14155550100-+14155550199`` (inclusive, equal lengths)."""

    def __init__(self, specs: list[str], region: str) -> None:
        self.exact: set[str] = set()
        self.prefixes: set[str] = set()
        ranges: dict[int, list[tuple[int, int]]] = {}
        for spec in specs:
            self._add(spec, region, ranges)
        # merged and sorted per digit count, so a lookup is one bisect
        self.ranges: dict[int, tuple[list[int], list[int]]] = {
            digits: _merged(spans) for digits, spans in ranges.items()
        }
        self._prefix_lengths = sorted({len(prefix) for prefix in self.prefixes})

    def _add(self, spec: str, region: str, ranges: dict[int, list[tuple[int, int]]]) -> None:
        # a range is exactly two numbers of one length around a hyphen; other hyphens,
        # dots and parentheses are visual separators (+1-415-555-0100)
        as_range = _RANGE.fullmatch(spec.replace(" ", ""))
        if as_range and len(as_range[1].lstrip("+")) == len(as_range[2].lstrip("+")):
            low, high = self._e164(as_range[1], region), self._e164(as_range[2], region)
            if len(low) != len(high) or int(low[1:]) > int(high[1:]):
                raise ValueError(f"range {spec!r} must run low to high between numbers of equal length")
            ranges.setdefault(len(low) - 1, []).append((int(low[1:]), int(high[1:])))
            return
        spec = _VISUAL_SEPARATORS.sub("", spec)
        if "*" in spec[:-1]:  # phonenumbers would drop it and own the number without it
            raise ValueError(f"{spec!r}: * may only end a prefix (+1415555*)")
        if spec.endswith("*"):
            prefix = spec[:-1]
            if not re.fullmatch(r"\+[0-9]+", prefix):
                raise ValueError(f"prefix {spec!r} must be + and digits, then *")
            self.prefixes.add(prefix)
        else:
            self.exact.add(self._e164(spec, region))

    @staticmethod
    def _e164(text: str, region: str) -> str:
        result = normalise(text, region)
        if result.e164 is None:
            raise ValueError(f"{text!r}: {result.problem}")
        return result.e164

    def __contains__(self, e164: object) -> bool:
        if not isinstance(e164, str):
            return False
        if e164 in self.exact:
            return True
        for length in self._prefix_lengths:
            if e164[:length] in self.prefixes:
                return True
        return self._in_ranges(e164)

    def lists(self, text: str) -> bool:
        """``text`` is, as written, one of the exact numbers or in one of the ranges.

        Both were normalised at load, and a range runs between two real numbers of one
        length, so text inside it is written the way phonenumbers would write it.
        """
        return text in self.exact or (_E164_TEXT.fullmatch(text) is not None and self._in_ranges(text))

    def _in_ranges(self, e164: str) -> bool:
        spans = self.ranges.get(len(e164) - 1)
        if spans is None:
            return False
        starts, ends = spans
        value = int(e164[1:])
        at = bisect.bisect_right(starts, value) - 1
        return at >= 0 and value <= ends[at]

    def __len__(self) -> int:
        return len(self.exact) + sum(
            end - start + 1
            for starts, ends in self.ranges.values()
            for start, end in zip(starts, ends, strict=True)
        )

    def describe(self) -> str:
        range_count = sum(len(starts) for starts, _ in self.ranges.values())
        parts = [f"{len(self.exact)} numbers"] if self.exact else []
        parts += [f"{range_count} ranges"] if range_count else []
        parts += [f"{len(self.prefixes)} prefixes"] if self.prefixes else []
        return ", ".join(parts) or "none"

    def overlaps(self, other: NumberSet) -> list[str]:
        """What two sets both claim: for a load-time warning, not for the hot path."""
        found = sorted(
            {number for number in self.exact if number in other}
            | {number for number in other.exact if number in self}
        )
        for digits, (starts, ends) in self.ranges.items():
            other_spans = other.ranges.get(digits)
            if other_spans is None:
                continue
            for start, end in zip(starts, ends, strict=True):
                for other_start, other_end in zip(*other_spans, strict=True):
                    if start <= other_end and other_start <= end:
                        found.append(f"+{max(start, other_start)}-+{min(end, other_end)}")
        for prefix in self.prefixes:
            for other_prefix in other.prefixes:
                if prefix.startswith(other_prefix) or other_prefix.startswith(prefix):
                    found.append(f"{max(prefix, other_prefix, key=len)}*")
        found += _prefix_range_overlaps(self.prefixes, other.ranges)
        found += _prefix_range_overlaps(other.prefixes, self.ranges)
        return found


def overlapping_pairs(sets: dict[str, NumberSet]) -> list[tuple[str, str]]:
    """The pairs of named sets that share a number, each pair in name order, sorted.

    For the load-time warning about accounts owning the same numbers: a sweep over every
    set's numbers and ranges (and its prefixes as ranges, one per number length in use),
    per number length, so n accounts cost n log n, not the n² of ``overlaps`` on every pair.
    """
    spans: dict[int, list[tuple[int, int, str]]] = {}  # digits -> (first, last, name)
    for name, numbers in sets.items():
        for number in numbers.exact:
            spans.setdefault(len(number) - 1, []).append((int(number[1:]), int(number[1:]), name))
        for digits, (starts, ends) in numbers.ranges.items():
            spans.setdefault(digits, []).extend(
                (start, end, name) for start, end in zip(starts, ends, strict=True)
            )
    pairs: set[tuple[str, str]] = set()
    owners: dict[str, set[str]] = {}
    for name, numbers in sets.items():
        for prefix in numbers.prefixes:
            owners.setdefault(prefix, set()).add(name)
            head = prefix[1:]
            for digits, listed in spans.items():
                if len(head) <= digits:
                    scale = 10 ** (digits - len(head))
                    listed.append((int(head) * scale, (int(head) + 1) * scale - 1, name))
    for prefix, names in owners.items():  # +1415* and +1415555*: one starts with the other
        for length in range(2, len(prefix) + 1):
            for name in names:
                pairs.update(_pair(name, other) for other in owners.get(prefix[:length], ()) if other != name)
    for listed in spans.values():
        listed.sort()
        open_spans: list[tuple[int, str]] = []  # a heap of (last, name) still open at ``first``
        for first, last, name in listed:
            while open_spans and open_spans[0][0] < first:
                heapq.heappop(open_spans)
            pairs.update(_pair(name, other) for _, other in open_spans if other != name)
            heapq.heappush(open_spans, (last, name))
    return sorted(pairs)


def _pair(one: str, other: str) -> tuple[str, str]:
    return (one, other) if one < other else (other, one)


def _prefix_range_overlaps(prefixes: set[str], ranges: dict[int, tuple[list[int], list[int]]]) -> list[str]:
    """The parts of ranges whose numbers start with one of ``prefixes``."""
    found = []
    for prefix in prefixes:
        head = prefix[1:]
        for digits, (starts, ends) in ranges.items():
            if len(head) > digits:
                continue
            scale = 10 ** (digits - len(head))
            low, high = int(head) * scale, (int(head) + 1) * scale - 1
            for start, end in zip(starts, ends, strict=True):
                if start <= high and low <= end:
                    found.append(f"+{max(start, low)}-+{min(end, high)}")
    return found


def _merged(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(spans):
        if ends and start <= ends[-1] + 1:
            ends[-1] = max(ends[-1], end)
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


class EmergencyNumbers:
    """Emergency numbers, matched on what was dialled and on its national number."""

    def __init__(self, numbers: list[str]) -> None:
        self.numbers = frozenset(number.lstrip("+") for number in numbers)

    def matches(self, uri: Uri, region: str) -> bool:
        if isinstance(uri, OpaqueUri):
            return uri.scheme == "urn" and uri.opaque.lower().startswith("service:sos")  # RFC 5031
        written = _written_number(uri)
        if written is None:
            return False
        digits, context = written
        if digits.lstrip("+") in self.numbers:  # as dialled: 911;phone-context=+1-415 too
            return True
        if context is not None:
            digits = context + digits
        national = _national_number(digits, region)
        return national is not None and national in self.numbers

    def owned_by(self, owned: NumberSet) -> list[tuple[str, str, str]]:
        """The numbers in ``owned`` that ``matches`` takes for emergency calls, as (E.164
        number, the entry of ``owned`` that holds it, the emergency number it dials). For a
        load-time warning: a few probes a set; the numbers' E.164 forms are found once."""
        return _emergency_forms(self.numbers).owned_by(owned)


@lru_cache(maxsize=16384)
def _national_number(digits: str, region: str) -> str | None:
    return _national_significant(digits, region)


def _national_significant(digits: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(digits, None if digits.startswith("+") else region.upper())
    except phonenumbers.NumberParseException:
        return None
    return phonenumbers.national_significant_number(number)  # keeps leading zeros: +61 000


class _EmergencyForms:
    """Every E.164 number ``EmergencyNumbers.matches`` takes for one of ``numbers``: the
    number itself after a + (dialled +911 is 911 as dialled), and +CC then the number for
    each country code CC whose national number it is (+1911, +44911, +61000 ...)."""

    def __init__(self, numbers: frozenset[str]) -> None:
        codes = phonenumbers.COUNTRY_CODE_TO_REGION_CODE
        self.dials: dict[str, str] = {}  # E.164 -> the emergency number it dials
        for number in sorted(numbers):
            self.dials.setdefault("+" + number, number)
            for code in codes:
                e164 = f"+{code}{number}"
                if _national_significant(e164, "ZZ") == number:  # uncached: 215 codes a number
                    self.dials.setdefault(e164, number)
        # a prefix holds the forms that start with it; not one that is a whole country code
        # (+1*, +44*): it claims every number of a country, emergency numbers by the way
        self._by_prefix: dict[str, str] = {}
        for e164 in sorted(self.dials, key=len):
            for end in range(2, len(e164) + 1):
                if int(e164[1:end]) not in codes:
                    self._by_prefix.setdefault(e164[:end], e164)
        self._by_digits: dict[int, list[int]] = {}
        for e164 in self.dials:
            self._by_digits.setdefault(len(e164) - 1, []).append(int(e164[1:]))
        for values in self._by_digits.values():
            values.sort()

    def owned_by(self, owned: NumberSet) -> list[tuple[str, str, str]]:
        found = [(e164, e164) for e164 in sorted(owned.exact & self.dials.keys())]
        found += [(self._by_prefix[p], f"{p}*") for p in sorted(owned.prefixes) if p in self._by_prefix]
        for digits, (starts, ends) in owned.ranges.items():
            values = self._by_digits.get(digits)
            if values is None:
                continue
            for start, end in zip(starts, ends, strict=True):
                at = bisect.bisect_left(values, start)
                if at < len(values) and values[at] <= end:
                    found.append((f"+{values[at]}", f"+{start}-+{end}"))
        return [(e164, entry, self.dials[e164]) for e164, entry in found]


@lru_cache(maxsize=8)
def _emergency_forms(numbers: frozenset[str]) -> _EmergencyForms:
    return _EmergencyForms(numbers)
