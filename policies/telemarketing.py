"""Telemarketing rules — AUP: telemarketing. Two rules for accounts marked
``telemarketing: true`` (every other account's calls pass without a look):

- ``calling_hours``: calls only inside a window of the callee's local time (default
  08:00-21:00, the US TCPA window), optionally different per weekday.
- ``do_not_call``: never to a number on the do-not-call lists (files of E.164 numbers).

Two rules, not one, so that each has its own reply and mode: a do-not-call list can be
monitored for a week while the calling hours are enforced.

Time zones come from the callee number (phonenumbers' time-zone data, by prefix). A
number spanning several zones (a US toll-free number, an Australian mobile) is judged
in every one of them: the call is allowed only if it is inside the window in each, the
most restrictive reading: a US toll-free number (42 zones, St John's to Guam) may be
called only 22:00-23:30 UTC in summer, and a number whose zones span more hours than the
window can't be called at all. Unknown zone
(a non-geographic number, a callee that isn't a number): refused, or judged in
``unknown_zone``. The time is the call's ``wall_time``, never a clock.

Zone lookups stay in microseconds: phonenumbers' prefix table is probed directly
(at most 9 dict probes; ``ZoneInfo`` tuples cached per zone list); only when a number's
type could change its zones (geographic and country-level zones differ, as in the US)
is the number parsed (~25 us). Answers are cached per number (65,536 of them).
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import cached_property, lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE
from phonenumbers.timezone import time_zones_for_number
from phonenumbers.tzdata import TIMEZONE_DATA, TIMEZONE_LONGEST_PREFIX
from pydantic import BaseModel, Field, field_validator, model_validator

from .base import ALLOW, SETTINGS, CallContext, Deny, Policy, Reply, RuleConfig, Verdict, is_time_zone
from .lists import E164Text, NumberFileField

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
_CLOCK = re.compile(r"([01]?[0-9]|2[0-3]):[0-5][0-9]|24:00")
_UNKNOWN_ZONE = "Etc/Unknown"  # what phonenumbers says when it doesn't know
Window = tuple[int, int]  # minutes since local midnight: start inclusive, end exclusive


def _clock_text(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):  # YAML 1.1 reads 21:00 as 1260
        raise ValueError('write times of day in quotes, "HH:MM"')
    return value


def _minutes(clock: str) -> int:
    """``"HH:MM"`` (00:00 to 24:00; ``8:00`` too) as minutes since midnight."""
    if not _CLOCK.fullmatch(clock):
        raise ValueError(f'{clock!r} is not a time of day "HH:MM", 00:00 to 24:00')
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def _window(start: str, end: str) -> Window:
    window = _minutes(start), _minutes(end)
    if window[0] >= window[1]:
        raise ValueError(f"the calling window must end after it starts ({start} to {end})")
    return window


def _day_window(text: str) -> Window | None:
    """``"10:00-17:00"`` as a window, ``"closed"`` as None."""
    if text == "closed":
        return None
    start, dash, end = text.partition("-")
    if not dash:
        raise ValueError('expected "HH:MM-HH:MM" or closed')
    return _window(start.strip(), end.strip())


def _window_text(window: Window | None) -> str:
    if window is None:
        return "no calls that day"
    (start_hour, start_minute), (end_hour, end_minute) = divmod(window[0], 60), divmod(window[1], 60)
    return f"calls {start_hour:02d}:{start_minute:02d}-{end_hour:02d}:{end_minute:02d}"


class Days(BaseModel):
    """Windows for particular weekdays, over the rule's every-day ``start``/``end``."""

    model_config = SETTINGS

    mon: str | None = None
    tue: str | None = None
    wed: str | None = None
    thu: str | None = None
    fri: str | None = None
    sat: str | None = None
    sun: str | None = None

    @field_validator(*WEEKDAYS)
    @classmethod
    def _valid(cls, value: str | None) -> str | None:
        if value is not None:
            _day_window(value)
        return value


