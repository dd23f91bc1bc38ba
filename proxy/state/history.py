"""Recent calls per caller number and per account, and the penalty box: what the dialer
signatures (policies/dialer.py) read.

Strategy: every aggregate a signature needs is kept incrementally, so reading it costs
O(1) whatever the traffic: a window of attempts (with a count of distinct callees), a
window of ended calls (with counts of answered, short and abandoned ones), the current
run of numerically adjacent callees, and the last gaps between a hang-up and the next
call (with running sums for their mean and variation). Entries older than the window
are dropped when a subject is touched; subjects idle for a whole window are dropped
when the table grows past its bound, and penalties that are over when the penalty box
does (both hold ``max_subjects`` at most).

This state lives in the process, not in the shared store: a dialer's pattern is seen by
the instance its calls go through. Times are the engine's monotonic ``now``; nothing
here reads a clock.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class HistorySettings:
    """How calls are measured; the thresholds applied to the measures are the rule's."""

    window: float = 3600.0  # seconds of calls the ratios and distinct counts cover
    short_call: float = 30.0  # an answered call shorter than this is short
    abandoned_call: float = 2.0  # an answered call the caller ends within this is abandoned
    pacing_samples: int = 20  # how many hang-up → next call gaps the pacing measure keeps
    max_subjects: int = 100_000  # ~1.5-3 KB each: at most ~300 MB of history


@dataclass(frozen=True, slots=True)
class Penalty:
    until: float
    rule: str
    reason: str


class SubjectHistory:
    __slots__ = (
        "abandoned",
        "answered",
        "attempts",
        "callees",
        "ended",
        "ends",
        "gap_sum",
        "gap_sum_sq",
        "gaps",
        "last_callee",
        "last_hangup",
        "last_seen",
        "run",
        "run_step",
        "samples",
        "short",
    )

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.attempts: deque[tuple[float, int | None]] = deque()
        self.callees: Counter[int] = Counter()
        self.ends: deque[tuple[float, bool, bool, bool]] = deque()  # (at, answered, short, abandoned)
        self.ended = self.answered = self.short = self.abandoned = 0
        self.last_callee: int | None = None
        self.run_step = 0  # +1 or -1 once a run has a direction
        self.run = 0
        self.last_hangup: float | None = None
        self.gaps: deque[float] | None = None  # made at the first gap: most numbers never have one
        self.gap_sum = self.gap_sum_sq = 0.0
        self.last_seen = 0.0

    # -- reading --------------------------------------------------------------------------
    def run_with(self, callee: int | None) -> int:
        """The run of adjacent callees if the next call goes to ``callee``, counting only
        the run's calls still in the window (they are the last of ``attempts``)."""
        if callee is None or self.last_callee is None or not self.attempts:
            return 1
        step = callee - self.last_callee
        if step not in (1, -1):
            return 1
        if self.run_step in (0, step):
            return min(self.run, len(self.attempts)) + 1
        return 2  # adjacent, but turning back: a new run of two

    def is_new_callee(self, callee: int | None) -> bool:
        return callee is not None and callee not in self.callees

    def gap_stats_with(self, gap: float | None) -> tuple[int, float, float]:
        """(samples, mean, coefficient of variation) of the gaps, with ``gap`` added."""
        gaps = self.gaps
        count, total, total_sq = len(gaps) if gaps else 0, self.gap_sum, self.gap_sum_sq
        if gap is not None:
            if gaps and count == self.samples:  # the oldest would make way
                oldest = gaps[0]
                total, total_sq, count = total - oldest, total_sq - oldest * oldest, count - 1
            total, total_sq, count = total + gap, total_sq + gap * gap, count + 1
        if count == 0:
            return 0, 0.0, math.inf
        mean = total / count
        variance = max(0.0, total_sq / count - mean * mean)
        return count, mean, (math.sqrt(variance) / mean if mean > 0 else 0.0)

    # -- recording ------------------------------------------------------------------------
    def expire(self, before: float) -> None:
        attempts, callees = self.attempts, self.callees
        while attempts and attempts[0][0] < before:
            _, callee = attempts.popleft()
            if callee is not None:
                callees[callee] -= 1
                if not callees[callee]:
                    del callees[callee]
        ends = self.ends
        while ends and ends[0][0] < before:
            _, answered, short, abandoned = ends.popleft()
            self.ended -= 1
            self.answered -= answered
            self.short -= short
            self.abandoned -= abandoned

    def started(self, now: float, callee: int | None) -> None:
        self.run = self.run_with(callee)
        if self.run >= 2 and self.last_callee is not None and callee is not None:
            self.run_step = callee - self.last_callee
        elif self.run == 1:
            self.run_step = 0
        self.last_callee = callee
        if self.last_hangup is not None:
            gap = max(0.0, now - self.last_hangup)
            if self.gaps is None:
                self.gaps = deque(maxlen=self.samples)
            elif len(self.gaps) == self.samples:
                oldest = self.gaps[0]
                self.gap_sum -= oldest
                self.gap_sum_sq -= oldest * oldest
            self.gaps.append(gap)
            self.gap_sum += gap
            self.gap_sum_sq += gap * gap
            self.last_hangup = None  # one gap per hang-up: parallel calls don't reuse it
        self.attempts.append((now, callee))
        if callee is not None:
            self.callees[callee] += 1

    def ended_call(self, now: float, answered: bool, short: bool, abandoned: bool) -> None:
        self.ends.append((now, answered, short, abandoned))
        self.ended += 1
        self.answered += answered
        self.short += short
        self.abandoned += abandoned
        self.last_hangup = now


