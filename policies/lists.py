"""Lists of numbers loaded from files: destination prefixes (longest match) and
do-not-call numbers (exact match, tens of millions of them).

Strategy:
- Files are text, one entry per line: an E.164 number or prefix, ``+`` optional, visual
  separators (space ``-`` ``.`` ``( )``) ignored; ``#`` starts a comment. A bad line
  is an error naming ``file:line``. Relative paths are relative to the policy file.
- A prefix table is one dict from prefix (``+449``) to the list that named it, plus
  the prefix lengths present, longest first: a lookup slices the number at each length
  and probes the dict (at most 16 probes), so its cost does not grow with the list.
- A number list is a sorted numpy int64 array (8 bytes a number: E.164's 15 digits fit
  in 50 bits) searched by bisection. Files are parsed a chunk at a time with numpy
  (digits turned into integers a column at a time), so ten million lines never become
  ten million Python objects; only lines that are not a bare number (comments, blanks,
  separators, mistakes) go through the per-line parser, which knows the line number.
- Loaded files are shared while some policy holds them, keyed by (path, inode, mtime,
  size): reloading a policy whose list files did not change reads nothing again, and a
  file replaced or edited in place is read anew.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BeforeValidator, PlainSerializer, PlainValidator, ValidationInfo

POLICY_FILE = "policy_file"  # validation context key: the policy file naming the lists
_SEPARATORS = re.compile(r"[\s\-.()]")  # RFC 3966 visual separators, and spaces
_E164 = re.compile(r"\+?([1-9][0-9]{0,14})")  # E.164: a country code never starts with 0
_CHUNK_BYTES = 2 << 20  # per read of a number file: ~160,000 lines, ~10 MB of numpy temporaries
_BLOCK = 1 << 20  # numbers compared at a time when dropping duplicates
_MAX_DIGITS = 15
Action = Literal["allow", "block"]


def e164_digits(text: str) -> str:
    """The digits of an E.164 number or prefix (``+44 20``, ``4420``): ``4420``."""
    match = _E164.fullmatch(_SEPARATORS.sub("", text))
    if match is None:
        raise ValueError(
            f"{text!r} is not an E.164 number or prefix (+ optional, then the country code, 1-15 digits)"
        )
    return match[1]


def _e164_text(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML reads an unquoted 4420 as an int
        value = str(value)
    if not isinstance(value, str):
        raise ValueError("expected an E.164 number or prefix")
    return "+" + e164_digits(value)


# A config field item: a number or prefix as written (+44 20, 4420), kept as +4420.
E164Text = Annotated[str, BeforeValidator(_e164_text)]


def list_path(text: str, info: ValidationInfo) -> Path:
    """A list file named in the policy file: a relative path is relative to the policy file."""
    path = Path(text).expanduser()
    policy_file = (info.context or {}).get(POLICY_FILE)
    if not path.is_absolute() and policy_file and not policy_file.startswith("<"):
        path = Path(policy_file).parent / path
    return path


def _entries(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, entry) for each line that is not blank or a comment. (For prefix
    files: a few MB at most, read whole.)"""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text ({error.reason})") from None
    for number, line_text in enumerate(text.split("\n"), 1):
        entry = _entry(line_text)
        if entry:
            yield number, entry


def _entry(line: str) -> str:
    return line.split("#", 1)[0].strip()


def _file_key(path: Path) -> tuple[str, int, int, int]:
    try:
        stat = path.stat()
    except OSError as error:
        raise ValueError(f"{path}: cannot read: {error.strerror}") from None
    return (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)


