"""Policies by name: the built-ins, plus any installed through the entry point group
``sipguard.policies`` (``name = "package.module:PolicyClass"``). A policy file names
rules by these names; an unknown name is an error at load."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from .base import Policy
from .call_rate import CallRatePolicy
from .caller_id import CallerIdPolicy
from .concurrency import ConcurrencyPolicy
from .destinations import DestinationsPolicy
from .dialer import DialerPolicy
from .telemarketing import CallingHoursPolicy, DoNotCallPolicy
from .usage import UsagePolicy

ENTRY_POINT_GROUP = "sipguard.policies"
BUILTIN: dict[str, type[Policy[Any]]] = {
    policy.name: policy
    for policy in (
        CallerIdPolicy,
        ConcurrencyPolicy,
        CallRatePolicy,
        UsagePolicy,
        DialerPolicy,
        DestinationsPolicy,
        CallingHoursPolicy,
        DoNotCallPolicy,
    )
}


def available_policies() -> dict[str, type[Policy[Any]]]:
    """Every policy that can be named in a policy file, built-ins first."""
    found = dict(BUILTIN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        policy = entry.load()
        if not (isinstance(policy, type) and issubclass(policy, Policy)):
            raise TypeError(f"entry point {entry.name} = {entry.value} is not a Policy subclass")
        if entry.name in found and found[entry.name] is not policy:
            raise ValueError(f"policy name {entry.name!r} is taken (by {found[entry.name].__module__})")
        found[entry.name] = policy
    return found
