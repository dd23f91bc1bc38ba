"""Run sipguard and SIPp as subprocesses on loopback, for the end-to-end tests.

``Lab`` owns everything one test starts and kills whatever is still running at the end.
Readiness is waited for by events, never by fixed sleeps: sipguard is ready when it logs
``proxy.started`` (its stderr is read line by line on a thread), a SIPp UAS when its
socket shows up bound or listening in /proc/net (SIPp's ``-bg`` forks before it binds,
so its exit says nothing). Every SIPp run is bounded by ``-m`` and ``-timeout``, and every
wait here by a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "sipp-scenarios"
LOOPBACK = "127.0.0.1"
LOOPBACK6 = "::1"
SIPP = shutil.which("sipp")
SIPP_TRACE_SEPARATOR = "-" * 47


def free_ports(count: int) -> list[int]:
    """Distinct ports free for both UDP and TCP right now, on 127.0.0.1 and on ::1."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            held.append(udp)
            udp.bind((LOOPBACK, 0))
            port = udp.getsockname()[1]
            try:
                for family, host in ((socket.AF_INET, LOOPBACK), (socket.AF_INET6, LOOPBACK6)):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        if (family, kind) == (socket.AF_INET, socket.SOCK_DGRAM):
                            continue  # that one is ``udp``
                        other = socket.socket(family, kind)
                        held.append(other)
                        other.bind((host, port))
            except OSError:
                continue
            ports.append(port)
    finally:
        for sock in held:
            sock.close()
    return ports


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``condition()`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _proc_net_host(host: str) -> str:
    """``host`` as /proc/net/{udp,tcp}[6] spell it: hex, each 32-bit word in host (little-endian) order."""
    packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    return "".join(packed[i : i + 4][::-1].hex().upper() for i in range(0, len(packed), 4))


def socket_bound(port: int, transport: str, host: str = LOOPBACK) -> bool:
    """True when some process has a UDP socket bound, or a TCP socket listening, on host:port
    (an IPv6 host is looked for in /proc/net/udp6 and tcp6)."""
    table = Path(f"/proc/net/{transport}{'6' if ':' in host else ''}")
    wildcard = "::" if ":" in host else "0.0.0.0"
    wanted = {f"{_proc_net_host(address)}:{port:04X}" for address in (host, wildcard)}
    for line in table.read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] in wanted and (transport == "udp" or fields[3] == "0A"):  # 0A: LISTEN
            return True
    return False


# -- sipguard ---------------------------------------------------------------------------------
@dataclass
class GuardLog:
    """What a stopped sipguard printed: its JSON log events and any line that was not JSON."""

    returncode: int
    events: list[dict[str, Any]]
    garbage: list[str]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.events if entry.get("event") == event]

    @property
    def stopped(self) -> dict[str, Any]:
        stopped = self.named("proxy.stopped")
        assert len(stopped) == 1, f"expected one proxy.stopped line, got {stopped}"
        return stopped[0]

    def counter(self, name: str) -> int:
        value = self.stopped.get(name, 0)
        assert isinstance(value, int)
        return value

    def summary(self) -> str:
        lines = [json.dumps(entry) for entry in self.events[-40:]]
        return "\n".join(lines + self.garbage[-40:])


def guard_command(listen: Sequence[str], upstream: str) -> list[str]:
    """``python -m proxy.cli run ...`` with JSON logs at debug, where every ``call.ended`` is."""
    argv = [sys.executable, "-m", "proxy.cli", "run"]
    for address in listen:
        argv += ["--listen", address]
    return [*argv, "--upstream", upstream, "--log-format", "json", "--log-level", "debug"]


def installed_sipguard() -> str:
    """The ``sipguard`` console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "sipguard"
    found = str(beside) if beside.exists() else shutil.which("sipguard")
    assert found, "the sipguard console script is not installed (pip install -e .)"
    return found


def checkout_env() -> dict[str, str]:
    """The environment for a sipguard subprocess that runs this checkout's code: the
    console script imports whichever checkout the venv was installed from (another git
    worktree, say) unless this one comes first on the path."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


class GuardProcess:
    def __init__(self, argv: Sequence[str], log_path: Path | None = None) -> None:
        self.argv = list(argv)
        self.log_path = log_path  # a copy of stderr, for a post-mortem
        self.events: list[dict[str, Any]] = []
        self.garbage: list[str] = []
        self._started = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> GuardProcess:
        self._process = subprocess.Popen(
            self.argv,
            cwd=REPO,
            env=checkout_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._started.wait(timeout)
        if not any(entry.get("event") == "proxy.started" for entry in self.events):
            self.kill()
            raise AssertionError(f"sipguard did not start: {self.argv}\n" + "\n".join(self.garbage))
        return self

    @property
    def exited(self) -> bool:
        return self._process is not None and self._process.poll() is not None

    def send_signal(self, sig: signal.Signals) -> None:
        assert self._process is not None and not self.exited, "sipguard is not running"
        self._process.send_signal(sig)

    def _read(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        copy = self.log_path.open("w") if self.log_path else None
        for raw in self._process.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if copy is not None:
                copy.write(line + "\n")
                copy.flush()
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                self.events.append(entry)
                if entry.get("event") == "proxy.started":
                    self._started.set()
            elif line.strip():
                self.garbage.append(line)
        if copy is not None:
            copy.close()
        self._started.set()  # EOF: whoever waits for the start should look now

    def stop(self, timeout: float = 30.0) -> GuardLog:
        """SIGTERM, wait for the drain and exit, and return the whole log."""
        assert self._process is not None and self._reader is not None
        self._process.send_signal(signal.SIGTERM)
        returncode = self._process.wait(timeout)
        self._reader.join(timeout)
        return GuardLog(returncode=returncode, events=list(self.events), garbage=list(self.garbage))

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)


# -- SIPp -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TracedMessage:
    """One SIP message from a SIPp -trace_msg log, as SIPp sent or received it."""

    direction: str  # "sent" or "received"
    transport: str  # "UDP" or "TCP"
    text: str
    at: float = 0.0  # when SIPp logged it, in seconds (its local wall clock: compare, don't print)

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]

    @property
    def method(self) -> str | None:
        first = self.first_line
        return None if first.startswith("SIP/2.0") else first.split(" ", 1)[0]

    def headers(self, name: str) -> list[str]:
        """The values of every ``name`` header line, in order (long form names only)."""
        head = self.text.split("\n\n", 1)[0]
        prefix = name.lower() + ":"
        return [
            line.split(":", 1)[1].strip() for line in head.split("\n")[1:] if line.lower().startswith(prefix)
        ]

    @property
    def top_via(self) -> str:
        return self.headers("via")[0].split(",")[0].strip()


def parse_trace(text: str) -> list[TracedMessage]:
    messages: list[TracedMessage] = []
    for block in text.replace("\r\n", "\n").split(SIPP_TRACE_SEPARATOR):
        lines = block.split("\n")
        header = lines[1] if len(lines) > 1 else ""
        words = header.split()
        if len(words) < 3 or words[1] != "message" or words[2] not in ("sent", "received"):
            continue  # the separator's timestamp line, an "Unexpected ..." note, a "lost" note
        body = "\n".join(lines[2:]).strip("\n")
        stamp = datetime.strptime(lines[0].strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
        messages.append(TracedMessage(direction=words[2], transport=words[0], text=body, at=stamp))
    return messages


@dataclass
class SippResult:
    name: str
    returncode: int
    stats: dict[str, str]
    messages: list[TracedMessage]
    errors: str
    screen: str

    def count(self, name: str) -> int:
        return int(self.stats[name])

    @property
    def successful(self) -> int:
        return self.count("SuccessfulCall(C)")

    @property
    def failed(self) -> int:
        return self.count("FailedCall(C)")

    def requests(self, direction: str, method: str) -> list[TracedMessage]:
        return [m for m in self.messages if m.direction == direction and m.method == method]

    def summary(self) -> str:
        return f"SIPp {self.name}: rc={self.returncode}\n{self.screen[-3000:]}\n{self.errors[-3000:]}"


def _read_stats(path: Path) -> dict[str, str]:
    """The last row of a SIPp -trace_stat CSV: cumulative counters at exit."""
    if not path.exists():
        return {}
    rows = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0].split(";"), rows[-1].split(";"), strict=False))


class Sipp:
    """One SIPp process: a UAC placing calls or a UAS standing in for the PBX."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        scenario: str,
        port: int,
        calls: int,
        remote: str | None = None,
        transport: str = "u1",
        rate: float = 10.0,
        timeout: float = 30.0,
        extra: Sequence[str] = (),
        host: str = LOOPBACK,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.transport = transport
        self.timeout = timeout
        self._files = {kind: workdir / f"{name}.{kind}" for kind in ("messages", "stats", "errors", "screen")}
        scenario_args = ["-sf", str(SCENARIOS / scenario)] if scenario.endswith(".xml") else ["-sn", scenario]
        assert SIPP is not None, "SIPp is not installed"
        self.argv = [
            SIPP, *scenario_args,
            "-i", host, "-p", str(port), "-t", transport,
            "-m", str(calls), "-r", str(rate), "-timeout", str(int(timeout)), "-timeout_error",
            "-nostdin",
            "-trace_msg", "-message_file", str(self._files["messages"]),
            "-trace_stat", "-stf", str(self._files["stats"]),
            "-trace_err", "-error_file", str(self._files["errors"]),
            *extra,
        ]  # fmt: skip
        if remote is not None:
            self.argv.append(remote)
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Sipp:
        screen = self._files["screen"].open("wb")
        with screen:
            self._process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=screen, stderr=subprocess.STDOUT
            )
        return self

    def wait_listening(self, timeout: float = 10.0) -> Sipp:
        kind = "udp" if self.transport.startswith("u") else "tcp"

        def ready() -> bool:
            assert self._process is not None
            if self._process.poll() is not None:
                raise AssertionError(f"SIPp {self.name} exited early:\n{self._read_screen()}")
            return socket_bound(self.port, kind, self.host)

        wait_until(ready, timeout, f"SIPp {self.name} to bind {kind} port {self.port}")
        return self

    def wait(self, timeout: float | None = None) -> SippResult:
        """Wait for SIPp to finish on its own (``-m`` calls done, or ``-timeout``)."""
        assert self._process is not None
        returncode = self._process.wait(self.timeout + 15 if timeout is None else timeout)
        return self._result(returncode)

    def stop(self) -> SippResult:
        """End SIPp now (a UAS whose caller is done); its logs are flushed as it goes."""
        assert self._process is not None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        returncode = self._process.wait(15)
        return self._result(returncode)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)

    def _read_screen(self) -> str:
        path = self._files["screen"]
        return path.read_text(errors="replace") if path.exists() else ""

    def _result(self, returncode: int) -> SippResult:
        messages_path, errors_path = self._files["messages"], self._files["errors"]
        return SippResult(
            name=self.name,
            returncode=returncode,
            stats=_read_stats(self._files["stats"]),
            messages=parse_trace(messages_path.read_text(errors="replace")) if messages_path.exists() else [],
            errors=errors_path.read_text(errors="replace") if errors_path.exists() else "",
            screen=self._read_screen(),
        )


@dataclass
class Lab:
    """Everything one test started; ``close`` kills what is still running."""

    workdir: Path
    guards: list[GuardProcess] = field(default_factory=list)
    sipps: list[Sipp] = field(default_factory=list)

    def __post_init__(self) -> None:
        # A missing SIPp fails the end-to-end tests: a skipped test must never pass for one that ran.
        if SIPP is None:
            pytest.fail("SIPp is not installed: run `bash .ci/setup` (installs Debian's sip-tester)")

    def guard(self, listen: Sequence[str], upstream: str) -> GuardProcess:
        return self.guard_argv(guard_command(listen, upstream))

    def guard_argv(self, argv: Sequence[str]) -> GuardProcess:
        guard = GuardProcess(argv, self.workdir / f"sipguard-{len(self.guards)}.log")
        self.guards.append(guard)
        return guard.start()

    def uas(self, scenario: str, port: int, *, calls: int, transport: str = "u1", **options: Any) -> Sipp:
        """A SIPp UAS standing in for the PBX, started and bound before this returns."""
        name = f"uas-{len(self.sipps)}"
        uas = Sipp(
            self.workdir, name, scenario=scenario, port=port, calls=calls, transport=transport, **options
        )
        self.sipps.append(uas)
        return uas.start().wait_listening()

    def uac(self, scenario: str, port: int, remote: str, *, calls: int, **options: Any) -> SippResult:
        """Run a SIPp UAC to the end and return what it reports."""
        name = f"uac-{len(self.sipps)}"
        uac = Sipp(self.workdir, name, scenario=scenario, port=port, calls=calls, remote=remote, **options)
        self.sipps.append(uac)
        return uac.start().wait()

    def close(self) -> None:
        for sipp in self.sipps:
            sipp.kill()
        for guard in self.guards:
            guard.kill()