# -- prefixes -------------------------------------------------------------------------------------
class PrefixFile:
    """The prefixes of one file, each with the line that first named it."""

    __slots__ = ("__weakref__", "lines", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[str, int] = {}
        for line, entry in _entries(path):
            try:
                prefix = "+" + e164_digits(entry)
            except ValueError as error:
                raise ValueError(f"{path}:{line}: {error}") from None
            self.lines.setdefault(prefix, line)

    def __len__(self) -> int:
        return len(self.lines)

    def __repr__(self) -> str:
        return f"PrefixFile({str(self.path)!r}, {len(self)} prefixes)"


@dataclass(frozen=True, slots=True)
class ListedPrefixes:
    """One list of prefixes with what it means: from a file, or inline in the policy file."""

    action: Action
    origin: str  # the file, or the policy key (block, allow)
    positions: dict[str, int]  # prefix -> its line in the file, or its place in the key's list
    in_file: bool = True

    def where(self, prefix: str) -> str:
        place = self.positions[prefix]
        return f"{self.origin}:{place}" if self.in_file else f"{self.origin}[{place}]"


class PrefixTable:
    """Allowed and blocked prefixes; the longest prefix of a number decides."""

    __slots__ = ("_lengths", "_lists", "allowed", "blocked")

    def __init__(self, lists: Iterable[ListedPrefixes]) -> None:
        self._lists: dict[str, ListedPrefixes] = {}
        for listed in lists:
            for prefix in listed.positions:
                first = self._lists.setdefault(prefix, listed)
                if first.action != listed.action:
                    places = f"{first.where(prefix)} and {listed.where(prefix)}"
                    raise ValueError(f"{prefix} is both allowed and blocked ({places})")
        self._lengths = sorted({len(prefix) for prefix in self._lists}, reverse=True)
        self.blocked = sum(1 for listed in self._lists.values() if listed.action == "block")
        self.allowed = len(self._lists) - self.blocked

    def longest_match(self, number: str) -> tuple[str, ListedPrefixes] | None:
        """The longest listed prefix of ``number`` (``+4420...``), and the list naming it."""
        lists = self._lists
        for length in self._lengths:
            if length <= len(number):
                found = lists.get(number[:length])
                if found is not None:
                    return number[:length], found
        return None

    def __len__(self) -> int:
        return len(self._lists)


# -- numbers --------------------------------------------------------------------------------------
class NumberFile:
    """The numbers of one file, as a sorted array of unique int64 (E.164 digits)."""

    __slots__ = ("__weakref__", "numbers", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.numbers = _read_numbers(path)

    def __contains__(self, e164: object) -> bool:
        """Whether ``+14155550100`` (or its digits) is listed: one binary search."""
        if not isinstance(e164, str):
            return False
        digits = e164[1:] if e164.startswith("+") else e164
        if not (0 < len(digits) <= _MAX_DIGITS and digits.isascii() and digits.isdigit()):
            return False
        value = int(digits)
        numbers = self.numbers
        at = int(numbers.searchsorted(value))
        return at < len(numbers) and int(numbers[at]) == value

    def __len__(self) -> int:
        return len(self.numbers)

    def __repr__(self) -> str:
        return f"NumberFile({str(self.path)!r}, {len(self)} numbers)"


def _read_numbers(path: Path) -> np.ndarray[Any, np.dtype[np.int64]]:
    with path.open("rb") as file:
        # one quick pass to count lines sizes the array once: no growing, no second copy
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(_CHUNK_BYTES), b"")) + 1
        file.seek(0)
        numbers = np.empty(lines, dtype=np.int64)
        count, line = 0, 1
        rest = b""
        while chunk := file.read(_CHUNK_BYTES):
            chunk = rest + chunk if rest else chunk
            end = chunk.rfind(b"\n") + 1
            rest = chunk[end:]
            count = _parse_lines(chunk, end, line, path, numbers, count)
            line += chunk.count(b"\n", 0, end)
        if rest:
            count = _parse_lines(rest + b"\n", len(rest) + 1, line, path, numbers, count)
    numbers = _sorted_unique(numbers[:count])
    # don't keep a mostly empty allocation alive (a file of comments, or of duplicates)
    return numbers.copy() if len(numbers) < 0.9 * lines else numbers


