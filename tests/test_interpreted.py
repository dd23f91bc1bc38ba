"""The sans-I/O core's tests once more, on the .py sources alone, as an install with
``SIPGUARD_PURE_PYTHON=1`` (no C compiler) runs them. The rest of the suite runs the
modules mypyc compiled (setup.py), so without this a difference between the compiled
and the interpreted core (mypyc checks types at run time, the interpreter does not)
would ship unseen on the fallback path.

Runs in a copy of the checkout without the extension modules, in a fresh interpreter.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE_TESTS = (
    "test_compiled.py",  # with SIPGUARD_PURE_PYTHON=1: proves nothing compiled was imported
    "test_core.py",
    "test_core_call_ends.py",
    "test_core_keepalive.py",
    "test_core_max_duration.py",
    "test_core_timers.py",
    "test_corpus.py",
    "test_editor.py",
    "test_framing.py",
    "test_memo.py",
    "test_parser.py",
    "test_sans_io.py",
)


def test_the_core_tests_pass_on_the_interpreted_sources(tmp_path: Path) -> None:
    skip = shutil.ignore_patterns("*.so", "__pycache__", ".hypothesis")
    for part in ("proxy", "policies", "tests"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=skip)
    env = {**os.environ, "SIPGUARD_PURE_PYTHON": "1", "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=tmp_path / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "skipped" not in summary, summary
