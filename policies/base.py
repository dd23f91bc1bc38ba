"""The policy plugin interface.

A policy is a pure function of the call and its typed configuration: ``check`` returns
``Allow``, ``Deny`` (with why), or ``Require`` (state operations: slots to take, rates
to hit). It never reads a clock (``call.now``), never does I/O and never acts: the
engine (proxy/engine.py) turns its answer into enforce / monitor / tag behaviour,
runs the state operations atomically and writes the log line.

Writing one: subclass ``Policy``, give it a ``name`` and a ``Config`` (a ``RuleConfig``
with defaults for everything), implement ``check``, and register it — in
``policies.registry`` for the built-ins, or through the ``sipguard.policies`` entry
point group for third-party packages.
"""

from __future__ import annotations

import enum
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proxy.sip.events import Keepalive
from proxy.state import Operation
from proxy.state.history import HistorySettings

from .numbering import dialled_e164

if TYPE_CHECKING:
    from proxy.sip import Request
    from proxy.state.history import CallHistory

    from .numbering import NumberSet


def is_time_zone(name: str) -> bool:
    """Whether ``name`` is an IANA time zone this machine knows (for validating configs)."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


# Every configuration model: unknown keys are errors (a typo must not switch a rule off),
# and YAML's .inf and .nan are not numbers a limit can be (60 / inf seconds between calls).
SETTINGS = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # C0 and DEL, HTAB aside


class Mode(enum.StrEnum):
    ENFORCE = "enforce"  # refuse the call with the rule's reply
    MONITOR = "monitor"  # forward it, log and count what would have happened
    TAG = "tag"  # forward it with a header naming the rule, for the PBX to act on


class Reply(BaseModel):
    model_config = SETTINGS

    code: int = Field(ge=400, le=699, description="SIP status code of the refusal")
    reason: str = Field(min_length=1, max_length=120)

    @field_validator("reason")
    @classmethod
    def _reason_phrase(cls, value: str) -> str:
        """It goes on the status line: RFC 3261 §25.1 allows no control character but HTAB
        there, and a CR or LF would start header lines of its own."""
        if _CONTROL.search(value):
            raise ValueError("a reason phrase is text on one line, without control characters")
        return value


class RuleConfig(BaseModel):
    """Settings every rule has; each rule's Config adds its own, all with defaults."""

    model_config = SETTINGS

    mode: Mode = Mode.ENFORCE
    reply: Reply
    # When the shared state store (Redis) is unreachable: "open" counts on this instance
    # alone and lets calls through within local limits; "closed" refuses them with 503.
    fail_mode: Literal["open", "closed"] = "open"

    @property
    def enforced(self) -> bool:
        """Whether this rule's state operations may block a call (stamped on each operation)."""
        return self.mode is Mode.ENFORCE

    @property
    def fails_closed(self) -> bool:
        """Whether this rule refuses calls (503) while the shared state store is away:
        ``fail_mode: closed`` and enforced. In monitor or tag mode a rule never refuses a
        call, so it counts on this instance alone, as ``open`` does."""
        return self.fail_mode == "closed" and self.enforced


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    name: str
    numbers: NumberSet
    region: str
    telemarketing: bool = False  # the telemarketing rules (calling_hours, do_not_call) apply


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """One identity the INVITE presents, as presented and as normalised."""

    header: str  # "from", "p-asserted-identity", ...
    presented: str  # the URI as it was sent
    e164: str | None  # None when it carries no valid number
    problem: str | None = None  # why there is no number
    anonymous: bool = False
    emergency: bool = False  # an emergency number presented as a caller ID


