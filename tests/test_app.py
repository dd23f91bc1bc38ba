"""SipGuard (proxy/app.py) carrying out the core's actions, without sockets: the core is
sipsim's, the loop a fresh one that never runs (timers are only armed)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from sipsim import LOCAL_UDP, UPSTREAM, Sim, of_type
from structlog.testing import capture_logs

from proxy.app import ProxySettings, SipGuard
from proxy.hooks import AcceptAll
from proxy.sip.events import Address, CallAnswered, CallEnded


class BrokenOnAnswer(AcceptAll):
    """A hook with a bug in call_answered; it notes the ends it is told of."""

    def __init__(self) -> None:
        self.ended: list[CallEnded] = []

    def call_answered(self, event: CallAnswered) -> None:
        raise RuntimeError("a bug in a hook")

    def call_ended(self, event: CallEnded) -> None:
        self.ended.append(event)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_an_action_that_raises_costs_itself_only_not_the_rest_of_its_batch(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A bug in carrying out one action (here a hook's call_answered) is logged and
    counted, and the actions after it in the same batch still happen: a CallEnded among
    them is what gives a call's policy slots back. Before, the rest of the batch was lost."""
    hook = BrokenOnAnswer()
    guard = SipGuard(ProxySettings(listen=[LOCAL_UDP], upstream=UPSTREAM), hook)
    sim = Sim.make()
    guard.core, guard._loop = sim.core, loop
    sim.answer(sim.forward().data)
    [answered] = of_type(sim.log, CallAnswered)
    [ended] = of_type(sim.hang_up(), CallEnded)

    with capture_logs() as logs:
        guard._execute([answered, ended])

    assert hook.ended == [ended]
    assert guard.counters["internal_errors"] == 1 and guard.counters["calls_ended"] == 1
    [error] = [entry for entry in logs if entry["event"] == "proxy.internal_error"]
    assert error["action"] == "CallAnswered"


def test_the_wall_clock_is_read_again_every_tick(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wall clock stepped after start (NTP at boot, a VM resumed): the next tick gives
    the policy the new offset, so calling hours and quota days follow. Before, the offset
    taken at start held until a restart. (The step is faked: stepping this machine's
    clock for real is not for a test.)"""
    told: list[float] = []

    async def scenario() -> tuple[float, float]:
        guard = SipGuard(ProxySettings(listen=[Address("udp", "127.0.0.1", 0)], upstream=UPSTREAM))
        guard.on_wall_offset = told.append
        await guard.start()
        try:
            at_start = guard.wall_offset
            system_clock = time.time
            monkeypatch.setattr("proxy.app.time.time", lambda: system_clock() + 3600.0)
            guard._on_tick()
            return at_start, guard.wall_offset
        finally:
            await guard.close()

    at_start, after_the_step = asyncio.run(scenario())
    assert after_the_step - at_start == pytest.approx(3600.0, abs=5.0)
    assert told == [at_start, after_the_step]
