"""The proxy core's objects are freed by reference counting alone: no reference cycles.

Why it matters: a cycle is only found by a full garbage collection, which walks every
live object (hundreds of milliseconds at 1,000 calls a second); and objects in cycles
could not safely be frozen out of the collector's sight. Each scenario of the core's
tests (plain calls, CANCEL, timers, maximum duration, keepalive probes) is run again
here with the collector saving what it finds, and must leave none of proxy.sip's objects
behind, not even the core itself, which every scenario drops with its calls still live.
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Callable
from types import ModuleType

import pytest
import test_core
import test_core_keepalive
import test_core_max_duration
import test_core_timers


def scenarios(*modules: ModuleType) -> list[Callable[[], None]]:
    """The tests of ``modules`` that take no arguments (parametrised ones need pytest)."""
    found = []
    for module in modules:
        for name, function in vars(module).items():
            if name.startswith("test_") and callable(function) and not inspect.signature(function).parameters:
                found.append(function)
    return found


SCENARIOS = scenarios(test_core, test_core_timers, test_core_max_duration, test_core_keepalive)


def test_every_kind_of_scenario_is_covered() -> None:
    assert len(SCENARIOS) > 50
    names = {scenario.__name__ for scenario in SCENARIOS}
    assert "test_both_parties_get_a_bye_when_the_maximum_duration_is_up" in names
    assert "test_one_lost_probe_does_not_end_the_call_nor_do_misses_that_are_not_in_a_row" in names


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_the_core_leaves_no_reference_cycles(scenario: Callable[[], None]) -> None:
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        scenario()
        gc.collect()
        left = sorted(
            {type(item).__qualname__ for item in gc.garbage if type(item).__module__.startswith("proxy.")}
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
