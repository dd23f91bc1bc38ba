"""RFC 3261 §17 transaction timers, shared by the relay (core.py) and the requests
sipguard sends on its own (dialogs.py)."""

from __future__ import annotations

T1 = 0.5  # RFC 3261 §17.1.1.1: round-trip estimate
T2 = 4.0  # the longest interval between retransmissions of a non-INVITE request
T4 = 5.0  # how long a message may linger in the network: Timer K
TIMER_B = 64 * T1  # also F, H, J: how long a transaction is remembered
