"""Shared counters behind one interface: concurrency slots, rate buckets and quotas.

A call's operations are evaluated and committed together, in one step (one Lua script
round trip on Redis): either every slot the call needs is taken, or none is, so a call
rejected by one limit never holds a slot of another. Every operation is keyed by the
call's attempt id, so repeating it is harmless, and every entry expires.
"""

from .memory import MemoryStore
from .ops import HitRate, Operation, OpResult, StateStore, TakeSlot, UseQuota

__all__ = ["HitRate", "MemoryStore", "OpResult", "Operation", "StateStore", "TakeSlot", "UseQuota"]
