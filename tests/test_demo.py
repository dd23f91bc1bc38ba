"""``sipguard demo``, README's first command: it runs, exits 0, and every row of its table
shows what the policy should do (connected and refused counts, by status and rule)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from sipp import REPO, SIPP, installed_sipguard

pytestmark = [pytest.mark.sipp]

ROWS = ["legitimate calls", "spoofed caller ID", "trunking burst", "dialer burst", "emergency over limits"]


def table(output: str) -> dict[str, dict[str, str]]:
    """The demo's table: scenario -> column -> text (columns are two or more spaces apart)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("scenario "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_demo_every_scenario_as_expected(tmp_path: Path) -> None:
    if SIPP is None:
        pytest.fail("SIPp is not installed: run `bash .ci/setup` (installs Debian's sip-tester)")
    done = subprocess.run(
        [installed_sipguard(), "demo"],
        cwd=REPO,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # the demo's temporary directory goes here
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, report
    assert done.stderr == "", report  # the log goes to its file unless --log-format console
    rows = table(done.stdout)
    assert list(rows) == ROWS, report
    for name, row in rows.items():
        connected, refused = row["expected (connected + refused)"].split(" + ", 1)
        assert (row["connected"], row["refused"]) == (connected, refused), f"{name}\n{report}"
        assert row["result"] == "ok", f"{name}\n{report}"
    assert rows["legitimate calls"]["refused"] == "0"
    assert rows["spoofed caller ID"]["refused"] == "5 × 403 caller_id"
    assert rows["trunking burst"]["connected"] == "2"
    assert rows["trunking burst"]["refused"] == "4 × 486 concurrency"
    assert rows["dialer burst"]["refused"] == "5 × 503 call_rate"
    assert rows["emergency over limits"]["connected"] == "3"
    assert "5 of 5 × 503 carried Retry-After" in done.stdout, report
    # the decision log: a JSON-lines file whose path is printed, one call.decision per judged call
    (path,) = re.findall(r"^decision log .*: (\S+)$", done.stdout, re.MULTILINE)
    assert Path(path).is_relative_to(tmp_path), report
    events = [json.loads(line) for line in Path(path).read_text().splitlines()]
    names = [event["event"] for event in events]
    assert names.count("call.decision") == 10 + 5 + 6 + 8, report
    assert names.count("call.emergency") == 3, report
    refused = [(e["rule"], e["account"]) for e in events if e.get("verdict") == "reject"]
    assert sorted(set(refused)) == [
        ("call_rate", "acme"),
        ("caller_id", "callcenter"),
        ("concurrency", "acme"),
    ], report
