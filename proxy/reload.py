"""Reloading the policy file while the proxy runs (SIGHUP, or ``POST /reload``).

A reload is atomic: the file is read and validated whole, then swapped in for new
INVITEs; live calls keep their slots and counters survive (see ``PolicyEngine.replace``).
A file that does not validate changes nothing: the running policy stays, and the
errors (``file:line: key: reason``) are logged and returned to whoever asked.

The file is read and compiled in a worker thread (seconds for 20,000 accounts), so the
event loop keeps serving calls meanwhile; the swap runs on the loop, with no ``await``
between taking the new policy into the engine and into the flood guard. Reloads run one
at a time, in the order asked: a reload asked while another compiles waits for it, then
reads the file again, so the file as it was at the last request is what ends up in force.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from .policyfile import PolicyFileError, load_policy

if TYPE_CHECKING:
    from .app import SipGuard
    from .engine import PolicyEngine

log = structlog.get_logger("sipguard")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadResult:
    ok: bool
    path: str | None  # the file asked for (None: the proxy runs without one)
    running: str  # the policy file in force afterwards
    errors: list[str] = field(default_factory=list)  # why it was refused
    restart_needed: bool = False  # proxy:, state: or admin: changed: they apply after a restart
    warnings: list[str] = field(default_factory=list)  # the applied file's, as sipguard check gives them

    def as_json(self) -> dict[str, object]:
        return {
            "reloaded": self.ok,
            "path": self.path,
            "running": self.running,
            "errors": self.errors,
            "restart_needed": self.restart_needed,
            "warnings": self.warnings,
        }


class Reloader:
    """Reloads ``path`` into the engine and the flood guard; counts how reloads went."""

    def __init__(self, engine: PolicyEngine, guard: SipGuard, path: str | None) -> None:
        self.engine = engine
        self.guard = guard
        self.path = path
        # what the process runs whatever is reloaded: a reload compares with these, not with
        # the file loaded last, whose proxy:, state: and admin: may never have been applied
        started = engine.policy
        self._restart_sections = (started.proxy, started.state, started.admin)
        self.succeeded = 0
        self.failed = 0
        self._turn = asyncio.Lock()  # one reload at a time; waiters go in the order they came
        self._signalled: set[asyncio.Task[ReloadResult]] = set()

    def on_signal(self) -> None:
        """SIGHUP: reload in a task of its own (a signal handler cannot wait for it)."""
        task = asyncio.get_running_loop().create_task(self.reload(by="signal"))
        self._signalled.add(task)
        task.add_done_callback(self._signalled.discard)

    async def reload(self, by: str = "signal") -> ReloadResult:
        """Load the file again and apply it; ``by`` says who asked (signal: SIGHUP, operator:
        ``POST /reload``), for the log."""
        async with self._turn:
            return await self._reload(by)

    async def _reload(self, by: str) -> ReloadResult:
        running = self.engine.policy
        if self.path is None:
            log.warning("policy.reload_skipped", reason="no --config file", by=by)
            self.failed += 1
            return ReloadResult(
                ok=False, path=None, running=running.path, errors=["sipguard runs without a policy file"]
            )
        try:  # in a worker thread: 20,000 accounts take seconds, the loop keeps serving
            new = await asyncio.to_thread(load_policy, self.path)
        except PolicyFileError as error:
            self.failed += 1
            log.error("policy.reload_failed", path=self.path, errors=error.errors, kept=running.path, by=by)
            return ReloadResult(ok=False, path=self.path, running=running.path, errors=error.errors)
        restart_needed = (new.proxy, new.state, new.admin) != self._restart_sections
        if restart_needed:
            log.warning(
                "policy.restart_needed", detail="proxy:, state: and admin: changes apply after a restart"
            )
        # no await from here on: new INVITEs see the old policy or the new one, whole
        self.engine.replace(new)
        self.guard.reconfigure_flood(new.flood)
        self.succeeded += 1
        rules = [rule.name for rule, _ in new.rules]
        log.info("policy.reloaded", path=self.path, accounts=len(new.accounts), rules=rules, by=by)
        for warning in new.warnings:  # a file cut short, say: it applies, and says what it lacks
            log.warning("policy.warning", detail=warning)
        return ReloadResult(
            ok=True, path=self.path, running=new.path, restart_needed=restart_needed, warnings=new.warnings
        )
