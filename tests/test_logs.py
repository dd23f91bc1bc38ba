"""The log set-up: JSON lines carry tracebacks, and a log nobody reads any more never
stops the proxy (its writes are lost, not raised)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import structlog
from sipp import checkout_env, free_ports, guard_command

from proxy.logs import LossyStream, configure_logging


def test_json_lines_carry_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    configure_logging("info", "json")
    try:
        try:
            raise RuntimeError("a bug in a policy")
        except RuntimeError:
            structlog.get_logger("sipguard").exception("policy.error", call_id="c1")
    finally:
        structlog.reset_defaults()
    line = json.loads(stderr.getvalue())
    assert line["event"] == "policy.error"
    [trace] = line["exception"]
    assert trace["exc_type"] == "RuntimeError" and trace["exc_value"] == "a bug in a policy"


def test_a_closed_log_pipe_loses_lines_instead_of_raising() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = LossyStream(os.fdopen(write_end, "w", buffering=1))
    stream.write("a line nobody reads\n")
    stream.flush()
    assert stream.lost == 1


def test_sigterm_stops_the_proxy_after_its_log_reader_has_gone() -> None:
    """A supervisor whose log pipe closed (a crashed log shipper) must still be able to stop
    sipguard: the stopping line fails to be written, and the stop goes on."""
    listen, upstream = free_ports(2)
    command = guard_command([f"udp:127.0.0.1:{listen}"], f"udp:127.0.0.1:{upstream}")
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=checkout_env())
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 20
        while b"proxy.started" not in process.stderr.readline():  # blocks line by line: no sleep
            assert time.monotonic() < deadline and process.poll() is None, "sipguard did not start"
        process.stderr.close()  # the reader goes away; sipguard's next log write hits a closed pipe
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