@dataclass(frozen=True, slots=True, kw_only=True)
class CallContext:
    """What a policy may look at. Built once per judged INVITE by the engine."""

    attempt_id: str
    call_id: str
    now: float  # monotonic seconds: for rates, windows and durations
    wall_time: float  # seconds since the epoch (UTC): for calendars (calling hours, daily quotas)
    source_host: str
    account: Account | None
    identities: tuple[Identity, ...]
    caller: str | None  # the E.164 number the call is made from (From, else PPI/PAI)
    callee: str | None  # the E.164 number dialled, when it is one
    callee_presented: str
    request: Request
    # recent calls and the penalty box, for rules with ``uses_history`` (read only)
    history: CallHistory | None = None
    # where the call's national numbers are read: the account's region, else the policy's
    # numbering.default_region (None: national numbers are not read at all)
    region: str | None = None

    def dialled_number(self) -> str | None:
        """The number dialled, in E.164: ``callee``, or, where phonenumbers does not call it
        valid (a range newer than its metadata, or one a pumping scheme terminates on, such
        as +882), its digits read as E.164 all the same; None for a callee that is no number."""
        return self.callee or dialled_e164(self.request.uri, self.region)


@dataclass(frozen=True, slots=True)
class Allow:
    pass


@dataclass(frozen=True, slots=True)
class Deny:
    detail: str  # why, for the log: "From +1415... not owned by acme"
    # subjects (``num:+1...``, ``acct:NAME``) to put in the penalty box, and for how long
    penalise: tuple[str, ...] = ()
    penalty_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class Warn:
    """Never refuses: logged with the decision, and tagged for the PBX unless the rule only
    monitors. A dialer signature past its warning threshold answers this."""

    detail: str


@dataclass(frozen=True, slots=True)
class Require:
    """State operations to run atomically with every other rule's; and, optionally, the
    longest the call may last once answered (sipguard then sends BYE to both sides), and
    keepalive probes of both parties (a call whose party vanished is ended the same way)."""

    operations: tuple[Operation, ...]
    max_duration: float | None = None
    keepalive: Keepalive | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class CallOutcome:
    """How a call this rule judged (and that was forwarded) ended, for the outcome hook."""

    attempt_id: str
    call_id: str
    account: str | None
    caller: str | None  # E.164
    callee: str | None  # E.164
    source_host: str
    started_at: float  # monotonic, like CallContext.now
    answered_at: float | None  # None: never answered
    ended_at: float
    wall_time: float  # of the start, like CallContext.wall_time
    reason: str  # proxy.sip.EndReason value: bye, cancelled, rejected, max-duration ...
    status: int | None  # final response when rejected downstream
    by_caller: bool | None  # for BYE: whether the calling side hung up

    @property
    def talk_time(self) -> float:
        """Seconds from answer to end; 0 for a call never answered."""
        return 0.0 if self.answered_at is None else max(0.0, self.ended_at - self.answered_at)


Verdict = Allow | Deny | Warn | Require
ALLOW = Allow()

ConfigT = TypeVar("ConfigT", bound=RuleConfig)


class Policy(ABC, Generic[ConfigT]):
    name: ClassVar[str]
    Config: ClassVar[type[RuleConfig]]
    description: ClassVar[str] = ""
    # True: the engine records this rule's forwarded calls in ``CallContext.history``
    uses_history: ClassVar[bool] = False

    @abstractmethod
    def check(self, call: CallContext, config: ConfigT) -> Verdict:
        """Judge one initial INVITE. Pure: same inputs, same answer."""

    def call_ended(self, outcome: CallOutcome, config: ConfigT) -> tuple[Operation, ...]:
        """A call this rule judged has ended: state operations to record it (none by default).
        Like ``check``, pure: the engine runs what it returns."""
        return ()

    def keeps_counters(self, config: ConfigT) -> bool:
        """Whether ``check`` may ask for state operations under this configuration, the
        counters ``fail_mode`` is about (/readyz reads it while Redis is away). True unless
        a rule says otherwise: a rule that does not say may count."""
        return True

    def history_settings(self, config: ConfigT) -> HistorySettings:
        """For a rule with ``uses_history``: how the history measures calls."""
        return HistorySettings()

    def account_overrides(self, limits: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        """Map an account's ``limits:`` shorthand onto this rule's ``settings`` (none by default)."""
        return {}

    def warnings(self, config: ConfigT) -> list[str]:
        """Load-time remarks about a configuration, e.g. a rule that can never fire."""
        return []

    def describe(self, config: ConfigT) -> list[str]:
        """What a configuration holds beyond its settings (list sizes ...), for ``sipguard check``."""
        return []