@dataclass(slots=True)
class LiveRecord:
    """A forwarded call's subjects, from its start to its end."""

    subjects: tuple[SubjectHistory, ...]
    answered_at: float | None = None


class CallHistory:
    def __init__(self, settings: HistorySettings | None = None) -> None:
        self.settings = settings or HistorySettings()
        self._subjects: dict[str, SubjectHistory] = {}
        self._live: dict[str, LiveRecord] = {}  # by attempt id
        self._penalties: dict[str, Penalty] = {}

    def __len__(self) -> int:
        return len(self._subjects)

    def configure(self, settings: HistorySettings) -> None:
        """A reload: new measures apply from now on; what was recorded stays."""
        if settings.pacing_samples != self.settings.pacing_samples:
            for subject in self._subjects.values():
                subject.samples = settings.pacing_samples
                if subject.gaps is not None:
                    subject.gaps = deque(subject.gaps, maxlen=settings.pacing_samples)
                    subject.gap_sum = sum(subject.gaps)
                    subject.gap_sum_sq = sum(gap * gap for gap in subject.gaps)
        self.settings = settings

    def subject(self, key: str, now: float) -> SubjectHistory | None:
        """A subject's window as of ``now`` (old entries dropped), or None if never seen."""
        subject = self._subjects.get(key)
        if subject is not None:
            subject.expire(now - self.settings.window)
        return subject

    # -- the penalty box ------------------------------------------------------------------------
    def penalty(self, key: str, now: float) -> Penalty | None:
        penalty = self._penalties.get(key)
        if penalty is not None and penalty.until <= now:
            del self._penalties[key]
            return None
        return penalty

    def penalise(self, key: str, until: float, rule: str, reason: str, *, now: float) -> None:
        penalties = self._penalties
        current = penalties.get(key)
        if current is None and len(penalties) >= self.settings.max_subjects:
            self._drop_penalties(now)
        if current is None or current.until < until:
            penalties[key] = Penalty(until, rule, reason)

    def release(self, key: str) -> bool:
        """An operator's unban of a number (``num:+1...``) or an account (``acct:NAME``): out
        of the box, and its history forgotten, or the next call would put it back at once."""
        self._subjects.pop(key, None)
        return self._penalties.pop(key, None) is not None

    def penalties(self, now: float) -> dict[str, Penalty]:
        for key in [key for key, penalty in self._penalties.items() if penalty.until <= now]:
            del self._penalties[key]
        return dict(self._penalties)

    # -- feeding (the engine, for every forwarded call of a rule that reads the history) --------
    def call_started(self, attempt_id: str, keys: tuple[str, ...], callee: str | None, now: float) -> None:
        callee_number = int(callee[1:]) if callee and callee[1:].isdigit() else None
        subjects = []
        for key in keys:
            subject = self._subjects.get(key)
            if subject is None:
                if len(self._subjects) >= self.settings.max_subjects:
                    self._drop_idle(now)
                subject = self._subjects[key] = SubjectHistory(self.settings.pacing_samples)
            subject.expire(now - self.settings.window)
            subject.started(now, callee_number)
            subject.last_seen = now
            subjects.append(subject)
        self._live[attempt_id] = LiveRecord(tuple(subjects))

    def call_answered(self, attempt_id: str, now: float) -> None:
        live = self._live.get(attempt_id)
        if live is not None:
            live.answered_at = now

    def call_challenged(self, attempt_id: str) -> LiveRecord | None:
        """The PBX asked the caller for credentials (401/407): no outcome of the call, which
        the caller sends again. Its record, for ``call_retried``; nothing is counted."""
        return self._live.pop(attempt_id, None)

    def call_retried(self, attempt_id: str, record: LiveRecord) -> None:
        """The challenged call again, with credentials: the same call, not a new attempt."""
        self._live[attempt_id] = record

    def call_ended(self, attempt_id: str, now: float, by_caller: bool | None) -> None:
        live = self._live.pop(attempt_id, None)
        if live is None:
            return
        settings = self.settings
        answered = live.answered_at is not None
        talk = now - live.answered_at if live.answered_at is not None else 0.0
        short = answered and talk < settings.short_call
        abandoned = answered and bool(by_caller) and talk < settings.abandoned_call
        for subject in live.subjects:
            subject.ended_call(now, answered, short, abandoned)
            subject.last_seen = now

    def _drop_penalties(self, now: float) -> None:
        """Make room in the box: forget the penalties that are over (a subject's own is
        only looked at when it calls again: a dialer that changes numbers leaves one
        behind each time), else, in a flood of subjects boxed at once, the tenth that
        would end soonest."""
        penalties = self._penalties
        over = [key for key, penalty in penalties.items() if penalty.until <= now]
        if len(over) < len(penalties) // 10:
            over = heapq.nsmallest(len(penalties) // 10, penalties, key=lambda key: penalties[key].until)
        for key in over:
            del penalties[key]

    def _drop_idle(self, now: float) -> None:
        """Make room: forget subjects idle for a window, else the least recently seen half."""
        idle_since = now - self.settings.window
        idle = [key for key, subject in self._subjects.items() if subject.last_seen < idle_since]
        if len(idle) < len(self._subjects) // 10:
            ranked = sorted(self._subjects, key=lambda key: self._subjects[key].last_seen)
            idle = ranked[: len(ranked) // 2]
        for key in idle:
            del self._subjects[key]