def _sorted_unique(numbers: np.ndarray[Any, np.dtype[np.int64]]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Sorted, duplicates dropped, in place: no second array of the list's size."""
    if len(numbers) > 1 and not (numbers[1:] >= numbers[:-1]).all():  # registry extracts often are
        numbers.sort()  # introsort, in place (a stable sort would borrow half the array again)
    kept, previous = 0, None
    for start in range(0, len(numbers), _BLOCK):  # written back at or before where it was read
        block = numbers[start : start + _BLOCK]
        new = np.empty(len(block), dtype=bool)
        new[0] = previous is None or block[0] != previous
        np.not_equal(block[1:], block[:-1], out=new[1:])
        previous = int(block[-1])
        unique = block[new]
        numbers[kept : kept + len(unique)] = unique
        kept += len(unique)
    return numbers[:kept]


def _parse_lines(
    chunk: bytes, end: int, first_line: int, path: Path, out: np.ndarray[Any, Any], count: int
) -> int:
    """Parse the whole lines in ``chunk[:end]`` into ``out[count:]``; the new count."""
    if end == 0:
        return count
    data = np.frombuffer(chunk, dtype=np.uint8, count=end)
    newlines = np.flatnonzero(data == ord("\n"))
    line_starts = np.empty_like(newlines)
    line_starts[0] = 0
    line_starts[1:] = newlines[:-1] + 1
    stops = newlines - ((newlines > line_starts) & (data[newlines - 1] == ord("\r")))  # CRLF files
    starts = line_starts + ((line_starts < stops) & (data[line_starts] == ord("+")))
    lengths = stops - starts
    # a bare number: 1-15 digits, the first not 0; everything else goes line by line.
    # Digits per line by one reduceat over (start, stop) pairs: the even sums are the lines.
    is_digit = ((data >= ord("0")) & (data <= ord("9"))).view(np.uint8)
    bounds = np.empty(2 * len(starts), dtype=np.int64)
    bounds[0::2], bounds[1::2] = starts, stops
    digits = np.add.reduceat(is_digit, bounds)[0::2]  # (an empty line reads its newline: 0)
    bare = (lengths > 0) & (lengths <= _MAX_DIGITS) & (data[starts] != ord("0")) & (digits == lengths)
    first, last = starts[bare], stops[bare]
    values = np.zeros(len(first), dtype=np.int64)
    longest = int((last - first).max()) if len(first) else 0
    for place in range(longest, 0, -1):  # most significant digit first; absent digits are 0
        at = last - place
        values *= 10
        values += np.where(at >= first, data[np.maximum(at, 0)], ord("0")) - ord("0")
    out[count : count + len(values)] = values
    count += len(values)
    for index in np.flatnonzero(~bare).tolist():
        entry = _entry(chunk[int(line_starts[index]) : int(stops[index])].decode("utf-8", "replace"))
        if entry:
            try:
                out[count] = int(e164_digits(entry))
            except ValueError as error:
                raise ValueError(f"{path}:{first_line + index}: {error}") from None
            count += 1
    return count


# -- loading, shared while in use -----------------------------------------------------------------
ListFile = TypeVar("ListFile", PrefixFile, NumberFile)
_loaded: weakref.WeakValueDictionary[tuple[str, str, int, int, int], Any] = weakref.WeakValueDictionary()


def _load(kind: type[PrefixFile] | type[NumberFile], path: Path) -> Any:
    key = (kind.__name__, *_file_key(path))
    found = _loaded.get(key)
    if found is None:
        try:
            found = _loaded[key] = kind(path)
        except OSError as error:  # a directory, no permission, an I/O error
            raise ValueError(f"{path}: cannot read: {error.strerror}") from None
    return found


def _list_file(kind: type[ListFile]) -> Callable[[Any, ValidationInfo], ListFile]:
    """A pydantic validator: a file name in the policy file becomes the loaded ``kind``."""

    def validate(value: Any, info: ValidationInfo) -> ListFile:
        if isinstance(value, kind):
            return value
        if not isinstance(value, str):
            raise ValueError("expected a file name")
        loaded: ListFile = _load(kind, list_path(value, info))
        return loaded

    return validate


PrefixFileField = Annotated[
    PrefixFile, PlainValidator(_list_file(PrefixFile)), PlainSerializer(lambda f: str(f.path))
]
NumberFileField = Annotated[
    NumberFile, PlainValidator(_list_file(NumberFile)), PlainSerializer(lambda f: str(f.path))
]
