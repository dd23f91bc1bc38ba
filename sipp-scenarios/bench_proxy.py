"""Load benchmark of the running proxy: SIPp UAC -> proxy -> SIPp UAS, loopback only.

Run from the repository root (the defaults take about 3 minutes here, longer when calls
fail: a failed call takes SIPp ~32 s of retransmissions to give up on):

    .venv/bin/python sipp-scenarios/bench_proxy.py                    # tables
    .venv/bin/python sipp-scenarios/bench_proxy.py --json             # one JSON object on stdout
    .venv/bin/python sipp-scenarios/bench_proxy.py --rates 100 --duration 2 --no-step-up   # quick look
    .venv/bin/python sipp-scenarios/bench_proxy.py --with-policies    # + sipguard enforcing policies
    .venv/bin/python sipp-scenarios/bench_proxy.py --with-patterns    # + the pattern policies too
    .venv/bin/python sipp-scenarios/bench_proxy.py --with-floor       # + sip_floor.py (with any of the above)
    .venv/bin/python sipp-scenarios/bench_proxy.py --state-compare    # policies: memory vs Redis store

What runs: for each rate in --rates, one SIPp run through (a) sipguard (``sipguard run
--config bench_plain.yaml``: no accounts and no rules, so every INVITE is accepted at
once on the no-op decision path, and the flood guard's per-source rate lifted, as the
UAC is one address sending for a whole customer base; --log-level warning, JSON logs)
and one through (b) udp_relay.py beside this file, a uvloop UDP relay that parses
nothing: the floor for moving datagrams through Python on uvloop. The order of (a) and
(b) alternates from one rate to the next, so neither always gets the quieter moment.
Then, unless --no-step-up, a step-up for sipguard alone through --step-rates (runs above
at the same rate are reused) that stops at the first step not carried, and one relay run
at that last step as a control: when the relay does not carry it either, the limit is
the rig (SIPp, the machine), not sipguard.

Every run starts fresh processes: a SIPp UAS (built-in ``uas``) as the stand-in PBX,
the proxy under test, and a SIPp UAC (built-in ``uac``: INVITE, 180, 200, ACK, pause
--hold-ms, BYE, 200) placing rate x duration calls with -r RATE -rp 1000, -m (call
count) and -l (2 s worth of concurrent calls). Both SIPps get -m and -timeout, so they
stop by themselves. Readiness is waited for by events, not sleeps: the UAS is ready
when a UDP socket owned by its pid is bound on its port (/proc/net/udp); the relay
prints ``relay.started``; sipguard is ready on its ``proxy.started`` log line or, as
that line is logged at info level and so not printed at --log-level warning, as soon as
it answers an OPTIONS probe addressed to itself (its keep-alive path).

What it reports per run:

- calls ok / failed / unfinished (SIPp's SuccessfulCall, FailedCall; unfinished: of the
  -m calls, neither, e.g. cut by -timeout), retransmissions (SIPp's Retransmissions
  counter of the UAC, which resends INVITE and BYE, and of the UAS, which resends its
  200 OK), and the rate achieved (answered calls over the span of their 200 OKs);
- proxy CPU: user+sys ticks of the proxy process from /proc/PID/stat, read just before
  the UAC starts and just after it exits, in microseconds per successful call; and,
  sampled every 0.2 s, its share of a core while calls were being placed and in its
  busiest second (near 100% means the proxy is the bottleneck);
- memory: peak RSS of the proxy (VmHWM from /proc/PID/status, read before SIGTERM),
  and its growth over the run per successful call;
- INVITE -> 200 response times: SIPp's response time 1 (the built-in uac stops it on
  the 200), every sample from -trace_rtt: mean, p50, p99, max. SIPp's clock has 1 ms
  resolution, so unloaded loopback calls read 0-1 ms;
- noise: the CPU time of the SIPp UAC and UAS (from wait4), the whole machine's busy
  cores over the run (/proc/stat) less those three processes' (the neighbours), and
  kernel UDP receive-buffer drops over the run (RcvbufErrors in /proc/net/snmp, all
  sockets, and the drops counter of the proxy's own socket);
- when calls failed: SIPp's failure causes on both sides, its -trace_err events
  counted by kind, and the proxy's warning/error log events; the run's files are kept.

Then the ratio of sipguard's CPU per call to the relay's at each rate, the step-up,
and the targets: 0 failed calls at 500 and 1000 CPS, CPU per call <= 2.0x the relay's,
0 failed calls at 2500 CPS (not met without a run when the step-up already failed
calls at a lower rate). A step counts as carried when every call succeeded and the
achieved rate is within 5% of the target rate.

With --with-policies (about 3 minutes): three systems at each rate, in an order that
alternates: the relay, sipguard without policies, and sipguard+pol, that is ``sipguard run
--config bench_policy.yaml`` (beside this file): caller_id, concurrency (2 per number) and
call_rate (10/min burst 3 per number) all enforcing, one account with 20,000 numbers and
per-account limits far above the offered load, --log-level warning. All three are driven
by the same UAC, uac_mix.xml from 127.0.0.2 (the account's source): each call presents
the next number of the account's range (``-inf callers.csv``, SEQUENTIAL, written into
each run's directory), so at these rates a number appears once a run and no limit is
reached. Reported besides the tables: each proxy's CPU per call over the relay's (targets
<= 2.0x for sipguard, <= 2.5x for sipguard+pol), the policies' cost under load (sipguard+pol
less sipguard, CPU per call), and bench_policies.py's figure for the policies alone per
INVITE (run as a subprocess after the load runs, nothing else running beside it). Then a
check that the allowed mix hit no limit: one more sipguard+pol run at the highest rate,
this one at --log-level info, where every rejection writes a ``call.decision`` line (the
measured runs stay at warning); it must load the three rules, show 0 rejections, and,
as a positive control after the load, refuse one call from an unowned number (uac_spoofed.xml,
403) with exactly one caller_id rejection in the log. Every caller being new to the
process, the load runs pay the policies' cold E.164 normalisation on each call, which is
the ``cold`` row of bench_policies.py. The step-up is off unless --step-up is given (it then
steps sipguard+pol). Targets: 0 failed calls at each rate for sipguard and sipguard+pol, the
two ratios, and 0 rejections in the check.

With --with-patterns (about 3 minutes; each run where calls fail adds ~30 s): --with-policies
with a fourth system at each rate, sipguard+pol+pat, that is ``sipguard run --config
bench_patterns.yaml`` (beside this file): bench_policy.yaml's account and three mission rules
unchanged, plus the pattern rules (dialer, usage, and whatever else that file lists), all
enforcing, on the same mix and in the same alternating order (relay, sipguard, sipguard+pol,
sipguard+pol+pat, then reversed). Reported besides the --with-policies figures: per rate,
sipguard+pol+pat's CPU per call over sipguard+pol's (target <= 1.3x: the pattern rules add at
most 30 % to the CPU per call with the mission rules) and the difference in us per call, also as
a share of what the mission rules themselves add (sipguard+pol less sipguard: the stricter
reading of the same target); and bench_policies.py's mission vs mission + patterns rows (the
rules alone, with call outcomes). The info-level check run is then of sipguard+pol+pat (its file
holds the mission rules too): it must load every rule bench_patterns.yaml lists (read with
``sipguard check``, so a rule added to the file is expected without touching this script), show
0 rejections and 0 warnings (a dialer signature past its warning threshold logs the call and
tags it), and have the control call refused by caller_id. The measured runs need no log check:
uac_mix.xml fails any call not answered 200, and a critical dialer finding also logs
penalty.boxed at warning level, which the notes would show. As a number appears at most 3 times
a run (the limit below), no dialer measure of a number reaches its min_calls; see
bench_patterns.yaml's comments.

With --with-floor (one run more per rate; combines with --with-policies and --with-patterns, not
with --state-compare): a further system at each rate, sip-floor, that is sip_floor.py beside this
file: a relay that does the SIP work a proxy must do on these calls on bytes only (pushes and pops
its Via, decrements Max-Forwards, adds Record-Route, strips its own Route, remembers the client by
Call-ID) and nothing else (no validation, transactions, timers or policies; see its docstring). It
is started as the relay is (same CLI, ready on its relay.started line), driven by the same UAC as
the other systems, and added at the end of their order, which is reversed at every other rate as
before. Reported like the others (calls, CPU per call, RSS, times), and its CPU per call over the
relay's beside the proxies' ratios, marked as a reference: it has no target and is in no other
figure (in --json: its runs under "runs", its ratio under "comparisons" with target_max and met
null). It is the floor for a proxy doing SIP work in Python on uvloop, so sip-floor / relay is
what that work costs at least, and sipguard's ratio above it what sipguard's per-message object
model (and its transactions, timers, policies) adds. udp_relay.py stays the baseline of every ratio.

With --state-compare (about 2 minutes): the shared-state store's cost. The script starts its own
redis-server (free loopback port, --save "" --appendonly no, maxmemory 256mb noeviction; stopped at
the end, ready when it answers PING) and writes a copy of bench_policy.yaml with
``state: {url: redis://127.0.0.1:PORT/0, timeout: 0.5}``. At each rate, in an order that alternates,
two systems on the --with-policies mix: sipguard+pol (counters in memory, the default) and
sipguard+pol+redis (the copy). Before each Redis run the server is emptied (FLUSHALL, SCRIPT FLUSH:
each run starts like a new instance on a new Redis). Reported besides the tables: the Redis run's
proxy CPU per call over the memory run's (target <= 1.5x); the redis-server's own CPU per call
(/proc/PID/stat over the same window as the proxy's; in the memory runs, its idle cost); INVITE->200
response times of both; and the round trips to Redis per INVITE, from INFO commandstats read before
and after each Redis run: every script call is one EVALSHA, one round trip, and the commands a
script runs are counted too, which tells the per-INVITE script (one ZREMRANGEBYSCORE per slot key)
from the release after the BYE (one ZREM per slot key) and the batched lease renewal (the rest).
Per INVITE counts the per-INVITE script calls plus any NOSCRIPT refusal and SCRIPT LOAD (target
<= 1), over the calls placed. Then a check like --with-policies': one more Redis run at the highest
rate at --log-level info, 0 call.decision rejections, a spoofed control call refused 403. A run
with Redis must show no fallback either (state.unavailable, state.breaker_open, state.renew_failed,
policy.timeout in the proxy's log: with fail_mode open a call would then be counted locally, and
look cheaper), and one per-INVITE script call per INVITE. The memory runs need no log check for
rejections: uac_mix.xml fails any call not answered 200, so 0 failed calls is 0 rejections.

Caveats, for reading the numbers: a run of D seconds does not reach sipguard's steady
state for memory and timers: it remembers each transaction for 32 s (Timer B/F/H/J)
after it ends, so with D = 10 no transaction expires during the measured window, the
expiry work is outside the CPU figure, and peak RSS is that of 10 s of calls. CPU ticks
are 10 ms, so short, slow runs of the relay (~0.1 s of CPU) are only good to ~10%. The
machine has 2 shared cores: SIPp UAC, UAS and the proxy compete for them, and so do
the neighbours (the "others" column).

Exit status: 0 when every target was met, 1 when one was missed, 2 when the benchmark
itself could not run (a process failed to start, SIPp missing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
RELAY_SCRIPT = HERE / "udp_relay.py"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

DEFAULT_RATES = (500, 1000)
DEFAULT_STEP_RATES = (500, 1000, 1500, 2000, 2500)
DEFAULT_DURATION = 10.0
DEFAULT_HOLD_MS = 100
TARGET_RATIO = 2.0
TARGET_ZERO_FAILED_AT = (500, 1000, 2500)
CARRIED_RATE_SHARE = 0.95  # achieved / target rate for a step to count as carried

SIPP_TAIL_S = 40  # past the last call's start: SIPp's slowest failure (INVITE Timer B) is ~32 s
SAMPLE_S = 0.2  # how often the proxy's CPU ticks are sampled during a run
START_TIMEOUT_S = 15.0  # for a process to become ready
UAS_EXIT_GRACE_S = 10.0  # the built-in uas keeps each call 4 s in timewait before it counts it
PROXY_EXIT_TIMEOUT_S = 20.0  # sipguard drains for at most 10 s (shutdown_grace)

SYSTEMS = ("sipguard", "relay")
QUIET_EVENTS = frozenset(
    {"proxy.started", "relay.started", "relay.stopped", "policy.loaded", "proxy.stopping", "proxy.stopped",
     "call.ended"}
)  # fmt: skip

# --with-policies: a third system, sipguard enforcing bench_policy.yaml, on an allowed-traffic mix
POLICIES = "sipguard+pol"
POLICY_SYSTEMS = ("relay", "sipguard", POLICIES)
BENCH_POLICY = HERE / "bench_policy.yaml"
BENCH_PLAIN = HERE / "bench_plain.yaml"  # plain sipguard: no rules; the flood rate lifted
MIX_SCENARIO = HERE / "uac_mix.xml"  # caller numbers from -inf callers.csv
SPOOFED_SCENARIO = HERE / "uac_spoofed.xml"  # the check's positive control: must get 403
BENCH_POLICIES_SCRIPT = HERE / "bench_policies.py"
POLICY_RULES = ["caller_id", "concurrency", "call_rate"]  # what bench_policy.yaml must load, in order
POLICY_UAC_HOST = "127.0.0.2"  # the account's source in bench_policy.yaml
POLICY_CALLEE = "+12125551234"
POLICY_CALLERS = (14155500000, 20_000)  # first number and count of the account's range (the yaml)
POLICY_BURST = 3  # call_rate.per_number burst: a number used at most this often per run never waits
SPOOFED_CALLER = "+16505550100"  # a valid number the account does not own
TARGET_POLICY_RATIO = 2.5

# --with-patterns: a fourth system, sipguard enforcing bench_patterns.yaml (mission + pattern rules)
PATTERNS = "sipguard+pol+pat"
PATTERN_SYSTEMS = (*POLICY_SYSTEMS, PATTERNS)
BENCH_PATTERNS = HERE / "bench_patterns.yaml"
TARGET_PATTERN_RATIO = 1.3  # sipguard+pol+pat CPU per call over sipguard+pol's

# --with-floor: one more system at each rate, sip_floor.py, a relay doing SIP work on bytes only: a
# yardstick (its ratio to the relay is reported, it has no target), started as the relay is
FLOOR = "sip-floor"
FLOOR_SCRIPT = HERE / "sip_floor.py"
RELAY_SCRIPTS = {"relay": RELAY_SCRIPT, FLOOR: FLOOR_SCRIPT}  # the systems that print relay.started

# --state-compare: sipguard+pol with its counters in memory against the same with them in Redis
POLICIES_REDIS = "sipguard+pol+redis"
STATE_SYSTEMS = (POLICIES, POLICIES_REDIS)
REDIS_TIMEOUT_S = 0.5  # state: timeout of the Redis runs' policy file
REDIS_MAXMEMORY = "256mb"  # bound for the benchmark's redis-server (noeviction: full means errors, seen)
# TakeSlot operations of every INVITE of the mix under bench_policy.yaml: concurrency per_number and
# per_account. The per-INVITE script runs ZREMRANGEBYSCORE once per slot key, the release script ZREM
# once per slot key, and nothing else does either: that is how the script calls are told apart.
SLOTS_PER_INVITE = 2
TARGET_REDIS_CPU_RATIO = 1.5
TARGET_ROUND_TRIPS_PER_INVITE = 1.0
STATE_EVENTS = ("state.unavailable", "state.breaker_open", "state.renew_failed", "policy.timeout")

# the systems that judge calls, by the policy file each runs (sipguard+pol+redis: a copy of
# bench_policy.yaml with a state: section, written by RedisBench)
POLICY_FILES = {POLICIES: BENCH_POLICY, PATTERNS: BENCH_PATTERNS}
JUDGING_SYSTEMS = (POLICIES, PATTERNS, POLICIES_REDIS)


class BenchmarkError(RuntimeError):
    """The benchmark could not run (not: the proxy did badly)."""


# -- /proc ---------------------------------------------------------------------------------------
def cpu_ticks(pid: int) -> int:
    """user + sys clock ticks of a process (fields 14 and 15 of /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return int(fields[11]) + int(fields[12])


def status_kib(pid: int, field_name: str) -> int | None:
    """A memory figure from /proc/PID/status (VmHWM: peak RSS, VmRSS: current), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def machine_busy_ticks() -> int:
    """Busy clock ticks of all CPUs together, from /proc/stat (steal counts as busy)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle  # guest time is already inside user


def udp_snmp() -> dict[str, int]:
    lines = [
        line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")
    ]
    return {name: int(value) for name, value in zip(lines[0][1:], lines[1][1:], strict=True)}


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def udp_socket_of(pid: int, port: int) -> dict[str, int] | None:
    """The UDP socket bound on 127.0.0.1:port owned by pid, from /proc/net/udp, or None."""
    owned = socket_inodes(pid)
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        cols = line.split()
        if len(cols) > 12 and cols[1] == wanted and cols[9] in owned:
            rx_queue = int(cols[4].split(":")[1], 16)
            return {"inode": int(cols[9]), "drops": int(cols[12]), "rx_queue": rx_queue}
    return None


def free_udp_ports(count: int) -> list[int]:
    probes = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind((HOST, 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


# -- SIPp output ---------------------------------------------------------------------------------
def read_stat_csv(path: Path) -> dict[str, str]:
    """The last complete row of a SIPp -trace_stat file (cumulative at exit), by column name."""
    if not path.exists():
        return {}
    lines = [line.rstrip("\r\n") for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(lines) < 2:
        return {}
    header = [name.strip() for name in lines[0].split(";")]
    for line in reversed(lines[1:]):
        values = line.split(";")
        if len(values) >= len(header) - 1:  # a trailing ';' may or may not be there
            return {name: value.strip() for name, value in zip(header, values, strict=False) if name}
    return {}


def stat_int(row: dict[str, str], name: str) -> int:
    try:
        return int(float(row.get(name, "0") or 0))
    except ValueError:
        return 0


def stat_ms(row: dict[str, str], name: str) -> float | None:
    """SIPp durations read HH:MM:SS:uuuuuu (microseconds field, millisecond resolution)."""
    match = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", row.get(name, ""))
    if not match:
        return None
    hours, minutes, seconds, micros = (int(part) for part in match.groups())
    return ((hours * 60 + minutes) * 60 + seconds) * 1000.0 + micros / 1000.0


def read_rtt(directory: Path) -> list[tuple[float, float]]:
    """(date_ms, response_time_ms) of every response-time-1 sample of -trace_rtt."""
    samples = []
    for path in sorted(directory.glob("uac_*_rtt.csv")):
        for line in path.read_text(errors="replace").splitlines()[1:]:
            parts = line.strip().split(";")
            if len(parts) >= 3 and parts[2].strip() == "1":
                with contextlib.suppress(ValueError):
                    samples.append((float(parts[0]), float(parts[1])))
    samples.sort()
    return samples


def percentile(sorted_values: list[float], share: float) -> float:
    rank = max(1, math.ceil(share * len(sorted_values)))
    return sorted_values[rank - 1]


def sipp_version() -> str:
    try:
        out = subprocess.run(["sipp", "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "n/a"
    match = re.search(r"SIPp v(\S+)", out)
    return match.group(1).rstrip(".") if match else "n/a"


# -- processes -----------------------------------------------------------------------------------
class LogReader(threading.Thread):
    """Drains a child's stderr (JSON lines), so it never blocks, and signals a start event."""

    def __init__(self, stream: Any, start_event: str) -> None:
        super().__init__(daemon=True)
        self._stream = stream
        self._start_event = start_event
        self.started_line = threading.Event()
        self.events: Counter[str] = Counter()
        self.levels: Counter[str] = Counter()
        self.first_lines: list[str] = []
        self.last_lines: list[str] = []
        self.decisions: Counter[tuple[str, str, str]] = Counter()  # (verdict, rule, caller_e164)
        self.warnings: Counter[str] = Counter()  # rules' warnings (Warn: the call goes on, tagged), by rule
        self.fields: dict[str, dict[str, Any]] = {}  # the last line of a few events, whole

    def run(self) -> None:
        for raw in self._stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if len(self.first_lines) < 20:
                self.first_lines.append(line)
            self.last_lines = [*self.last_lines[-19:], line]
            try:
                entry = json.loads(line)
            except ValueError:
                self.events["(not json)"] += 1
                continue
            if not isinstance(entry, dict):
                continue
            event = str(entry.get("event"))
            self.events[event] += 1
            self.levels[str(entry.get("level", "-"))] += 1
            if event == "call.decision":
                key = (str(entry.get("verdict")), str(entry.get("rule")), str(entry.get("caller_e164")))
                self.decisions[key] += 1
                for warning in entry.get("warnings") or ():
                    self.warnings[str(warning.get("rule") if isinstance(warning, dict) else warning)] += 1
            elif event in ("policy.loaded", "proxy.stopped"):
                self.fields[event] = entry
            if entry.get("event") == self._start_event:
                self.started_line.set()


class CpuSampler(threading.Thread):
    """Samples a process's CPU ticks every SAMPLE_S, for its busiest second and its load phase."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self._pid = pid
        self._halt = threading.Event()
        self.samples: list[tuple[float, int]] = [(time.monotonic(), cpu_ticks(pid))]

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_S):
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic(), cpu_ticks(self._pid)))

    def finish(self) -> None:
        self._halt.set()
        self.join()
        with contextlib.suppress(OSError, ValueError):
            self.samples.append((time.monotonic(), cpu_ticks(self._pid)))

    def share(self, start: float, end: float) -> float | None:
        """Cores used between the samples nearest to two moments (1.0 = one core)."""
        first = min(self.samples, key=lambda sample: abs(sample[0] - start))
        last = min(self.samples, key=lambda sample: abs(sample[0] - end))
        if last[0] - first[0] < SAMPLE_S / 2:
            return None
        return (last[1] - first[1]) / CLK_TCK / (last[0] - first[0])

    def peak(self, window: float = 1.0) -> float | None:
        """The busiest ``window`` seconds, in cores."""
        best = None
        for index, (when, _) in enumerate(self.samples):
            later = [j for j in range(index + 1, len(self.samples)) if self.samples[j][0] - when >= window]
            if not later:
                break
            end = self.samples[later[0]]
            value = (end[1] - self.samples[index][1]) / CLK_TCK / (end[0] - when)
            best = value if best is None else max(best, value)
        return best


def wait4(process: subprocess.Popen[bytes], timeout: float | None) -> float | None:
    """Reap a child with wait4 and return its CPU seconds (user+sys), or None on timeout."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG if deadline is not None else 0)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.01)  # polling for exit, not synchronising on a guess


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 5.0) -> float | None:
    """Signal a child of ours (by its pid), reap it; SIGKILL if it will not go."""
    if process.returncode is not None:
        return None
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    cpu = wait4(process, timeout)
    if cpu is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        cpu = wait4(process, None)
    return cpu


def wait_until(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check():
        if process.poll() is not None:
            raise BenchmarkError(f"{what} exited at start (status {process.returncode})")
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{what} not ready after {START_TIMEOUT_S:g} s")
        time.sleep(0.005)


def options_probe(port: int, attempt: int, local_port: int) -> bytes:
    return (
        f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{local_port};branch=z9hG4bK-bench-ready-{attempt}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:bench@{HOST}>;tag=bench{attempt}\r\n"
        f"To: <sip:{HOST}:{port}>\r\n"
        f"Call-ID: bench-ready-{attempt}-{os.getpid()}@{HOST}\r\n"
        f"CSeq: {attempt} OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def wait_sipguard_ready(process: subprocess.Popen[bytes], reader: LogReader, port: int) -> str:
    """Ready on proxy.started (info level) or on the first answer to an OPTIONS to itself."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((HOST, 0))
        local_port = probe.getsockname()[1]
        attempt = 0
        while True:
            if reader.started_line.is_set():
                return "proxy.started log line"
            if process.poll() is not None:
                raise BenchmarkError(f"sipguard exited at start (status {process.returncode})")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"sipguard not ready after {START_TIMEOUT_S:g} s")
            attempt += 1
            probe.sendto(options_probe(port, attempt, local_port), (HOST, port))
            readable, _, _ = select.select([probe], [], [], 0.05)
            if readable:
                with contextlib.suppress(ConnectionRefusedError):  # ICMP: not bound yet
                    answer = probe.recv(65535)
                    if answer.startswith(b"SIP/2.0 200"):
                        return "answered an OPTIONS probe"


# -- the benchmark's redis-server (--state-compare) ----------------------------------------------
def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def redis_ping(port: int) -> bool:
    """True when a redis-server answers PING on the port (a fresh connection each time)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as connection:
            connection.sendall(b"*1\r\n$4\r\nPING\r\n")
            return connection.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def parse_info(text: str) -> dict[str, str]:
    """INFO's ``name:value`` lines (section headers and blank lines skipped)."""
    pairs = (line.split(":", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: value.strip() for name, value in pairs}


def parse_commandstats(text: str) -> dict[str, dict[str, int]]:
    """INFO commandstats: ``cmdstat_evalsha:calls=3,usec=40,usec_per_call=13.33,rejected_calls=0,
    failed_calls=1`` -> {"evalsha": {"calls": 3, "usec": 40, "rejected_calls": 0, "failed_calls": 1}}."""
    stats = {}
    for name, value in parse_info(text).items():
        if name.startswith("cmdstat_"):
            fields = dict(part.split("=", 1) for part in value.split(","))
            stats[name.removeprefix("cmdstat_")] = {
                key: int(fields.get(key, 0)) for key in ("calls", "usec", "rejected_calls", "failed_calls")
            }
    return stats


class RedisBench:
    """The benchmark's own redis-server: a free loopback port, no persistence, memory bounded
    (noeviction), stopped by ``stop``. One plain RESP connection of ours reads INFO and flushes
    between runs; sipguard's commands are told from it by name (ours: INFO, FLUSHALL, SCRIPT
    FLUSH, PING)."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="bench_proxy-redis-"))
        self.policy_path = self.workdir / "bench_policy_redis.yaml"
        self.port = 0
        self.version = "n/a"
        self.process: subprocess.Popen[bytes] | None = None
        self.cpu_s: float | None = None  # its whole CPU time, from wait4 when stopped
        self._connection: socket.socket | None = None
        self._replies: Any = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise BenchmarkError("--state-compare needs redis-server: run `bash .ci/setup`")
        for attempt in range(3):  # the free port may be taken between the probe and redis's bind
            self.port = free_tcp_port()
            self.process = subprocess.Popen(
                [exe, "--port", str(self.port), "--bind", HOST, "--protected-mode", "yes",
                 "--save", "", "--appendonly", "no", "--dir", str(self.workdir), "--logfile", "redis.log",
                 "--maxmemory", REDIS_MAXMEMORY, "--maxmemory-policy", "noeviction"],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            process = self.process
            try:
                wait_until(functools.partial(redis_ping, self.port), process, "redis-server")
                break
            except BenchmarkError:
                exited = process.poll() is not None  # e.g. the port was taken: try another one
                stop(process)
                if not exited or attempt == 2:
                    raise BenchmarkError(f"redis-server did not start (log in {self.workdir})") from None
        self.version = self.info("server").get("redis_version", "n/a")
        # the bench policy, its counters in this Redis: bench_policy.yaml has no state: section
        self.policy_path.write_text(
            BENCH_POLICY.read_text()
            + "\n# added by bench_proxy.py --state-compare\n"
            + f"state: {{url: {self.url}, timeout: {REDIS_TIMEOUT_S}}}\n"
        )

    def command(self, *args: str) -> Any:
        if self._connection is None:
            self._connection = socket.create_connection((HOST, self.port), timeout=5.0)
            self._replies = self._connection.makefile("rb")
        request = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            request.append(b"$%d\r\n%s\r\n" % (len(data), data))
        try:
            self._connection.sendall(b"".join(request))
            return self._reply()
        except OSError as error:
            raise BenchmarkError(f"redis-server on port {self.port}: {error}") from None

    def _reply(self) -> Any:
        line = self._replies.readline()
        if not line.endswith(b"\r\n"):
            raise BenchmarkError(f"redis-server on port {self.port} closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BenchmarkError(f"redis-server: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._replies.read(size + 2)[:-2].decode(errors="replace")
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self._reply() for _ in range(size)]
        raise BenchmarkError(f"redis-server: unexpected reply {line[:40]!r}")

    def info(self, section: str) -> dict[str, str]:
        return parse_info(self.command("INFO", section))

    def commandstats(self) -> dict[str, dict[str, int]]:
        return parse_commandstats(self.command("INFO", "commandstats"))

    def reset(self) -> None:
        """Before each Redis run: no keys and no cached scripts, so every run starts alike (a
        new sipguard against a new Redis: its first script calls get NOSCRIPT and load it)."""
        self.command("SCRIPT", "FLUSH")
        self.command("FLUSHALL")

    def stop(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._replies.close()
                self._connection.close()
            self._connection = None
        if self.process is not None and self.process.returncode is None:
            self.cpu_s = stop(self.process, signal.SIGTERM, 10.0)


# -- one run -------------------------------------------------------------------------------------
@dataclass(slots=True)
class RunResult:
    system: str
    rate: int
    duration_s: float
    hold_ms: int
    calls: int
    ok: int = 0
    failed: int = 0
    unfinished: int = 0
    created: int = 0
    failure_causes: dict[str, int] = field(default_factory=dict)
    retrans_uac: int = 0
    retrans_uas: int = 0
    uas_ok: int = 0
    uas_failed: int = 0
    dead_call_msgs: int = 0
    out_of_call_msgs: int = 0
    achieved_cps: float | None = None
    rt_samples: int = 0
    rt_mean_ms: float | None = None
    rt_p50_ms: float | None = None
    rt_p99_ms: float | None = None
    rt_max_ms: float | None = None
    rt_stat_mean_ms: float | None = None
    window_s: float = 0.0
    proxy_cpu_s: float = 0.0
    proxy_cpu_us_per_call: float | None = None
    proxy_core_share: float | None = None
    proxy_load_share: float | None = None
    proxy_peak_share: float | None = None
    proxy_peak_rss_mib: float | None = None
    proxy_rss_start_mib: float | None = None
    proxy_rss_kib_per_call: float | None = None
    proxy_socket_drops: int | None = None
    proxy_exit_status: int | None = None
    proxy_drain_s: float | None = None
    proxy_log_events: dict[str, int] = field(default_factory=dict)
    proxy_ready_by: str = ""
    uac_cpu_s: float | None = None
    uas_cpu_s: float | None = None
    uac_exit_status: int | None = None
    uas_exit_status: int | None = None
    uas_stopped_by_us: bool = False
    machine_busy_cores: float | None = None
    others_cores: float | None = None
    udp_rcvbuf_errors: int | None = None
    loadavg_1m: float = 0.0
    uas_failure_causes: dict[str, int] = field(default_factory=dict)
    sipp_errors: dict[str, dict[str, int]] = field(default_factory=dict)
    workdir: str | None = None
    uac: str = "sipp built-in uac"
    log_level: str | None = None  # sipguard's --log-level; None for the relay and sip-floor
    policy_file: str | None = None
    # from sipguard's info-level lines (the policy check run only): policy.loaded's rules,
    # call.decision rejections of the load by (rule, caller), proxy.stopped's counters
    policy_rules: list[str] | None = None
    policy_rejections: dict[str, int] = field(default_factory=dict)
    policy_warnings: dict[str, int] = field(default_factory=dict)  # accepted calls a rule warned about
    proxy_counters: dict[str, int] = field(default_factory=dict)
    # the positive control of the check: one call from an unowned caller, which must get 403
    control_refused_403: bool | None = None
    control_rejections: dict[str, int] = field(default_factory=dict)
    # --state-compare: the store holding sipguard+pol's counters ("memory" or "redis"); the
    # benchmark's redis-server over the same window as the proxy's CPU (idle in memory runs);
    # for the Redis runs, what sipguard sent it (INFO commandstats, before and after the run)
    state_store: str | None = None
    redis_cpu_s: float | None = None
    redis_cpu_us_per_call: float | None = None
    redis_invites: int | None = None  # INVITEs judged: calls placed (and the control call)
    redis_scripts: dict[str, float] = field(default_factory=dict)
    redis_round_trips_per_invite: float | None = None  # per-INVITE script calls / INVITEs
    redis_round_trips_with_cold: float | None = None  # the same + NOSCRIPT refusals + SCRIPT LOADs
    redis_script_usec: float | None = None  # Redis's own time per script call (commandstats usec)
    redis_connections: int | None = None  # connections opened to Redis during the run
    redis_clients: int | None = None  # connected when the load ended, ours excluded
    state_events: dict[str, int] = field(default_factory=dict)  # fallbacks, from the proxy's log

    @property
    def clean(self) -> bool:
        return self.failed == 0 and self.unfinished == 0 and self.ok == self.calls

    @property
    def carried(self) -> bool:
        return self.clean and (self.achieved_cps or 0.0) >= CARRIED_RATE_SHARE * self.rate


def sipguard_exe() -> str:
    sipguard = REPO_ROOT / ".venv" / "bin" / "sipguard"
    return str(sipguard) if sipguard.exists() else (shutil.which("sipguard") or "sipguard")


def policy_rules(path: Path) -> list[str]:
    """The rules a policy file makes sipguard run, in order, as ``sipguard check`` lists them
    (which also validates the file before any run uses it)."""
    try:
        done = subprocess.run(
            [sipguard_exe(), "check", str(path)], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        raise BenchmarkError(f"sipguard check {path.name}: {error}") from None
    if done.returncode != 0:
        raise BenchmarkError(
            f"sipguard check {path.name} failed: {(done.stdout + done.stderr).strip()[-500:]}"
        )
    lines = done.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if re.match(r"rules \(\d+\)", line)), None)
    if header is None:
        raise BenchmarkError(f"sipguard check {path.name}: no rule list in its output")
    rules = []
    for line in lines[header + 1 :]:
        if not line.startswith("  "):
            break
        if not line.startswith("   "):  # a rule; deeper lines describe it (list sizes ...)
            rules.append(line.split()[0])
    return rules


def proxy_command(
    system: str, port: int, upstream: int, log_level: str = "warning", policy_file: Path = BENCH_POLICY
) -> list[str]:
    if system == "sipguard" or system in JUDGING_SYSTEMS:
        config = ["--config", str(policy_file if system in JUDGING_SYSTEMS else BENCH_PLAIN)]
        return [
            sipguard_exe(), "run", *config, "--listen", f"udp:{HOST}:{port}",
            "--upstream", f"udp:{HOST}:{upstream}", "--log-level", log_level, "--log-format", "json",
        ]  # fmt: skip
    return [
        sys.executable,
        str(RELAY_SCRIPTS[system]),
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{upstream}",
    ]


def sipp_stats_args(name: str) -> list[str]:
    return [
        "-trace_stat",
        "-stf",
        f"{name}_stat.csv",
        "-fd",
        "1",
        "-trace_err",
        "-error_file",
        f"{name}_errors.log",
    ]


def write_callers(path: Path) -> None:
    """The injection file of uac_mix.xml: every number of bench_policy.yaml's account, in turn."""
    first, count = POLICY_CALLERS
    path.write_text("SEQUENTIAL\n" + "".join(f"+{first + n};\n" for n in range(count)))


def uac_scenario_args(mix: bool, workdir: Path) -> list[str]:
    """The UAC's scenario: SIPp's built-in uac, or (--with-policies) uac_mix.xml from the
    account's source address, presenting its numbers in turn."""
    if not mix:
        return ["-sn", "uac", "-i", HOST]
    write_callers(workdir / "callers.csv")
    return ["-sf", str(MIX_SCENARIO), "-inf", "callers.csv", "-s", POLICY_CALLEE, "-i", POLICY_UAC_HOST]


def run_control(workdir: Path, proxy_port: int, local_port: int) -> bool:
    """One call from the account's source with a caller it does not own: True when it got 403
    (uac_spoofed.xml succeeds exactly then). Bounded by -timeout and a subprocess timeout."""
    with open(workdir / "control_screen.txt", "wb") as screen:
        subprocess.run(
            ["sipp", "-sf", str(SPOOFED_SCENARIO), f"{HOST}:{proxy_port}", "-i", POLICY_UAC_HOST,
             "-p", str(local_port), "-key", "caller", SPOOFED_CALLER, "-s", POLICY_CALLEE, "-m", "1",
             "-timeout", "10", "-nostdin", "-trace_stat", "-stf", "control_stat.csv", "-fd", "1"],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=screen, stderr=subprocess.STDOUT, timeout=30,
            check=False,
        )  # fmt: skip
    return stat_int(read_stat_csv(workdir / "control_stat.csv"), "SuccessfulCall(C)") == 1


def run_once(
    system: str,
    rate: int,
    duration: float,
    hold_ms: int,
    keep: bool,
    *,
    mix: bool = False,
    log_level: str = "warning",
    control: bool = False,
    redis: RedisBench | None = None,
) -> RunResult:
    """One run through ``system``. ``mix``: the --with-policies UAC (uac_mix.xml from the
    account's address, owned callers in turn) instead of the built-in uac; ``control``
    (a system judging calls): once the load is done, one spoofed call that must be refused;
    ``redis`` (--state-compare): the benchmark's redis-server, whose CPU is read over the run's
    window, and which sipguard+pol+redis uses as its store (flushed before, its command
    statistics read before and after)."""
    calls = max(1, round(rate * duration))
    result = RunResult(system=system, rate=rate, duration_s=duration, hold_ms=hold_ms, calls=calls)
    result.loadavg_1m = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix=f"bench_proxy-{system.replace('+', '_')}-{rate}-"))
    uas_port, proxy_port, uac_port, control_port = free_udp_ports(4)
    if mix:
        result.uac = f"{MIX_SCENARIO.name}, -i {POLICY_UAC_HOST}, {POLICY_CALLERS[1]} callers in turn"
    if system not in RELAY_SCRIPTS:
        result.log_level = log_level
    policy_file = POLICY_FILES.get(system, BENCH_POLICY)
    if system in POLICY_FILES:
        result.policy_file = str(policy_file.relative_to(REPO_ROOT))
    if system == POLICIES_REDIS:
        if redis is None:
            raise BenchmarkError(f"{POLICIES_REDIS} needs the benchmark's redis-server")
        policy_file = redis.policy_path
        result.policy_file = (
            f"{BENCH_POLICY.relative_to(REPO_ROOT)} + state: {redis.url} (timeout {REDIS_TIMEOUT_S:g} s)"
        )
    if redis is not None and system in STATE_SYSTEMS:
        result.state_store = "redis" if system == POLICIES_REDIS else "memory"
    sipp_timeout = str(math.ceil(1.5 * duration + hold_ms / 1000.0 + SIPP_TAIL_S))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with open(workdir / "uas_screen.txt", "wb") as screen:
            uas = subprocess.Popen(
                ["sipp", "-sn", "uas", "-i", HOST, "-p", str(uas_port), "-nostdin", "-m", str(calls),
                 "-timeout", str(int(sipp_timeout) + 10), *sipp_stats_args("uas")],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=screen, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(uas)
        wait_until(lambda: udp_socket_of(uas.pid, uas_port) is not None, uas, "SIPp UAS")

        redis_before: dict[str, dict[str, int]] = {}
        connections_before = 0
        if redis is not None:
            if system == POLICIES_REDIS:
                redis.reset()
            redis_before = redis.commandstats()
            connections_before = int(redis.info("stats").get("total_connections_received", 0))
        proxy = subprocess.Popen(
            proxy_command(system, proxy_port, uas_port, log_level, policy_file),
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        processes.append(proxy)
        reader = LogReader(proxy.stderr, "relay.started" if system in RELAY_SCRIPTS else "proxy.started")
        reader.start()
        if system not in RELAY_SCRIPTS:
            result.proxy_ready_by = wait_sipguard_ready(proxy, reader, proxy_port)
        else:
            wait_until(reader.started_line.is_set, proxy, system)
            result.proxy_ready_by = "relay.started log line"

        rss_start = status_kib(proxy.pid, "VmRSS") or 0
        snmp_before = udp_snmp()
        busy_before = machine_busy_ticks()
        redis_ticks_before = cpu_ticks(redis.pid) if redis is not None else 0
        proxy_before = cpu_ticks(proxy.pid)
        sampler = CpuSampler(proxy.pid)
        sampler.start()
        started = time.monotonic()
        with open(workdir / "uac_screen.txt", "wb") as screen:
            uac = subprocess.Popen(
                ["sipp", *uac_scenario_args(mix, workdir), f"{HOST}:{proxy_port}", "-p", str(uac_port),
                 "-nostdin",
                 "-r", str(rate), "-rp", "1000", "-m", str(calls), "-l", str(max(100, 2 * rate)),
                 "-d", str(hold_ms), "-timeout", sipp_timeout, "-trace_rtt", "-rtt_freq", "100",
                 *sipp_stats_args("uac")],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=screen, stderr=subprocess.STDOUT,
            )  # fmt: skip
        processes.append(uac)
        result.uac_cpu_s = wait4(uac, None)
        window = time.monotonic() - started
        proxy_after = cpu_ticks(proxy.pid)
        redis_ticks_after = cpu_ticks(redis.pid) if redis is not None else 0
        sampler.finish()
        redis_clients = None if redis is None else int(redis.info("clients").get("connected_clients", 0)) - 1
        load_phase = started + duration + hold_ms / 1000.0
        load_share = sampler.share(started, min(load_phase, started + window))
        result.proxy_load_share = None if load_share is None else round(load_share, 3)
        peak_share = sampler.peak()
        result.proxy_peak_share = None if peak_share is None else round(peak_share, 3)
        busy_after = machine_busy_ticks()
        snmp_after = udp_snmp()
        result.uac_exit_status = uac.returncode
        peak = status_kib(proxy.pid, "VmHWM") or 0
        result.proxy_peak_rss_mib = round(peak / 1024.0, 1)
        result.proxy_rss_start_mib = round(rss_start / 1024.0, 1)
        proxy_socket = udp_socket_of(proxy.pid, proxy_port)
        result.proxy_socket_drops = proxy_socket["drops"] if proxy_socket else None
        if control:  # after every figure above was taken: it is no part of the load
            result.control_refused_403 = run_control(workdir, proxy_port, control_port)

        result.uas_cpu_s = wait4(uas, UAS_EXIT_GRACE_S)
        if result.uas_cpu_s is None:  # some calls never reached it: it would wait for -timeout
            result.uas_stopped_by_us = True
            result.uas_cpu_s = stop(uas)
        result.uas_exit_status = uas.returncode

        stopping = time.monotonic()
        stop(proxy, signal.SIGTERM, PROXY_EXIT_TIMEOUT_S)
        result.proxy_drain_s = round(time.monotonic() - stopping, 3)
        result.proxy_exit_status = proxy.returncode
        reader.join(timeout=5)
        result.proxy_log_events = dict(reader.events)
        result.state_events = {event: reader.events[event] for event in STATE_EVENTS if reader.events[event]}
        if system in JUDGING_SYSTEMS:
            loaded = reader.fields.get("policy.loaded")
            result.policy_rules = list(loaded["rules"]) if loaded and "rules" in loaded else None
            stopped = reader.fields.get("proxy.stopped", {})
            result.proxy_counters = {k: v for k, v in stopped.items() if isinstance(v, int)}
            for (verdict, rule, caller), count in reader.decisions.items():
                if verdict == "reject":
                    side = result.control_rejections if caller == SPOOFED_CALLER else result.policy_rejections
                    side[rule] = side.get(rule, 0) + count
            result.policy_warnings = dict(reader.warnings)
        if reader.levels.get("warning") or reader.levels.get("error"):
            (workdir / "proxy_stderr_head.txt").write_text("\n".join(reader.first_lines) + "\n")
            (workdir / "proxy_stderr_tail.txt").write_text("\n".join(reader.last_lines) + "\n")

        result.window_s = round(window, 3)
        result.proxy_cpu_s = round((proxy_after - proxy_before) / CLK_TCK, 3)
        # the UAS outlives the window by a moment; nearly all of its CPU falls inside it
        ours = result.proxy_cpu_s + (result.uac_cpu_s or 0.0) + (result.uas_cpu_s or 0.0)
        busy_cores = (busy_after - busy_before) / CLK_TCK / window if window > 0 else 0.0
        result.machine_busy_cores = round(busy_cores, 2)
        result.others_cores = round(max(0.0, busy_cores - ours / window), 2) if window > 0 else None
        result.proxy_core_share = round(result.proxy_cpu_s / window, 3) if window > 0 else None
        result.udp_rcvbuf_errors = snmp_after.get("RcvbufErrors", 0) - snmp_before.get("RcvbufErrors", 0)
        collect_sipp(result, workdir)
        if result.ok:
            result.proxy_cpu_us_per_call = round(result.proxy_cpu_s * 1e6 / result.ok, 1)
            result.proxy_rss_kib_per_call = round((peak - rss_start) / result.ok, 2)
        if redis is not None:
            result.redis_cpu_s = round((redis_ticks_after - redis_ticks_before) / CLK_TCK, 3)
            if result.ok:
                result.redis_cpu_us_per_call = round(result.redis_cpu_s * 1e6 / result.ok, 1)
            if system == POLICIES_REDIS:  # the proxy has exited: its last releases are in
                redis_traffic(result, redis_before, redis.commandstats(), control)
                connections = int(redis.info("stats").get("total_connections_received", 0))
                result.redis_connections = connections - connections_before
                result.redis_clients = redis_clients
    except BenchmarkError as error:
        raise BenchmarkError(f"{system} at {rate} CPS: {error} (files kept in {workdir})") from None
    finally:
        for process in reversed(processes):
            stop(process, signal.SIGTERM)
    if keep or not result.clean or result.proxy_exit_status not in (0, None):
        result.workdir = str(workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def redis_traffic(
    result: RunResult, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], control: bool
) -> None:
    """What sipguard sent Redis during one run, from INFO commandstats before and after it.

    Every script call is one EVALSHA (redis-py's Script; EVAL is counted too, should it appear),
    one round trip. Commands a script runs are counted as well, which tells the scripts apart:
    the per-INVITE check-and-take runs ZREMRANGEBYSCORE once per slot key, the release ZREM once
    per slot key (SLOTS_PER_INVITE each with bench_policy.yaml), the lease renewal neither. An
    EVALSHA refused NOSCRIPT (the script not yet loaded: the first calls after the flush) runs
    nothing; redis-py then sends SCRIPT LOAD and the EVALSHA again. Those cold-start round trips
    are counted apart, and in ``redis_round_trips_with_cold`` against the INVITEs (an upper
    bound: a release can be the one that meets NOSCRIPT)."""

    def delta(name: str, key: str = "calls") -> int:
        return after.get(name, {}).get(key, 0) - before.get(name, {}).get(key, 0)

    sent = delta("evalsha") + delta("eval")
    noscript = sum(
        delta(name, "failed_calls") + delta(name, "rejected_calls") for name in ("evalsha", "eval")
    )
    loads = delta("script|load")
    per_invite = delta("zremrangebyscore") / SLOTS_PER_INVITE
    releases = delta("zrem") / SLOTS_PER_INVITE
    renewals = sent - noscript - per_invite - releases
    invites = result.created + (1 if control else 0)
    result.redis_invites = invites
    result.redis_scripts = {
        "script_calls": sent,
        "per_invite": per_invite,
        "release": releases,
        "renewal": renewals,
        "noscript": noscript,
        "script_load": loads,
    }
    if renewals == 0:  # ZADD comes from the per-INVITE script only when its slots are committed
        result.redis_scripts["admitted"] = delta("zadd") / SLOTS_PER_INVITE
    if invites:
        result.redis_round_trips_per_invite = round(per_invite / invites, 4)
        result.redis_round_trips_with_cold = round((per_invite + noscript + loads) / invites, 4)
    if sent:
        result.redis_script_usec = round((delta("evalsha", "usec") + delta("eval", "usec")) / sent, 1)


def failure_causes(row: dict[str, str]) -> dict[str, int]:
    """SIPp's Failed*(C) counters that are not zero, by cause."""
    return {
        name.removeprefix("Failed").removesuffix("(C)"): stat_int(row, name)
        for name in row
        if name.startswith("Failed")
        and name.endswith("(C)")
        and name != "FailedCall(C)"
        and stat_int(row, name)
    }


ERROR_EVENT = re.compile(
    r"Aborting call on (?P<what>[^']+?) for Call-I[dD] '[^']*'"
    r"(?:: while expecting '(?P<expected>[^']+)' \(index \d+\), received '(?P<received>[^\r\n]{0,40}))?"
)


def summarise_errors(path: Path) -> dict[str, int]:
    """SIPp's -trace_err events, counted by kind (what it aborted on, expected and received)."""
    if not path.exists():
        return {}
    counts: Counter[str] = Counter()
    for match in ERROR_EVENT.finditer(path.read_text(errors="replace")):
        kind = match["what"]
        if match["expected"]:
            received = (match["received"] or "").split(" sip:")[0].split(" SIP/")[0]
            kind += f" (expecting {match['expected']}, got {received.strip()})"
        counts[kind] += 1
    return dict(counts.most_common())


def collect_sipp(result: RunResult, workdir: Path) -> None:
    uac = read_stat_csv(workdir / "uac_stat.csv")
    uas = read_stat_csv(workdir / "uas_stat.csv")
    if not uac:
        raise BenchmarkError(f"no SIPp UAC statistics in {workdir}")
    result.ok = stat_int(uac, "SuccessfulCall(C)")
    result.failed = stat_int(uac, "FailedCall(C)")
    result.created = stat_int(uac, "OutgoingCall(C)")
    result.unfinished = max(0, result.calls - result.ok - result.failed)
    result.failure_causes = failure_causes(uac)
    result.retrans_uac = stat_int(uac, "Retransmissions(C)")
    result.retrans_uas = stat_int(uas, "Retransmissions(C)")
    result.uas_ok = stat_int(uas, "SuccessfulCall(C)")
    result.uas_failed = stat_int(uas, "FailedCall(C)")
    result.dead_call_msgs = stat_int(uac, "DeadCallMsgs(C)") + stat_int(uas, "DeadCallMsgs(C)")
    result.out_of_call_msgs = stat_int(uac, "OutOfCallMsgs(C)") + stat_int(uas, "OutOfCallMsgs(C)")
    result.rt_stat_mean_ms = stat_ms(uac, "ResponseTime1(C)")

    samples = read_rtt(workdir)
    times = sorted(rt for _, rt in samples)
    result.rt_samples = len(times)
    if times:
        result.rt_mean_ms = round(statistics.fmean(times), 2)
        result.rt_p50_ms = percentile(times, 0.50)
        result.rt_p99_ms = percentile(times, 0.99)
        result.rt_max_ms = times[-1]
    if len(samples) >= 2 and samples[-1][0] > samples[0][0]:
        result.achieved_cps = round((len(samples) - 1) / ((samples[-1][0] - samples[0][0]) / 1000.0), 1)

    result.uas_failure_causes = failure_causes(uas)
    result.sipp_errors = {side: summarise_errors(workdir / f"{side}_errors.log") for side in ("uac", "uas")}


# -- the whole benchmark -------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "n/a"
    try:
        revision = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "uvloop": uvloop_version,
        "sipp": sipp_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(value, 2) for value in os.getloadavg()],
        "git": revision,
    }


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(
    system: str,
    rate: int,
    args: argparse.Namespace,
    *,
    log_level: str = "warning",
    control: bool = False,
    redis: RedisBench | None = None,
) -> RunResult:
    label = system if log_level == "warning" or system in RELAY_SCRIPTS else f"{system} ({log_level})"
    progress(f"  {label:<8} {rate:>5} CPS x {args.duration:g} s ...")
    result = run_once(
        system, rate, args.duration, args.hold_ms, args.keep,
        mix=args.with_policies or args.state_compare, log_level=log_level, control=control, redis=redis,
    )  # fmt: skip
    cpu = f"{result.proxy_cpu_us_per_call:.0f} us/call" if result.proxy_cpu_us_per_call else "n/a"
    extra = ""
    if result.redis_round_trips_per_invite is not None:
        extra = (
            f", {result.redis_round_trips_per_invite:g} round trips to Redis per INVITE "
            f"({result.redis_round_trips_with_cold:g} with cold start)"
        )
    progress(f"  {'':<8} ok {result.ok}/{result.calls}, failed {result.failed}, {cpu}{extra}")
    return result


def _median_cpu(runs: list[RunResult], system: str, rate: int) -> float | None:
    values = [r.proxy_cpu_us_per_call for r in runs if r.system == system and r.rate == rate]
    measured = [value for value in values if value]
    return statistics.median(measured) if measured else None


def compare(runs: list[RunResult]) -> list[dict[str, Any]]:
    """Each proxy's CPU per call over the relay's at the same rate (medians of the repeats);
    sip-floor's too, a reference with no target (target_max and met None)."""
    rows = []
    ratio_targets = {FLOOR: None, "sipguard": TARGET_RATIO, POLICIES: TARGET_POLICY_RATIO}
    for rate in sorted({run.rate for run in runs}):
        b = _median_cpu(runs, "relay", rate)
        if b is None:
            continue
        for system, target in ratio_targets.items():
            g = _median_cpu(runs, system, rate)
            if g is None:
                continue
            ratio = round(g / b, 2) if b else None
            row = {"rate": rate, "system": system}
            if system == "sipguard":
                row["sipguard_us_per_call"] = g
            rows.append(
                row
                | {
                    "us_per_call": g,
                    "relay_us_per_call": b,
                    "ratio": ratio,
                    "target_max": target,
                    "met": None if target is None else ratio is not None and ratio <= target,
                }
            )
    return rows


def policy_costs(runs: list[RunResult]) -> list[dict[str, Any]]:
    """What the policies add per call under load: sipguard+pol's CPU per call less sipguard's."""
    rows = []
    for rate in sorted({run.rate for run in runs}):
        plain, with_policies = _median_cpu(runs, "sipguard", rate), _median_cpu(runs, POLICIES, rate)
        relay = _median_cpu(runs, "relay", rate)
        if plain is None or with_policies is None:
            continue
        cost = round(with_policies - plain, 1)
        clean = all(r.clean for r in runs if r.rate == rate and r.system in ("sipguard", POLICIES))
        rows.append(
            {
                "rate": rate,
                "clean": clean,  # False: calls failed, retransmissions are in the CPU, not only policies
                "sipguard_us_per_call": plain,
                "with_policies_us_per_call": with_policies,
                "policies_us_per_call": cost,
                "policies_share_of_sipguard": round(cost / plain, 3) if plain else None,
                "policies_in_relays": round(cost / relay, 2) if relay else None,
            }
        )
    return rows


def pattern_costs(runs: list[RunResult]) -> list[dict[str, Any]]:
    """--with-patterns: what the pattern rules add per call under load, sipguard+pol+pat against
    sipguard+pol (medians of the repeats); and, for scale, what the mission rules add to sipguard."""
    rows = []
    for rate in sorted({run.rate for run in runs}):
        mission, patterns = _median_cpu(runs, POLICIES, rate), _median_cpu(runs, PATTERNS, rate)
        plain = _median_cpu(runs, "sipguard", rate)
        if mission is None or patterns is None:
            continue
        ratio = round(patterns / mission, 3) if mission else None
        added = round(patterns - mission, 1)
        mission_cost = None if plain is None else round(mission - plain, 1)
        clean = all(r.clean for r in runs if r.rate == rate and r.system in (POLICIES, PATTERNS))
        rows.append(
            {
                "rate": rate,
                "clean": clean,  # False: calls failed, retransmissions are in the CPU
                "mission_us_per_call": mission,
                "patterns_us_per_call": patterns,
                "ratio": ratio,
                "patterns_added_us_per_call": added,
                "target_max": TARGET_PATTERN_RATIO,
                "met": ratio is not None and ratio <= TARGET_PATTERN_RATIO,
                "sipguard_us_per_call": plain,
                "mission_added_us_per_call": mission_cost,
                "patterns_over_mission_added": round(added / mission_cost, 2) if mission_cost else None,
            }
        )
    return rows


def micro_benchmark(only: str | None = None) -> dict[str, Any]:
    """bench_policies.py --json in a subprocess, alone on the machine (after the load runs);
    ``only``: one of its two sets of rows ("example": the three policies, "patterns")."""
    try:
        done = subprocess.run(
            [sys.executable, str(BENCH_POLICIES_SCRIPT), "--json", *(["--only", only] if only else [])],
            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"{BENCH_POLICIES_SCRIPT.name}: {error}"}
    if done.returncode != 0:
        tail = (done.stderr.strip() or done.stdout.strip())[-300:]
        return {"error": f"{BENCH_POLICIES_SCRIPT.name} exited {done.returncode}: {tail}"}
    try:
        report: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        return {"error": f"{BENCH_POLICIES_SCRIPT.name} printed no JSON: {done.stdout.strip()[-300:]}"}
    return report


def zero_failed_target(
    runs: list[RunResult], system: str, rate: int, stepped: bool, label: str = ""
) -> dict[str, Any]:
    """0 failed calls at ``rate`` through ``system``; when the step-up stopped below it, not met."""
    name = f"0 failed calls at {rate} CPS{label}"
    guard = [r for r in runs if r.system == system and r.rate == rate]
    lower = [r for r in runs if r.system == system and r.rate < rate and not r.clean]
    if guard:
        bad = sum(r.failed + r.unfinished for r in guard)
        return {"target": name, "met": bad == 0, "measured": f"{bad} failed"}
    if lower and stepped:
        first = min(lower, key=lambda r: r.rate)
        bad = first.failed + first.unfinished
        return {
            "target": name,
            "met": False,
            "measured": f"not run: {bad} failed already at {first.rate} CPS",
        }
    return {"target": name, "met": None, "measured": "not run"}


def policy_check_target(check: RunResult, expected: list[str], label: str = "") -> dict[str, Any]:
    """The allowed mix met no limit: no call.decision reject (and no rule's warning) in the
    info-level check run, which did load the rules of its policy file (``expected``, in order)
    and did refuse its spoofed control call (so rejections would show)."""
    rejected = sum(check.policy_rejections.values())
    warned = sum(check.policy_warnings.values())
    problems = []
    if check.policy_rules != expected:
        problems.append(f"rules loaded {check.policy_rules}, expected {expected}")
    if not check.control_refused_403 or check.control_rejections != {"caller_id": 1}:
        problems.append(
            f"control call: 403 {'yes' if check.control_refused_403 else 'no'}, "
            f"decision log {check.control_rejections or 'no reject'} (expected caller_id x1)"
        )
    by_rule = ", ".join(f"{rule} {n}" for rule, n in sorted(check.policy_rejections.items()))
    measured = f"{rejected} rejected" + (f" ({by_rule})" if by_rule else "")
    if warned:
        measured += ", warned " + ", ".join(
            f"{rule} {n}" for rule, n in sorted(check.policy_warnings.items())
        )
    measured += f" of {check.calls} calls"
    if problems:
        measured += "; check invalid: " + "; ".join(problems)
    return {
        "target": f"0 rejections/warnings of the allowed mix at {check.rate} CPS{label} (decision log)",
        "met": rejected == 0 and warned == 0 and not problems,
        "measured": measured,
    }


def _median(values: list[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None


def state_comparisons(runs: list[RunResult]) -> list[dict[str, Any]]:
    """--state-compare, per rate: the memory store against Redis (medians of the repeats; the
    round trips per INVITE, the worst of them)."""
    rows = []
    for rate in sorted({run.rate for run in runs}):
        memory = [r for r in runs if r.system == POLICIES and r.rate == rate]
        redis = [r for r in runs if r.system == POLICIES_REDIS and r.rate == rate]
        if not memory or not redis:
            continue
        memory_cpu, redis_cpu = _median_cpu(runs, POLICIES, rate), _median_cpu(runs, POLICIES_REDIS, rate)
        ratio = round(redis_cpu / memory_cpu, 2) if memory_cpu and redis_cpu else None
        trips = [r.redis_round_trips_per_invite for r in redis if r.redis_round_trips_per_invite is not None]
        with_cold = [
            r.redis_round_trips_with_cold for r in redis if r.redis_round_trips_with_cold is not None
        ]
        cold = [r.redis_scripts.get("noscript", 0) + r.redis_scripts.get("script_load", 0) for r in redis]
        server = _median([r.redis_cpu_us_per_call for r in redis])
        rows.append(
            {
                "rate": rate,
                "clean": all(r.clean for r in memory + redis),
                "memory_us_per_call": memory_cpu,
                "redis_us_per_call": redis_cpu,
                "ratio": ratio,
                "target_max": TARGET_REDIS_CPU_RATIO,
                "met": ratio is not None and ratio <= TARGET_REDIS_CPU_RATIO,
                "redis_server_us_per_call": server,
                "redis_server_idle_us_per_call": _median([r.redis_cpu_us_per_call for r in memory]),
                "with_server_us_per_call": redis_cpu + server if redis_cpu and server is not None else None,
                "round_trips_per_invite": max(trips) if trips else None,
                "round_trips_with_cold": max(with_cold) if with_cold else None,
                "cold_round_trips": max(cold) if cold else None,
                "rt_mean_ms": {
                    "memory": _median([r.rt_mean_ms for r in memory]),
                    "redis": _median([r.rt_mean_ms for r in redis]),
                },
                "rt_p99_ms": {
                    "memory": _median([r.rt_p99_ms for r in memory]),
                    "redis": _median([r.rt_p99_ms for r in redis]),
                },
            }
        )
    return rows


def state_targets(
    args: argparse.Namespace, runs: list[RunResult], rows: list[dict[str, Any]], check: RunResult | None
) -> list[dict[str, Any]]:
    targets = []
    for rate in args.rates:
        for system in STATE_SYSTEMS:
            targets.append(zero_failed_target(runs, system, rate, False, f", {system}"))
    for row in rows:
        targets.append(
            {
                "target": f"Redis/memory proxy CPU/call <= {TARGET_REDIS_CPU_RATIO:g}x at {row['rate']} CPS",
                "met": row["met"],
                "measured": f"{row['ratio']}x",
            }
        )
        trips = row["round_trips_per_invite"]
        targets.append(
            {
                "target": f"round trips to Redis per INVITE <= {TARGET_ROUND_TRIPS_PER_INVITE:g} at "
                f"{row['rate']} CPS",
                "met": trips is not None and trips <= TARGET_ROUND_TRIPS_PER_INVITE,
                "measured": f"{_fmt(trips, '.3f')}; {_fmt(row['round_trips_with_cold'], '.4f')} with the "
                f"{_fmt(row['cold_round_trips'])} cold-start NOSCRIPT/SCRIPT LOAD",
            }
        )
    # every INVITE of every Redis run went to Redis: one per-INVITE script call each, no fallback
    redis_runs = [r for r in [*runs, *([check] if check else [])] if r.system == POLICIES_REDIS]
    fallbacks: Counter[str] = Counter()
    unjudged = 0.0
    for run in redis_runs:
        fallbacks.update(run.state_events)
        unjudged += abs((run.redis_invites or 0) - run.redis_scripts.get("per_invite", 0))
    measured = f"{sum(fallbacks.values())} fallbacks" + (
        " (" + ", ".join(f"{k} {v}" for k, v in sorted(fallbacks.items())) + ")" if fallbacks else ""
    )
    measured += f", per-INVITE script calls - INVITEs: {unjudged:g}, {len(redis_runs)} runs"
    targets.append(
        {
            "target": "every INVITE of the Redis runs judged by Redis",
            "met": bool(redis_runs) and not fallbacks and unjudged == 0,
            "measured": measured,
        }
    )
    if check is not None:
        targets.append(policy_check_target(check, POLICY_RULES, ", Redis store"))
    return targets


def run_state_compare(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """--state-compare: sipguard+pol with the memory store and with Redis, at each rate (order
    alternated), then an info-level check run of the Redis one; the redis-server is ours."""
    wall = time.monotonic()
    runs: list[RunResult] = []
    check: RunResult | None = None
    redis = RedisBench()
    redis_summary: dict[str, Any] = {}
    try:
        redis.start()
        redis_summary = {
            "version": redis.version,
            "url": redis.url,
            "timeout_s": REDIS_TIMEOUT_S,
            "maxmemory": REDIS_MAXMEMORY,
        }
        progress(
            f"redis-server {redis.version} on {HOST}:{redis.port} (pid {redis.pid}, no persistence, "
            f"maxmemory {REDIS_MAXMEMORY})"
        )
        progress(
            f"main runs: {', '.join(map(str, args.rates))} CPS, {', '.join(STATE_SYSTEMS)} (order alternated)"
        )
        for index, rate in enumerate(args.rates):
            order = STATE_SYSTEMS if index % 2 == 0 else tuple(reversed(STATE_SYSTEMS))
            for _ in range(args.repeats):
                for system in order:
                    runs.append(measure(system, rate, args, redis=redis))
        rate = max(args.rates)
        progress(
            f"policy check: {POLICIES_REDIS} at {rate} CPS, --log-level info, then one spoofed call (403)"
        )
        check = measure(POLICIES_REDIS, rate, args, log_level="info", control=True, redis=redis)
        memory = redis.info("memory")
        redis_summary["used_memory_peak"] = memory.get("used_memory_peak_human")
    finally:
        redis.stop()
        redis_summary["exit_status"] = redis.process.returncode if redis.process else None
        redis_summary["cpu_s_total"] = None if redis.cpu_s is None else round(redis.cpu_s, 2)
        if args.keep or redis_summary["exit_status"] not in (0, None):
            redis_summary["workdir"] = str(redis.workdir)
        else:
            shutil.rmtree(redis.workdir, ignore_errors=True)

    rows = state_comparisons(runs)
    env["loadavg_end"] = [round(value, 2) for value in os.getloadavg()]
    return {
        "environment": env,
        "settings": {
            "rates": args.rates,
            "duration_s": args.duration,
            "hold_ms": args.hold_ms,
            "repeats": args.repeats,
            "step_up": False,
            "state_compare": True,
            "policy_file": str(BENCH_POLICY.relative_to(REPO_ROOT)),
            "uac": f"{MIX_SCENARIO.name} from {POLICY_UAC_HOST}, -s {POLICY_CALLEE}",
            "callers": {"first": f"+{POLICY_CALLERS[0]}", "count": POLICY_CALLERS[1]},
        },
        "redis": redis_summary,
        "runs": [asdict(run) | {"clean": run.clean, "carried": run.carried} for run in runs],
        "comparisons": [],
        "step_up": None,
        "state_compare": rows,
        "policy_check": None if check is None else asdict(check) | {"clean": check.clean},
        "targets": state_targets(args, runs, rows, check),
        "wall_seconds": round(time.monotonic() - wall, 1),
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    env = environment()
    if args.state_compare:
        return run_state_compare(args, env)
    wall = time.monotonic()
    runs: list[RunResult] = []
    systems = PATTERN_SYSTEMS if args.with_patterns else POLICY_SYSTEMS if args.with_policies else SYSTEMS
    if args.with_floor:
        systems = (*systems, FLOOR)
    stepped = POLICIES if args.with_policies else "sipguard"  # the system the step-up drives
    # the check run's system: the one with the most rules (bench_patterns.yaml holds the mission rules)
    checked = PATTERNS if args.with_patterns else POLICIES
    expected_rules = policy_rules(POLICY_FILES[checked]) if args.with_policies else []
    progress(f"main runs: {', '.join(map(str, args.rates))} CPS, {', '.join(systems)} (order alternated)")
    for index, rate in enumerate(args.rates):
        order = systems if index % 2 == 0 else tuple(reversed(systems))
        for _ in range(args.repeats):
            for system in order:
                runs.append(measure(system, rate, args))

    step_up: dict[str, Any] | None = None
    if args.step_up:
        progress(f"step-up for {stepped}: {', '.join(map(str, args.step_rates))} CPS")
        steps: list[RunResult] = []
        for rate in sorted(set(args.step_rates)):
            earlier = [r for r in runs if r.system == stepped and r.rate == rate]
            step = earlier[0] if earlier else measure(stepped, rate, args)
            if not earlier:
                runs.append(step)
            steps.append(step)
            if not step.carried:
                break
        last = steps[-1]
        earlier_relay = [r for r in runs if r.system == "relay" and r.rate == last.rate]
        control = earlier_relay[0] if earlier_relay else measure("relay", last.rate, args)
        if not earlier_relay:
            runs.append(control)
        carried = [s.rate for s in steps if s.carried]
        step_up = {
            "system": stepped,
            "steps": [
                {
                    "rate": s.rate,
                    "carried": s.carried,
                    "ok": s.ok,
                    "failed": s.failed,
                    "unfinished": s.unfinished,
                    "achieved_cps": s.achieved_cps,
                }
                for s in steps
            ],
            "highest_carried": max(carried) if carried else None,
            "stopped_at": None if last.carried else last.rate,
            "control_relay": {
                "rate": control.rate,
                "carried": control.carried,
                "ok": control.ok,
                "failed": control.failed,
                "unfinished": control.unfinished,
                "achieved_cps": control.achieved_cps,
            },
        }

    check: RunResult | None = None
    micro: dict[str, Any] | None = None
    if args.with_policies:
        rate = max(args.rates)
        progress(f"policy check: {checked} at {rate} CPS, --log-level info, then one spoofed call (403)")
        check = measure(checked, rate, args, log_level="info", control=True)
        only = "patterns" if args.with_patterns else "example"
        progress(f"micro-benchmark: {BENCH_POLICIES_SCRIPT.name} --json --only {only}")
        micro = micro_benchmark(only)

    comparisons = compare(runs)
    patterns = pattern_costs(runs) if args.with_patterns else []
    targets = []
    if args.with_policies:
        for rate in args.rates:
            for system in systems:
                if system in RELAY_SCRIPTS:  # the yardsticks have no target
                    continue
                targets.append(zero_failed_target(runs, system, rate, args.step_up, f", {system}"))
        if args.step_up:
            for rate in TARGET_ZERO_FAILED_AT:
                if rate not in args.rates:
                    targets.append(zero_failed_target(runs, POLICIES, rate, True, f", {POLICIES}"))
    else:
        for rate in TARGET_ZERO_FAILED_AT:
            targets.append(zero_failed_target(runs, "sipguard", rate, step_up is not None))
    for row in comparisons:
        if row["target_max"] is None:  # sip-floor: a reference, reported with the comparisons only
            continue
        label = f"{row['system']} " if args.with_policies else ""
        targets.append(
            {
                "target": f"{label}CPU/call <= {row['target_max']:g}x relay at {row['rate']} CPS",
                "met": row["met"],
                "measured": f"{row['ratio']}x",
            }
        )
    for row in patterns:
        targets.append(
            {
                "target": f"{PATTERNS} CPU/call <= {row['target_max']:g}x {POLICIES}'s at {row['rate']} CPS",
                "met": row["met"],
                "measured": f"{_fmt(row['ratio'], '.2f')}x, {row['patterns_added_us_per_call']:+.0f} us/call"
                + ("" if row["clean"] else " (calls failed: retransmissions in the CPU)"),
            }
        )
    if check is not None:
        targets.append(policy_check_target(check, expected_rules))
    env["loadavg_end"] = [round(value, 2) for value in os.getloadavg()]
    report: dict[str, Any] = {
        "environment": env,
        "settings": {
            "rates": args.rates,
            "duration_s": args.duration,
            "hold_ms": args.hold_ms,
            "repeats": args.repeats,
            "step_up": args.step_up,
            "step_rates": args.step_rates,
            "with_policies": args.with_policies,
            "with_patterns": args.with_patterns,
            "with_floor": args.with_floor,
        },
        "runs": [asdict(run) | {"clean": run.clean, "carried": run.carried} for run in runs],
        "comparisons": comparisons,
        "step_up": step_up,
    }
    if args.with_policies:
        report["settings"] |= {
            "policy_file": str(BENCH_POLICY.relative_to(REPO_ROOT)),
            "uac": f"{MIX_SCENARIO.name} from {POLICY_UAC_HOST}, -s {POLICY_CALLEE}",
            "callers": {"first": f"+{POLICY_CALLERS[0]}", "count": POLICY_CALLERS[1]},
        }
        report["policy_costs"] = policy_costs(runs)
        report["policy_check_rules"] = expected_rules
        if args.with_patterns:
            report["settings"]["patterns_file"] = str(BENCH_PATTERNS.relative_to(REPO_ROOT))
            report["pattern_costs"] = patterns
        report["policy_micro"] = micro
        report["policy_check"] = None if check is None else asdict(check) | {"clean": check.clean}
    report["targets"] = targets
    report["wall_seconds"] = round(time.monotonic() - wall, 1)
    return report


# -- reporting -----------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    settings = report["settings"]
    print(f"sipguard proxy load benchmark (git {env['git'] or 'n/a'})")
    print(
        f"Python {env['python']} ({env['implementation']}), uvloop {env['uvloop']}, SIPp {env['sipp']}, "
        f"{env['platform']}"
    )
    print(
        f"{env['cpus']} CPUs, load average {' '.join(map(str, env['loadavg_start']))} at start, "
        f"{' '.join(map(str, env['loadavg_end']))} at end"
    )
    state_compare = settings.get("state_compare")
    print(
        f"SIPp uac -> proxy -> SIPp uas on {HOST}, UDP; {settings['duration_s']:g} s per run, "
        f"hold {settings['hold_ms']} ms"
        + ("" if state_compare else "; sipguard with no policy rules (no-op decision), --log-level warning")
    )
    check = report.get("policy_check")
    if state_compare:
        redis = report["redis"]
        print(
            f"{POLICIES}: sipguard --config {settings['policy_file']} ({', '.join(POLICY_RULES)} enforcing), "
            f"counters in memory;\n{POLICIES_REDIS}: the same file + state: {{url: {redis.get('url')}, "
            f"timeout: {redis.get('timeout_s')}}}, the benchmark's redis-server {redis.get('version')}\n"
            f"(no persistence, maxmemory {redis.get('maxmemory')}, flushed before each Redis run); "
            "--log-level warning;\n"
            f"UAC for both: {settings['uac']}, owned callers {settings['callers']['first']}.. "
            f"({settings['callers']['count']}) in turn, each at most {POLICY_BURST}x a run"
        )
    if settings.get("with_policies"):
        print(
            f"{POLICIES}: sipguard --config {settings['policy_file']} ({', '.join(POLICY_RULES)} enforcing), "
            "--log-level warning;"
        )
        if settings.get("with_patterns"):
            added = [rule for rule in report.get("policy_check_rules") or () if rule not in POLICY_RULES]
            print(
                f"{PATTERNS}: sipguard --config {settings['patterns_file']} (the same + "
                f"{', '.join(added) or 'n/a'} enforcing), --log-level warning;"
            )
        print(
            f"UAC for all systems: {settings['uac']}, owned callers "
            f"{settings['callers']['first']}.. ({settings['callers']['count']}) in turn, each at most "
            f"{POLICY_BURST}x a run"
        )
    if settings.get("with_floor"):
        print(
            f"{FLOOR}: {FLOOR_SCRIPT.name}, SIP on bytes only (Via, Max-Forwards, Record-Route/Route, "
            "Call-ID -> client; no transactions, no policies): the floor for a proxy doing SIP work"
        )
    # the check run is listed with the others, marked: it logs at info and is in no ratio
    shown = report["runs"] + ([check | {"system": f"{check['system']}*"}] if check else [])
    width = max(8, *(len(run["system"]) for run in shown))
    print()
    print("calls (SIPp's view)")
    header = (
        f"{'system':<{width}} {'CPS':>5} {'got':>6} {'calls':>6} {'ok':>6} {'failed':>6} {'unfin':>5} "
        f"{'retrans':>11}  {'INVITE->200 ms mean/p50/p99/max':>31}"
    )
    print(header)
    print("-" * len(header))
    for run in shown:
        rt = (
            f"{_fmt(run['rt_mean_ms'], '.1f')} / {_fmt(run['rt_p50_ms'])} / {_fmt(run['rt_p99_ms'])} / "
            f"{_fmt(run['rt_max_ms'])}"
        )
        retrans = f"{run['retrans_uac']}/{run['retrans_uas']}"
        print(
            f"{run['system']:<{width}} {run['rate']:>5} {_fmt(run['achieved_cps']):>6} {run['calls']:>6} "
            f"{run['ok']:>6} {run['failed']:>6} {run['unfinished']:>5} {retrans:>11}  {rt:>31}"
        )
    print(
        "got: achieved CPS (answered calls over the span of their 200 OKs); unfin: calls neither ok nor\n"
        "failed when SIPp stopped; retrans: SIPp retransmissions, UAC (INVITE, BYE) / UAS (200 OK);\n"
        "INVITE->200: SIPp response time 1, every sample, 1 ms resolution."
        + (
            f"\n{check['system']}*: the policy check run, sipguard at --log-level info (in no ratio below)."
            if check
            else ""
        )
    )
    print("\nproxy cost (the proxy process) and noise")
    header = (
        f"{'system':<{width}} {'CPS':>5} {'us/call':>8} {'core%':>6} {'peak%':>6} {'peak RSS':>9} "
        f"{'KiB/call':>8} "
        f"{'uac%':>5} {'uas%':>5} {'others':>6} {'drops':>6} {'load1':>6}"
    )
    print(header)
    print("-" * len(header))
    for run in shown:
        window = run["window_s"] or None
        uac = 100.0 * run["uac_cpu_s"] / window if window and run["uac_cpu_s"] is not None else None
        uas = 100.0 * run["uas_cpu_s"] / window if window and run["uas_cpu_s"] is not None else None
        share = 100.0 * run["proxy_load_share"] if run["proxy_load_share"] is not None else None
        peak = 100.0 * run["proxy_peak_share"] if run["proxy_peak_share"] is not None else None
        rss = f"{_fmt(run['proxy_peak_rss_mib'], '.0f')} MiB"
        print(
            f"{run['system']:<{width}} {run['rate']:>5} {_fmt(run['proxy_cpu_us_per_call']):>8} "
            f"{_fmt(share):>6} "
            f"{_fmt(peak):>6} "
            f"{rss:>9} {_fmt(run['proxy_rss_kib_per_call'], '.1f'):>8} {_fmt(uac):>5} {_fmt(uas):>5} "
            f"{_fmt(run['others_cores'], '.2f'):>6} {run['udp_rcvbuf_errors']:>6} {run['loadavg_1m']:>6.2f}"
        )
    print(
        "us/call: proxy user+sys CPU (/proc/PID/stat, 10 ms ticks) over the UAC's run, per successful call;\n"
        "core%: proxy CPU while calls were being placed (100 = one core); peak%: its busiest second;\n"
        "peak RSS: VmHWM; KiB/call: (VmHWM - RSS when ready) per successful call; uac%/uas%: the SIPps'\n"
        "CPU over the run; others: cores busy on the machine but not by these three processes (the\n"
        "neighbours); drops: kernel UDP receive-buffer drops over the run, all sockets (RcvbufErrors);\n"
        "load1: 1-min load average when the run started."
    )

    notes = []
    for run in shown:
        flags = []
        if run["failure_causes"]:
            flags.append("UAC failures: " + ", ".join(f"{k} {v}" for k, v in run["failure_causes"].items()))
        if run["uas_failure_causes"]:
            flags.append(
                "UAS failures: " + ", ".join(f"{k} {v}" for k, v in run["uas_failure_causes"].items())
            )
        for side, events in run["sipp_errors"].items():
            if events:
                flags.append(f"{side} error log: " + "; ".join(f"{k} x{v}" for k, v in events.items()))
        if run["proxy_socket_drops"]:
            flags.append(f"proxy socket drops {run['proxy_socket_drops']}")
        if run["proxy_exit_status"] not in (0, None):
            flags.append(f"proxy exit status {run['proxy_exit_status']}")
        if run["proxy_drain_s"] and run["proxy_drain_s"] > 1:
            flags.append(f"proxy took {run['proxy_drain_s']:.1f} s to exit after SIGTERM")
        if run["uas_stopped_by_us"]:
            flags.append(f"UAS had to be stopped (it saw {run['uas_ok']} ok, {run['uas_failed']} failed)")
        noisy = {k: v for k, v in run["proxy_log_events"].items() if k not in QUIET_EVENTS}
        if run.get("control_refused_403"):  # the check's control call: its refusal is expected
            for event in ("call.decision", "message.refused"):
                if noisy.get(event, 0) <= 1:
                    noisy.pop(event, None)
                else:
                    noisy[event] -= 1
        if noisy:
            flags.append("proxy log: " + ", ".join(f"{k} x{v}" for k, v in sorted(noisy.items())))
        if run["dead_call_msgs"] or run["out_of_call_msgs"]:
            flags.append(
                f"SIPp dead-call msgs {run['dead_call_msgs']}, out-of-call {run['out_of_call_msgs']}"
            )
        if run["workdir"]:
            flags.append(f"files kept in {run['workdir']}")
        if flags:
            notes.append(
                f"  {run['system']} @ {run['rate']} CPS:\n" + "".join(f"    - {flag}\n" for flag in flags)
            )
    if notes:
        print("\nnotes:")
        print("".join(notes), end="")

    if report["comparisons"]:
        several = len({row["system"] for row in report["comparisons"]}) > 1
        print(f"\n{'proxy' if several else 'sipguard'} / relay, proxy CPU per call at the same rate:")
        for row in report["comparisons"]:
            if row["target_max"] is None:
                verdict = "reference, no target"
            else:
                verdict = f"target <= {row['target_max']:g}x: {'met' if row['met'] else 'NOT met'}"
            guard, relay = row["us_per_call"], row["relay_us_per_call"]
            system = f" {row['system'] + ':':<13}" if several else ":"
            print(
                f"  {row['rate']:>5} CPS{system} {guard:.0f} / {relay:.0f} us = {row['ratio']}x ({verdict})"
            )
    if "policy_costs" in report:
        print_policy_costs(report)
    if "state_compare" in report:
        print_state_compare(report)
    step = report["step_up"]
    if step:
        print(f"\nstep-up ({step.get('system', 'sipguard')}):")
        for s in step["steps"]:
            print(
                f"  {s['rate']:>5} CPS: {'carried' if s['carried'] else 'NOT carried':<11} {s['ok']} ok, "
                f"{s['failed']} failed, {s['unfinished']} unfinished, got {_fmt(s['achieved_cps'])} CPS"
            )
        highest = step["highest_carried"]
        print(
            f"  highest rate carried with 0 failed calls: {highest} CPS"
            if highest
            else "  highest rate carried with 0 failed calls: none (the first step failed)"
        )
        control = step["control_relay"]
        print(
            f"  control, relay at {control['rate']} CPS: {control['ok']} ok, {control['failed']} failed, "
            f"{control['unfinished']} unfinished, got {_fmt(control['achieved_cps'])} CPS "
            f"({'carried' if control['carried'] else 'NOT carried: the rig itself is at its limit'})"
        )
    print("\ntargets:")
    name_width = max(36, *(len(target["target"]) for target in report["targets"]))
    for target in report["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        print(f"  {target['target']:<{name_width}} {verdict:<13} ({target['measured']})")
    print(f"\nwall time {report['wall_seconds']} s")


def print_policy_costs(report: dict[str, Any]) -> None:
    """--with-policies: the policies' cost per call under load, on their own per INVITE, and the check."""
    print(f"\nthe policies' cost, under load: {POLICIES} less sipguard, proxy CPU per call")
    for row in report["policy_costs"]:
        share = row["policies_share_of_sipguard"]
        print(
            f"  {row['rate']:>5} CPS: {row['with_policies_us_per_call']:.0f} - "
            f"{row['sipguard_us_per_call']:.0f} us"
            f" = {row['policies_us_per_call']:+.0f} us/call"
            f" ({_fmt(None if share is None else 100 * share, '+.0f')}% on sipguard;"
            f" {_fmt(row['policies_in_relays'], '+.2f')}x the relay's CPU per call)"
            + (
                ""
                if row.get("clean", True)
                else "\n             NOT the policies' cost alone: calls failed in one of the two runs, "
                "so its CPU includes retransmissions"
            )
        )
    print(
        "  (CPU is read in 10 ms ticks: 1 us/call at 10,000 calls; run-to-run noise on this shared\n"
        "  machine is larger: compare with the same difference at the other rate)"
    )
    if "pattern_costs" in report:
        print_pattern_costs(report)
    micro = report.get("policy_micro") or {}
    print(
        f"\nthe policies' cost on their own, per INVITE ({BENCH_POLICIES_SCRIPT.name}, in process, no I/O):"
    )
    if "error" in micro or not ("us_per_invite" in micro or "patterns" in micro):
        print(f"  not measured: {micro.get('error', 'no result')}")
    if "us_per_invite" in micro:
        per = micro["us_per_invite"]
        print(
            f"  policies/example.yaml (every rule it enables), {micro['iterations']} INVITEs "
            f"x {micro['repeats']} repeats, Python {micro['python']}"
        )
        print(f"  {'us per INVITE':<36} {'min':>7} {'median':>7}")
        for name, figures in per.items():
            print(f"  {name:<36} {figures['min']:7.1f} {figures['median']:7.1f}")
        print(
            "  policies: parse + policies + release less parse + core accessors, callers already\n"
            "  normalised (the E.164 cache warm); cold: the cache emptied before each INVITE, a caller\n"
            f"  new to the process, which is every call of the load runs above ({POLICY_CALLERS[1]} callers, "
            "each\n  at most once a run at these rates and 10 s). min is the closest to the code's own cost."
        )
    if "patterns" in micro:
        print_micro_patterns(micro)
    check = report.get("policy_check")
    if check:
        print_policy_check(check, report.get("policy_check_rules"))


def print_pattern_costs(report: dict[str, Any]) -> None:
    """--with-patterns: sipguard+pol+pat against sipguard+pol, proxy CPU per call, per rate."""
    print(
        f"\nthe pattern rules' cost, under load: {PATTERNS} vs {POLICIES}, proxy CPU per call "
        f"(target <= {TARGET_PATTERN_RATIO:g}x)"
    )
    for row in report["pattern_costs"]:
        verdict = "met" if row["met"] else "NOT met"
        share = row["patterns_over_mission_added"]
        print(
            f"  {row['rate']:>5} CPS: {row['patterns_us_per_call']:.0f} / "
            f"{row['mission_us_per_call']:.0f} us "
            f"= {_fmt(row['ratio'], '.2f')}x, {row['patterns_added_us_per_call']:+.0f} us/call "
            f"(target <= {row['target_max']:g}x: {verdict});\n             the mission rules add "
            f"{_fmt(row['mission_added_us_per_call'], '+.0f')} us/call to sipguard, the pattern rules "
            f"{_fmt(None if share is None else 100 * share)}% of that"
            + (
                ""
                if row["clean"]
                else "\n             calls failed in one of the runs: retransmissions are in the CPU"
            )
        )


def print_micro_patterns(micro: dict[str, Any]) -> None:
    """bench_policies.py's mission vs mission + patterns rows."""
    section = micro["patterns"]
    added = [rule for rule in section["rules"] if rule not in section["mission_rules"]]
    print(
        f"  mission: {section['mission_file']} ({', '.join(section['mission_rules'])}); mission + patterns:\n"
        f"  {section['patterns_file']} (+ {', '.join(added)}); {micro['iterations']} calls x "
        f"{micro['repeats']} repeats, Python {micro['python']}"
    )
    print(f"  {'us per call (INVITE, answer, end)':<52} {'min':>7} {'median':>7}")
    for name, figures in section["us_per_invite"].items():
        print(f"  {name:<52} {figures['min']:7.1f} {figures['median']:7.1f}")
    for name, figures in section["ratio"].items():
        print(f"  {name:<52} {figures['min']:6.2f}x {figures['median']:6.2f}x")
    print(
        f"  {section['callers']} callers in turn, each call answered and ended by the caller (the dialer's\n"
        "  history and usage's talk time work then), so every dialer measure reaches its min_calls;\n"
        "  cold: the caller new to the process (E.164 cache emptied, its history forgotten), as in the\n"
        "  load runs. The ratio: (mission + pattern policies) / mission policies, the rules alone."
    )


def print_state_compare(report: dict[str, Any]) -> None:
    """--state-compare: memory against Redis per rate, then what the Redis runs sent Redis."""
    print(f"\nmemory vs Redis store ({POLICIES} vs {POLICIES_REDIS}, medians of the repeats):")
    for row in report["state_compare"]:
        verdict = "met" if row["met"] else "NOT met"
        memory, redis = row["memory_us_per_call"], row["redis_us_per_call"]
        server, both = row["redis_server_us_per_call"], row["with_server_us_per_call"]
        mean, p99 = row["rt_mean_ms"], row["rt_p99_ms"]
        added = None if mean["redis"] is None or mean["memory"] is None else mean["redis"] - mean["memory"]
        print(
            f"  {row['rate']:>5} CPS: proxy CPU {_fmt(memory)} -> {_fmt(redis)} us/call "
            f"= {_fmt(row['ratio'], '.2f')}x "
            f"(target <= {row['target_max']:g}x: {verdict})"
            + ("" if row["clean"] else "; calls failed: retransmissions are in the CPU")
        )
        print(
            f"             redis-server CPU {_fmt(server)} us/call (idle, in the memory run: "
            f"{_fmt(row['redis_server_idle_us_per_call'])}); proxy + redis-server {_fmt(both)} us/call"
            + ("" if both is None or not memory else f" = {both / memory:.2f}x memory")
        )
        print(
            f"             INVITE->200 mean {_fmt(mean['memory'], '.2f')} -> {_fmt(mean['redis'], '.2f')} ms "
            f"({_fmt(added, '+.2f')}), p99 {_fmt(p99['memory'])} -> {_fmt(p99['redis'])} ms"
        )
    check = report.get("policy_check")
    shown = [run for run in report["runs"] if run["system"] == POLICIES_REDIS]
    shown += [check | {"system": f"{check['system']}*"}] if check else []
    print(
        "\nround trips to Redis (INFO commandstats before/after each Redis run; one EVALSHA: one round trip):"
    )
    width = max(len(run["system"]) for run in shown) if shown else 8
    header = (
        f"{'system':<{width}} {'CPS':>5} {'INVITEs':>7} {'scripts':>7} {'/INVITE':>7} {'cold':>4} "
        f"{'w/ cold':>7} {'release':>7} {'/call':>5} {'renew':>5} {'us/script':>9} {'conns':>5} "
        f"{'fallbacks':>9}"
    )
    print(header)
    print("-" * len(header))
    for run in shown:
        scripts = run["redis_scripts"]
        release = scripts.get("release")
        per_call = None if release is None or not run["ok"] else release / run["ok"]
        print(
            f"{run['system']:<{width}} {run['rate']:>5} {_fmt(run['redis_invites']):>7} "
            f"{_fmt(scripts.get('script_calls')):>7} {_fmt(run['redis_round_trips_per_invite'], '.3f'):>7} "
            f"{_fmt(scripts.get('noscript', 0) + scripts.get('script_load', 0) if scripts else None):>4} "
            f"{_fmt(run['redis_round_trips_with_cold'], '.4f'):>7} {_fmt(release):>7} "
            f"{_fmt(per_call, '.2f'):>5} {_fmt(scripts.get('renewal')):>5} "
            f"{_fmt(run['redis_script_usec'], '.1f'):>9} {_fmt(run['redis_connections']):>5} "
            f"{sum(run['state_events'].values()):>9}"
        )
    print(
        "INVITEs: calls placed (judged once each); scripts: EVALSHA calls; /INVITE: per-INVITE script\n"
        "calls / INVITEs; cold: EVALSHAs refused NOSCRIPT + SCRIPT LOADs (the scripts are flushed before\n"
        "each run; redis-py loads a script when told NOSCRIPT, once per caller waiting on it); w/ cold:\n"
        "(per-INVITE script calls + cold) / INVITEs; release: release script calls (one per call that\n"
        "held slots, after its BYE, off the INVITE's path), /call: per successful call; renew: lease\n"
        "renewals (every lease/3 = 20 s: none in a shorter run); us/script: Redis's own time per script\n"
        "call (commandstats); conns: connections opened to Redis during the run; fallbacks: lines\n"
        "state.unavailable, state.breaker_open, state.renew_failed, policy.timeout in the proxy's log\n"
        "(with fail_mode open, such a call is counted on this instance alone)."
    )
    for run in shown:
        scripts = run["redis_scripts"]
        admitted = scripts.get("admitted")
        if admitted is not None and admitted != run["ok"]:
            print(
                f"  {run['system']} @ {run['rate']} CPS: the per-INVITE script committed the slots of "
                f"{admitted:g} calls, {run['ok']} calls succeeded"
            )
    redis = report.get("redis", {})
    print(
        f"\nredis-server {redis.get('version')}: {_fmt(redis.get('cpu_s_total'), '.2f')} s CPU in all, "
        f"peak memory {redis.get('used_memory_peak', 'n/a')}, exit status {redis.get('exit_status')}"
        + (f", files kept in {redis['workdir']}" if redis.get("workdir") else "")
    )
    print(
        "INVITE->200 is SIPp's measure, on a clock that moves in steps (4 ms on this machine): p50, p99 and\n"
        "max are whole steps; the mean, over calls that start anywhere within a step, is the fair figure."
    )
    if check:
        print_policy_check(check)


def print_policy_check(check: dict[str, Any], expected: list[str] | None = None) -> None:
    """The info-level check run: rules loaded, 0 rejections and warnings, proxy.stopped, the control call."""
    if check:
        counters = check["proxy_counters"]
        rejected = sum(check["policy_rejections"].values())
        warnings = check.get("policy_warnings") or {}
        print(
            f"\npolicy check ({check['system']}* above: {check['rate']} CPS, --log-level info, "
            "call.decision lines):"
        )
        print(
            f"  rules loaded: {', '.join(check['policy_rules'] or ['none seen'])}"
            + (
                ""
                if expected is None or check["policy_rules"] == expected
                else f" (expected {', '.join(expected)})"
            )
            + f"; load: {check['ok']} ok / {check['failed']} failed of {check['calls']} calls, "
            f"{rejected} rejected by a rule"
            + (
                ""
                if not rejected
                else " (" + ", ".join(f"{k} {v}" for k, v in check["policy_rejections"].items()) + ")"
            )
            + f", {sum(warnings.values())} warned"
            + ("" if not warnings else " (" + ", ".join(f"{k} {v}" for k, v in warnings.items()) + ")")
        )
        print(
            f"  proxy.stopped: calls_answered {counters.get('calls_answered', 'n/a')}, "
            f"calls_ended {counters.get('calls_ended', 'n/a')}, "
            f"live_calls {counters.get('live_calls', 'n/a')}"
        )
        control = check["control_rejections"]
        print(
            f"  control, one call from {SPOOFED_CALLER} (not owned): "
            f"{'refused 403' if check['control_refused_403'] else 'NOT refused with 403'}, decision log "
            + (", ".join(f"reject by {k} x{v}" for k, v in control.items()) or "no reject")
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def rates(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError("expected comma-separated integers, e.g. 500,1000") from None
        if not values or any(not 1 <= value <= 20_000 for value in values):
            raise argparse.ArgumentTypeError("rates must be between 1 and 20000 CPS")
        return values

    def seconds(text: str) -> float:
        value = float(text)
        if not 0.5 <= value <= 600:
            raise argparse.ArgumentTypeError("must be between 0.5 and 600 s")
        return value

    parser = argparse.ArgumentParser(
        description="Load benchmark: SIPp UAC -> sipguard (or a bare uvloop UDP relay, or with --with-floor "
        f"{FLOOR_SCRIPT.name}) -> SIPp UAS on loopback. Reports calls ok/failed, retransmissions, proxy CPU "
        "per call and its ratio to the relay's, peak RSS and INVITE->200 response times, plus a step-up "
        "to the highest rate sipguard carries with 0 failed calls. See the module docstring for how each "
        "figure is taken.",
    )
    parser.add_argument(
        "--rates", type=rates, default=list(DEFAULT_RATES), metavar="R1,R2",
        help=f"call rates (CPS) at which every system runs (default {','.join(map(str, DEFAULT_RATES))})",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=seconds, default=DEFAULT_DURATION, metavar="S",
        help=f"seconds of calls per run: each run places rate x S calls (default {DEFAULT_DURATION:g})",
    )  # fmt: skip
    parser.add_argument(
        "--hold-ms", type=int, default=DEFAULT_HOLD_MS, metavar="MS",
        help=f"call hold between ACK and BYE, SIPp -d (default {DEFAULT_HOLD_MS})",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=1, metavar="N", help="runs of each system per rate (default 1)"
    )
    parser.add_argument(
        "--with-policies", action="store_true",
        help=f"a third system at each rate, {POLICIES}: sipguard enforcing {BENCH_POLICY.name} (caller_id, "
        f"concurrency, call_rate), all systems driven by {MIX_SCENARIO.name} (owned callers in turn); "
        f"then an info-level check run for 0 rejections and {BENCH_POLICIES_SCRIPT.name}'s per-INVITE "
        "figure. "
        "Turns the step-up off unless --step-up is given (it then steps sipguard+pol)",
    )  # fmt: skip
    parser.add_argument(
        "--with-patterns", action="store_true",
        help=f"--with-policies plus a fourth system at each rate, {PATTERNS}: sipguard enforcing "
        f"{BENCH_PATTERNS.name} (the mission rules + the pattern rules), its CPU per call against "
        f"{POLICIES}'s (target <= {TARGET_PATTERN_RATIO:g}x); the check run is then of {PATTERNS} "
        "(0 rejections, 0 warnings), and the micro-benchmark's rows are mission vs mission + patterns",
    )  # fmt: skip
    parser.add_argument(
        "--with-floor", action="store_true",
        help=f"one more system at each rate, beside the others and in the same alternating order: {FLOOR}, "
        f"{FLOOR_SCRIPT.name}, a relay doing SIP work on bytes only (Via, Max-Forwards, Record-Route, "
        "Call-ID -> client; no transactions, no policies); its CPU per call and its ratio to the relay's "
        "are reported as a reference, with no target. Not with --state-compare",
    )  # fmt: skip
    parser.add_argument(
        "--state-compare", action="store_true",
        help=f"memory vs Redis state store in one run: at each rate, {POLICIES} with its counters in memory "
        f"and {POLICIES_REDIS} with them in a redis-server this script starts (loopback, no persistence, "
        "stopped at the end), both on the allowed mix; proxy CPU per call, their ratio, the redis-server's "
        "CPU, INVITE->200 times, round trips to Redis per INVITE (INFO commandstats), then an info-level "
        "check run of the Redis one for 0 rejections. No step-up",
    )  # fmt: skip
    parser.add_argument(
        "--step-up", action=argparse.BooleanOptionalAction, default=None,
        help="step sipguard up through --step-rates until a step is not carried (default on, off with "
        "--with-policies)",
    )  # fmt: skip
    parser.add_argument(
        "--step-rates", type=rates, default=list(DEFAULT_STEP_RATES), metavar="R1,R2",
        help=f"the step-up ladder (default {','.join(map(str, DEFAULT_STEP_RATES))}); "
        "rates already run above are reused",
    )  # fmt: skip
    parser.add_argument(
        "--keep", action="store_true", help="keep every run's SIPp files (failed runs' always)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.hold_ms < 0:
        parser.error("--repeats must be >= 1 and --hold-ms >= 0")
    if args.state_compare and (args.with_policies or args.with_patterns):
        parser.error("--state-compare and --with-policies/--with-patterns are separate runs: give one")
    if args.state_compare and args.with_floor:
        parser.error("--with-floor is measured against the relay, which --state-compare does not run")
    mode = "--with-patterns" if args.with_patterns else "--with-policies"
    args.with_policies = args.with_policies or args.with_patterns  # patterns: policies and one more system
    if args.state_compare and args.step_up:
        parser.error("--state-compare has no step-up")
    if args.step_up is None:
        args.step_up = not (args.with_policies or args.state_compare)
    if args.with_policies or args.state_compare:
        mode = mode if args.with_policies else "--state-compare"
        highest = max(args.rates + (args.step_rates if args.step_up else []))
        if highest * args.duration > POLICY_BURST * POLICY_CALLERS[1]:
            parser.error(
                f"{mode}: {highest} CPS x {args.duration:g} s would present a caller number more "
                f"than {POLICY_BURST} times in a run (the per-number burst of {BENCH_POLICY.name}); "
                "shorten --duration"
            )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("sipp") is None:
        print("bench_proxy needs SIPp: run `bash .ci/setup` (installs Debian's sip-tester)", file=sys.stderr)
        return 2
    try:
        report = run_benchmark(args)
    except BenchmarkError as error:
        print(f"bench_proxy: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if all(target["met"] is not False for target in report["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
