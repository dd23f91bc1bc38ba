"""``sipguard demo``, README's first command: it runs, exits 0, and every row of its table
shows what the policy should do (answered and refused counts, by status and rule; the
scanner's messages dropped and its ban), in a table that fits 100 columns."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from sipp import LOOPBACK, REPO, SIPP, installed_sipguard

from proxy.demo import Lab, play_scan, table_row
from proxy.demo_plan import SCANNER, SCANNER_SCAN
from proxy.flood import FloodGuard
from proxy.sip.events import Address

pytestmark = [pytest.mark.sipp]

ROWS = [
    "legitimate calls",
    "scanner (svmap)",
    "spoofed caller ID",
    "trunking burst",
    "dialer burst",
    "sequential dialer",
    "agent beside it",
    "911 over limits",
]
DIALER = "+14155552050"  # the sequential dialer's number, and the agent beside it on the same account
AGENT = "+14155552005"


def table(output: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The demo's table: its lines, and scenario -> column -> text (columns are two or more
    spaces apart)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("scenario "))
    end = lines.index("", start)
    header = re.split(r"\s{2,}", lines[start].strip())
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 2 : end]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return lines[start:end], rows


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
    lines, rows = table(done.stdout)
    notes = " ".join(done.stdout.split())  # the notes under the table, unwrapped
    assert list(rows) == ROWS, report
    assert max(len(line) for line in lines) <= 100, report
    for name, row in rows.items():
        answered, refused = row["expected"].split(" + ", 1)
        assert (row["answered"], row["refused / dropped"]) == (answered, refused), f"{name}\n{report}"
        assert row["result"] == "ok", f"{name}\n{report}"
    assert rows["legitimate calls"]["refused / dropped"] == "0"
    assert rows["spoofed caller ID"]["refused / dropped"] == "5 × 403 caller_id"
    assert rows["trunking burst"]["answered"] == "2"
    assert rows["trunking burst"]["refused / dropped"] == "4 × 486 concurrency"
    assert rows["dialer burst"]["refused / dropped"] == "5 × 503 call_rate"
    assert rows["911 over limits"]["answered"] == "3"
    # the sequential dialer: 4 connect, the 5th adjacent callee is refused and boxes the number,
    # and the box refuses the rest; the agent on the same account connects every call
    sequential, agent = rows["sequential dialer"], rows["agent beside it"]
    assert (sequential["from"], sequential["sent"], sequential["answered"]) == ("callcenter", "8", "4")
    assert sequential["refused / dropped"] == "4 × 403 dialer"
    assert (agent["from"], agent["sent"], agent["answered"], agent["refused / dropped"]) == (
        "callcenter", "3", "3", "0",
    )  # fmt: skip
    assert "refused, boxed 600 s; then 3 refused by the box" in notes, report
    # the scanner: svmap's 3 messages dropped unanswered, its address banned for its User-Agent
    scanner = rows["scanner (svmap)"]
    assert (scanner["from"], scanner["sent"], scanner["answered"]) == (SCANNER, "3", "0")
    assert scanner["refused / dropped"] == "3 dropped, UA ban"
    assert f"\nbanned: {SCANNER}; no customer, and not the PBX\n" in done.stdout, report
    assert "5 of 5 × 503 carried Retry-After" in notes, report
    # the decision log: a JSON-lines file whose path is printed, one call.decision per judged call
    (path,) = re.findall(r"^decision log .*: (\S+)$", done.stdout, re.MULTILINE)
    assert Path(path).is_relative_to(tmp_path), report
    events = [json.loads(line) for line in Path(path).read_text().splitlines()]
    names = [event["event"] for event in events]
    assert names.count("call.decision") == 10 + 5 + 6 + 8 + 8 + 3, report
    assert names.count("call.emergency") == 3, report
    refused = [(e["rule"], e["account"]) for e in events if e.get("verdict") == "reject"]
    assert sorted(set(refused)) == [
        ("call_rate", "acme"),
        ("caller_id", "callcenter"),
        ("concurrency", "acme"),
        ("dialer", "callcenter"),
    ], report
    (boxed,) = [e for e in events if e["event"] == "penalty.boxed"]
    assert (boxed["rule"], boxed["subjects"], boxed["seconds"]) == ("dialer", [f"num:{DIALER}"], 600.0)
    agent_calls = [e for e in events if e["event"] == "call.decision" and e["caller_e164"] == AGENT]
    assert [(e["verdict"], e["account"]) for e in agent_calls] == [("accept", "callcenter")] * 3, report
    (banned,) = [e for e in events if e["event"] == "flood.banned"]
    assert (banned["host"], banned["reason"], banned["detail"]) == (SCANNER, "user-agent", "friendly-scanner")


def test_a_missing_svmap_is_a_differing_row_that_says_how_to_install_it(tmp_path: Path) -> None:
    """Without SIPVicious the scanner row cannot pass: it says svmap is not installed, and how
    to install it, and counts as a difference (the demo then exits 1)."""
    row = asyncio.run(
        play_scan(Lab(tmp_path), SCANNER_SCAN, Address("udp", LOOPBACK, 5060), FloodGuard(), None)
    )
    assert not row.ok
    assert re.split(r"\s{2,}", table_row(row)) == [
        "scanner (svmap)", SCANNER, "0", "0", "svmap not installed", "0 + 3 dropped, UA ban", "DIFFERS",
    ]  # fmt: skip
    assert row.notes() == ["SIPVicious svmap is not installed, so no scan ran: pip install sipvicious"]
    assert list(tmp_path.iterdir()) == []  # nothing was started