class CallingHoursConfig(RuleConfig):
    # 403, not 480 + Retry-After: the refusal is the operator's policy, not the callee's
    # state, and a dialer reading 480 as "no answer" would book it as one and redial.
    reply: Reply = Reply(code=403, reason="Outside permitted calling hours")
    start: str = Field(default="08:00", description='window start, callee local time (default "08:00", TCPA)')
    end: str = Field(default="21:00", description='window end, exclusive (default "21:00", TCPA)')
    days: Days = Field(
        default=Days(), description='per weekday (mon ... sun): "HH:MM-HH:MM" or closed (default: start-end)'
    )
    unknown_zone: str = Field(
        default="refuse",
        description="callee of no known time zone: refuse, or an IANA zone to judge it in (default refuse)",
    )
    _text = field_validator("start", "end", mode="before")(_clock_text)

    @field_validator("start", "end")
    @classmethod
    def _clock(cls, value: str) -> str:
        _minutes(value)
        return value

    @field_validator("unknown_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value != "refuse" and not is_time_zone(value):
            raise ValueError(f"{value!r} is neither refuse nor an IANA time zone such as America/New_York")
        return value

    @cached_property  # (in the instance's __dict__: a private attribute costs ~2 us a read)
    def windows(self) -> tuple[Window | None, ...]:
        """The window of each weekday, Monday first; None when the day is closed."""
        every_day = _window(self.start, self.end)
        days = [getattr(self.days, day) for day in WEEKDAYS]
        return tuple(every_day if day is None else _day_window(day) for day in days)

    @cached_property
    def fallback_zone(self) -> ZoneInfo | None:
        """Where a callee of no known zone is judged; None: refused."""
        return None if self.unknown_zone == "refuse" else ZoneInfo(self.unknown_zone)

    @model_validator(mode="after")
    def _compile(self) -> CallingHoursConfig:
        self.windows  # noqa: B018 - checked now: a window that ends before it starts is a load error
        return self


class CallingHoursPolicy(Policy[CallingHoursConfig]):
    name = "calling_hours"
    Config = CallingHoursConfig
    description = "telemarketing accounts: calls only inside the callee's local calling hours"

    def keeps_counters(self, config: CallingHoursConfig) -> bool:
        return False

    def check(self, call: CallContext, config: CallingHoursConfig) -> Verdict:
        if call.account is None or not call.account.telemarketing:
            return ALLOW
        callee = call.callee
        zones = callee_zones(callee) if callee else ()
        if not zones:
            if config.fallback_zone is None:
                return Deny(f"no time zone known for callee {callee or call.callee_presented}")
            zones = (config.fallback_zone,)
        for zone in zones:  # inside the window in every zone the number may ring in
            local = datetime.fromtimestamp(call.wall_time, zone)
            window = config.windows[local.weekday()]
            if window is None or not window[0] <= local.hour * 60 + local.minute < window[1]:
                when = f"{local:%a %H:%M} in {zone.key}"
                return Deny(f"{callee or call.callee_presented}: {when}, {_window_text(window)}")
        return ALLOW


@lru_cache(maxsize=65536)
def callee_zones(e164: str) -> tuple[ZoneInfo, ...]:
    """The time zones ``phonenumbers.timezone.time_zones_for_number`` gives a valid E.164
    number; () when it knows none. Cached: a dialer's retries and callbacks repeat numbers."""
    digits = e164[1:]
    geographic = _zone_names(digits)
    country = _zone_names(_country_code(digits))
    if geographic == country:  # the number's type can't change the answer
        return _zone_infos(geographic)
    return _number_zones(e164)


def _zone_names(digits: str) -> tuple[str, ...]:
    """phonenumbers' longest-prefix lookup in its time-zone table."""
    for length in range(min(TIMEZONE_LONGEST_PREFIX, len(digits)), 0, -1):
        names = TIMEZONE_DATA.get(digits[:length])
        if names is not None:
            return names
    return (_UNKNOWN_ZONE,)


def _country_code(digits: str) -> str:
    for length in (1, 2, 3):  # country codes are prefix-free
        if int(digits[:length] or 0) in COUNTRY_CODE_TO_REGION_CODE:
            return digits[:length]
    return ""


def _number_zones(e164: str) -> tuple[ZoneInfo, ...]:
    """Geographic numbers get their area's zones, others their country's: the type decides."""
    try:
        number = phonenumbers.parse(e164)
    except phonenumbers.NumberParseException:
        return ()
    return _zone_infos(tuple(time_zones_for_number(number)))


@lru_cache(maxsize=4096)
def _zone_infos(names: tuple[str, ...]) -> tuple[ZoneInfo, ...]:
    if names == (_UNKNOWN_ZONE,):
        return ()
    try:
        return tuple(ZoneInfo(name) for name in names)
    except ZoneInfoNotFoundError:  # a zone this system's tz database lacks: don't guess
        return ()


# -- do not call -----------------------------------------------------------------------------------
class DoNotCallConfig(RuleConfig):
    # RFC 8688 608 Rejected: an intermediary refused the call on policy, not the callee
    # (607 Unwanted, RFC 8197, is the called party's own answer and feeds call analytics
    # about the caller). As a 6xx, no other route is tried; a UAC that doesn't know 608
    # handles it as 600 (RFC 3261 §8.1.3.2), which is still a global refusal.
    reply: Reply = Reply(code=608, reason="Rejected: do-not-call list")
    files: list[NumberFileField] = Field(
        default=[], description="files of E.164 numbers, one a line, + optional, # comments (default none)"
    )
    numbers: list[E164Text] = Field(default=[], description="numbers listed inline (default none)")

    @cached_property
    def inline(self) -> frozenset[str]:
        return frozenset(self.numbers)

    def listed(self, e164: str) -> str | None:
        """Where ``e164`` is listed (a file, or ``numbers``); None when it is not."""
        if e164 in self.inline:
            return "numbers"
        for listed in self.files:
            if e164 in listed:
                return str(listed.path)
        return None


class DoNotCallPolicy(Policy[DoNotCallConfig]):
    name = "do_not_call"
    Config = DoNotCallConfig
    description = "telemarketing accounts: never to numbers on the do-not-call lists"

    def keeps_counters(self, config: DoNotCallConfig) -> bool:
        return False

    def check(self, call: CallContext, config: DoNotCallConfig) -> Verdict:
        if call.account is None or not call.account.telemarketing:
            return ALLOW
        # a number phonenumbers calls invalid (a range newer than its metadata) is still
        # looked up by its digits: the list, not the metadata, says who may not be called
        callee = call.dialled_number()
        if callee is None:
            return ALLOW
        where = config.listed(callee)
        return ALLOW if where is None else Deny(f"{callee} is on the do-not-call list {where}")

    def warnings(self, config: DoNotCallConfig) -> list[str]:
        if not config.files and not config.numbers:
            return ["do_not_call lists no number (files, numbers): it never fires"]
        return []

    def describe(self, config: DoNotCallConfig) -> list[str]:
        sizes = [f"{listed.path}: {len(listed):,} numbers" for listed in config.files]
        return sizes + ([f"numbers: {len(config.numbers):,} inline"] if config.numbers else [])
